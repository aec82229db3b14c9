"""lower_ort_live_slots: buffers sized to the live context give the same logits as full-capacity ones.

A ring graph (fp32, int8, dynamic fp8 caches) runs step by step in ONNX Runtime twice: as compiled,
with [B, K, C, D] buffers, and lowered, with buffers that start at 8 slots and double (contents
copied) whenever a step needs more, up to C; past C (the slide policy) both wrap. Tolerance: the
same float32 graph on the same inputs, atol 1e-5 (observed 0: the masked slots get exactly zero weight).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kvc.contract import INPUT_IDS, LOGITS, PAST_LEN, POSITION_IDS, KvDtype
from kvc.errors import GraphError
from kvc.passes.kv_layout import KvCacheLayout, KvQuantOptions, RingBufferOptions
from kvc.passes.kv_quantize import KvQuantizePass
from kvc.passes.lower_ort_fp8_scatter import LowerOrtFp8ScatterPass
from kvc.passes.kv_ring_buffer import CAPACITY_INITIALIZER, SLOTS_INITIALIZER, KvRingBufferPass
from kvc.passes.lower_ort_live_slots import SLOTS_DIM, LowerOrtLiveSlotsPass
from synthetic import DecoderSpec, build_fused_decoder, random_weights

SPEC = DecoderSpec()
CAPACITY = 40
_STORAGE = {ir.DataType.FLOAT: np.float32, ir.DataType.INT8: np.int8, ir.DataType.FLOAT8E4M3FN: np.uint8}


def ring_graph(dtype: KvDtype, seed: int = 0) -> ir.Model:
    model = build_fused_decoder(SPEC, random_weights(SPEC, seed))
    KvRingBufferPass(RingBufferOptions(capacity=CAPACITY))(model)
    KvQuantizePass(KvQuantOptions(dtype))(model)
    LowerOrtFp8ScatterPass()(model)  # the ORT lowering that precedes lower_ort_live_slots
    return model


def lowered(model: ir.Model) -> tuple[ir.Model, LowerOrtLiveSlotsPass]:
    copy = ir.from_proto(ir.to_proto(model))
    lower = LowerOrtLiveSlotsPass()
    lower(copy)
    return copy, lower


class Runner:
    """Steps a ring graph with every cache input bound to its present output (in place)."""

    def __init__(self, model: ir.Model, batch: int, slots: int):
        self.layout = KvCacheLayout.read_from(model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.types = {v.name: v.dtype for v in model.graph.inputs}
        self.buffers = {past: np.zeros((batch, SPEC.num_kv_heads, slots, self._last_dim(model, past)),
                                       _STORAGE[self.types[past]])
                        for past, _ in self.layout.cache_names()}

    @staticmethod
    def _last_dim(model: ir.Model, name: str) -> int:
        return next(v for v in model.graph.inputs if v.name == name).shape[3]

    def grow_to(self, slots: int) -> None:
        for name, old in self.buffers.items():
            new = np.zeros(old.shape[:2] + (slots,) + old.shape[3:], old.dtype)
            new[:, :, : old.shape[2]] = old
            self.buffers[name] = new

    def step(self, ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        positions = past_len[:, None] + np.arange(ids.shape[1], dtype=np.int64)[None, :]
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, ids)
        binding.bind_cpu_input(POSITION_IDS, positions)
        binding.bind_cpu_input(PAST_LEN, past_len)
        binding.bind_output(LOGITS)
        for past, present in self.layout.cache_names():
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(self.buffers[past], int(self.types[past]))
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def live_slots(needed: int, current: int) -> int:
    """What the runtime does: double until the step fits; the full capacity once it does not."""
    if needed > CAPACITY:
        return CAPACITY
    while current < needed:
        current *= 2
    return min(current, CAPACITY)


@pytest.mark.parametrize("dtype", [KvDtype.FP32, KvDtype.INT8, KvDtype.FP8])
def test_growing_buffers_match_full_capacity_through_and_past_the_wrap(dtype):
    rng = np.random.default_rng(7)
    model = ring_graph(dtype)
    small, _ = lowered(model)
    batch = 2
    full, live = Runner(model, batch, CAPACITY), Runner(small, batch, 8)
    ids = rng.integers(0, SPEC.vocab_size, (batch, 6), dtype=np.int64)
    past_len = np.zeros(batch, np.int64)
    grew = []
    for _ in range(CAPACITY + 12):  # prefill, decode to the capacity, then wrap (slide)
        slots = live_slots(int(past_len.max()) + ids.shape[1], live.buffers["past_key_values.0.key"].shape[2])
        if slots != live.buffers["past_key_values.0.key"].shape[2]:
            live.grow_to(slots)
            grew.append(slots)
        want, got = full.step(ids, past_len.copy()), live.step(ids, past_len.copy())
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        past_len += ids.shape[1]
        ids = want[:, -1].argmax(-1)[:, None].astype(np.int64)
    assert grew == [16, 32, CAPACITY]  # the buffers really were smaller than the capacity


def test_pass_replaces_the_capacity_constants_and_makes_cache_dims_symbolic():
    model, lower = lowered(ring_graph(KvDtype.INT8))
    assert CAPACITY_INITIALIZER not in model.graph.initializers
    assert SLOTS_INITIALIZER not in model.graph.initializers
    assert lower.report.matched == 2
    caches = [v for v in model.graph.inputs if v.name.startswith("past_key_values")]
    caches += [v for v in model.graph.outputs if v.name.startswith("present")]
    assert len(caches) == 4 * SPEC.num_layers * 2
    for value in caches:
        assert isinstance(value.shape[2], ir.SymbolicDim) and value.shape[2].value == SLOTS_DIM
    # nothing else in the graph still holds the capacity as a constant of its own
    for init in model.graph.initializers.values():
        array = init.const_value.numpy()
        assert not (array.dtype == np.int64 and array.size == 1 and int(array.reshape(-1)[0]) == CAPACITY)


def test_pass_refuses_a_graph_without_a_ring():
    model = build_fused_decoder(SPEC, random_weights(SPEC, 0))
    with pytest.raises(GraphError, match="run the KV ring-buffer pass first"):
        LowerOrtLiveSlotsPass()(model)
