"""Decode timing of onnxruntime-genai, run with the peers' venv (it imports onnxruntime_genai only).

    python ortgenai_decode.py MODEL_DIR --contexts 128,512 --batch 1 --gen 32 --warmup 1 --reps 5 --seed 0

Per context: a generator with room for context + gen + 1 tokens per sequence (at most the model's
context_length: at the deepest contexts fewer steps are timed, and the line says how many) gets a random prompt
of `context` tokens per row (numpy default_rng(seed), as kvc bench draws them) untimed; the first
generate_next_token() only picks a token from the prefill's logits and is untimed; then `gen`
generate_next_token() calls (one decode step + greedy pick each) are timed. Each repetition starts
from a fresh generator (a real prefill each time: ORT-GenAI has no synthetic fill). Prints one JSON
line per context: {"context", "batch", "capacity", "steps", "step_s": [seconds per step per timed rep]}.
Threads: ORT-GenAI takes intra_op_num_threads from genai_config.json (run.py writes it).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def context_length(model_dir: str) -> int:
    """The longest sequence the model's generator accepts (genai_config.json's model.context_length)."""
    return int(json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["context_length"])


def time_once(og, model, prompt: np.ndarray, gen: int, capacity: int) -> float:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=capacity, batch_size=prompt.shape[0], do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()  # picks from the prefill logits: no decode step yet
    start = time.perf_counter()
    for _ in range(gen):
        generator.generate_next_token()
    return (time.perf_counter() - start) / gen


def main() -> None:
    import onnxruntime_genai as og

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--contexts", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, required=True)
    args = parser.parse_args()
    model = og.Model(args.model_dir)
    longest = context_length(args.model_dir)
    for context in sorted(int(c) for c in args.contexts.split(",")):
        prompt = np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, context), dtype=np.int64)
        prompt = prompt.astype(np.int32)
        capacity = min(context + args.gen + 1, longest)
        steps = capacity - context - 1  # the first pick after the prompt is not a decode step
        if steps < 1:
            raise SystemExit(f"context {context} leaves no decode step within the model's {longest} positions")
        samples = [time_once(og, model, prompt, steps, capacity) for _ in range(args.warmup + args.reps)]
        print(json.dumps({"context": context, "batch": args.batch, "capacity": capacity, "steps": steps,
                          "step_s": samples[args.warmup:], "version": og.__version__}), flush=True)


if __name__ == "__main__":
    main()
