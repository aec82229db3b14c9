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
    """Prefill and decode of one (engine, dtype, capacity, batch, context), side by side."""

    engine: str
    kv_dtype: str
    capacity: int | None
    batch: int
    context: int
    prefill: Row | None
    decode: Row | None


def table_lines(rows: list[Row]) -> list[TableLine]:
    keyed: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        keyed.setdefault((row.engine, row.kv_dtype, row.capacity, row.batch, row.context), {})[row.metric] = row
    return [TableLine(*key, m.get(PREFILL), m.get(DECODE)) for key, m in keyed.items()]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%" if fraction >= 0.095 else f"{100 * fraction:.1f}%"


def _decode_cells(row: Row | None, batch: int) -> list[str]:
    if row is None:
        return ["-"] * 7
    floor = f"{row.floor_ms:.2f}" if row.floor_ms is not None else "-"
    share = _percent(row.bandwidth_fraction) if row.bandwidth_fraction is not None else "-"
    traffic = f"{row.bytes_per_token / 1e6:.1f}" if row.bytes_per_token is not None else "-"
    return [row.fill, f"{row.median:.2f}", f"{row.min:.2f}-{row.max:.2f}", f"{1e3 * batch / row.median:.1f}",
            traffic, floor, share]


DECODE_COLUMNS = ["decode fill", "decode ms/step", "min-max", "decode tok/s (all rows)", "MB read/step",
                  "floor ms/step (roofline)", "% of measured BW"]


def columns(with_capacity: bool) -> list[str]:
    head = ["engine", "KV dtype"] + (["capacity"] if with_capacity else []) + ["batch", "context"]
    return head + ["prefill tok/s"] + DECODE_COLUMNS


def _cells(line: TableLine, with_capacity: bool) -> list[str]:
    prefill = f"{line.prefill.median:.0f}" if line.prefill is not None else "-"
    capacity = [str(line.capacity) if line.capacity is not None else "-"] if with_capacity else []
    return [line.engine, line.kv_dtype, *capacity, str(line.batch), str(line.context), prefill,
            *_decode_cells(line.decode, line.batch)]


def _with_capacity(rows: list[Row]) -> bool:
    """Name the capacity only where it varies between rows of one engine."""
    seen: dict[tuple, set] = {}
    for row in rows:
        if row.capacity is not None:
            seen.setdefault((row.engine, row.kv_dtype), set()).add(row.capacity)
    return any(len(c) > 1 for c in seen.values())


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
    with_capacity = _with_capacity(result.rows)
    for i, name in enumerate(columns(with_capacity)):
        table.add_column(name, justify="left" if i < 2 else "right")
    for line in table_lines(result.rows):
        table.add_row(*_cells(line, with_capacity))
    console.print(table)
    for label, reason in unavailable(result).items():
        console.print(f"{label}: {reason}", markup=False)


def markdown_table(result: BenchResult) -> str:
    with_capacity = _with_capacity(result.rows)
    head = columns(with_capacity)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(line, with_capacity)) + " |" for line in table_lines(result.rows)]
    missing = unavailable(result)
    if missing:
        lines += [""] + [f"- {label}: {reason}" for label, reason in missing.items()]
    return "\n".join(lines) + "\n"


def write_json(result: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def write_csv(result: BenchResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(row.to_dict())
