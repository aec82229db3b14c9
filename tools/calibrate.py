"""Static FP8 KV scales: run the concat-form graph on sample text and take, per layer and kv head,
the largest |K| and |V| seen, mapped onto float8e4m3fn's largest finite value (448)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvc.contract import ATTENTION_MASK, INPUT_IDS, KINDS, POSITION_IDS, PRESENT_RE, is_past, past_for, present_name
from kvc.errors import KvcError

FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class CalibrationResult:
    key: list[list[float]]  # [layer][kv_head]
    value: list[list[float]]
    tokens: int

    def to_dict(self) -> dict:
        return {"key": self.key, "value": self.value, "tokens": self.tokens, "format": "float8e4m3fn amax/448"}


def calibrate_fp8(onnx_path: Path, token_ids: list[int], chunk: int = 256, margin: float = 1.0) -> CalibrationResult:
    """Scales from ``token_ids`` run through the concat graph in chunks of ``chunk`` tokens."""
    if len(token_ids) < 2:
        raise KvcError("calibration needs at least 2 tokens of sample text")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    if ATTENTION_MASK not in inputs or not any(is_past(n) for n in inputs):
        raise KvcError(f"{onnx_path} is not a concat-form decoder with past key/values; calibrate the "
                       "model exported by kvc export (before kvc compile)")
    outputs = [o.name for o in session.get_outputs()]
    past = {n: np.zeros([1, int(i.shape[1]), 0, int(i.shape[3])], np.float32)
            for n, i in inputs.items() if is_past(n)}
    amax: dict[str, np.ndarray] = {}
    for start in range(0, len(token_ids), chunk):
        ids = np.array([token_ids[start:start + chunk]], dtype=np.int64)
        total = start + ids.shape[1]
        feed = {INPUT_IDS: ids, ATTENTION_MASK: np.ones((1, total), np.int64),
                POSITION_IDS: np.arange(start, total, dtype=np.int64)[None], **past}
        results = dict(zip(outputs, session.run(None, feed)))
        for name, value in results.items():
            if PRESENT_RE.match(name):
                new = np.abs(value[:, :, start:]).max(axis=(0, 2, 3))
                amax[name] = np.maximum(amax.get(name, new), new)
                past[past_for(name)] = value
    layers = sorted({int(PRESENT_RE.match(n).group(1)) for n in amax})

    def table(kind: str) -> list[list[float]]:
        return [[float(max(a, 1e-6) * margin / FP8_E4M3_MAX) for a in amax[present_name(layer, kind)]]
                for layer in layers]
    key, value = (table(kind) for kind in KINDS)
    return CalibrationResult(key=key, value=value, tokens=len(token_ids))
