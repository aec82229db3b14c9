"""Add onnxruntime-genai and llama.cpp rows to a `kvc bench` JSON (and CSV), measured with the
same contexts, batch, decode steps, warm-up, repetitions, threads and prompt seed.

    python benchmarks/peers/run.py --peers-dir ~/kvc-peers --into benchmarks/results/bench.json \\
        [--csv benchmarks/results/bench.csv] [--peers ortgenai,llama.cpp] [--llama-kv f16,q8_0]

Run with kvc's interpreter; each peer runs as a subprocess of the peers' venv built by setup.sh
(README.md beside this file). A peer that is missing or fails is recorded in header.engines as
"unavailable: why" and the others still run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_rows import (PeerDecode, Shape, decode_rows, merge, parse_batched_bench, parse_llama_bench,  # noqa: E402
                       parse_ortgenai, write_merged)

PEERS = ("ortgenai", "llama.cpp")


@dataclass(frozen=True)
class PeerSettings:
    """The kvc bench run's settings the peers repeat."""

    contexts: tuple[int, ...]
    batch: int
    gen: int
    warmup: int
    reps: int
    threads: int
    seed: int
    vocab_size: int
    preset: str

    @classmethod
    def from_header(cls, header: dict) -> "PeerSettings":
        s, model = header["settings"], header["model"]
        return cls(tuple(s["contexts"]), s["batch"], s["gen"], s["warmup"], s["reps"], s["threads"], s["seed"],
                   model["vocab_size"], model.get("name") or model["source"])


@dataclass(frozen=True)
class PeerLayout:
    """Where setup.sh puts things under the peers directory; each can be pointed elsewhere (an existing
    llama.cpp build, GGUF or ORT-GenAI model, e.g. the ones another harness made)."""

    root: Path
    preset: str = "llama-100m"
    python_override: Path | None = None
    llama_bin: Path | None = None  # folder holding llama-bench and llama-batched-bench
    gguf_override: Path | None = None
    ortgenai_override: Path | None = None

    @property
    def python(self) -> Path:
        return self.python_override or self.root / "venv" / "bin" / "python"

    def tool(self, name: str) -> Path:
        return (self.llama_bin or self.root / "llama.cpp-build" / "bin") / name

    @property
    def gguf(self) -> Path:
        return self.gguf_override or self.root / "models" / f"{self.preset}-f32.gguf"

    @property
    def ortgenai_model(self) -> Path:
        return self.ortgenai_override or self.root / "models" / f"ortgenai-{self.preset}"


def llama_bench_command(layout: PeerLayout, s: PeerSettings, kv: str, flash: bool) -> list[str]:
    """llama-bench's depth mode: -d fills the context (untimed), -n times `gen` decodes, -r repeats."""
    return [str(layout.tool("llama-bench")), "-m", str(layout.gguf), "-p", "0", "-n", str(s.gen),
            "-d", ",".join(map(str, s.contexts)), "-r", str(s.warmup + s.reps), "-t", str(s.threads),
            "-ctk", kv, "-ctv", kv, "-fa", "on" if flash else "off", "-o", "json"]


def batched_bench_command(layout: PeerLayout, s: PeerSettings, kv: str, flash: bool) -> list[str]:
    """batch > 1: llama-batched-bench decodes `batch` sequences together after a real prefill each."""
    n_ctx = s.batch * (max(s.contexts) + s.gen)
    return [str(layout.tool("llama-batched-bench")), "-m", str(layout.gguf), "-c", str(n_ctx), "-b", "2048",
            "-ub", "512", "-npp", ",".join(map(str, s.contexts)), "-ntg", str(s.gen), "-npl", str(s.batch),
            "-t", str(s.threads), "-ctk", kv, "-ctv", kv, "-fa", "on" if flash else "off",
            "--output-format", "jsonl"]


def ortgenai_command(layout: PeerLayout, s: PeerSettings) -> list[str]:
    script = Path(__file__).resolve().parent / "ortgenai_decode.py"
    return [str(layout.python), str(script), str(layout.ortgenai_model), "--contexts", ",".join(map(str, s.contexts)),
            "--batch", str(s.batch), "--gen", str(s.gen), "--warmup", str(s.warmup), "--reps", str(s.reps),
            "--seed", str(s.seed), "--vocab", str(s.vocab_size)]


def set_ortgenai_threads(model_dir: Path, threads: int) -> None:
    """ORT-GenAI reads its session options from genai_config.json."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4))


def run_tool(command: list[str], timeout: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{Path(command[0]).name} exited {done.returncode}: {tail[0]}")
    return done.stdout


def measure_llama(layout: PeerLayout, s: PeerSettings, kv: str, flash: bool, timeout: float) -> list[PeerDecode]:
    if s.batch == 1:
        return parse_llama_bench(run_tool(llama_bench_command(layout, s, kv, flash), timeout), s.warmup,
                                 "llama.cpp llama-bench")
    return parse_batched_bench(run_tool(batched_bench_command(layout, s, kv, flash), timeout), kv, "llama.cpp")


def measure_ortgenai(layout: PeerLayout, s: PeerSettings, timeout: float) -> list[PeerDecode]:
    set_ortgenai_threads(layout.ortgenai_model, s.threads)
    return parse_ortgenai(run_tool(ortgenai_command(layout, s), timeout), "onnxruntime-genai")


def collect(layout: PeerLayout, s: PeerSettings, peers: tuple[str, ...], llama_kv: tuple[str, ...], flash: bool,
            timeout: float) -> tuple[list[PeerDecode], dict[str, str]]:
    """Every requested peer configuration; failures become statuses, not exceptions."""
    samples, statuses = [], {}
    jobs = []
    if "ortgenai" in peers:
        jobs.append(("ortgenai/fp32", lambda: measure_ortgenai(layout, s, timeout)))
    if "llama.cpp" in peers:
        for kv in llama_kv:
            label = f"llama.cpp{'+fa' if flash else ''}/{kv}"
            jobs.append((label, lambda kv=kv: measure_llama(layout, s, kv, flash, timeout)))
    for label, job in jobs:
        try:
            samples += job()
            statuses[label] = "ok"
        except Exception as exc:  # noqa: BLE001 - a missing or failing peer is reported, not fatal
            statuses[label] = f"unavailable: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        print(f"{label}: {statuses[label]}", file=sys.stderr)
    return samples, statuses


def add_peers(doc: dict, layout: PeerLayout, peers: tuple[str, ...], llama_kv: tuple[str, ...], flash: bool,
              timeout: float) -> dict:
    settings = PeerSettings.from_header(doc["header"])
    samples, statuses = collect(layout, settings, peers, llama_kv, flash, timeout)
    return merge(doc, decode_rows(samples, Shape.from_header(doc["header"])), statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-dir", type=Path, required=True, help="what setup.sh built")
    parser.add_argument("--into", type=Path, required=True, help="kvc bench JSON to add the peer rows to")
    parser.add_argument("--csv", type=Path, default=None, help="rewrite this CSV with all rows")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--llama-kv", default="f16,q8_0", help="llama.cpp cache types (-ctk/-ctv)")
    parser.add_argument("--no-flash-attn", action="store_true", help="llama.cpp without flash attention")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per peer run")
    parser.add_argument("--python", type=Path, default=None, help="the peers' interpreter (default: DIR/venv)")
    parser.add_argument("--llama-bin", type=Path, default=None, help="folder of llama-bench, llama-batched-bench")
    parser.add_argument("--gguf", type=Path, default=None, help="F32 GGUF of the same weights")
    parser.add_argument("--ortgenai-model", type=Path, default=None, help="ORT-GenAI model folder of the same weights")
    args = parser.parse_args()
    doc = json.loads(args.into.read_text())
    layout = PeerLayout(args.peers_dir.expanduser(), PeerSettings.from_header(doc["header"]).preset, args.python,
                        args.llama_bin, args.gguf, args.ortgenai_model)
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    kv = tuple(k.strip() for k in args.llama_kv.split(",") if k.strip())
    write_merged(add_peers(doc, layout, peers, kv, not args.no_flash_attn, args.timeout), args.into, args.csv)
    print(f"added peer rows to {args.into}")


if __name__ == "__main__":
    main()
