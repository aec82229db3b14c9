"""Building blocks shared by the model families: RoPE, the attention mask, explicit-KV attention.

Attention is written unfused (matmul, scale, mask, softmax, matmul, GQA expand) on purpose:
the exported ONNX is the plain concat form that kvc's passes fuse and rewrite.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from kvc.models.config import ModelConfig, NormKind, RopeScalingKind


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    """1 / theta^(2i/d) per rotary pair (d: the rotary dims), with linear or llama3 frequency scaling applied."""
    d = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind is RopeScalingKind.LINEAR:
        return inv_freq / scaling.factor
    # llama3: leave high frequencies alone, divide low ones by factor, blend in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    return x_BHSD * cos_BSD.unsqueeze(1) + rotate_half(x_BHSD) * sin_BSD.unsqueeze(1)


def apply_partial_rope(x_BHSD: Tensor, cos_BSR: Tensor, sin_BSR: Tensor) -> Tensor:
    """RoPE on the first R dims of each head (R = cos.shape[-1]); the other dims pass through."""
    rotary = cos_BSR.shape[-1]
    if rotary == x_BHSD.shape[-1]:
        return apply_rope(x_BHSD, cos_BSR, sin_BSR)
    rotated = apply_rope(x_BHSD[..., :rotary], cos_BSR, sin_BSR)
    return torch.cat((rotated, x_BHSD[..., rotary:]), dim=-1)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def causal_padding_mask(attention_mask: Tensor, query_len: int, sliding_window: Optional[int],
                        dtype: torch.dtype) -> Tensor:
    """Additive mask [batch, 1, query, past+query] from a 0/1 key mask.

    Query i sits at concat index past+i; it may see key j when j <= past+i, the key is not
    padding, and (with a window) past+i - j < window. Masked entries get the dtype's lowest
    finite value, so fully masked rows (left padding) stay finite instead of NaN.
    """
    total = attention_mask.shape[-1]
    past = total - query_len
    q_idx = torch.arange(query_len, device=attention_mask.device).unsqueeze(-1) + past
    k_idx = torch.arange(total, device=attention_mask.device).unsqueeze(0)
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    zero = torch.zeros((), dtype=dtype)
    lowest = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, lowest).unsqueeze(1)


def expand_kv_heads(x_BKTD: Tensor, group: int) -> Tensor:
    """Repeat each kv head ``group`` times so GQA/MQA keys line up with query heads."""
    if group == 1:
        return x_BKTD
    b, k, t, d = x_BKTD.shape
    return x_BKTD[:, :, None].expand(b, k, group, t, d).reshape(b, k * group, t, d)


def attend(q_BHSD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, mask_B1ST: Tensor, group: int,
           scale: Optional[float] = None, softcap: Optional[float] = None) -> Tensor:
    """Softmax(q k^T x scale [-> softcap] + mask) v; scale defaults to 1/sqrt(head size)."""
    k = expand_kv_heads(k_BKTD, group)
    v = expand_kv_heads(v_BKTD, group)
    scale = 1.0 / math.sqrt(q_BHSD.shape[-1]) if scale is None else scale
    scores = torch.matmul(q_BHSD, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    scores = scores + mask_B1ST
    probs = torch.softmax(scores.float(), dim=-1).to(q_BHSD.dtype)
    return torch.matmul(probs, v)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class UnitOffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + w), in float32 before casting back."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    if kind is NormKind.LAYER:
        return nn.LayerNorm(dim, eps=eps)
    return UnitOffsetRMSNorm(dim, eps) if kind is NormKind.RMS_UNIT_OFFSET else RMSNorm(dim, eps)


def soft_cap(x: Tensor, cap: float) -> Tensor:
    """cap x tanh(x / cap): Div, Tanh, Mul in the graph (the form kvc's attention fusion reads as softcap)."""
    return torch.tanh(x / cap) * cap
