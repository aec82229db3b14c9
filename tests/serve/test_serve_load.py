"""A bounded load test against 4 decode rows (kvc serve, uvicorn): every completed greedy response equals
the same request run alone, nothing is lost or mixed, abandoned streams free their rows, and the server
keeps serving afterwards."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("openai")

from load_jobs import check_results, drive, make_jobs  # noqa: E402


def test_load_with_streams_and_abandoned_requests(server, reference):
    url, state = server
    jobs = make_jobs()
    results = asyncio.run(drive(url, jobs))
    check_results(reference, jobs, results)
    deadline = time.monotonic() + 30
    while state.scheduler.stats.snapshot().rows_busy and time.monotonic() < deadline:
        time.sleep(0.05)
    snap = state.scheduler.stats.snapshot()
    assert snap.rows_busy == 0 and snap.queue_depth == 0
    abandoned = sum(j.abandon for j in jobs)
    assert snap.requests_by_end.get("cancelled", 0) >= abandoned // 2  # rows freed before max_tokens
    assert sum(snap.requests_by_end.values()) == len(jobs)
    assert snap.decode_rows / snap.decode_steps > 1.5  # requests really shared decode steps
    # still serving
    again = asyncio.run(drive(url, jobs[:4], clients=2))
    check_results(reference, jobs[:4], again)
