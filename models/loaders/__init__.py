"""Checkpoint loaders: Hugging Face safetensors directories, llama2.c .bin files, and the SOURCE dispatcher.

Every loader ends in ``fill_model``: it builds the own torch model for a config and copies in one tensor per
parameter, refusing a checkpoint with a missing or wrongly shaped tensor instead of leaving random weights.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvc.errors import CheckpointError
from kvc.models.config import ModelConfig

if TYPE_CHECKING:  # torch waits for a load: the SOURCE resolver below this package must stay light
    import torch

__all__ = ["LoadedCheckpoint", "fill_model"]

# Own parameter name -> its tensor (any dtype, already in the own [out, in] layout), or None when absent.
TensorSource = Callable[[str], "torch.Tensor | None"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    config: ModelConfig
    model: torch.nn.Module  # eval mode, float32
    path: Path  # the checkpoint directory or file the weights came from


def fill_model(config: ModelConfig, tensor_for: TensorSource, available: Iterable[str], where: str) -> torch.nn.Module:
    """The own model for ``config`` with every parameter copied from ``tensor_for`` (cast to float32).

    ``available`` lists the own names the checkpoint provides: a name the model has no place for means an
    architecture the config does not describe (e.g. a bias it lacks), which is refused rather than dropped.
    """
    import torch

    from kvc.models import build_model

    model = build_model(config)
    _refuse_unexpected(set(available) - set(model.state_dict()), where)
    with torch.no_grad():
        # named_parameters() lists a tied lm_head once, under the embedding's name.
        for name, param in model.named_parameters():
            tensor = tensor_for(name)
            if tensor is None:
                raise CheckpointError(f"{where} has no tensor for {name}; the checkpoint does not match its "
                                      "config (incomplete download, or another architecture)")
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{where}: tensor {name} has shape {list(tensor.shape)} but the config needs "
                                      f"{list(param.shape)}; the checkpoint does not match its config")
            param.copy_(tensor.to(torch.float32))
    return model.eval()


def _refuse_unexpected(extra: set[str], where: str) -> None:
    if extra:
        names = sorted(extra)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckpointError(f"{where} holds tensors the model for its config has no place for ({shown}); "
                              "this architecture variant is not supported")
