"""One interface over every engine `kvc bench` compares: run tokens after the cached ones,
return the last position's logits, and rewind the cache to a shorter length.

The baselines keep the KV cache the way a straightforward implementation does, in the concat
form: ``torch`` grows it with torch.cat inside the model, ``ort-concat`` feeds the previous
step's present tensors back as the next step's past (the copies that implies are part of what
is measured). The kvc engines update their ring buffers in place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from kvc.compiler.bench.options import EngineName


class Runner(Protocol):
    engine: EngineName
    kv_dtype: str
    length: int  # tokens cached per sequence

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """Run ``input_ids`` [B, S] after the cached tokens; logits of the last position [B, V]."""
        ...

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens (0: an empty cache)."""
        ...


class KvcRunner:
    """A loaded kvc artifact (ORT or TVM engine): the caches stay where they are; only the
    per-sequence length moves, so a rewind costs nothing and later steps overwrite the slots."""

    def __init__(self, model, engine: EngineName, kv_dtype: str):
        self.model, self.engine, self.kv_dtype = model, engine, kv_dtype
        self.length = 0

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        past = np.full(input_ids.shape[0], self.length, dtype=np.int64)
        if input_ids.shape[1] == 1:
            logits = self.model.decode(input_ids[:, 0], past)
        else:
            logits = self.model.prefill(input_ids, past)[:, -1]
        self.length += input_ids.shape[1]
        return logits

    def rewind(self, length: int) -> None:
        self.length = length


def open_kvc(artifact: Path, engine: EngineName, kv_dtype: str, batch: int, threads: int) -> KvcRunner:
    from kvc.runtime.model import LoadOptions, load

    return KvcRunner(load(artifact, LoadOptions(max_batch=batch, threads=threads)), engine, kv_dtype)


class TorchRunner:
    """PyTorch eager on kvc's own model definition, fp32, torch.no_grad, concat KV."""

    engine = EngineName.TORCH
    kv_dtype = "fp32"

    def __init__(self, model, threads: int):
        import torch

        from kvc.models import empty_past

        self.model, self.threads = model.eval(), threads
        self._empty = empty_past(model.config, 1)
        self.past = None
        self.length = 0
        torch.set_num_threads(threads)

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        if torch.get_num_threads() != self.threads:  # another library may have changed it
            torch.set_num_threads(self.threads)
        batch, seq = input_ids.shape
        if self.past is None:
            self.past = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._empty]
        total = self.length + seq
        positions = torch.arange(self.length, total).expand(batch, seq)
        with torch.no_grad():
            logits, self.past = self.model(torch.from_numpy(input_ids), torch.ones(batch, total, dtype=torch.long),
                                           positions, self.past)
        self.length = total
        return logits[:, -1].numpy()

    def rewind(self, length: int) -> None:
        if self.past is not None:
            self.past = [(k[:, :, :length].contiguous(), v[:, :, :length].contiguous()) for k, v in self.past]
        self.length = length


class OrtConcatRunner:
    """ONNX Runtime (CPU, default graph optimizations) on the unoptimized concat export."""

    engine = EngineName.ORT_CONCAT
    kv_dtype = "fp32"

    def __init__(self, onnx_path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_shapes = {i.name: i.shape for i in self.session.get_inputs()
                            if i.name.startswith("past_key_values.")}
        self.past: dict[str, np.ndarray] | None = None
        self.length = 0

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, int(shape[1]), 0, int(shape[3])), np.float32)
                for name, shape in self.past_shapes.items()}

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        if self.past is None:
            self.past = self._empty_past(batch)
        total = self.length + seq
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ones((batch, total), np.int64),
                "position_ids": np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (batch, seq)).copy(),
                **self.past}
        outputs = self.session.run(self.output_names, feed)
        self.past = {name.replace("present.", "past_key_values.", 1): value
                     for name, value in zip(self.output_names[1:], outputs[1:])}
        self.length = total
        return outputs[0][:, -1]

    def rewind(self, length: int) -> None:
        if self.past is not None:
            self.past = {n: np.ascontiguousarray(v[:, :, :length]) for n, v in self.past.items()}
        self.length = length
