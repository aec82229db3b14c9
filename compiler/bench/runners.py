"""One interface over every engine `kvc bench` compares: run tokens after the cached ones,
return the last position's logits, rewind the cache to a shorter length, and read or write the
cache rows directly (for the synthetic prefill that makes deep contexts cheap to reach).

The concat baselines keep the KV cache the way a straightforward implementation does:
``torch-concat`` grows it with torch.cat inside the model, ``ort-concat`` feeds the previous
step's present tensors back as the next step's past (the copies that implies are part of what
is measured). ``torch-static`` preallocates the cache and writes in place, as gpt-fast does
(kvc.compiler.bench.torch_static). The kvc engines update their ring buffers in place.

Cache tensors cross this interface as {contract past name: array [B, kv_heads, L, D]} in the
engine's stored dtype (scale rings [B, kv_heads, L, 1] included), so what one runner reads
another of the same cache dtype can write.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from kvc.compiler.bench.options import EngineName
from kvc.contract import ATTENTION_MASK, INPUT_IDS, KINDS, PAST_PREFIX, POSITION_IDS, PRESENT_PREFIX, past_name
from kvc.models.config import ModelConfig

CacheRows = dict[str, np.ndarray]  # contract past name -> [B, kv_heads, L, D] (stored dtype)


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

    def read_cache(self, length: int) -> CacheRows:
        """Copies of the first ``length`` slots of every cache tensor, all rows of the last step."""
        ...

    def write_cache(self, rows: CacheRows) -> None:
        """Make ``rows`` the whole cache (length = their slot count), as if a prefill had written them."""
        ...

    def kv_bytes_per_token(self) -> int:
        """Stored bytes one cached token takes in one row: K and V, all layers, scales included."""
        ...


def concat_kv_bytes_per_token(config: ModelConfig) -> int:
    """An fp32 K and V per layer and kv head (the baselines' cache)."""
    return 2 * config.num_layers * config.num_kv_heads * config.resolved_head_dim * 4


def _layer_names(num_layers: int) -> list[tuple[str, str]]:
    return [(past_name(i, KINDS[0]), past_name(i, KINDS[1])) for i in range(num_layers)]


class KvcRunner:
    """A loaded kvc artifact (ORT or TVM engine): the caches stay where they are; only the
    per-sequence length moves, so a rewind costs nothing and later steps overwrite the slots."""

    def __init__(self, model, engine: EngineName, kv_dtype: str, batch: int = 1):
        self.model, self.engine, self.kv_dtype, self.batch = model, engine, kv_dtype, batch
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

    def read_cache(self, length: int) -> CacheRows:
        engine = self.model.engine
        per_row = [engine.read_slots(row, length) for row in range(self.batch)]
        return {name: np.stack([row[i] for row in per_row]) for i, name in enumerate(engine.cache_inputs)}

    def write_cache(self, rows: CacheRows) -> None:
        engine = self.model.engine
        for row in range(self.batch):  # the engines' own row writer: their buffers stay where they are
            engine.write_slots(row, [rows[name][row] for name in engine.cache_inputs])
        self.length = next(iter(rows.values())).shape[2]

    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token()


def open_kvc(artifact: Path, engine: EngineName, kv_dtype: str, batch: int, threads: int) -> KvcRunner:
    from kvc.runtime.model import LoadOptions, load

    return KvcRunner(load(artifact, LoadOptions(max_batch=batch, threads=threads)), engine, kv_dtype, batch)


class _TorchThreads:
    def __init__(self, threads: int):
        import torch

        self.threads = threads
        torch.set_num_threads(threads)

    def _keep_threads(self) -> None:
        import torch

        if torch.get_num_threads() != self.threads:  # another library may have changed it
            torch.set_num_threads(self.threads)


class TorchRunner(_TorchThreads):
    """PyTorch eager on kvc's own model definition, fp32, torch.no_grad, concat KV (torch.cat per step)."""

    engine = EngineName.TORCH_CONCAT
    kv_dtype = "fp32"

    def __init__(self, model, threads: int):
        from kvc.models import empty_past

        super().__init__(threads)
        self.model = model.eval()
        self._empty = empty_past(model.config, 1)
        self.past = None
        self.length = 0

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        self._keep_threads()
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

    def read_cache(self, length: int) -> CacheRows:
        names = _layer_names(len(self.past))
        return {n: t[:, :, :length].numpy().copy() for (nk, nv), kv in zip(names, self.past)
                for n, t in ((nk, kv[0]), (nv, kv[1]))}

    def write_cache(self, rows: CacheRows) -> None:
        import torch

        names = _layer_names(self.model.config.num_layers)
        self.past = [(torch.from_numpy(np.ascontiguousarray(rows[k], np.float32)),
                      torch.from_numpy(np.ascontiguousarray(rows[v], np.float32))) for k, v in names]
        self.length = next(iter(rows.values())).shape[2]

    def kv_bytes_per_token(self) -> int:
        return concat_kv_bytes_per_token(self.model.config)


class TorchStaticRunner(_TorchThreads):
    """PyTorch eager, fp32, static preallocated cache of ``capacity`` slots written in place."""

    engine = EngineName.TORCH_STATIC
    kv_dtype = "fp32"

    def __init__(self, model, threads: int, capacity: int):
        super().__init__(threads)
        self.model, self.capacity = model.eval(), capacity
        self.cache = None
        self.length = 0

    def _cache_for(self, batch: int):
        from kvc.compiler.bench.torch_static import StaticKVCache

        if self.cache is None or self.cache.batch != batch:
            self.cache = StaticKVCache.allocate(self.model.config, batch, self.capacity)
        return self.cache

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        from kvc.compiler.bench.torch_static import static_forward

        self._keep_threads()
        cache = self._cache_for(input_ids.shape[0])
        logits = static_forward(self.model, cache, torch.from_numpy(input_ids), self.length)
        self.length += input_ids.shape[1]
        return logits[:, -1].numpy()

    def rewind(self, length: int) -> None:
        self.length = length  # slots past `length` are overwritten by the next steps, never read

    def read_cache(self, length: int) -> CacheRows:
        names = _layer_names(self.model.config.num_layers)
        return {n: t[:, :, :length].numpy().copy() for (nk, nv), k, v in
                zip(names, self.cache.keys, self.cache.values) for n, t in ((nk, k), (nv, v))}

    def write_cache(self, rows: CacheRows) -> None:
        import torch

        length = next(iter(rows.values())).shape[2]
        cache = self._cache_for(next(iter(rows.values())).shape[0])
        for (nk, nv), k, v in zip(_layer_names(self.model.config.num_layers), cache.keys, cache.values):
            k[:, :, :length] = torch.from_numpy(np.asarray(rows[nk], np.float32))
            v[:, :, :length] = torch.from_numpy(np.asarray(rows[nv], np.float32))
        self.length = length

    def kv_bytes_per_token(self) -> int:
        return concat_kv_bytes_per_token(self.model.config)


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
        self.past_shapes = {i.name: i.shape for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)}
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
        feed = {INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
                ATTENTION_MASK: np.ones((batch, total), np.int64),
                POSITION_IDS: np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (batch, seq)).copy(),
                **self.past}
        outputs = self.session.run(self.output_names, feed)
        self.past = {name.replace(PRESENT_PREFIX, PAST_PREFIX, 1): value
                     for name, value in zip(self.output_names[1:], outputs[1:])}
        self.length = total
        return outputs[0][:, -1]

    def rewind(self, length: int) -> None:
        if self.past is not None:
            self.past = {n: np.ascontiguousarray(v[:, :, :length]) for n, v in self.past.items()}
        self.length = length

    def read_cache(self, length: int) -> CacheRows:
        return {n: v[:, :, :length].copy() for n, v in self.past.items()}

    def write_cache(self, rows: CacheRows) -> None:
        self.past = {n: np.ascontiguousarray(rows[n], np.float32) for n in self.past_shapes}
        self.length = next(iter(rows.values())).shape[2]

    def kv_bytes_per_token(self) -> int:
        return sum(4 * int(s[1]) * int(s[3]) for s in self.past_shapes.values())
