"""benchmarks/peers: peer output -> kvc bench rows (same roofline), merged into a kvc bench JSON/CSV,
and the commands that repeat the run's settings. Fake peer output only: no peer is run here."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))

import peer_rows  # noqa: E402
import run as peer_run  # noqa: E402

from kvc.compiler.bench import BenchConfig, EngineName, run_bench  # noqa: E402
from kvc.compiler.bench.report import markdown_table, write_json  # noqa: E402

LLAMA_BENCH_JSON = json.dumps([
    {"build_commit": "abc123", "n_prompt": 0, "n_gen": 4, "n_depth": 8, "type_k": "f16", "type_v": "f16",
     "flash_attn": True, "n_threads": 2, "samples_ns": [9e6, 4e6, 8e6, 6e6]},
    {"build_commit": "abc123", "n_prompt": 0, "n_gen": 4, "n_depth": 16, "type_k": "f16", "type_v": "f16",
     "flash_attn": True, "n_threads": 2, "samples_ns": [9e6, 8e6, 8e6, 8e6]},
])
BATCHED_JSONL = ('main: n_kv_max = 40\n'
                 '{"n_kv_max": 40, "flash_attn": 1, "pp": 8, "tg": 4, "pl": 2, "n_kv": 24, "t_pp": 0.1, '
                 '"speed_pp": 160, "t_tg": 0.02, "speed_tg": 400, "t": 0.12, "speed": 200}\n')
ORTGENAI_LINES = ('{"context": 8, "batch": 1, "capacity": 13, "step_s": [0.002, 0.003], "version": "0.18.0"}\n'
                  '{"context": 16, "batch": 1, "capacity": 21, "step_s": [0.004], "version": "0.18.0"}\n')


@pytest.fixture(scope="module")
def bench_doc(tmp_path_factory):
    work = tmp_path_factory.mktemp("peers-work")
    config = BenchConfig(contexts=(8, 16), gen=4, reps=1, warmup=0, prefill_reps=0,
                         engines=(EngineName.TORCH_STATIC,), work_dir=work)
    result = run_bench("tiny", config, bandwidth=10e9)
    write_json(result, work / "bench.json")
    return json.loads((work / "bench.json").read_text())


def test_llama_bench_output_drops_warmup_and_gives_ms_per_step(bench_doc):
    samples = peer_rows.parse_llama_bench(LLAMA_BENCH_JSON, warmup=1, source="llama.cpp llama-bench")
    assert [(s.engine, s.kv_dtype, s.context, s.batch) for s in samples] == [
        ("llama.cpp+fa", "f16", 8, 1), ("llama.cpp+fa", "f16", 16, 1)]
    assert samples[0].step_s == pytest.approx([1e-3, 2e-3, 1.5e-3])
    rows = peer_rows.decode_rows(samples, peer_rows.Shape.from_header(bench_doc["header"]))
    assert rows[0].median == pytest.approx(1.5) and rows[0].reps == 3 and rows[0].fill == "real"
    assert "abc123" in rows[0].source


def test_peer_roofline_counts_the_peers_stored_kv_dtype(bench_doc):
    shape = peer_rows.Shape.from_header(bench_doc["header"])  # tiny: 2 layers, 2 kv heads, head_dim 16
    assert shape.kv_bytes_per_token("f16") == 2 * 2 * 2 * 16 * 2
    assert shape.kv_bytes_per_token("q8_0") == 2 * 2 * 2 * 16 * 34 // 32
    sample = peer_rows.PeerDecode("x", "f16", 8, 3, [0.01], None, "fake")
    row = peer_rows.decode_rows([sample], shape)[0]
    attended = 8 + (4 + 1) / 2
    assert row.bytes_per_token == shape.weight_bytes + 3 * attended * 2 * 2 * 2 * 16 * 2
    assert row.floor_ms == pytest.approx(1e3 * row.bytes_per_token / 10e9)
    assert row.bandwidth_fraction == pytest.approx(row.floor_ms / 10.0)


def test_batched_bench_and_ortgenai_outputs():
    batched = peer_rows.parse_batched_bench(BATCHED_JSONL, "q8_0", "llama.cpp")
    assert [(s.engine, s.kv_dtype, s.context, s.batch, s.step_s) for s in batched] == [
        ("llama.cpp+fa", "q8_0", 8, 2, [0.005])]
    genai = peer_rows.parse_ortgenai(ORTGENAI_LINES, "onnxruntime-genai")
    assert [(s.engine, s.context, s.capacity, len(s.step_s)) for s in genai] == [
        ("ortgenai", 8, 13, 2), ("ortgenai", 16, 21, 1)]


def test_merge_appends_peer_rows_and_replaces_a_rerun(bench_doc, tmp_path):
    shape = peer_rows.Shape.from_header(bench_doc["header"])
    rows = peer_rows.decode_rows(peer_rows.parse_ortgenai(ORTGENAI_LINES, "onnxruntime-genai"), shape)
    doc = peer_rows.merge(bench_doc, rows, {"ortgenai/fp32": "ok", "llama.cpp+fa/f16": "unavailable: not built"})
    again = peer_rows.merge(doc, rows, {"ortgenai/fp32": "ok"})  # a second run replaces, never duplicates
    assert len(again["rows"]) == len(bench_doc["rows"]) + 2
    assert again["header"]["engines"]["torch-static/fp32"] == "ok"
    assert again["header"]["engines"]["llama.cpp+fa/f16"].startswith("unavailable")
    peer_rows.write_merged(again, tmp_path / "m.json", tmp_path / "m.csv")
    with open(tmp_path / "m.csv") as f:
        written = list(csv.DictReader(f))
    assert {r["engine"] for r in written} == {"torch-static", "ortgenai"}
    assert {r["source"] for r in written if r["engine"] == "ortgenai"} == {"onnxruntime-genai (version 0.18.0)"}
    table = markdown_table(peer_rows.result_from_doc(json.loads((tmp_path / "m.json").read_text())))
    assert "| ortgenai | fp32 |" in table and "llama.cpp+fa/f16: unavailable: not built" in table


def test_peer_commands_repeat_the_bench_settings(bench_doc, tmp_path):
    settings = peer_run.PeerSettings.from_header(bench_doc["header"])
    layout = peer_run.PeerLayout(tmp_path, settings.preset)
    bench = peer_run.llama_bench_command(layout, settings, "f16", flash=True)
    assert bench[bench.index("-d") + 1] == "8,16" and bench[bench.index("-n") + 1] == "4"
    assert bench[bench.index("-r") + 1] == "1" and bench[bench.index("-t") + 1] == str(settings.threads)
    batched = peer_run.batched_bench_command(layout, settings.__class__(**{**settings.__dict__, "batch": 4}),
                                             "q8_0", flash=True)
    assert batched[batched.index("-npl") + 1] == "4" and batched[batched.index("-npp") + 1] == "8,16"
    genai = peer_run.ortgenai_command(layout, settings)
    assert genai[genai.index("--vocab") + 1] == "256" and str(layout.ortgenai_model) in genai


def test_missing_peers_are_reported_not_fatal(bench_doc, tmp_path):
    doc = peer_run.add_peers(bench_doc, peer_run.PeerLayout(tmp_path, "tiny"), ("ortgenai", "llama.cpp"),
                             ("f16",), flash=True, timeout=10)
    assert doc["rows"] == bench_doc["rows"]
    assert set(doc["header"]["engines"]) >= {"ortgenai/fp32", "llama.cpp+fa/f16"}
    assert all(doc["header"]["engines"][k].startswith("unavailable: ") for k in ("ortgenai/fp32", "llama.cpp+fa/f16"))


def test_checkpoint_round_trips_and_has_a_full_vocabulary(tmp_path):
    import checkpoint

    assert len(set(checkpoint.vocabulary(32000))) == 32000
    checkpoint.write_checkpoint(tmp_path / "hf", "tiny", seed=0)  # fails itself unless bit-identical
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    assert sp.vocab_size() == 256
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 2


def test_layout_paths_can_point_at_an_existing_build(tmp_path):
    default = peer_run.PeerLayout(tmp_path, "llama-100m")
    assert default.tool("llama-bench") == tmp_path / "llama.cpp-build" / "bin" / "llama-bench"
    assert default.gguf == tmp_path / "models" / "llama-100m-f32.gguf"
    other = peer_run.PeerLayout(tmp_path, "llama-100m", llama_bin=Path("/x/bin"), gguf_override=Path("/x/m.gguf"))
    assert other.tool("llama-bench") == Path("/x/bin/llama-bench") and other.gguf == Path("/x/m.gguf")


def test_checkpoint_can_declare_more_positions_for_capacity_comparisons(tmp_path):
    import checkpoint

    checkpoint.write_checkpoint(tmp_path / "hf", "tiny", seed=0, max_positions=4096)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 4096
