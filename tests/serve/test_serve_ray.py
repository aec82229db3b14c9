"""The same load through Ray Serve: 2 replicas of the app on a local Ray instance (loopback only),
each loading the artifact once; every completed greedy response equals generate() alone."""
from __future__ import annotations

import asyncio
import socket

import pytest

pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from load_jobs import check_results, drive, make_jobs  # noqa: E402

pytestmark = pytest.mark.slow  # ~60 s on 2 cores, most of it Ray starting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(serve_artifact):
    from kvc.runtime.serve.ray_app import build
    from kvc.runtime.serve.state import ServerConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(max_batch=4, model_name="tiny", api_key="test-key", timeout_s=120)
        serve.run(build(serve_artifact, config, replicas=2, cpus_per_replica=0.5), name="kvc", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_load_correctly(ray_server, reference):
    status = serve.status().applications["kvc"]
    replicas = status.deployments["kvc"].replica_states
    assert replicas.get("RUNNING") == 2
    jobs = make_jobs(seed=1)
    check_results(reference, jobs, asyncio.run(drive(ray_server, jobs)))
    again = asyncio.run(drive(ray_server, jobs[:4], clients=2))
    check_results(reference, jobs[:4], again)


def test_bad_input_through_ray_is_still_a_400(ray_server):
    import httpx

    response = httpx.post(f"{ray_server}/v1/completions", content=b"{oops",
                          headers={"Authorization": "Bearer test-key"}, timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
