"""`kvc export SOURCE -o model.onnx`: checkpoint or preset -> ONNX with explicit past KV."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from kvc.errors import KvcError


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Path of the ONNX file to write; tokenizer and generation config go beside it.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Tokenizer for llama2.c checkpoints (tok*.bin); found beside the checkpoint when omitted.")
@click.option("--seed", default=0, show_default=True, help="Seed for random-init presets.")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights in model.onnx.data (default: only when over 1 GiB).")
@click.option("--overwrite", is_flag=True,
              help="Replace the earlier kvc export in the output directory (all its files, recorded in "
                   "kvc-export.json); files kvc export did not write are never replaced.")
def export(source: str, output: Path, tokenizer_path: str | None, seed: int, external_data: bool | None,
           overwrite: bool) -> None:
    """Export SOURCE (preset id, Hugging Face checkpoint dir or hub id, llama2.c .bin) to ONNX."""
    from kvc.fsutil import staging_dir
    from kvc.models.export import ExportOptions, check_export_target, commit_export, export_onnx
    from kvc.models.loaders.source import load_source

    if output.suffix != ".onnx":
        raise KvcError(f"output {output} must end in .onnx")
    check_export_target(output, overwrite)  # before minutes of loading; checked again at commit
    loaded = load_source(source, seed=seed, tokenizer_path=tokenizer_path)
    generation = dataclasses.asdict(loaded.generation)
    with staging_dir(output.parent) as staging:
        export_onnx(loaded.model, loaded.config, staging / output.name,
                    ExportOptions(external_data=external_data), generation=generation)
        if loaded.tokenizer is not None:
            from kvc.models.tokenizer import save_tokenizer

            save_tokenizer(loaded.tokenizer, staging, loaded.generation, chat_template=loaded.chat_template)
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True))
        commit_export(staging, output, overwrite)
    click.echo(f"wrote {output} ({loaded.config.name or loaded.config.family.value}, "
               f"{loaded.config.num_parameters() / 1e6:.1f}M parameters, {loaded.config.num_layers} layers)")
