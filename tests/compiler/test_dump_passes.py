"""--dump-passes DIR shows every transformation from the input ONNX to what the engine builds, numbered
in order: the input, each neutral pass, each of the engine's lowering passes, and for TVM the Relax
module after import and after each phase of its pipeline. The manifest lists the same passes."""
from __future__ import annotations

import re

import pytest

NEUTRAL = ["import_ort_genai", "canonicalize", "positions", "rms_norm", "rotary", "attention", "past_shapes", "length_uses",
           "kv_ring_buffer", "kv_quantize"]


def compile_with_dump(exported, tmp_path, engine: str, kv_dtype: str):
    from kvc.compiler.options import CompileOptions
    from kvc.compiler.pipeline import compile_model
    from kvc.contract import EngineKind
    from kvc.passes.pipeline import lowering_passes

    _, _, onnx_path = exported("tiny")
    dump = tmp_path / "dump"
    result = compile_model(onnx_path, tmp_path / "out.kvc",
                           CompileOptions(engine=EngineKind(engine), max_seq_len=32, kv_dtype=kv_dtype, dump_passes=dump),
                           progress=lambda *_: None)
    files = sorted(p.name for p in dump.iterdir() if not p.name.endswith(".data"))
    return result, files, [p.name for p in lowering_passes(engine)]


def numbered(files: list[str]) -> list[tuple[int, str]]:
    found = [re.match(r"^(\d+)_(.+)\.(onnx|txt)$", name) for name in files]
    assert all(found), files
    return [(int(m.group(1)), m.group(2)) for m in found]


def test_ort_dump_numbers_every_pass_including_lowering(exported, tmp_path):
    result, files, lowering = compile_with_dump(exported, tmp_path, "ort", "fp8")
    steps = numbered(files)
    assert [i for i, _ in steps] == list(range(len(steps)))
    assert [name for _, name in steps] == ["input", *NEUTRAL, *lowering]
    assert [p["name"] for p in result.manifest.passes] == [*NEUTRAL, *lowering]
    fp8 = next(p for p in result.manifest.passes if p["name"] == "lower_ort_fp8_scatter")
    assert fp8["matched"] == 4 and fp8["modified"] is False  # 2 layers x key/value, counted as matches


@pytest.mark.slow
def test_tvm_dump_continues_with_lowering_and_the_relax_phases(exported, tmp_path):
    pytest.importorskip("tvm")
    result, files, lowering = compile_with_dump(exported, tmp_path, "tvm", "fp32")
    steps = numbered(files)
    assert [i for i, _ in steps] == list(range(len(steps)))
    # what each entry imports: prefill's, decode's and decode_b1's graphs, weights packed last in each
    decode_graphs = ["lower_tvm_weight_codes", "lower_tvm_decode_entry", "lower_tvm_weight_codes",
                     "lower_tvm_decode_b1_entry", "lower_tvm_weight_codes"]
    relax = ["relax_import", "relax_legalize_and_fuse", "relax_schedule", "relax_lower_to_vm"]
    assert [name for _, name in steps] == ["input", *NEUTRAL, *lowering, *decode_graphs, *relax]
    assert [p["name"] for p in result.manifest.passes] == [*NEUTRAL, *lowering, *decode_graphs]
    # each entry's copy says whose it is; the shared graph's passes say none
    assert [p["entry"] for p in result.manifest.passes[-5:]] == ["prefill", "decode", "decode", "decode_b1",
                                                                  "decode_b1"]
    assert all(p["entry"] is None for p in result.manifest.passes[:-5])
    b1 = next(p for p in result.manifest.passes if p["name"] == "lower_tvm_decode_b1_entry")
    assert b1["matched"] > 0  # input_ids, position_ids, the caches... fixed to one row
    import onnx

    b1_graph = onnx.load(tmp_path / "dump" / files[-5])
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in b1_graph.graph.input}
    assert dims["input_ids"] == [1, 1] and dims["position_ids"] == [1, 1]
    imported = (tmp_path / "dump" / files[-4]).read_text()
    assert "def prefill" in imported and "def decode_b1" in imported
