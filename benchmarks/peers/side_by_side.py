"""kvc's artifacts against onnxruntime-genai at a few contexts, in alternating rounds, so that both see the same
phases of a shared machine (the README bench runs every engine once, one after another).

    python benchmarks/peers/side_by_side.py --peers-dir DIR --batch 4 --contexts 128,512,2048 --rounds 3 \\
        --out benchmarks/results/side_by_side  tvm-fp32=A.kvc tvm-int8=B.kvc

Each round runs ortgenai_decode.py (the peers' venv from setup.sh, real prefill) and then `kvc bench` on each
artifact (synthetic fill), both with 32 decode steps, 1 warm-up + 5 timed repetitions, median, 2 threads.
Writes each round's raw output under --out and prints, per context, every round's ms/step and the ratio
onnxruntime-genai / kvc (above 1: kvc faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ["--gen", "32", "--warmup", "1", "--reps", "5"]


def run_ortgenai(peers: Path, batch: int, contexts: str, out: Path) -> dict[int, float]:
    command = [str(peers / "venv" / "bin" / "python"), str(HERE / "ortgenai_decode.py"),
               str(peers / "models" / "ortgenai-llama-100m"), "--contexts", contexts, "--batch", str(batch),
               *SETTINGS, "--seed", "0", "--vocab", "32000"]
    text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    out.write_text(text)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {row["context"]: statistics.median(row["step_s"]) * 1e3 for row in rows}


def run_kvc(artifact: str, batch: int, contexts: str, threads: int, out: Path) -> dict[int, float]:
    kvc = Path(sys.executable).parent / "kvc"  # the CLI of the venv this script runs in
    command = [str(kvc), "bench", artifact, "--contexts", contexts, "--batch", str(batch), *SETTINGS,
               "--prefill-reps", "0", "--threads", str(threads), "--bandwidth-gbs", "30", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    return {row["context"]: row["median"] for row in rows if row["metric"].startswith("decode")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", help="NAME=ARTIFACT_DIR")
    parser.add_argument("--peers-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--contexts", default="128,512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    artifacts = dict(item.split("=", 1) for item in args.artifacts)
    args.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[dict[int, float]]] = {"onnxruntime-genai": [], **{name: [] for name in artifacts}}
    for r in range(1, args.rounds + 1):
        stem = f"b{args.batch}_r{r}"
        times["onnxruntime-genai"].append(run_ortgenai(args.peers_dir, args.batch, args.contexts,
                                                       args.out / f"ortgenai_{stem}.jsonl"))
        for name, path in artifacts.items():
            times[name].append(run_kvc(path, args.batch, args.contexts, args.threads,
                                       args.out / f"{name}_{stem}.json"))
        print(f"round {r} done", file=sys.stderr)
    peer = times["onnxruntime-genai"]
    for context in map(int, args.contexts.split(",")):
        print(f"batch {args.batch}, context {context}: onnxruntime-genai "
              f"{[round(t[context], 2) for t in peer]} ms/step")
        for name in artifacts:
            mine = [t[context] for t in times[name]]
            ratios = [p[context] / m for p, m in zip(peer, mine)]
            print(f"  {name}: {[round(m, 2) for m in mine]} ms/step; onnxruntime-genai / kvc per round "
                  f"{[round(x, 2) for x in ratios]} (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
