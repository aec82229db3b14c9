"""GET /metrics: the scheduler's counters in Prometheus' text exposition format."""
from __future__ import annotations

from kvc.runtime.scheduler_stats import StatsSnapshot

PREFIX = "kvc"


def render(snap: StatsSnapshot, model: str, http_responses: dict[int, int]) -> str:
    label = f'model="{_escape(model)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {PREFIX}_{name} {help_}", f"# TYPE {PREFIX}_{name} {kind}"])
        lines.extend(f"{PREFIX}_{name}{suffix} {_number(value)}" for suffix, value in samples)

    ends = sorted(snap.requests_by_end.items()) or [("stop", 0)]
    metric("requests_total", "counter", "Requests ended, by how they ended.",
           [(f'{{{label},end="{end}"}}', count) for end, count in ends])
    codes = sorted(http_responses.items()) or [(200, 0)]
    metric("http_responses_total", "counter", "Responses under /v1, by status code (refusals included).",
           [(f'{{{label},code="{code}"}}', count) for code, count in codes])
    metric("queue_depth", "gauge", "Requests waiting for a cache row.", [(f"{{{label}}}", snap.queue_depth)])
    metric("batch_rows_busy", "gauge", "Cache rows generating for a request.", [(f"{{{label}}}", snap.rows_busy)])
    metric("batch_rows_total", "gauge", "Cache rows available for decoding.", [(f"{{{label}}}", snap.rows_total)])
    occupancy = snap.decode_rows / snap.decode_steps if snap.decode_steps else 0.0
    metric("batch_occupancy_mean", "gauge", "Mean requests per decode step since start.",
           [(f"{{{label}}}", occupancy)])
    metric("kv_slots_in_use", "gauge", "KV-cache token slots holding a live request's tokens.",
           [(f"{{{label}}}", snap.kv_slots_in_use)])
    metric("kv_slots_total", "gauge", "KV-cache token slots of the decode rows.", [(f"{{{label}}}", snap.kv_slots_total)])
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [(f"{{{label}}}", snap.prompt_tokens)])
    metric("prefix_cache_tokens_total", "counter", "Prompt tokens served from shared prefix KV.",
           [(f"{{{label}}}", snap.prefix_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [(f"{{{label}}}", snap.generated_tokens)])
    metric("decode_steps_total", "counter", "Batched decode steps run.", [(f"{{{label}}}", snap.decode_steps)])
    metric("prefill_chunks_total", "counter", "Prefill chunks run.", [(f"{{{label}}}", snap.prefill_chunks)])
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [(f"{{{label}}}", snap.tokens_per_s)])
    ttft = snap.ttft
    buckets = [(f'_bucket{{{label},le="{_number(b)}"}}', c) for b, c in zip(ttft.buckets, ttft.counts)]
    metric("time_to_first_token_seconds", "histogram", "From arrival to the first generated token.",
           buckets + [(f'_bucket{{{label},le="+Inf"}}', ttft.count), (f"_sum{{{label}}}", ttft.total),
                      (f"_count{{{label}}}", ttft.count)])
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
