"""`kvc calibrate model.onnx --text sample.txt -o scales.json`: static FP8 KV-cache scales."""
from __future__ import annotations

import json
from pathlib import Path

import click

from kvc.errors import KvcError


@click.command("calibrate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Sample text representative of the workload.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON file for `kvc compile --kv-dtype fp8 --kv-scales`.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=2048, show_default=True)
def calibrate(model: Path, text_path: Path, output: Path, max_tokens: int) -> None:
    """Run MODEL (as exported, concat KV) on sample text and write per-layer per-head FP8 scales."""
    from tokenizers import Tokenizer

    from kvc.compiler.calibrate import calibrate_fp8

    tokenizer_path = model.parent / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise KvcError(f"no tokenizer.json beside {model}; export the model with kvc export")
    ids = Tokenizer.from_file(str(tokenizer_path)).encode(text_path.read_text()).ids[:max_tokens]
    result = calibrate_fp8(model, ids)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(output)
    click.echo(f"wrote {output}: scales for {len(result.key)} layers from {result.tokens} tokens")
