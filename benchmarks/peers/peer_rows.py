"""Peer measurements -> `kvc bench` rows, and merging them into a kvc bench JSON/CSV.

Pure Python (kvc and the standard library): the peers themselves run in their own venv
(see setup.sh), print their raw output, and this module reads it. Every row it makes carries
`source` naming the peer and version, `fill` "real" (the peers prefill for real) and the same
roofline as kvc's rows: weights once per step + every row's live KV in the peer's stored dtype
over the bandwidth measured by the kvc bench run it is merged into.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from kvc.compiler.bench.bandwidth import Roofline, mean_attended_tokens
from kvc.compiler.bench.results import DECODE, Row, summary_row

# Bytes per stored K/V element: llama.cpp's block formats hold 32 values plus an fp16 scale.
KV_ELEMENT_BYTES = {"f32": 4.0, "fp32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class PeerDecode:
    """Decode step times of one peer configuration at one depth (seconds per step, per repetition)."""

    engine: str  # row engine name, e.g. "llama.cpp" or "ortgenai"
    kv_dtype: str  # the peer's own name for its cache type (f16, q8_0, fp32)
    context: int
    batch: int
    step_s: list[float]
    capacity: int | None
    source: str  # peer and version, e.g. "llama.cpp llama-bench b1234 (fa on)"


@dataclass(frozen=True)
class Shape:
    """What the roofline needs from the bench header."""

    weight_bytes: int
    layers: int
    kv_heads: int
    head_dim: int
    gen: int
    bandwidth: float

    @classmethod
    def from_header(cls, header: dict) -> "Shape":
        model, settings = header["model"], header["settings"]
        return cls(model["weight_bytes_read_per_token"], model["layers"], model["kv_heads"], model["head_dim"],
                   settings["gen"], header["machine"]["measured_bandwidth_bytes_per_s"])

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        return round(2 * self.layers * self.kv_heads * self.head_dim * KV_ELEMENT_BYTES[kv_dtype])


def decode_rows(samples: list[PeerDecode], shape: Shape) -> list[Row]:
    rows = []
    for s in samples:
        roof = Roofline(shape.weight_bytes, shape.kv_bytes_per_token(s.kv_dtype), shape.bandwidth)
        moved = roof.bytes_per_step(mean_attended_tokens(s.context, shape.gen), s.batch)
        floor_s = moved / shape.bandwidth
        median = statistics.median(s.step_s)
        rows.append(summary_row(s.engine, s.kv_dtype, s.context, DECODE, "ms", [1e3 * t for t in s.step_s],
                                bytes_per_token=moved, bandwidth_fraction=floor_s / median, batch=s.batch,
                                capacity=s.capacity, fill="real", floor_ms=1e3 * floor_s,
                                kv_bytes_per_cached_token=roof.kv_bytes_per_token, source=s.source))
    return rows


# --- llama.cpp ---------------------------------------------------------------------------------
def parse_llama_bench(text: str, warmup: int, source: str) -> list[PeerDecode]:
    """`llama-bench -o json -p 0 -n GEN -d C1,C2 -r WARMUP+REPS` -> one PeerDecode per depth; the
    first ``warmup`` samples of each are dropped."""
    out = []
    for entry in json.loads(text):
        if entry.get("n_prompt", 0) != 0 or not entry.get("n_gen"):
            continue  # a prompt-processing test: not decode
        per_step = [ns / 1e9 / entry["n_gen"] for ns in entry["samples_ns"]][warmup:]
        flash = entry.get("flash_attn") in (1, True, "on", "enabled", "1")
        # llama-bench sizes its context to each test (depth + gen): no fixed capacity to report.
        out.append(PeerDecode("llama.cpp+fa" if flash else "llama.cpp", entry["type_k"], int(entry.get("n_depth", 0)),
                              1, per_step, None, f"{source} (build {entry.get('build_commit', '?')})"))
    return out


def parse_batched_bench(text: str, kv_dtype: str, source: str) -> list[PeerDecode]:
    """`llama-batched-bench --output-format jsonl -npp C -ntg GEN -npl B`: one sample per line (its
    decode time t_tg covers GEN steps of all B sequences after a real prefill of B x C tokens)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if "t_tg" not in entry:
            continue
        flash = entry.get("flash_attn") in (1, True, "on", "enabled", "1")
        out.append(PeerDecode("llama.cpp+fa" if flash else "llama.cpp", kv_dtype, int(entry["pp"]), int(entry["pl"]),
                              [entry["t_tg"] / entry["tg"]], None, f"{source} (llama-batched-bench)"))
    return out


# --- onnxruntime-genai -------------------------------------------------------------------------
def parse_ortgenai(text: str, source: str) -> list[PeerDecode]:
    """Lines of JSON printed by ortgenai_decode.py: {context, batch, capacity, step_s: [...]}."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            out.append(PeerDecode("ortgenai", "fp32", d["context"], d["batch"], d["step_s"], d["capacity"],
                                  f"{source} (version {d.get('version', '?')})"))
    return out


# --- merging -----------------------------------------------------------------------------------
def merge(bench: dict, rows: list[Row], statuses: dict[str, str]) -> dict:
    """A kvc bench JSON document with ``rows`` appended (replacing earlier rows of the same engine,
    dtype, batch, context and source) and each peer's status in header.engines."""
    fresh = {_key(r.to_dict()) for r in rows}
    kept = [r for r in bench["rows"] if _key(r) not in fresh]
    header = dict(bench["header"])
    header["engines"] = {**header.get("engines", {}), **statuses}
    return {"header": header, "rows": kept + [r.to_dict() for r in rows]}


def _key(row: dict) -> tuple:
    return (row["engine"], row["kv_dtype"], row.get("batch", 1), row["context"], row["metric"],
            row.get("source", "kvc bench"))


def write_merged(doc: dict, json_path: Path, csv_path: Path | None = None) -> None:
    from kvc.compiler.bench.report import write_csv

    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    if csv_path is not None:
        write_csv(result_from_doc(doc), csv_path)


def result_from_doc(doc: dict):
    from kvc.compiler.bench.run import BenchResult

    header = {k: v for k, v in doc["header"].items() if k != "engines"}
    return BenchResult(header, [Row.from_dict(r) for r in doc["rows"]], dict(doc["header"].get("engines", {})))
