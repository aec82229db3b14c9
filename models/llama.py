"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) with explicit past KV.

Parameter names follow Hugging Face's LlamaForCausalLM so checkpoints load by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvc.models.config import ModelConfig
from kvc.models.layers import RMSNorm, apply_rope, attend, causal_padding_mask, rope_cos_sin, rope_inverse_frequencies

KV = tuple[Tensor, Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        d = c.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, d
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * d, c.hidden_size, bias=c.o_proj_bias)

    def forward(self, x_BSE: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past: KV) -> tuple[Tensor, KV]:
        b, s, _ = x_BSE.shape
        q = self.q_proj(x_BSE).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSE).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSE).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
        out = attend(q, k, v, mask, self.num_heads // self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x, cos, sin, mask, past: KV):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class LlamaBody(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config).float(), persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values: list[KV]) -> tuple[Tensor, list[KV]]:
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        mask = causal_padding_mask(attention_mask, input_ids.shape[1], self.config.sliding_window, x.dtype)
        presents = []
        for layer, past in zip(self.model.layers, past_key_values):
            x, present = layer(x, cos, sin, mask, past)
            presents.append(present)
        return self.lm_head(self.model.norm(x)), presents
