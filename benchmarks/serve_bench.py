"""kvc serve under concurrent clients: continuous batching vs one request at a time, same artifact.

    python benchmarks/serve_bench.py --preset llama-100m --concurrency 1,4,16

Builds (once, in --workdir) a seeded preset with a word-level tokenizer of its vocabulary (one word per
id, so every generated token streams as one SSE chunk), then for each mode starts ``kvc serve`` as a
subprocess on 127.0.0.1 (its own process: no GIL shared with the clients) and runs, per concurrency c,
max(c * --requests-per-client, --min-requests) streamed completions from c concurrent clients: random
prompts of --prompt-tokens, exactly --gen-tokens generated (ignore_eos), prefix cache off. Modes:
``continuous`` (--max-batch rows) and ``sequential`` (--max-batch 1: one request decodes at a time, the
rest wait in the queue). Reports throughput (generated tokens / wall time), time to first token and
inter-token latency percentiles (client-side, from chunk arrival times).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np


@dataclass(frozen=True)
class Row:
    mode: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    itl_p99_ms: float
    latency_p50_s: float


def build_artifact(preset: str, capacity: int, workdir: Path) -> Path:
    out = workdir / f"{preset}-{capacity}.kvc"
    if out.is_dir():
        return out
    from kvc.compiler.options import CompileOptions
    from kvc.compiler.pipeline import compile_model
    from kvc.models import random_model
    from kvc.models.export import export_onnx
    from kvc.models.presets import RANDOM_PRESETS

    config = RANDOM_PRESETS[preset]
    export_dir = workdir / f"{preset}-export"
    shutil.rmtree(export_dir, ignore_errors=True)
    export_dir.mkdir(parents=True)
    export_onnx(random_model(config, seed=0), config, export_dir / "model.onnx")
    word_tokenizer(config.vocab_size).save(str(export_dir / "tokenizer.json"))
    compile_model(export_dir / "model.onnx", out, CompileOptions(max_seq_len=capacity), progress=lambda *_: None)
    return out


def word_tokenizer(vocab_size: int):
    """Ids 0-2 are <unk> <s> </s>; id i >= 3 is the word 'w{i}'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvc.cli.main", "serve", str(artifact), "--port", str(port), "--max-batch",
           str(max_batch), "--prefix-cache-tokens", "0", "--model-name", "bench", "--max-queue", "256",
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=artifact.parent)  # not the checkout: its kvc/ would shadow the install
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"kvc serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("kvc serve did not become healthy in 300 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, gen_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"start": start, "arrivals": arrivals, "end": time.perf_counter(), "tokens": tokens}


async def run_level(url: str, prompts: list[str], concurrency: int, gen_tokens: int) -> tuple[list[dict], float]:
    todo = list(prompts)
    done: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as client:
        async def worker():
            while todo:
                done.append(await one_request(client, url, todo.pop(), gen_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - start


def summarize(mode: str, concurrency: int, done: list[dict], wall: float) -> Row:
    ttft = np.array([d["arrivals"][0] - d["start"] for d in done]) * 1e3
    itl = np.concatenate([np.diff(d["arrivals"]) for d in done]) * 1e3
    latency = np.array([d["end"] - d["start"] for d in done])
    tokens = sum(d["tokens"] for d in done)
    p = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")  # noqa: E731
    return Row(mode, concurrency, len(done), tokens, wall, tokens / wall, p(ttft, 50), p(ttft, 90), p(ttft, 99),
               p(itl, 50), p(itl, 90), p(itl, 99), p(latency, 50))


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(length)) for _ in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-100m")
    ap.add_argument("--artifact", type=Path, help="an artifact with a tokenizer (default: build --preset)")
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kvc-serve-bench",
                    help="where the built artifact is kept between runs")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--modes", default="continuous,sequential")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_bench.json"))
    args = ap.parse_args()

    if args.artifact is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    artifact = (args.artifact or build_artifact(args.preset, args.capacity, args.workdir)).resolve()
    vocab = json.loads((artifact / "manifest.json").read_text())["model"]["vocab_size"]
    rows: list[Row] = []
    for mode in args.modes.split(","):
        proc, url = start_server(artifact, args.max_batch if mode == "continuous" else 1, args.threads)
        try:
            asyncio.run(run_level(url, random_prompts(1, args.prompt_tokens, vocab, 99), 1, 4))  # warm-up
            for c in (int(x) for x in args.concurrency.split(",")):
                count = max(c * args.requests_per_client, args.min_requests)
                prompts = random_prompts(count, args.prompt_tokens, vocab, seed=c)
                done, wall = asyncio.run(run_level(url, prompts, c, args.gen_tokens))
                rows.append(summarize(mode, c, done, wall))
                print(json.dumps(asdict(rows[-1])), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "settings": {k: str(v) for k, v in vars(args).items()}, "artifact": str(artifact),
              "rows": [asdict(r) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(rows))


def markdown(rows: list[Row]) -> str:
    lines = ["| mode | clients | requests | tok/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | latency p50 s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.concurrency} | {r.requests} | {r.tokens_per_s:.1f} | "
                     f"{r.ttft_p50_ms:.0f} / {r.ttft_p90_ms:.0f} / {r.ttft_p99_ms:.0f} | "
                     f"{r.itl_p50_ms:.1f} / {r.itl_p90_ms:.1f} / {r.itl_p99_ms:.1f} | {r.latency_p50_s:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
