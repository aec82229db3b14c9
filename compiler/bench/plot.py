"""Decode ms/token against context depth: one line per engine and cache dtype, log-x, min-max bars."""
from __future__ import annotations

from pathlib import Path

from kvc.compiler.bench.results import DECODE
from kvc.compiler.bench.run import BenchResult
from kvc.errors import KvcError


def write_plot(result: BenchResult, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise KvcError("--plot needs matplotlib; install it with pip install 'kvc[bench]'") from None
    matplotlib.use("Agg", force=True)  # files only: never open a window
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    batches = {r.batch for r in result.rows}
    capacities: dict[tuple, set] = {}
    for row in result.rows:
        capacities.setdefault((row.engine, row.kv_dtype), set()).add(row.capacity)
    for row in result.rows:
        if row.metric == DECODE:
            lines.setdefault(_label(row, len(batches) > 1, len(capacities[(row.engine, row.kv_dtype)]) > 1),
                             []).append(row)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for label, rows in lines.items():
        rows.sort(key=lambda r: r.context)
        x = [r.context for r in rows]
        y = [r.median for r in rows]
        err = [[r.median - r.min for r in rows], [r.max - r.median for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    machine = result.header["machine"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.context for rows in lines.values() for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("context depth (tokens in the cache)")
    ax.set_ylabel("decode ms / step (median, min-max)")
    ax.set_title(f"{result.header['model']['description']}\n{machine['cpu']}, {machine['threads_used']} thread(s)",
                 fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _label(row, show_batch: bool, show_capacity: bool) -> str:
    extra = ([f"batch {row.batch}"] if show_batch else []) + ([f"cap {row.capacity}"] if show_capacity else [])
    return f"{row.engine} ({row.kv_dtype} KV{', ' + ', '.join(extra) if extra else ''})"
