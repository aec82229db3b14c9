"""kvc.passes.length_uses on a small hand-written graph: sizes and positions computed from the past length
(attention_mask's length minus the new tokens) are rebuilt from input_ids' shape or read from position_ids, the
graph computes what it computed (ONNX Runtime, several lengths), and a value that is the past length itself is
left as it was."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from kvc.passes.length_uses import LengthUsesFromInputsPass, PositionsFromInputsPass

LIMIT, HIDDEN = 16, 8  # the model's positions; hidden = 2 heads x 4


def _graph(with_position_ids: bool) -> onnx.ModelProto:
    """rows = Max(0, Min(L, P + S) - Min(L, P)) sizes a Reshape (GPT-2 under the dynamo exporter); positions
    Range(P, P + S) as a [1, S] row feed a float input of the output (optimum's Gemma); ``past`` outputs P."""
    c = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)] if isinstance(v, list) else [], v if isinstance(v, list) else [v])  # noqa: E731
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
        helper.make_node("Shape", ["attention_mask"], ["total"], start=1, end=2),
        helper.make_node("Shape", ["x"], ["seq"], start=1, end=2),  # the embedding's [batch, seq, hidden]
        helper.make_node("Shape", ["input_ids"], ["batch"], start=0, end=1),
        helper.make_node("Sub", ["total", "seq"], ["past"]),
        helper.make_node("Min", ["past", "limit"], ["low"]),
        helper.make_node("Min", ["total", "limit"], ["high"]),
        helper.make_node("Sub", ["high", "low"], ["span"]),
        helper.make_node("Max", ["span", "zero"], ["rows"]),
        helper.make_node("Concat", ["batch", "rows", "two", "four"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["heads"]),
        helper.make_node("Squeeze", ["past"], ["past_scalar"]),
        helper.make_node("Squeeze", ["total"], ["total_scalar"]),
        helper.make_node("Range", ["past_scalar", "total_scalar", "one"], ["steps"]),
        helper.make_node("Unsqueeze", ["steps", "zero"], ["row"]),
        helper.make_node("Cast", ["row"], ["row_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["row_float", "minus_one"], ["row_column"]),
        helper.make_node("Add", ["x", "row_column"], ["shifted"]),
        helper.make_node("Identity", ["past"], ["past_length"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    if with_position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("heads", "shifted")]
    outputs.append(helper.make_tensor_value_info("past_length", TensorProto.INT64, None))
    embed = helper.make_tensor("embed", TensorProto.FLOAT, [32, HIDDEN],
                               np.random.default_rng(0).standard_normal(32 * HIDDEN).astype(np.float32))
    inits = [embed, c("limit", [LIMIT]), c("zero", [0]), c("two", [2]), c("four", [4]), c("one", 1),
             c("minus_one", [-1])]
    graph = helper.make_graph(nodes, "lengths", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model, data_prop=True)  # as canonicalize leaves a graph


def _run(kit, model, batch: int, past: int, new: int) -> list[np.ndarray]:
    rng = np.random.default_rng(past * 100 + new)
    feeds = {"input_ids": rng.integers(0, 32, (batch, new)), "attention_mask": np.ones((batch, past + new), np.int64),
             "position_ids": np.tile(np.arange(past, past + new), (batch, 1))}
    session = kit.ort_session(model)
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def _reads_mask(value: ir.Value) -> bool:
    stack, seen = [value], set()
    while stack:
        value = stack.pop()
        if value.name == "attention_mask":
            return True
        node = value.producer()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(i for i in node.inputs if i is not None)
    return False


@pytest.mark.parametrize("with_position_ids", [False, True])
def test_sizes_and_positions_from_the_past_length_are_rebuilt_and_the_past_length_is_left(kit, with_position_ids):
    original = _graph(with_position_ids)
    model = ir.from_proto(original)
    positions, sizes = PositionsFromInputsPass(max_positions=LIMIT), LengthUsesFromInputsPass(max_positions=LIMIT)
    positions(model)
    sizes(model)
    assert positions.report.matched == 1 and sizes.report.matched == 1, (positions.report, sizes.report)
    outputs = {v.name: v for v in model.graph.outputs}
    assert not _reads_mask(outputs["heads"]) and not _reads_mask(outputs["shifted"])
    assert _reads_mask(outputs["past_length"])  # P itself has no form in input_ids or position_ids
    order = ["attention_mask", "position_ids"] if with_position_ids else ["position_ids", "attention_mask"]
    assert [v.name for v in model.graph.inputs] == ["input_ids", *order]  # added after input_ids when missing
    for batch, past, new in ((1, 0, 4), (2, 3, 1), (3, 10, 6), (1, LIMIT - 1, 1)):
        for want, got in zip(_run(kit, original, batch, past, new), _run(kit, model, batch, past, new)):
            np.testing.assert_array_equal(got, want)


def test_a_size_that_differs_from_the_new_tokens_past_the_samples_range_is_left(kit):
    """With positions up to 64 assumed, Min(16, P + S) - Min(16, P) is not S at every sample: nothing changes."""
    model = ir.from_proto(_graph(True))
    sizes = LengthUsesFromInputsPass(max_positions=64)
    sizes(model)
    assert sizes.report.matched == 0
    assert _reads_mask({v.name: v for v in model.graph.outputs}["heads"])
