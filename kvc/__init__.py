"""kvc: compile decoder-only LLMs to in-place ring-buffer KV engines (TVM, ONNX Runtime).

``import kvc; model = kvc.load("out.kvc")`` loads a compiled artifact.
"""
from kvc._version import __version__

__all__ = ["__version__", "load"]


def load(path, **options):
    """Load a compiled artifact directory (see ``kvc.runtime.load``)."""
    from kvc.runtime import load as _load

    return _load(path, **options)
