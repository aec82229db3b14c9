"""`kvc bench SOURCE`: prefill and decode speed against context depth, kvc engines beside baselines."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from kvc.errors import KvcError


@click.command("bench")
@click.argument("source")
@click.option("--contexts", default="128,512,2048,8192", show_default=True,
              help="Cache depths (tokens) at which decode is timed; also the prefill prompt lengths.")
@click.option("--gen", type=int, default=64, show_default=True, help="Decode steps timed per repetition.")
@click.option("--kv-dtype", "kv_dtypes", default="fp32", show_default=True,
              help="Cache dtypes of the kvc engines, comma-separated: fp32,fp16,bf16,int8,fp8.")
@click.option("--weights", "weight_dtypes", default="fp32", show_default=True,
              help="Weight precisions of the kvc engines, comma-separated: fp32,fp16,bf16,int8,int4 (kvc compile "
                   "--weights; block 32, symmetric). Rows name the precision beside the engine.")
@click.option("--engines", default="kvc-ort,kvc-tvm,ort-concat,torch-concat,torch-static", show_default=True,
              help="Comma-separated; torch-concat and ort-concat keep an fp32 concat cache (copied every step), "
                   "torch-static an fp32 preallocated one written in place (gpt-fast style); torch = torch-concat.")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences decoded together, every engine.")
@click.option("--prefill", "fill", type=click.Choice(["synthetic", "real"]), default="synthetic", show_default=True,
              help="How decode timing reaches each depth: synthetic (K/V of a short real prefill tiled to the depth "
                   "and written straight into the cache: seconds at 8192) or real (a full prefill). Rows say which.")
@click.option("--prefill-contexts", default=None,
              help="Depths whose real prefill is timed (default: every --contexts depth; prefill at 8192 takes "
                   "minutes on 2 cores). --prefill-reps 0 with --prefill synthetic times none.")
@click.option("--synthetic-tokens", type=int, default=64, show_default=True,
              help="Real prefill length whose K/V a synthetic fill repeats.")
@click.option("--capacity", "capacities", default=None,
              help="Cache slots of the kvc engines and torch-static, comma-separated to compare capacities "
                   "(e.g. 256,32768: each is compiled; default: deepest context + --gen).")
@click.option("--reps", type=int, default=5, show_default=True, help="Timed decode repetitions per context.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed decode repetitions first.")
@click.option("--prefill-reps", type=int, default=None,
              help="Timed prefills per context (default: --reps; 0: time only the fill that precedes decode).")
@click.option("--threads", type=int, default=0, help="Compute threads for every engine (0: all available CPUs).")
@click.option("--prefill-chunk", type=int, default=512, show_default=True,
              help="Longest prefill call; deeper prompts are run in chunks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random-init presets and prompts.")
@click.option("--bandwidth-gbs", type=float, default=None,
              help="Memory bandwidth (GB/s) to compare against instead of measuring it.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep exports and artifacts here and reuse them (default: a temporary directory).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG of decode ms/token against context.")
def bench(source: str, contexts: str, gen: int, kv_dtypes: str, weight_dtypes: str, engines: str, batch: int, fill: str,
          prefill_contexts: str | None, synthetic_tokens: int, capacities: str | None, reps: int, warmup: int,
          prefill_reps: int | None, threads: int, prefill_chunk: int, seed: int, bandwidth_gbs: float | None,
          work_dir: Path | None, json_path: Path | None, csv_path: Path | None, plot_path: Path | None) -> None:
    """Benchmark SOURCE: an artifact directory (that engine only), a `kvc export` model.onnx, or a model
    source such as a preset id (llama-100m), which is exported and compiled for every engine and dtype."""
    from kvc.compiler.bench import BenchConfig, parse_choice_list, parse_engines, parse_int_list, run_bench
    from kvc.compiler.bench.options import KV_DTYPES, FillMode
    from kvc.compiler.bench.progress import progress_for
    from kvc.contract import WEIGHT_DTYPE_NAMES, WeightDtype
    from kvc.compiler.bench.report import print_table, write_csv, write_json

    if bandwidth_gbs is not None and not bandwidth_gbs > 0:
        raise KvcError(f"--bandwidth-gbs must be a positive number of GB/s, got {bandwidth_gbs}")
    config = BenchConfig(contexts=parse_int_list(contexts, "--contexts"), gen=gen,
                         kv_dtypes=parse_choice_list(kv_dtypes, KV_DTYPES, "--kv-dtype"),
                         weights=tuple(WeightDtype(w) for w in
                                       parse_choice_list(weight_dtypes, WEIGHT_DTYPE_NAMES, "--weights")),
                         engines=parse_engines(engines), batch=batch, reps=reps, warmup=warmup,
                         prefill_reps=prefill_reps, threads=threads,
                         prefill_chunk=prefill_chunk, seed=seed, work_dir=work_dir, fill=FillMode(fill),
                         prefill_contexts=(parse_int_list(prefill_contexts, "--prefill-contexts")
                                           if prefill_contexts is not None else None),
                         synthetic_tokens=synthetic_tokens,
                         capacities=parse_int_list(capacities, "--capacity") if capacities is not None else ())
    bandwidth = bandwidth_gbs * 1e9 if bandwidth_gbs is not None else None
    result = run_bench(source, config, progress_for(sys.stderr), bandwidth=bandwidth)
    print_table(result)
    if json_path is not None:
        write_json(result, json_path)
    if csv_path is not None:
        write_csv(result, csv_path)
    if plot_path is not None:
        from kvc.compiler.bench.plot import write_plot

        write_plot(result, plot_path)
