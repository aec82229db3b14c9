"""kvc.passes.decode_ring_mask (run by lower_tvm_decode_entry): the decode graph drops the capacity-wide ring mask only where
nonpad_kv_seqlen implies it, and the graph without it computes the same thing.

Reference: ONNX Runtime CPU on the ring graph with its mask (the ORT engine's semantics), vs ONNX
Runtime on the decode-specialized graph without it; random caches, rows before, at and past the
wrap-around (past_len >= capacity). Logits and caches must agree to 1e-5 (same arithmetic; only the
masking differs).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tests.compiler.tvm_case_helpers import OrtRunner

CAPACITY = 16


@pytest.fixture(scope="module")
def ring_graph(exported):
    """sliding window (None or int) -> the tiny llama export after kvc's passes, as an ir.Model."""
    from kvc.passes.pipeline import PipelineOptions, default_passes, run_passes

    graphs = {}

    def make(window: int | None) -> ir.Model:
        if window not in graphs:
            _, _, path = exported("tiny")
            model = ir.load(path)
            run_passes(model, default_passes(PipelineOptions(capacity=CAPACITY, sliding_window=window)))
            graphs[window] = model
        return graphs[window]

    return make


def _attention_masks(model: ir.Model) -> list[bool]:
    return [node.inputs[3] is not None for node in model.graph if node.op_type in ("Attention", "CacheAttention")]


def _specialize_decode(model: ir.Model, batch: int | None) -> ir.Model:
    """A copy of ``model`` as TVM's decode entry (batch None) or decode_b1 entry (batch 1) imports it."""
    from kvc.contract import Entry
    from kvc.passes.lower_tvm_decode_entry import LowerTvmDecodeEntryPass

    decode = ir.from_proto(ir.to_proto(model))
    LowerTvmDecodeEntryPass(Entry.DECODE_B1 if batch == 1 else Entry.DECODE)(decode)
    return decode


def test_the_tvm_lowered_graph_drops_it_too(ring_graph):
    """After lower_tvm_cache_attention, the mask is CacheAttention's input 3 and nonpad its input 4."""
    from kvc.contract import EngineKind
    from kvc.passes.pipeline import lowering_passes, run_passes

    lowered = ir.from_proto(ir.to_proto(ring_graph(None)))
    run_passes(lowered, lowering_passes(EngineKind.TVM))
    assert all(_attention_masks(lowered))
    assert not any(_attention_masks(_specialize_decode(lowered, 1)))


def test_decode_graph_drops_the_ring_mask_without_a_window(ring_graph):
    model = ring_graph(None)
    assert all(_attention_masks(model))
    for batch in (None, 1):
        decode = _specialize_decode(model, batch)
        masks = _attention_masks(decode)
        assert masks and not any(masks)
        # the capacity-wide subgraph is gone: nothing left reads the slot index table
        assert not any(name.endswith("slots") for name in decode.graph.initializers)
    assert all(_attention_masks(model)), "the input graph must not be changed"


def test_decode_graph_keeps_the_mask_of_a_sliding_window(ring_graph):
    decode = _specialize_decode(ring_graph(8), None)
    masks = _attention_masks(decode)
    assert masks and all(masks)


def test_a_mask_not_built_by_the_ring_pass_is_kept():
    from kvc.passes.decode_ring_mask import drop_redundant_ring_masks

    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    q, k, v = (ir.val(n, f32, [1, 2, 1, 4]) for n in "qkv")
    user_mask = ir.val("user_mask", f32, [1, 1, 1, 1])
    nonpad = ir.val("past_len", i64, [1])
    node = ir.node("Attention", [q, k, v, user_mask, None, None, nonpad])
    graph = ir.Graph([q, k, v, user_mask, nonpad], node.outputs, nodes=[node], opset_imports={"": 24})
    assert drop_redundant_ring_masks(graph) == 0
    assert node.inputs[3] is user_mask


@pytest.mark.parametrize("batch", [None, 1])
def test_decode_without_the_mask_matches_the_ring_graph(ring_graph, batch, rng):
    model = ring_graph(None)
    with_mask = OrtRunner(ir.to_proto(model))
    without = OrtRunner(ir.to_proto(_specialize_decode(model, batch)))
    # rows: empty cache, mid-ring, last free slot, exactly full, long past the wrap
    lengths = [0, 5, CAPACITY - 1, CAPACITY, 3 * CAPACITY + 7] if batch is None else [CAPACITY + 2]
    rows = len(lengths)
    feeds = {"input_ids": rng.integers(0, 256, (rows, 1)).astype(np.int64),
             "position_ids": np.array(lengths, np.int64)[:, None],
             "past_len": np.array(lengths, np.int64)}
    for value in model.graph.inputs:
        if value.name not in feeds:
            dims = [rows] + [d for d in value.shape][1:]  # caches: [batch, kv heads, C, head size]
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    want = with_mask.run(feeds)
    got = without.run(feeds)
    assert len(got) == len(want)
    for name, a, b in zip([o.name for o in model.graph.outputs], got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
