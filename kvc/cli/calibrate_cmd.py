"""`kvc calibrate model.onnx --text sample.txt -o scales.json`: static FP8 KV-cache scales."""
from __future__ import annotations

import json
from pathlib import Path

import click

from kvc.errors import KvcError

SCALES_FORMAT = "float8e4m3fn amax/448"  # the "format" field kvc.tools.calibrate writes


def _is_scales_file(path: Path) -> bool:
    """Whether ``path`` is a scales file kvc calibrate wrote (the only file --overwrite replaces)."""
    from kvc.userfiles import read_user_json

    try:
        return read_user_json(path, "scales file").get("format") == SCALES_FORMAT
    except KvcError:
        return False


@click.command("calibrate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Sample text (UTF-8) representative of the workload.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON file for `kvc compile --kv-dtype fp8 --kv-scales`.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=2048, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing scales file written by kvc calibrate.")
def calibrate(model: Path, text_path: Path, output: Path, max_tokens: int, overwrite: bool) -> None:
    """Run MODEL (as exported, concat KV) on sample text and write per-layer per-head FP8 scales."""
    from tokenizers import Tokenizer

    from kvc.errors import GraphError
    from kvc.fsutil import atomic_write_text, check_output_file
    from kvc.tools.calibrate import calibrate_fp8
    from kvc.userfiles import check_regular_file, read_user_text

    inputs = (model, text_path, model.parent / "tokenizer.json")
    check_output_file(output, overwrite, _is_scales_file, keep=inputs)  # before the model runs
    check_regular_file(model, "model", error=GraphError)
    text = read_user_text(text_path, "sample text")
    tokenizer_path = model.parent / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise KvcError(f"no tokenizer.json beside {model}; export the model with kvc export")
    try:
        tokenizer = Tokenizer.from_str(read_user_text(tokenizer_path, "tokenizer"))
    except Exception as exc:  # the tokenizers library raises its own exception type
        if isinstance(exc, KvcError):
            raise
        raise KvcError(f"{tokenizer_path} is not a tokenizer ({str(exc)[:100]}); export the model again") from None
    ids = tokenizer.encode(text).ids[:max_tokens]
    result = calibrate_fp8(model, ids)
    atomic_write_text(output, json.dumps(result.to_dict(), indent=2), overwrite, _is_scales_file, keep=inputs)
    click.echo(f"wrote {output}: scales for {len(result.key)} layers from {result.tokens} tokens")
