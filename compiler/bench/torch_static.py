"""The fair PyTorch baseline: kvc's own model weights run with a static, preallocated KV cache.

The concat baseline (`torch-concat`) grows its cache with torch.cat, so every step copies the
whole cache: that measures the concat form, not PyTorch. Here, as gpt-fast does, every layer owns
K and V buffers [batch, kv_heads, capacity, head_dim] allocated once; a step writes its new rows
with index_copy_ at their positions and attends over a view of the live slots [0, length), so a
step reads the live context once and copies nothing. Attention is torch's fused
scaled_dot_product_attention (GQA without expanding the kv heads). Eager mode, torch.no_grad.

The forward reuses the modules of kvc.models (same parameters, same RoPE and norms) and must give
the logits of the concat model: tests/compiler/test_bench_static.py checks that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc.errors import KvcError
from kvc.models.config import Family, ModelConfig

STATIC_FAMILIES = frozenset({Family.LLAMA, Family.GPT2})
from kvc.models.layers import apply_rope, rope_cos_sin


@dataclass
class StaticKVCache:
    """K and V buffers of every layer, [batch, kv_heads, capacity, head_dim], written in place."""

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, capacity: int,
                 dtype: torch.dtype = torch.float32) -> "StaticKVCache":
        shape = (batch, config.num_kv_heads, capacity, config.resolved_head_dim)
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor, live: int) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, S, D] at ``slots`` [S]; views of the first ``live`` slots (no copy)."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
        return keys[:, :, :live], values[:, :, :live]


def _mask(config: ModelConfig, start: int, seq: int) -> Tensor | None:
    """Boolean [S, start+S] (True = attend) for a prefill chunk or a sliding window; None for a plain
    decode step, which attends every live slot."""
    total = start + seq
    if seq == 1 and (config.sliding_window is None or total <= config.sliding_window):
        return None
    q_pos = torch.arange(start, total).unsqueeze(-1)
    k_pos = torch.arange(total).unsqueeze(0)
    allowed = k_pos <= q_pos
    if config.sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < config.sliding_window)
    return allowed


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _llama_forward(model, cache: StaticKVCache, input_ids: Tensor, start: int) -> Tensor:
    b, s = input_ids.shape
    positions = torch.arange(start, start + s).expand(b, s)
    slots = torch.arange(start, start + s)
    x = model.model.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
    mask = _mask(model.config, start, s)
    for i, layer in enumerate(model.model.layers):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_live, v_live = cache.update(i, slots, k, v, start + s)
        out = _attend(q, k_live, v_live, mask)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


def _gpt2_forward(model, cache: StaticKVCache, input_ids: Tensor, start: int) -> Tensor:
    b, s = input_ids.shape
    t = model.transformer
    positions = torch.arange(start, start + s).expand(b, s)
    slots = torch.arange(start, start + s)
    x = t.wte(input_ids) + t.wpe(positions)
    mask = _mask(model.config, start, s)
    for i, block in enumerate(t.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(attn.num_heads * attn.head_dim, dim=-1)
        q, k, v = (y.view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2) for y in (q, k, v))
        k_live, v_live = cache.update(i, slots, k, v, start + s)
        out = _attend(q, k_live, v_live, mask)
        x = x + attn.c_proj(out.transpose(1, 2).reshape(b, s, -1))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(t.ln_f(x))


def static_forward(model, cache: StaticKVCache, input_ids: Tensor, start: int) -> Tensor:
    """Logits [B, S, V] of ``input_ids`` [B, S] placed after ``start`` cached tokens of every row;
    their K/V are written into ``cache`` at slots start..start+S-1."""
    if start + input_ids.shape[1] > cache.capacity:
        raise ValueError(f"{start + input_ids.shape[1]} tokens exceed the static cache's {cache.capacity} slots")
    if model.config.family not in STATIC_FAMILIES:  # the other RoPE families add features this loop omits
        raise KvcError(f"the torch-static baseline covers {sorted(f.value for f in STATIC_FAMILIES)}, not "
                       f"{model.config.family.value}; bench other engines (--engines kvc-ort,kvc-tvm,...)")
    forward = _gpt2_forward if model.config.family is Family.GPT2 else _llama_forward
    with torch.no_grad():
        return forward(model, cache, input_ids, start)
