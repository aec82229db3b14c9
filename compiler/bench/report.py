"""Ways to show a bench result: a rich table, JSON, CSV and a Markdown table for the README."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from kvc.compiler.bench.results import DECODE, PREFILL, Row
from kvc.compiler.bench.run import OK, BenchResult

CSV_FIELDS = [f.name for f in dataclasses.fields(Row)]


@dataclasses.dataclass(frozen=True)
class TableLine:
    """Prefill and decode of one (engine, dtype, context), side by side."""

    engine: str
    kv_dtype: str
    context: int
    prefill: Row | None
    decode: Row | None


def table_lines(result: BenchResult) -> list[TableLine]:
    keyed: dict[tuple, dict[str, Row]] = {}
    for row in result.rows:
        keyed.setdefault((row.engine, row.kv_dtype, row.context), {})[row.metric] = row
    return [TableLine(e, d, c, m.get(PREFILL), m.get(DECODE)) for (e, d, c), m in keyed.items()]


def _decode_cells(row: Row | None) -> list[str]:
    if row is None:
        return ["-"] * 5
    return [f"{row.median:.2f}", f"{row.min:.2f}-{row.max:.2f}", f"{1e3 / row.median:.1f}",
            f"{row.bytes_per_token / 1e6:.1f}", _percent(row.bandwidth_fraction)]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%" if fraction >= 0.095 else f"{100 * fraction:.1f}%"


COLUMNS = ["engine", "KV dtype", "context", "prefill tok/s", "decode ms/token", "min-max", "decode tok/s",
           "MB read/token", "% of measured BW"]


def _cells(line: TableLine) -> list[str]:
    prefill = f"{line.prefill.median:.0f}" if line.prefill is not None else "-"
    return [line.engine, line.kv_dtype, str(line.context), prefill, *_decode_cells(line.decode)]


def unavailable(result: BenchResult) -> dict[str, str]:
    return {k: v for k, v in result.engines.items() if v != OK}


def print_table(result: BenchResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    # Piped output keeps whole lines instead of wrapping the table to 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    machine = result.header["machine"]
    table = Table(title=f"{result.header['model']['description']} on {machine['cpu']}, "
                        f"{machine['threads_used']} thread(s), measured bandwidth "
                        f"{machine['measured_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for line in table_lines(result):
        table.add_row(*_cells(line))
    console.print(table)
    for label, reason in unavailable(result).items():
        console.print(f"{label}: {reason}", markup=False)


def markdown_table(result: BenchResult) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(line)) + " |" for line in table_lines(result)]
    lines += [f"\n{label}: {reason}" for label, reason in unavailable(result).items()]
    return "\n".join(lines) + "\n"


def write_json(result: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def write_csv(result: BenchResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(row.to_dict())
