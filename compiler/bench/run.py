"""`kvc bench` end to end: resolve SOURCE, measure the machine's bandwidth, time every engine at
every context depth, and collect rows plus a header describing the machine and the settings."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kvc.compiler.bench.bandwidth import Roofline, measure_bandwidth, weight_bytes_per_token
from kvc.compiler.bench.machine import machine_info
from kvc.compiler.bench.measure import DepthPlan, measure_depth, random_prompt, steps_per_depth
from kvc.compiler.bench.options import BenchConfig, EngineName, FillMode
from kvc.compiler.bench.progress import BenchProgress, NullProgress
from kvc.compiler.bench.results import Row, RowContext, rows_for_depth
from kvc.compiler.bench.sources import EngineSlot, plan_source
from kvc.errors import KvcError

OK = "ok"


@dataclass
class BenchResult:
    header: dict
    rows: list[Row] = field(default_factory=list)
    engines: dict[str, str] = field(default_factory=dict)  # "engine/dtype" -> "ok" | "unavailable: why"

    def to_dict(self) -> dict:
        return {"header": {**self.header, "engines": self.engines}, "rows": [r.to_dict() for r in self.rows]}


@contextlib.contextmanager
def work_directory(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="kvc-bench-") as tmp:
        yield Path(tmp)


def run_bench(source: str, bench: BenchConfig, progress: BenchProgress = NullProgress(),
              bandwidth: float | None = None, bandwidth_probe: str | None = None) -> BenchResult:
    """Benchmark SOURCE; ``bandwidth`` (bytes/s) skips the probe when already known, ``bandwidth_probe``
    then says how it was measured (default: given by the caller)."""
    threads = bench.resolved_threads()
    with work_directory(bench.work_dir) as work:
        target = plan_source(source, bench, work, progress.note)
        requested = bench.contexts
        bench = fit_positions(bench, target.config, progress.note)
        given = bandwidth is not None
        if bandwidth is None:
            progress.note(f"measuring memory bandwidth on {threads} thread(s)")
            bandwidth = measure_bandwidth(threads=threads)
        result = BenchResult(_header(source, target, bench, threads, bandwidth, given, bandwidth_probe),
                             engines=dict(target.unavailable))
        result.header["settings"]["contexts_requested"] = list(requested)
        progress.begin(len(target.slots) * _steps(bench))
        try:
            for slot in target.slots:
                result.engines[slot.label] = _bench_slot(slot, target.config, bench, bandwidth, result.rows, progress)
        finally:
            progress.end()
    return result


def fit_positions(bench: BenchConfig, config, note=lambda _msg: None) -> BenchConfig:
    """Contexts whose timed steps would run past the model's positions (RoPE tables end there) move
    down to the deepest that fits (llama-100m: 8192 positions, so 8192 with --gen 32 is timed at 8160,
    its steps attending up to 8192 tokens)."""
    limit = config.max_position_embeddings
    if not limit or bench.capacity <= limit:
        return bench
    deepest = limit - bench.gen
    if deepest < 1:
        raise KvcError(f"--gen {bench.gen} leaves no context within {config.name or 'the model'}'s {limit} positions")
    fit = lambda c: min(c, deepest)  # noqa: E731
    contexts = tuple(sorted({fit(c) for c in bench.contexts}))
    prefill = None if bench.prefill_contexts is None else tuple(sorted({fit(c) for c in bench.prefill_contexts}))
    note(f"{config.name or 'the model'} has {limit} positions: contexts above {deepest} are timed at {deepest}")
    return dataclasses.replace(bench, contexts=contexts, prefill_contexts=prefill)


def _bench_slot(slot: EngineSlot, config, bench: BenchConfig, bandwidth: float, rows: list[Row],
                progress: BenchProgress) -> str:
    """Time one engine at every context; its rows are kept only once every context succeeded.

    A kvc engine that cannot be built or loaded at some cache dtype, and a TVM engine that fails
    at all (the engine is optional where it cannot build), are recorded as "unavailable: why"
    instead of ending the run; a baseline or kvc-ort failing mid-measurement still raises."""
    progress.describe(f"{slot.label}: building")
    steps = _steps(bench)
    try:
        runner = slot.open()
    except Exception as exc:
        if not slot.engine.is_kvc:
            raise
        return _unavailable(slot, exc, progress, steps)
    roofline = Roofline(weight_bytes_per_token(config, weights=slot.weights), runner.kv_bytes_per_token(), bandwidth)
    ctx = RowContext(slot.row_engine, slot.kv_dtype, bench.batch, bench.gen, slot.capacity, bench.fill.value,
                     roofline)
    done = 0
    try:
        new_rows = []
        for depth in bench.contexts:
            progress.describe(f"{slot.label} @ {depth}")
            prompt = random_prompt(config.vocab_size, bench.batch, depth, bench.seed)
            plan = depth_plan(bench, depth)
            samples = measure_depth(runner, prompt, plan, on_step=progress.advance)
            done += steps_per_depth(plan)
            new_rows += rows_for_depth(ctx, depth, samples)
    except Exception as exc:
        if slot.engine is not EngineName.KVC_TVM:
            raise
        return _unavailable(slot, exc, progress, steps - done)
    finally:
        del runner
        gc.collect()  # free this engine's weights before the next one loads
    rows.extend(new_rows)
    return OK


def depth_plan(bench: BenchConfig, depth: int) -> DepthPlan:
    return DepthPlan(gen=bench.gen, reps=bench.reps, warmup=bench.warmup, chunk=min(bench.prefill_chunk, depth),
                     prefill_reps=bench.resolved_prefill_reps, fill=bench.fill,
                     time_prefill=bench.times_prefill_at(depth), synthetic_tokens=bench.synthetic_tokens)


def _steps(bench: BenchConfig) -> int:
    """Progress steps of one engine at every context."""
    return sum(steps_per_depth(depth_plan(bench, d)) for d in bench.contexts)


def _unavailable(slot: EngineSlot, exc: Exception, progress: BenchProgress, steps_left: int) -> str:
    progress.advance(steps_left)  # the bar still reaches its end
    status = f"unavailable: {_one_line(exc)}"
    progress.note(f"{slot.label} {status}")
    return status


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _header(source: str, target, bench: BenchConfig, threads: int, bandwidth: float, given: bool,
            probe: str | None) -> dict:
    config = target.config
    return {"machine": machine_info(threads, bandwidth, given, probe),
            "model": {"source": source, "description": target.description, "name": config.name,
                      "parameters": config.num_parameters(), "layers": config.num_layers,
                      "vocab_size": config.vocab_size,
                      "kv_heads": config.num_kv_heads, "head_dim": config.resolved_head_dim,
                      "weight_bytes_read_per_token": weight_bytes_per_token(config)},
            "settings": {"contexts": list(bench.contexts), "gen": bench.gen, "batch": bench.batch,
                         "reps": bench.reps, "warmup": bench.warmup,
                         "prefill_reps": bench.resolved_prefill_reps, "threads": threads,
                         "prefill_chunk": bench.prefill_chunk, "capacities": list(bench.resolved_capacities),
                         "seed": bench.seed, "kv_dtypes": list(bench.kv_dtypes),
                         "engines": [e.value for e in bench.engines], "fill": bench.fill.value,
                         "synthetic_tokens": bench.synthetic_tokens,
                         "prefill_contexts": list(bench.prefill_contexts or bench.contexts)},
            "method": method_text(bench)}


def method_text(bench: BenchConfig) -> str:
    if bench.fill is FillMode.SYNTHETIC:
        fill = (f"per context: SYNTHETIC fill: a real prefill of the first {bench.synthetic_tokens} tokens of a "
                "random prompt, its K/V rows (stored dtype, scales included) tiled to `context` slots and written "
                "straight into the engine's cache, length set to `context`")
    else:
        fill = ("per context: REAL fill: prefill an empty cache with a random prompt of `context` tokens in chunks "
                "of prefill_chunk")
    return (fill + "; then per repetition rewind to `context` and time `gen` greedy decode steps of one token per "
            "row (decode_ms_per_token = step time; `warmup` untimed first, `reps` timed); prefill_tok_s: "
            "`prefill_reps` real prefills from an empty cache at prefill_contexts (0 with a real fill: the first "
            "fill). Median and min/max over the timed repetitions. bytes_per_token: weights read once per step + "
            "every row's live KV (K and V, all layers, stored dtype incl. scales, measured from the engine's "
            "buffers) at the mean attended length context + (gen+1)/2; floor_ms = bytes_per_token / measured "
            "bandwidth (the roofline); bandwidth_fraction = floor_ms / median step time. torch-concat and "
            "ort-concat keep an fp32 concat cache; torch-static an fp32 preallocated one.")
