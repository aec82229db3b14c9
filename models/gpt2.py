"""GPT-2 with explicit past KV. Names follow Hugging Face's GPT2LMHeadModel; its Conv1D
weights ([in, out]) are transposed to nn.Linear ([out, in]) by the loader."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvc.models.config import ModelConfig
from kvc.models.layers import attend, causal_padding_mask

KV = tuple[Tensor, Tensor]


class GPT2Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.resolved_head_dim
        inner = c.num_heads * self.head_dim
        self.c_attn = nn.Linear(c.hidden_size, 3 * inner)
        self.c_proj = nn.Linear(inner, c.hidden_size)

    def forward(self, x: Tensor, mask: Tensor, past: KV) -> tuple[Tensor, KV]:
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=-1)
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
        out = attend(q, k, v, mask, 1)
        return self.c_proj(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


class GPT2MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.hidden_size, c.intermediate_size)
        self.c_proj = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, x, mask, past: KV):
        h, present = self.attn(self.ln_1(x), mask, past)
        x = x + h
        return x + self.mlp(self.ln_2(x)), present


class GPT2Body(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # GPT-2 always ties

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values: list[KV]) -> tuple[Tensor, list[KV]]:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(position_ids)
        mask = causal_padding_mask(attention_mask, input_ids.shape[1], None, x.dtype)
        presents = []
        for block, past in zip(t.h, past_key_values):
            x, present = block(x, mask, past)
            presents.append(present)
        return self.lm_head(t.ln_f(x)), presents
