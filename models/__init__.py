"""Own compact torch definitions of decoder-only families, their loaders and ONNX export."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvc.models.config import Family, ModelConfig, RopeScaling, RopeScalingKind

if TYPE_CHECKING:  # torch is imported lazily: `kvc plan` and config-only users never load it
    import torch

__all__ = ["Family", "ModelConfig", "RopeScaling", "RopeScalingKind", "build_model", "random_model",
           "empty_past"]


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Instantiate the torch module for ``config`` (weights uninitialised by any checkpoint)."""
    if config.family is Family.GPT2:
        from kvc.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel(config)
    from kvc.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(config)


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """A model with seeded normal(0, std) weights and unit norm scales: same seed, same weights."""
    import torch

    model = build_model(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen) * (5.0 if p.ndim == 1 else 1.0))
    return model.eval()


def empty_past(config: ModelConfig, batch: int, dtype: "torch.dtype | None" = None,
               length: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import torch

    dtype = dtype or torch.float32
    shape = (batch, config.num_kv_heads, length, config.resolved_head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(config.num_layers)]
