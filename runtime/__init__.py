"""Thin runtime: load a compiled artifact and run prefill/decode/generate over its engine."""
from __future__ import annotations


def load(path, **options):
    """``kvc.load(path, max_batch=1, device="cpu")`` -> KvcModel (see kvc.runtime.model)."""
    from kvc.runtime.model import LoadOptions, load as _load

    return _load(path, LoadOptions(**options))
