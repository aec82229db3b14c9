"""KV ring-buffer rewrite in ONNX Runtime CPU vs the concat graph and the numpy ring oracle (float64).

Tolerances: fp32 graphs against each other and against the float64 oracle, atol 1e-4 on logits
of magnitude ~5 (observed ~5e-6).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kvc.errors import GraphError, KvcError
from kvc.contract import ATTENTION_MASK, LAYOUT_KEY
from kvc.passes.kv_layout import KvCacheLayout, RingBufferOptions
from kvc.passes.kv_ring_buffer import KvRingBufferPass
from ring_oracle import RingCache, ring_step, window_forward
from synthetic import ConcatRunner, DecoderSpec, RingRunner, build_fused_decoder, fuse, random_weights

TOL = 1e-4
SPEC = DecoderSpec()


def ring_model(spec: DecoderSpec, capacity: int, seed: int = 0, *, config_metadata: bool = True,
               sliding_window: int | None = None):
    """The ring graph of ``spec``; the pass is told the model's window (``spec``'s unless given), as the
    compiler's model description tells it."""
    weights = random_weights(spec, seed)
    model = build_fused_decoder(spec, weights, config_metadata=config_metadata)
    window = sliding_window if sliding_window is not None else spec.sliding_window
    rewrite = KvRingBufferPass(RingBufferOptions(capacity=capacity, sliding_window=window))
    rewrite(model)
    return model, weights, rewrite.report


def greedy(logits_BSV: np.ndarray) -> np.ndarray:
    return logits_BSV[:, -1].argmax(-1)[:, None].astype(np.int64)


def prompt(rng, spec: DecoderSpec, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(0, spec.vocab_size, (batch, length), dtype=np.int64)
    return ids, np.tile(np.arange(length, dtype=np.int64), (batch, 1))


# --- interface --------------------------------------------------------------------------------

def test_rewritten_graph_has_the_ring_interface():
    capacity = 24
    model, _, report = ring_model(SPEC, capacity)
    layout = KvCacheLayout.read_from(model)
    assert layout == KvCacheLayout(num_layers=2, num_kv_heads=2, head_dim=8, capacity=capacity)
    assert [v.name for v in model.graph.inputs] == layout.input_names()
    assert [v.name for v in model.graph.outputs] == layout.output_names()
    cache_shape = ["batch", 2, capacity, 8]
    for past, present in layout.cache_names():
        for value in (model.graph.inputs[layout.input_names().index(past)],
                      model.graph.outputs[layout.output_names().index(present)]):
            assert [d if isinstance(d, int) else d.value for d in value.shape] == cache_shape
            assert value.dtype == ir.DataType.FLOAT
    past_len = model.graph.inputs[2]
    assert (past_len.name, past_len.dtype, [d.value for d in past_len.shape]) == ("past_len", ir.DataType.INT64,
                                                                                 ["batch"])
    ops = [n.op_type for n in model.graph]
    assert ops.count("TensorScatter") == 4 and ops.count("Attention") == 2 and ATTENTION_MASK not in ops
    for node in model.graph:
        if node.op_type == "TensorScatter":
            assert node.attributes["mode"].as_string() == "circular"
        if node.op_type == "Attention":
            assert len(node.inputs) == 7 and node.inputs[4] is None and node.inputs[6] is not None
            assert len(node.outputs) == 1
    assert model.opset_imports[""] == 24 and report.matched == 2
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_rewrite_refuses_a_second_run_and_leaves_the_graph_as_it_was():
    model, _, _ = ring_model(SPEC, 16)
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(GraphError, match="already has a ring-buffer KV cache"):
        KvRingBufferPass(RingBufferOptions(capacity=16))(model)
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("capacity", [0, -3, 2.5])
def test_capacity_must_be_a_positive_integer(capacity):
    with pytest.raises(KvcError, match="capacity must be a positive integer"):
        RingBufferOptions(capacity=capacity)


# --- numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rope", [True, False])
def test_equals_the_concat_graph_while_nothing_wraps(rng, rope):
    """Prefill 8 + 64 greedy decode steps, capacity 80 >= 72 tokens: same logits as the concat graph."""
    spec = DecoderSpec(rope=rope)
    model, weights, _ = ring_model(spec, capacity=80)
    concat = ConcatRunner(build_fused_decoder(spec, weights), batch=2)
    ring = RingRunner(model, batch=2)
    oracle = RingCache(spec, batch=2, capacity=80)
    ids, pos = prompt(rng, spec, 2, 8)
    past_len = np.zeros(2, np.int64)
    for step in range(65):
        want = concat.step(ids, pos)
        got = ring.step(ids, pos, past_len)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"step {step}")
        np.testing.assert_allclose(got, ring_step(spec, weights, oracle, ids, pos, past_len, None),
                                   atol=TOL, rtol=0, err_msg=f"oracle, step {step}")
        past_len += ids.shape[1]
        ids, pos = greedy(got), pos[:, -1:] + 1


def test_wrap_around_is_sliding_window_attention_of_the_capacity(rng):
    """Capacity 12, prompt 7, 40 decode steps, then a 5-token chunk after the wrap.

    Every step equals the ring oracle; single-token steps also equal plain sliding-window attention
    of width 12 over the whole history (the concat semantics), which they must once the ring wraps.
    """
    capacity = 12
    model, weights, _ = ring_model(SPEC, capacity)
    ring = RingRunner(model, batch=2)
    oracle = RingCache(SPEC, batch=2, capacity=capacity)
    ids, pos = prompt(rng, SPEC, 2, 7)
    history_ids, history_pos = ids, pos
    past_len = np.zeros(2, np.int64)
    for step in range(40):
        got = ring.step(ids, pos, past_len)
        np.testing.assert_allclose(got, ring_step(SPEC, weights, oracle, ids, pos, past_len, None),
                                   atol=TOL, rtol=0, err_msg=f"step {step}")
        if ids.shape[1] == 1:
            window = window_forward(SPEC, weights, history_ids, history_pos, capacity)[:, -1:]
            np.testing.assert_allclose(got, window, atol=TOL, rtol=0, err_msg=f"window oracle, step {step}")
        past_len += ids.shape[1]
        ids, pos = greedy(got), pos[:, -1:] + 1
        history_ids = np.concatenate([history_ids, ids], axis=1)
        history_pos = np.concatenate([history_pos, pos], axis=1)
    assert past_len[0] > 3 * capacity
    chunk_ids, chunk_pos = prompt(rng, SPEC, 2, 5)
    chunk_pos = chunk_pos + past_len[:, None]
    got = ring.step(chunk_ids, chunk_pos, past_len)
    np.testing.assert_allclose(got, ring_step(SPEC, weights, oracle, chunk_ids, chunk_pos, past_len, None),
                               atol=TOL, rtol=0, err_msg="5-token chunk after the wrap")


def test_model_window_keeps_the_concat_graph_exact_after_wrap(rng):
    """A Mistral-style model (window 6) in a ring of 10: the concat graph's own window fits inside the
    ring, so the ring graph equals the concat graph for every step, before and after the wrap."""
    spec = DecoderSpec(sliding_window=6)
    model, weights, report = ring_model(spec, capacity=10)
    assert KvCacheLayout.read_from(model).sliding_window == 6
    assert any("sliding window 6" in n for n in report.notes)
    concat = ConcatRunner(build_fused_decoder(spec, weights), batch=2)
    ring = RingRunner(model, batch=2)
    ids, pos = prompt(rng, spec, 2, 5)
    past_len = np.zeros(2, np.int64)
    for step in range(30):
        want = concat.step(ids, pos)
        got = ring.step(ids, pos, past_len)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"step {step}")
        past_len += ids.shape[1]
        ids, pos = greedy(got), pos[:, -1:] + 1


def run_decode(model, rng, spec, steps: int) -> np.ndarray:
    ring = RingRunner(model, batch=1)
    ids, pos = prompt(rng, spec, 1, 4)
    past_len = np.zeros(1, np.int64)
    out = []
    for _ in range(steps):
        logits = ring.step(ids, pos, past_len)
        out.append(logits[:, -1])
        past_len += ids.shape[1]
        ids, pos = greedy(logits), pos[:, -1:] + 1
    return np.stack(out)


def test_window_is_the_option_alone_and_matters():
    """The pass takes the window from its options only (metadata is the model description's business):
    the same graph with and without metadata rewrites alike, and full attention differs."""
    spec = DecoderSpec(sliding_window=4)
    with_meta, _, _ = ring_model(spec, 16)
    with_option, _, report = ring_model(spec, 16, config_metadata=False, sliding_window=4)
    without = build_fused_decoder(spec, random_weights(spec, 0))
    KvRingBufferPass(RingBufferOptions(capacity=16))(without)
    assert any("sliding window 4" in n for n in report.notes)
    reference = run_decode(with_meta, np.random.default_rng(5), spec, 12)
    np.testing.assert_allclose(run_decode(with_option, np.random.default_rng(5), spec, 12), reference, atol=TOL)
    assert np.abs(run_decode(without, np.random.default_rng(5), spec, 12) - reference).max() > 1e-2


def test_unused_slots_do_not_change_outputs(rng):
    """Slots never written (at or after nonpad_kv_seqlen) are poisoned: NaN in keys, 1e30 in values.

    Values get a huge finite number rather than NaN because ONNX Runtime 1.31's CPU Attention still
    multiplies their zero weights by them (see the next test); that is why caches start zero-filled.
    """
    capacity = 40
    model, _, _ = ring_model(SPEC, capacity)
    clean, poisoned = RingRunner(model, batch=2), RingRunner(model, batch=2)
    for name in poisoned.buffers:
        poisoned.cache(name)[...] = np.nan if name.endswith(".key") else 1e30
    ids, pos = prompt(rng, SPEC, 2, 6)
    past_len = np.zeros(2, np.int64)
    for step in range(12):
        want = clean.step(ids, pos, past_len)
        got = poisoned.step(ids, pos, past_len)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        past_len += ids.shape[1]
        ids, pos = greedy(want), pos[:, -1:] + 1
    written = int(past_len[0])
    assert np.isnan(poisoned.cache("past_key_values.0.key")[:, :, written:]).all()  # still poisoned, unread


def test_ort_attention_multiplies_unused_value_slots():
    """Pins the ONNX Runtime behaviour behind the zero-fill requirement in kv_layout: a NaN value slot
    beyond nonpad_kv_seqlen leaks into the output. If this fails, ORT skips such slots: the poison test
    above can then use NaN for values too."""
    b, h, s, c, d = 1, 1, 1, 4, 2
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Attention", ["q", "k", "v", "", "", "", "n"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape)
         for n, shape in (("q", [b, h, s, d]), ("k", [b, h, c, d]), ("v", [b, h, c, d]))]
        + [onnx.helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [b])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [b, h, s, d])])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 24)], ir_version=10)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    v = np.ones((b, h, c, d), np.float32)
    v[:, :, 2:] = np.nan
    y = sess.run(None, {"q": np.ones((b, h, s, d), np.float32), "k": np.ones((b, h, c, d), np.float32), "v": v,
                        "n": np.array([2], np.int64)})[0]
    assert np.isnan(y).all()


def test_batch_of_two_lengths_equals_each_sequence_alone(rng):
    """Prompts of 4 and 9 tokens, the first right-padded to 9, then 16 decode steps through a wrap
    (capacity 12): every real position's logits equal those of the sequence run alone."""
    capacity, lengths, steps = 12, (4, 9), 16
    model, _, _ = ring_model(SPEC, capacity)
    batch = RingRunner(model, batch=2)
    alone = [RingRunner(model, batch=1) for _ in lengths]
    prompts = [rng.integers(0, SPEC.vocab_size, (1, n), dtype=np.int64) for n in lengths]
    padded = np.zeros((2, max(lengths)), np.int64)
    for row, p in enumerate(prompts):
        padded[row, : p.shape[1]] = p
    pos = np.tile(np.arange(max(lengths), dtype=np.int64), (2, 1))
    got = batch.step(padded, pos, np.zeros(2, np.int64))
    for row, (p, runner) in enumerate(zip(prompts, alone)):
        want = runner.step(p, pos[:1, : p.shape[1]], np.zeros(1, np.int64))
        np.testing.assert_allclose(got[row, : p.shape[1]], want[0], atol=TOL, rtol=0, err_msg=f"prefill row {row}")
    past_len = np.array(lengths, np.int64)
    tokens = np.array([[got[row, n - 1].argmax()] for row, n in enumerate(lengths)], np.int64)
    for step in range(steps):
        got = batch.step(tokens, past_len[:, None], past_len)
        for row, runner in enumerate(alone):
            want = runner.step(tokens[row:row + 1], past_len[row:row + 1, None], past_len[row:row + 1])
            np.testing.assert_allclose(got[row], want[0], atol=TOL, rtol=0, err_msg=f"step {step} row {row}")
        past_len += 1
        tokens = greedy(got)
    assert past_len.min() > capacity


def test_attention_mask_used_elsewhere_is_refused():
    model = build_fused_decoder(SPEC, random_weights(SPEC))
    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == ATTENTION_MASK)
    logits = graph.outputs[0]
    cast = ir.node("Cast", [mask], {"to": ir.DataType.FLOAT})
    total = ir.node("ReduceSum", [cast.outputs[0]], {"keepdims": 0})
    bump = ir.node("Add", [logits, total.outputs[0]])
    graph.extend([cast, total, bump])
    bump.outputs[0].name, logits.name = "logits", "logits_raw"
    graph.outputs[0] = bump.outputs[0]
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(GraphError, match="attention_mask is used by Cast node"):
        KvRingBufferPass(RingBufferOptions(capacity=16))(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_attention_mask_length_used_elsewhere_is_refused_naming_where_it_reaches():
    """A size read off attention_mask (the past length) that reaches the logits: the refusal names the Shape read
    and the first node computing on tensor data, where a user would look."""
    model = build_fused_decoder(SPEC, random_weights(SPEC))
    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == ATTENTION_MASK)
    logits = graph.outputs[0]
    shape = ir.node("Shape", [mask], {"start": 1, "end": 2}, name="total_length")
    minus = ir.node("Sub", [shape.outputs[0], shape.outputs[0]], name="zero_length")
    cast = ir.node("Cast", [minus.outputs[0]], {"to": ir.DataType.FLOAT}, name="length_as_float")
    bump = ir.node("Add", [logits, cast.outputs[0]], name="bump")
    graph.extend([shape, minus, cast, bump])
    for node, dtype in ((shape, ir.DataType.INT64), (minus, ir.DataType.INT64), (cast, ir.DataType.FLOAT)):
        node.outputs[0].dtype = dtype  # as shape inference leaves them in the pipeline
    bump.outputs[0].name, logits.name = "logits", "logits_raw"
    graph.outputs[0] = bump.outputs[0]
    with pytest.raises(GraphError, match=r"^attention_mask is used by Shape node 'total_length' besides the attention "
                                         r"mask, reaching Cast node 'length_as_float'; the ring graph has no"):
        KvRingBufferPass(RingBufferOptions(capacity=16))(model)


def test_layout_metadata_is_json_the_runtime_can_read():
    model, _, _ = ring_model(DecoderSpec(sliding_window=5), 32)
    meta = json.loads(model.metadata_props[LAYOUT_KEY])
    assert meta == {"layout": "ring", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "capacity": 32,
                    "sliding_window": 5, "dtype": "fp32", "scales": "none"}


def test_mask_is_exactly_the_oracle_visibility(rng):
    """The in-graph mask [B, 1, S, C] alone (without nonpad_kv_seqlen's help) equals the oracle's
    simulated slot visibility, for rows at different lengths, chunks of several tokens and wraps."""
    capacity = 8
    model, _, _ = ring_model(DecoderSpec(sliding_window=6), capacity)
    attention = next(n for n in model.graph if n.op_type == "Attention")
    probe = ir.node("Identity", [attention.inputs[3]])
    probe.outputs[0].name = "debug.mask"
    model.graph.append(probe)
    model.graph.outputs.append(probe.outputs[0])
    ring = RingRunner(model, batch=2, extra_outputs=("debug.mask",))
    oracle = RingCache(SPEC, batch=2, capacity=capacity)
    past_len = np.array([0, 3], np.int64)
    oracle.advance(np.zeros(2, np.int64), 3)  # row 1 already holds 3 tokens
    for seq in (1, 3, 1, 5, 2, 1, 7, 1, 1, 4):
        ids = rng.integers(0, SPEC.vocab_size, (2, seq), dtype=np.int64)
        ring.step(ids, past_len[:, None] + np.arange(seq), past_len)
        oracle.advance(past_len, seq)
        want = oracle.visible(past_len, seq, window=6)
        np.testing.assert_array_equal(ring.extras["debug.mask"][:, 0] == 0, want, err_msg=f"past_len {past_len}")
        past_len += seq


# --- the real exporter's graphs ----------------------------------------------------------------

def test_unfused_export_is_refused_naming_the_layer(exported):
    from kvc.passes.graph_checks import load_model_checked

    _, _, path = exported("tiny")
    model = load_model_checked(path)
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(GraphError, match="layer 0: attention is not fused.*run the fusion passes"):
        KvRingBufferPass(RingBufferOptions(capacity=16))(model)
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("preset, capacity", [("tiny", 40), ("tiny-mistral", 12), ("tiny-gpt2", 40)])
def test_fused_export_equals_its_concat_graph(exported, rng, preset, capacity):
    """kvc export -> fusions -> ring: prompt 7 + 24 decode steps equal the exported concat graph in
    ORT. tiny and tiny-gpt2 (no window) stay inside capacity 40; tiny-mistral (window 8) wraps
    capacity 12 and must still match, its window given to the pass as the compiler's model description does."""
    from kvc.passes.graph_checks import load_model_checked

    _, config, path = exported(preset)
    concat = ConcatRunner(load_model_checked(path), batch=2)
    model = load_model_checked(path)
    fuse(model)
    rewrite = KvRingBufferPass(RingBufferOptions(capacity=capacity, sliding_window=config.sliding_window))
    rewrite(model)
    assert rewrite.report.matched == config.num_layers
    assert KvCacheLayout.read_from(model).sliding_window == config.sliding_window
    assert ATTENTION_MASK not in [v.name for v in model.graph.inputs]
    ring = RingRunner(model, batch=2)
    ids = rng.integers(0, config.vocab_size, (2, 7), dtype=np.int64)
    pos = np.tile(np.arange(7, dtype=np.int64), (2, 1))
    past_len = np.zeros(2, np.int64)
    for step in range(25):
        want = concat.step(ids, pos)
        got = ring.step(ids, pos, past_len)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"{preset} step {step}")
        past_len += ids.shape[1]
        ids, pos = greedy(want), pos[:, -1:] + 1
    assert past_len[0] > capacity or config.sliding_window is None


def test_per_layer_windows_are_validated_and_kept_in_the_layout():
    """Per-layer windows (Gemma2) go with no single window; the layout records them for the manifest. (The
    rewrite itself is checked end to end against transformers: tests/models/test_families_compile.py,
    tests/passes/test_torch_exports_compile.py.)"""
    options = RingBufferOptions(capacity=16, layer_windows=(4, None))
    assert [options.window_of(i) for i in range(2)] == [4, None]
    with pytest.raises(KvcError, match="either one sliding window or per-layer windows"):
        RingBufferOptions(capacity=16, sliding_window=4, layer_windows=(4, None))
    with pytest.raises(KvcError, match="positive integer"):
        RingBufferOptions(capacity=16, layer_windows=(0, None))
    layout = KvCacheLayout(num_layers=2, num_kv_heads=1, head_dim=8, capacity=16, layer_windows=(4, None))
    assert KvCacheLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    assert "layer_windows" not in KvCacheLayout(num_layers=2, num_kv_heads=1, head_dim=8, capacity=16).to_dict()
    with pytest.raises(GraphError, match=r"3 per-layer windows were given for a graph of 2 layers"):
        KvRingBufferPass(RingBufferOptions(capacity=16, layer_windows=(4, None, 4)))(build_fused_decoder(
            SPEC, random_weights(SPEC, 0)))
