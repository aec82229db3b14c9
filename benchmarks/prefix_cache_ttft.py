"""Time to first token with and without the prefix cache (a shared system prompt).

Builds (or reuses) an ORT artifact of a preset, then for each run: a request made of a
system prompt of SYSTEM tokens plus a user turn of USER tokens; cold = prefill everything,
warm = the system prompt's KV copied from the prefix cache and only the user turn prefilled.
Reports the medians side by side from one process; writes benchmarks/results/prefix_ttft.json.

    python benchmarks/prefix_cache_ttft.py --preset llama-100m --system 1024 --user 32
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kvc.compiler.options import CompileOptions
from kvc.compiler.pipeline import compile_model
from kvc.models import random_model
from kvc.models.export import export_onnx
from kvc.models.presets import RANDOM_PRESETS
from kvc.runtime import load
from kvc.runtime.sampling import SamplingParams


def build(preset: str, capacity: int, work: Path) -> Path:
    artifact = work / f"{preset}-{capacity}.kvc"
    if not artifact.exists():
        config = RANDOM_PRESETS[preset]
        export_onnx(random_model(config), config, work / f"{preset}.onnx")
        compile_model(work / f"{preset}.onnx", artifact, CompileOptions(max_seq_len=capacity), progress=lambda *_: None)
    return artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-100m")
    parser.add_argument("--system", type=int, default=1024, help="system prompt tokens")
    parser.add_argument("--user", type=int, default=32, help="user turn tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvc-prefix-"))
    work.mkdir(parents=True, exist_ok=True)
    model = load(build(args.preset, args.system + args.user + 8, work))
    rng = np.random.default_rng(0)
    vocab = model.engine.vocab_size
    system = rng.integers(3, vocab, args.system).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)

    def ttft() -> tuple[float, list[int]]:
        prompt = system + rng.integers(3, vocab, args.user).tolist()
        start = time.perf_counter()
        result = model.generate(prompt, params)
        return time.perf_counter() - start, result.token_ids

    ttft()  # warm-up
    cold = [ttft()[0] for _ in range(args.reps)]
    model.cache_prefix(system)
    ttft()
    warm = [ttft()[0] for _ in range(args.reps)]
    # Same tokens with and without the cache (exactness, not just speed).
    probe = system + [5, 6, 7]
    with_cache = model.generate(probe, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)).token_ids
    model.clear_prefix_cache()
    without = model.generate(probe, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)).token_ids
    result = {"preset": args.preset, "system_tokens": args.system, "user_tokens": args.user, "reps": args.reps,
              "cold_ttft_s_median": statistics.median(cold), "warm_ttft_s_median": statistics.median(warm),
              "cold_ttft_s": cold, "warm_ttft_s": warm, "speedup": statistics.median(cold) / statistics.median(warm),
              "identical_tokens": with_cache == without}
    out = Path(__file__).parent / "results" / "prefix_ttft.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.preset}: system {args.system} + user {args.user} tokens, median of {args.reps}: "
          f"cold TTFT {result['cold_ttft_s_median'] * 1e3:.1f} ms, prefix-cached {result['warm_ttft_s_median'] * 1e3:.1f} ms "
          f"({result['speedup']:.1f}x); identical tokens: {result['identical_tokens']}")


if __name__ == "__main__":
    main()
