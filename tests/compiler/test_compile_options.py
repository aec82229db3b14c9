"""`kvc compile --dump-passes/--verify`, and the compile pipeline's refusals."""
from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner

from kvc.cli.main import cli
from kvc.passes.pipeline import lowering_passes


def test_dump_passes_and_verify_report_each_pass(exported, tmp_path):
    _, _, onnx_path = exported("tiny")
    dump = tmp_path / "dump"
    result = CliRunner().invoke(cli, ["compile", str(onnx_path), "-o", str(tmp_path / "a.kvc"), "--max-seq-len", "32",
                                      "--dump-passes", str(dump), "--verify"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in dump.glob("*.onnx"))
    lowering = [f"{i:02d}_{p.name}.onnx" for i, p in enumerate(lowering_passes("ort"), start=11)]
    assert names == ["00_input.onnx", "01_import_ort_genai.onnx", "02_canonicalize.onnx", "03_positions.onnx",
                     "04_rms_norm.onnx", "05_rotary.onnx", "06_attention.onnx", "07_past_shapes.onnx",
                     "08_length_uses.onnx", "09_kv_ring_buffer.onnx", "10_kv_quantize.onnx", *lowering]
    fused = onnx.load(str(dump / "06_attention.onnx"))
    assert sum(n.op_type == "Attention" for n in fused.graph.node) == 2
    # Each I/O-preserving pass was run against its input in ONNX Runtime on random inputs.
    for name in ("canonicalize", "rms_norm", "rotary", "attention", "past_shapes", "length_uses"):
        line = next(l for l in result.output.splitlines() if l.startswith(f"pass {name}:"))
        diff = float(line.split("max |diff| vs previous graph ")[1])
        assert diff < 1e-4, line


def test_graph_without_past_kv_is_refused_and_nothing_written(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 4])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "out.kvc")])
    assert result.exit_code != 0 and "past_key_values" in result.output
    assert not (tmp_path / "out.kvc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]
