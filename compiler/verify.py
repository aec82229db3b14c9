"""--verify: run ONNX Runtime on a graph before and after a pass, on the same fresh random inputs."""
from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

BATCH, SEQ, PAST = 2, 3, 4
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def concat_form_inputs(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a decoder in the concat form (kvc export or optimum-style names)."""
    rng = np.random.default_rng(seed)
    vocab = _vocab_size(model)
    feed: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        name = value.name
        if name == "input_ids":
            feed[name] = rng.integers(0, vocab, (BATCH, SEQ), dtype=np.int64)
        elif name == "attention_mask":
            feed[name] = np.ones((BATCH, PAST + SEQ), np.int64)
        elif name == "position_ids":
            feed[name] = np.tile(np.arange(PAST, PAST + SEQ, dtype=np.int64), (BATCH, 1))
        elif _PAST.match(name):
            heads, dim = (int(d) for d in (value.shape[1], value.shape[3]))
            feed[name] = rng.standard_normal((BATCH, heads, PAST, dim)).astype(np.float32)
        else:
            raise ValueError(f"--verify does not know how to fill graph input {name!r}")
    return feed


def _vocab_size(model: ir.Model) -> int:
    for out in model.graph.outputs:
        if out.name == "logits" and out.shape is not None and isinstance(out.shape[-1], int):
            return out.shape[-1]
    return 2  # unknown: any id below the vocabulary works; 0..1 always does


def run_ort(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def max_abs_diff(before: ir.Model, after: ir.Model, seed: int = 0) -> float:
    feed = concat_form_inputs(before, seed)
    return max(float(np.max(np.abs(a - b))) for a, b in zip(run_ort(before, feed), run_ort(after, feed)))
