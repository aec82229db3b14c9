"""`kvc compile model.onnx -o out.kvc`: passes + engine build into an artifact directory."""
from __future__ import annotations

from pathlib import Path

import click

from kvc.contract import KV_DTYPE_NAMES, WEIGHT_BLOCK_SIZES, WEIGHT_DTYPE_NAMES, EngineKind, KvDtype, WeightDtype


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact directory to write (default: MODEL with suffix .kvc).")
@click.option("--engine", type=click.Choice([e.value for e in EngineKind]), default=EngineKind.ORT.value,
              show_default=True)
@click.option("--target", "--device", "device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="cpu (TVM: llvm) or cuda.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="KV-cache capacity in tokens (default: the model's max positions, at most 2048).")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPE_NAMES), default=KvDtype.FP32.value, show_default=True)
@click.option("--weights", type=click.Choice(WEIGHT_DTYPE_NAMES), default=WeightDtype.FP32.value, show_default=True,
              help="Weight storage: fp16/bf16, or weight-only int8/int4 with per-block scales.")
@click.option("--weight-block", type=click.Choice([str(b) for b in WEIGHT_BLOCK_SIZES]), default="32",
              show_default=True, help="int8/int4: values per scale along the input dim.")
@click.option("--weight-scheme", type=click.Choice(["symmetric", "asymmetric"]), default="symmetric",
              show_default=True, help="int8/int4: asymmetric adds a zero point per block.")
@click.option("--kv-scales", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Static FP8 scales from `kvc calibrate` (default for fp8: dynamic per-token scales).")
@click.option("--sliding-window", type=click.IntRange(min=1), default=None,
              help="Override the model's attention window (tokens).")
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Hugging Face config.json for graphs not exported by kvc.")
@click.option("--dump-passes", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the graph after each pass into this directory.")
@click.option("--verify", is_flag=True, help="Run ONNX Runtime before/after each pass and report max |diff|.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Before writing, run the original graph (ONNX Runtime CPU) and the compiled engine on one "
                   "seeded random prompt plus decode steps (past the model's window and the ring's wrap) and "
                   "refuse if their logits differ; --no-check skips it (huge models).")
@click.option("--tune-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="TVM: MetaSchedule trials (in all) for the decode step's weight matmuls (CUDA: measured on "
                   "this machine's GPU); the database goes into the artifact's tuning/ directory. 0: kvc's "
                   "default schedules.")
@click.option("--tuning-db", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Start from (and with --tune-trials 0 only apply) an artifact's tuning/ directory; "
                   "it is copied, not modified.")
@click.option("--cpu", default="native", show_default=True,
              help="TVM on CPU: 'native' builds for this machine's CPU (its vector units; loading on a CPU "
                   "without them is refused), 'generic' for any x86-64, or an LLVM CPU name.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output directory, only when it is a kvc artifact holding no other "
                   "files, the current directory or an input.")
def compile_(model: Path, output: Path | None, engine: str, device: str, max_seq_len: int | None, kv_dtype: str,
             weights: str, weight_block: str, weight_scheme: str,
             kv_scales: Path | None, sliding_window: int | None, config_path: Path | None,
             dump_passes: Path | None, verify: bool, check: bool, tune_trials: int, tuning_db: Path | None,
             cpu: str, overwrite: bool) -> None:
    """Compile MODEL (ONNX with past key/values) into an artifact with an in-place ring-buffer KV cache."""
    from kvc.compiler.options import CompileOptions, Device
    from kvc.compiler.pipeline import compile_model
    from kvc.fsutil import check_output_dir

    output = output or model.with_suffix(".kvc")
    check_inputs(model, kv_scales, config_path)
    # Before minutes of passes and builds; the atomic write checks again before replacing anything.
    check_output_dir(output, overwrite, keep=[p for p in (model, kv_scales, config_path, tuning_db) if p])
    options = CompileOptions(engine=EngineKind(engine), device=Device(device), max_seq_len=max_seq_len,
                             kv_dtype=kv_dtype, kv_scales=kv_scales, sliding_window=sliding_window,
                             dump_passes=dump_passes, verify=verify, check=check, tune_trials=tune_trials,
                             tuning_db=tuning_db, config_path=config_path, cpu=cpu, weights=weights,
                             weight_block=int(weight_block), weight_symmetric=weight_scheme == "symmetric")
    result = compile_model(model, output, options, overwrite=overwrite, progress=click.echo)
    cache = result.manifest.cache
    click.echo(f"model config: {result.config_source}")
    click.echo(f"wrote {output}: engine {engine} ({device}), ring cache {cache.capacity} tokens x "
               f"{cache.num_layers} layers, {cache.dtype.value}; weights {options.weights.value}")


def check_inputs(model: Path, kv_scales: Path | None, config_path: Path | None) -> None:
    """One-line errors for unreadable inputs before any of them is parsed (a FIFO or /dev/zero as the
    model would block or exhaust memory in the ONNX parser)."""
    from kvc.errors import CheckpointError, GraphError
    from kvc.userfiles import check_regular_file, read_user_json

    check_regular_file(model, "model", error=GraphError)
    if kv_scales is not None:
        read_user_json(kv_scales, "KV scales file")
    if config_path is not None:
        read_user_json(config_path / "config.json" if config_path.is_dir() else config_path, "model config",
                       error=CheckpointError)
