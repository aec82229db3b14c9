"""kvc's artifacts against onnxruntime-genai at a few contexts, in alternating rounds, so that both see the same
phases of a shared machine (the README bench runs every engine once, one after another).

    python benchmarks/peers/side_by_side.py --peers-dir DIR --batch 4 --contexts 128,512,2048 --rounds 3 \\
        --out benchmarks/results/side_by_side  tvm-fp32=A.kvc tvm-int8=B.kvc

Each round runs `kvc bench` on each artifact (synthetic fill: 32 decode steps, 1 warm-up + 5 timed
repetitions, median) and then onnxruntime-genai through run.py's harness (the peers' venv from setup.sh, real
prefill) with the settings of the first artifact's run, as run.py repeats them.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import PeerLayout, PeerSettings, measure_ortgenai  # noqa: E402

KVC_SETTINGS = ["--gen", "32", "--warmup", "1", "--reps", "5", "--prefill-reps", "0", "--bandwidth-gbs", "30"]


def run_kvc(artifact: str, batch: int, contexts: str, threads: int, out: Path) -> dict:
    """`kvc bench` on the artifact; its JSON document (also written to ``out``)."""
    kvc = Path(sys.executable).parent / "kvc"  # the CLI of the venv this script runs in
    command = [str(kvc), "bench", artifact, "--contexts", contexts, "--batch", str(batch), "--threads", str(threads),
               *KVC_SETTINGS, "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def kvc_ms(doc: dict) -> dict[int, float]:
    return {row["context"]: row["median"] for row in doc["rows"] if row["metric"].startswith("decode")}


def run_ortgenai(peers: Path, settings: PeerSettings, out: Path) -> dict[int, float]:
    samples = measure_ortgenai(PeerLayout(peers, settings.preset), settings, timeout=3600)
    out.write_text("".join(json.dumps({"context": d.context, "batch": d.batch, "capacity": d.capacity,
                                       "step_s": d.step_s, "source": d.source}) + "\n" for d in samples))
    return {d.context: statistics.median(d.step_s) * 1e3 for d in samples}


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
        docs = [run_kvc(path, args.batch, args.contexts, args.threads, args.out / f"{name}_{stem}.json")
                for name, path in artifacts.items()]
        for name, doc in zip(artifacts, docs):
            times[name].append(kvc_ms(doc))
        settings = PeerSettings.from_header(docs[0]["header"])
        times["onnxruntime-genai"].append(run_ortgenai(args.peers_dir, settings, args.out / f"ortgenai_{stem}.jsonl"))
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
