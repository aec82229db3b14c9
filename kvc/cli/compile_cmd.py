"""`kvc compile model.onnx -o out.kvc`: passes + engine build into an artifact directory."""
from __future__ import annotations

from pathlib import Path

import click

KV_DTYPES = ["fp32", "fp16", "bf16", "int8", "fp8"]


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact directory to write (default: MODEL with suffix .kvc).")
@click.option("--engine", type=click.Choice(["ort", "tvm"]), default="ort", show_default=True)
@click.option("--target", "--device", "device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="cpu (TVM: llvm) or cuda.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="KV-cache capacity in tokens (default: the model's max positions, at most 2048).")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPES), default="fp32", show_default=True)
@click.option("--kv-scales", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Static FP8 scales from `kvc calibrate` (default for fp8: dynamic per-token scales).")
@click.option("--sliding-window", type=click.IntRange(min=1), default=None,
              help="Override the model's attention window (tokens).")
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Hugging Face config.json for graphs not exported by kvc.")
@click.option("--dump-passes", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the graph after each pass into this directory.")
@click.option("--verify", is_flag=True, help="Run ONNX Runtime before/after each pass and report max |diff|.")
@click.option("--tune-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="TVM on CPU: MetaSchedule trials (in all) for the decode step's weight matmuls; the "
                   "database goes into the artifact's tuning/ directory. 0: kvc's default schedules.")
@click.option("--tuning-db", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Start from (and with --tune-trials 0 only apply) an artifact's tuning/ directory; "
                   "it is copied, not modified.")
@click.option("--cpu", default="native", show_default=True,
              help="TVM on CPU: 'native' builds for this machine's CPU (its vector units; loading on a CPU "
                   "without them is refused), 'generic' for any x86-64, or an LLVM CPU name.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def compile_(model: Path, output: Path | None, engine: str, device: str, max_seq_len: int | None, kv_dtype: str,
             kv_scales: Path | None, sliding_window: int | None, config_path: Path | None,
             dump_passes: Path | None, verify: bool, tune_trials: int, tuning_db: Path | None,
             cpu: str, overwrite: bool) -> None:
    """Compile MODEL (ONNX with past key/values) into an artifact with an in-place ring-buffer KV cache."""
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model

    options = CompileOptions(engine=EngineKind(engine), device=Device(device), max_seq_len=max_seq_len,
                             kv_dtype=kv_dtype, kv_scales=kv_scales, sliding_window=sliding_window,
                             dump_passes=dump_passes, verify=verify, tune_trials=tune_trials,
                             tuning_db=tuning_db, config_path=config_path, cpu=cpu)
    output = output or model.with_suffix(".kvc")
    result = compile_model(model, output, options, overwrite=overwrite, progress=click.echo)
    cache = result.manifest.cache
    click.echo(f"model config: {result.config_source}")
    click.echo(f"wrote {output}: engine {engine} ({device}), ring cache {cache.capacity} tokens x "
               f"{cache.num_layers} layers, {cache.dtype}")
