"""The RoPE decoder with explicit past KV: Llama 2/3, Mistral, Qwen2/3, SmolLM/SmolLM3, TinyLlama, Phi-3,
Gemma/Gemma2, OLMo2, Granite, StableLM. ModelConfig's feature fields pick the variant (norm kind and placement,
q/k norm, partial rotary, NoPE layers, per-layer windows, softcapping, multipliers).

Parameter names follow Hugging Face's *ForCausalLM of each family so checkpoints load by name
(Phi-3's fused qkv_proj / gate_up_proj are split by the loader).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvc.models.config import Activation, ModelConfig, NormPlacement, QkNorm
from kvc.models.layers import (apply_partial_rope, attend, causal_padding_mask, make_norm, rope_cos_sin,
                               rope_inverse_frequencies, soft_cap)

KV = tuple[Tensor, Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        d = c.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, d
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * d, c.hidden_size, bias=c.o_proj_bias)
        self.qk_norm = c.qk_norm
        if c.qk_norm is not QkNorm.NONE:
            per_head = c.qk_norm is QkNorm.PER_HEAD
            self.q_norm = make_norm(c.norm, d if per_head else c.num_heads * d, c.norm_eps)
            self.k_norm = make_norm(c.norm, d if per_head else c.num_kv_heads * d, c.norm_eps)
        self.rotary = c.uses_rope(layer)
        self.window = c.window_for_layer(layer)
        self.scale, self.softcap = c.attention_scale, c.attn_logit_softcap

    def forward(self, x_BSE: Tensor, cos: Tensor, sin: Tensor, masks: dict, past: KV) -> tuple[Tensor, KV]:
        b, s, _ = x_BSE.shape
        q, k, v = self.q_proj(x_BSE), self.k_proj(x_BSE), self.v_proj(x_BSE)
        if self.qk_norm is QkNorm.PROJECTION:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm is QkNorm.PER_HEAD:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
        out = attend(q, k, v, masks[self.window], self.num_heads // self.num_kv_heads, self.scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.gelu = c.activation is Activation.GELU_TANH

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class _Block(nn.Module):
    """Attention and MLP sublayers; subclasses place the norms."""

    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(c, layer)
        self.mlp = LlamaMLP(c)
        self.residual_multiplier = c.residual_multiplier

    def residual(self, x: Tensor, h: Tensor) -> Tensor:
        return x + (h if self.residual_multiplier == 1.0 else h * self.residual_multiplier)


class PreNormBlock(_Block):
    """x + attn(norm(x)), then + mlp(norm(x)) (Llama, Gemma, StableLM...)."""

    def __init__(self, c: ModelConfig, layer: int):
        super().__init__(c, layer)
        self.input_layernorm = make_norm(c.norm, c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = make_norm(c.norm, c.hidden_size, c.norm_eps)

    def forward(self, x, cos, sin, masks, past: KV):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, masks, past)
        x = self.residual(x, h)
        return self.residual(x, self.mlp(self.post_attention_layernorm(x))), present


class SandwichNormBlock(_Block):
    """x + norm(attn(norm(x))), then + norm(mlp(norm(x))) (Gemma2)."""

    def __init__(self, c: ModelConfig, layer: int):
        super().__init__(c, layer)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, make_norm(c.norm, c.hidden_size, c.norm_eps))

    def forward(self, x, cos, sin, masks, past: KV):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, masks, past)
        x = self.residual(x, self.post_attention_layernorm(h))
        return self.residual(x, self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))), present


class PostNormBlock(_Block):
    """x + norm(attn(x)), then + norm(mlp(x)) (OLMo2)."""

    def __init__(self, c: ModelConfig, layer: int):
        super().__init__(c, layer)
        self.post_attention_layernorm = make_norm(c.norm, c.hidden_size, c.norm_eps)
        self.post_feedforward_layernorm = make_norm(c.norm, c.hidden_size, c.norm_eps)

    def forward(self, x, cos, sin, masks, past: KV):
        h, present = self.self_attn(x, cos, sin, masks, past)
        x = self.residual(x, self.post_attention_layernorm(h))
        return self.residual(x, self.post_feedforward_layernorm(self.mlp(x))), present


BLOCKS: dict[NormPlacement, type[_Block]] = {
    NormPlacement.PRE: PreNormBlock, NormPlacement.SANDWICH: SandwichNormBlock, NormPlacement.POST: PostNormBlock}
LlamaBlock = PreNormBlock


class LlamaBody(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(BLOCKS[c.norm_placement](c, i) for i in range(c.num_layers))
        self.norm = make_norm(c.norm, c.hidden_size, c.norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config).float(), persistent=False)
        self.windows = sorted({config.window_for_layer(i) for i in range(config.num_layers)}, key=lambda w: w or 0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values: list[KV]) -> tuple[Tensor, list[KV]]:
        c = self.config
        x = self.model.embed_tokens(input_ids)
        if c.embedding_multiplier != 1.0:
            x = x * torch.tensor(c.embedding_multiplier, dtype=x.dtype)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        masks = {w: causal_padding_mask(attention_mask, input_ids.shape[1], w, x.dtype) for w in self.windows}
        presents = []
        for layer, past in zip(self.model.layers, past_key_values):
            x, present = layer(x, cos, sin, masks, past)
            presents.append(present)
        return self.logits(self.model.norm(x)), presents

    def logits(self, h: Tensor) -> Tensor:
        logits = self.lm_head(h)
        if self.config.logits_divisor != 1.0:
            logits = logits / self.config.logits_divisor
        cap: Optional[float] = self.config.final_logit_softcap
        return logits if cap is None else soft_cap(logits, cap)
