"""Packed decode rows (finished rows refilled by copying the last row's slots) vs holes (decode calls
run up to the highest busy row, idle rows on a dummy token): the scheduler alone, no HTTP.

    python benchmarks/serve_rows_ab.py ARTIFACT --rows 8 --requests 24 --reps 2

Every request arrives at once with a short prompt and a different generation length, so rows finish
at staggered times and holes appear; the strategies alternate per repetition (same load drift for both).
"""
from __future__ import annotations

import argparse
import queue
import random
import time

import kvc
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.scheduler import Scheduler, SchedulerOptions


def run_once(artifact: str, rows: int, requests: int, compact: bool, threads: int) -> dict:
    model = kvc.load(artifact, max_batch=rows + 1, threads=threads)
    scheduler = Scheduler(model, SchedulerOptions(prefix_cache_tokens=0, compact=compact))
    rng = random.Random(0)
    done = queue.Queue()
    for _ in range(requests):
        params = SamplingParams(temperature=0.0, max_new_tokens=rng.randrange(4, 48), ignore_eos=True)
        prompt = [1] + [rng.randrange(3, 200) for _ in range(16)]
        scheduler.submit(scheduler.new_request(prompt, params, lambda e: e.end and done.put(e)))
    start = time.perf_counter()
    scheduler.start()
    for _ in range(requests):
        done.get(timeout=3600)
    wall = time.perf_counter() - start
    scheduler.close()
    snap = scheduler.stats.snapshot()
    return {"compact": compact, "wall_s": round(wall, 2), "tokens_per_s": round(snap.generated_tokens / wall, 2),
            "decode_steps": snap.decode_steps, "busy_rows_per_step": round(snap.decode_rows / snap.decode_steps, 2),
            "rows_run_per_step": round(scheduler.rows.rows_run / snap.decode_steps, 2), "moves": scheduler.rows.moves}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    for _ in range(args.reps):
        for compact in (True, False):
            print(run_once(args.artifact, args.rows, args.requests, compact, args.threads), flush=True)


if __name__ == "__main__":
    main()
