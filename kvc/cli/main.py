"""The ``kvc`` command. Subcommands are imported only when invoked, so ``kvc --help`` stays fast
(no torch, TVM or ONNX Runtime import)."""
from __future__ import annotations

import importlib
import sys

import click

from kvc._version import __version__

# command name -> (module, attribute, one-line help shown by `kvc --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "export": ("kvc.cli.export_cmd", "export", "Export a model to ONNX with explicit past key/values."),
    "compile": ("kvc.cli.compile_cmd", "compile_", "Run the graph passes and build an artifact (ORT or TVM engine)."),
    "calibrate": ("kvc.cli.calibrate_cmd", "calibrate", "Measure static FP8 KV-cache scales on sample text."),
    "run": ("kvc.cli.run_cmd", "run", "Generate text with a compiled artifact."),
    "bench": ("kvc.cli.bench_cmd", "bench", "Measure prefill and decode speed against context depth."),
    "plan": ("kvc.cli.plan_cmd", "plan", "Plan KV-cache memory and the bandwidth floor of a decode step."),
    "serve": ("kvc.cli.serve_cmd", "serve", "Serve an artifact over OpenAI's HTTP API with continuous batching."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        """User errors end in one line on stderr and exit 1, never a traceback (see ``_fail``)."""
        from kvc.errors import Interrupted, KvcError

        try:
            return super().invoke(ctx)
        except KvcError as exc:
            _fail(str(exc))
        except Interrupted as exc:  # raised inside kvc's atomic writes, which removed their staging data
            _fail(f"{exc}; no partial output was left", 128 + exc.signum)
        except OSError as exc:  # a file kvc had no reason to doubt failed (disk full, permissions changed)
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}; check the path, its permissions and free space")
        except MemoryError:
            _fail("out of memory; use a smaller model, batch or context")


def _fail(message: str, code: int = 1) -> None:
    click.echo("error: " + " ".join(message.split()), err=True)  # one line, whatever the message held
    sys.exit(code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvc")
def cli() -> None:
    """kvc: compile decoder-only LLMs into engines whose KV cache is an in-place ring buffer."""


if __name__ == "__main__":
    cli()
