"""Graph and file checks: each bad input raises GraphError naming the problem, and nothing is changed
or written (the model serializes identically after a refused pass; the model directory is untouched)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvc.errors import GraphError
from kvc.passes.graph_checks import check_ring_input, load_model_checked
from kvc.passes.kv_layout import RingBufferOptions
from kvc.passes.kv_ring_buffer import KvRingBufferPass
from synthetic import DecoderSpec, build_fused_decoder, random_weights


def fused(spec: DecoderSpec = DecoderSpec()) -> ir.Model:
    return build_fused_decoder(spec, random_weights(spec), config_metadata=False)


def rename(values, old: str, new: str) -> None:
    next(v for v in values if v.name == old).name = new


def without_cache() -> ir.Model:
    ids = ir.val("input_ids", ir.DataType.INT64, ["batch", "seq"])
    embed = ir.Value(name="embed", const_value=ir.tensor(np.ones((8, 4), np.float32), name="embed"))
    gather = ir.node("Gather", [embed, ids])
    gather.outputs[0].name = "logits"
    graph = ir.Graph([ids], gather.outputs, nodes=[gather], initializers=[embed], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def renamed_outputs(old: str, new: str) -> ir.Model:
    model = fused()
    rename(model.graph.outputs, old, new)
    return model


def renamed_inputs(old: str, new: str) -> ir.Model:
    model = fused()
    rename(model.graph.inputs, old, new)
    return model


def layer_one_renamed_to_two() -> ir.Model:
    model = fused()
    for kind in ("key", "value"):
        rename(model.graph.inputs, f"past_key_values.1.{kind}", f"past_key_values.2.{kind}")
        rename(model.graph.outputs, f"present.1.{kind}", f"present.2.{kind}")
    return model


BAD_GRAPHS = {
    "no past inputs": (without_cache, "has no past_key_values.* inputs.*kvc export"),
    "past without present": (lambda: renamed_outputs("present.1.value", "present.7.value"),
                             "past_key_values.1.value has no matching present.1.value output"),
    "key without value": (lambda: renamed_inputs("past_key_values.1.value", "past_key_values.1.val"),
                          "past_key_values.1.key has no matching past_key_values.1.value input"),
    "layer gap": (layer_one_renamed_to_two, r"layer indices \[0, 2\] are not 0..1"),
    "heads not divisible": (lambda: fused(DecoderSpec(num_heads=3, num_kv_heads=2, hidden_size=24)),
                            "3 query heads are not divisible by 2 kv heads"),
    "odd head size": (lambda: fused(DecoderSpec(head_dim=3, rope=False)), "unsupported head size 3"),
    "huge head size": (lambda: fused(DecoderSpec(num_heads=1, num_kv_heads=1, head_dim=512, rope=False)),
                       "unsupported head size 512"),
    "unfused layer": (lambda: fused(DecoderSpec(unfused_layers=frozenset({1}))),
                      "layer 1: attention is not fused.*Concat.*run the fusion passes"),
}


@pytest.mark.parametrize("case", BAD_GRAPHS)
def test_bad_graph_is_refused_and_left_unchanged(case):
    make, message = BAD_GRAPHS[case]
    model = make()
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(GraphError, match=message):
        KvRingBufferPass(RingBufferOptions(capacity=16))(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_good_graph_passes_the_checks():
    layers = check_ring_input(fused())
    assert [(f.io.layer, f.num_heads, f.num_kv_heads, f.head_dim) for f in layers] == [(0, 4, 2, 8), (1, 4, 2, 8)]


# --- files -------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path) -> Path:
    """A model whose weights live in model.onnx.data beside it."""
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    ir.save(fused(), path, external_data="model.onnx.data")
    return path


def edit_external(path: Path, **entries: str) -> None:
    """Rewrite the external-data entries of the largest initializer (the embedding)."""
    proto = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == "embed")
    assert tensor.data_location == onnx.TensorProto.EXTERNAL
    current = {e.key: e.value for e in tensor.external_data}
    current.update(entries)
    del tensor.external_data[:]
    for key, value in current.items():
        tensor.external_data.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())


def listing(directory: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(directory)), p.lstat().st_size) for p in directory.rglob("*"))


def test_valid_model_with_external_data_loads(saved):
    model = load_model_checked(saved)
    embed = model.graph.initializers["embed"].const_value.numpy()
    assert embed.shape == (48, 32) and np.isfinite(embed).all()


def test_missing_file(tmp_path):
    with pytest.raises(GraphError, match="no such ONNX file"):
        load_model_checked(tmp_path / "nope.onnx")


def test_garbage_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(GraphError, match="not a readable ONNX model|holds no graph"):
        load_model_checked(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_file(saved, fraction):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * fraction)])
    before = listing(saved.parent)
    with pytest.raises(GraphError, match="truncated"):
        load_model_checked(saved)
    assert listing(saved.parent) == before


@pytest.mark.parametrize("location, message", [
    ("/etc/passwd", "absolute or empty path"),
    ("../outside.data", "outside the model directory"),
    ("sub/../../outside.data", "outside the model directory"),
    ("missing.data", "does not exist"),
])
def test_external_data_must_stay_beside_the_model(saved, location, message):
    (saved.parent.parent / "outside.data").write_bytes(saved.with_suffix(".onnx.data").read_bytes())
    edit_external(saved, location=location)
    before = listing(saved.parent.parent)
    with pytest.raises(GraphError, match=message):
        load_model_checked(saved)
    assert listing(saved.parent.parent) == before


def test_symlinked_external_data_is_refused(saved):
    real = saved.parent.parent / "elsewhere.data"
    real.write_bytes(saved.with_suffix(".onnx.data").read_bytes())
    os.symlink(real, saved.parent / "linked.data")
    edit_external(saved, location="linked.data")
    with pytest.raises(GraphError, match="symbolic link"):
        load_model_checked(saved)


def test_external_data_shorter_than_its_tensor(saved):
    data = saved.with_suffix(".onnx.data")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(GraphError, match="holds 1000 bytes at offset 0 but the tensor needs .*truncated or stale"):
        load_model_checked(saved)


def test_declared_length_shorter_than_its_tensor(saved):
    edit_external(saved, length="100")
    with pytest.raises(GraphError, match="holds 100 bytes.*needs 6144"):
        load_model_checked(saved)


def _external_tensor(location: str) -> onnx.TensorProto:
    tensor = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def _model_with_tensor_in(where: str, tensor: onnx.TensorProto) -> onnx.ModelProto:
    """A graph whose only external tensor sits in a local function, a sparse initializer or a subgraph."""
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    functions, sparse, nodes = [], [], []
    if where == "function":
        const = h.make_node("Constant", [], ["c"], value=tensor)
        add = h.make_node("Add", ["a", "c"], ["b"])
        functions.append(h.make_function("local", "F", ["a"], ["b"], [const, add],
                                         [h.make_opsetid("", 18)]))
        nodes.append(h.make_node("F", ["x"], ["y"], domain="local"))
    elif where == "sparse":
        indices = h.make_tensor("w_idx", onnx.TensorProto.INT64, [4], [0, 1, 2, 3])
        sparse.append(h.make_sparse_tensor(tensor, indices, [4]))
        nodes.append(h.make_node("Add", ["x", "w"], ["y"]))
    else:  # a Constant inside an If branch
        const = h.make_node("Constant", [], ["c"], value=tensor)
        branch = h.make_graph([const, h.make_node("Add", ["x", "c"], ["z"])], "b", [],
                              [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [4])])
        cond = h.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
        nodes.append(h.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch))
        graph = h.make_graph(nodes, "g", [cond, x], [y])
        return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    graph = h.make_graph(nodes, "g", [x], [y], sparse_initializer=sparse)
    return h.make_model(graph, functions=functions,
                        opset_imports=[h.make_opsetid("", 18), h.make_opsetid("local", 1)])


@pytest.mark.parametrize("where", ["function", "sparse", "subgraph"])
def test_external_data_anywhere_in_the_model_is_checked(tmp_path, where):
    """dea640d checked initializers and subgraph attributes but not local functions or sparse attributes:
    a Constant inside model.functions could point its data at any file."""
    (tmp_path / "outside.data").write_bytes(b"\0" * 16)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    path = model_dir / "model.onnx"
    onnx.save(_model_with_tensor_in(where, _external_tensor("../outside.data")), str(path))
    with pytest.raises(GraphError, match="outside the model directory"):
        load_model_checked(path)
