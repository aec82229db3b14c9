"""--verify: run ONNX Runtime on a graph before and after a pass, on the same fresh random inputs."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kvc.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, PAST_LEN, POSITION_IDS, is_past, is_scale

BATCH, SEQ, PAST = 2, 3, 4


def concat_form_inputs(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a decoder in the concat form (kvc export or optimum-style names) or the ring
    form (past_len and fixed-capacity caches, as the engine lowering passes see it)."""
    rng = np.random.default_rng(seed)
    vocab = _vocab_size(model)
    feed: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        name = value.name
        if name == INPUT_IDS:
            feed[name] = rng.integers(0, vocab, (BATCH, SEQ), dtype=np.int64)
        elif name == ATTENTION_MASK:
            feed[name] = np.ones((BATCH, PAST + SEQ), np.int64)
        elif name == POSITION_IDS:
            feed[name] = np.tile(np.arange(PAST, PAST + SEQ, dtype=np.int64), (BATCH, 1))
        elif name == PAST_LEN:
            feed[name] = np.full(BATCH, PAST, np.int64)
        elif is_past(name):
            feed[name] = _cache(rng, value)
        else:
            raise ValueError(f"--verify does not know how to fill graph input {name!r}")
    return feed


def _vocab_size(model: ir.Model) -> int:
    for out in model.graph.outputs:
        if out.name == LOGITS and out.shape is not None and isinstance(out.shape[-1], int):
            return out.shape[-1]
    return 2  # unknown: any id below the vocabulary works; 0..1 always does


def _cache(rng: np.random.Generator, value: ir.Value) -> np.ndarray:
    """Concat form: PAST tokens; ring form: its static capacity, in the cache's own dtype."""
    heads, slots, dim = value.shape[1], value.shape[2], value.shape[3]
    shape = (BATCH, int(heads), slots if isinstance(slots, int) else PAST, int(dim))
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    if is_scale(value.name):
        return rng.uniform(0.01, 0.1, shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-127, 128, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def run_ort(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def max_abs_diff(before: ir.Model, after: ir.Model, seed: int = 0) -> float:
    feed = concat_form_inputs(before, seed)
    return max(float(np.max(np.abs(a - b))) for a, b in zip(run_ort(before, feed), run_ort(after, feed)))
