"""What a SOURCE argument names, decided in one place for `kvc export`, `kvc plan` and `kvc bench`.

Light on purpose (no torch, no onnx): the planner resolves sources without loading a model. Each
command says which kinds it accepts; ``resolve_source`` checks them in this order, and the first
that fits wins:
  1. ARTIFACT  a `kvc compile` output directory (it holds manifest.json), or that manifest.json
  2. ONNX      a .onnx file (kvc export's output, or another exporter's)
  3. PRESET    a seeded random preset id (models/presets.py); a directory of that name is ./name
  4. HF        a Hugging Face checkpoint directory, or its config.json
  5. LLAMA2C   a llama2.c .bin checkpoint
  6. KNOWN     a known model id, config only (models/known_models.py; case-insensitive)
  7. HF        a Hugging Face Hub id (owner/name), when nothing local has that name
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kvc.contract import MANIFEST_FILE
from kvc.errors import CheckpointError

HF_CONFIG_FILE = "config.json"
ONNX_SUFFIX = ".onnx"
LLAMA2C_SUFFIX = ".bin"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceKind(str, enum.Enum):
    """What SOURCE names; in the order ``resolve_source`` tries them (module docstring)."""

    ARTIFACT = "artifact"  # kvc compile's output: a model to run, with its engine
    ONNX = "onnx"  # an exported graph: compile it
    PRESET = "preset"  # seeded random weights: export, compile, run
    HF = "hf"  # a checkpoint (local or on the hub)
    LLAMA2C = "llama2c"  # a llama2.c checkpoint
    KNOWN = "known"  # a config without weights: plan only


@dataclass(frozen=True)
class ResolvedSource:
    kind: SourceKind
    source: str  # as the user wrote it
    path: Optional[Path] = None  # the local directory (ARTIFACT, HF) or file (ONNX, LLAMA2C)


def resolve_source(source: str, accept: frozenset[SourceKind]) -> ResolvedSource | None:
    """The kind of ``source`` among ``accept`` (order in the module docstring); None if none fits, so
    each command words its own error."""
    path = Path(source)
    for kind, match in _CHECKS:
        if kind in accept:
            fits, local = match(source, path)
            if fits:
                return ResolvedSource(kind, source, local)
    return None


Match = tuple[bool, Optional[Path]]  # (fits, the local path if any)
NO_MATCH: Match = (False, None)


def _artifact(source: str, path: Path) -> Match:
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        return True, path
    return (True, path.parent) if path.is_file() and path.name == MANIFEST_FILE else NO_MATCH


def _onnx(source: str, path: Path) -> Match:
    if path.suffix != ONNX_SUFFIX:
        return NO_MATCH
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; export a model with `kvc export SOURCE -o {path}`")
    return True, path


def _preset(source: str, path: Path) -> Match:
    from kvc.models.presets import RANDOM_PRESETS

    return (source in RANDOM_PRESETS), None


def _hf_local(source: str, path: Path) -> Match:
    if path.is_dir():
        return True, path
    return (True, path.parent) if path.is_file() and path.name == HF_CONFIG_FILE else NO_MATCH


def _llama2c(source: str, path: Path) -> Match:
    return (True, path) if path.is_file() and path.suffix == LLAMA2C_SUFFIX else NO_MATCH


def _known(source: str, path: Path) -> Match:
    from kvc.models.known_models import KNOWN_MODELS

    return (source.lower() in KNOWN_MODELS and not path.exists()), None


def _hub(source: str, path: Path) -> Match:
    return (HUB_ID.match(source) is not None and not path.exists()), None


_CHECKS = ((SourceKind.ARTIFACT, _artifact), (SourceKind.ONNX, _onnx), (SourceKind.PRESET, _preset),
           (SourceKind.HF, _hf_local), (SourceKind.LLAMA2C, _llama2c), (SourceKind.KNOWN, _known),
           (SourceKind.HF, _hub))
