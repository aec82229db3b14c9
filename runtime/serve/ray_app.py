"""The same app as a Ray Serve deployment: N replicas, each loading the artifact once.

Ray Serve's HTTP proxy routes each request to a replica (least loaded of two picked at random) and
streams the response back; each replica is one ``ServerState`` (engine + scheduler thread), so
continuous batching happens inside a replica and Ray spreads requests across replicas. On a Ray
cluster (``ray start --head`` on one machine, ``ray start --address=HEAD:6379`` on the others, the
artifact at the same path on each) replicas are placed on any node with a free CPU. It is data
parallelism only: every replica holds the whole model; no tensor or pipeline parallelism.

Python entry point::

    from ray import serve
    from kvc.runtime.serve.ray_app import build
    from kvc.runtime.serve.state import ServerConfig
    serve.run(build("out.kvc", ServerConfig(max_batch=8), replicas=2), route_prefix="/")
"""
from __future__ import annotations

import os

from ray import serve

from kvc.runtime.serve.app import build_app
from kvc.runtime.serve.state import ServerConfig, ServerState


@serve.ingress()
class KvcReplica:
    def __init__(self, artifact: str, config: ServerConfig):
        self.state = ServerState.load(artifact, config).start()

    def __serve_build_asgi_app__(self):
        return build_app(self.state)

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.close()


def build(artifact: str | os.PathLike, config: ServerConfig, replicas: int = 1,
          cpus_per_replica: float = 1.0) -> serve.Application:
    """A Ray Serve application of ``replicas`` copies of the server. Each replica lets through
    max_batch + max_queue requests at once; past that Ray Serve itself answers 503."""
    deployment = serve.deployment(KvcReplica, name="kvc", num_replicas=replicas,
                                  max_ongoing_requests=config.max_batch + config.scheduler.max_queue,
                                  ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment.bind(os.fspath(os.path.abspath(artifact)), config)


def run(artifact: str | os.PathLike, config: ServerConfig, replicas: int, host: str, port: int,
        blocking: bool = True, address: str | None = None) -> None:
    """Start (or join, with ``address``) a Ray instance, serve on host:port until interrupted."""
    import ray

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    cpus = max(0.1, min(1.0, ray.available_resources().get("CPU", 1.0) / replicas))
    serve.run(build(artifact, config, replicas, cpus), name="kvc", route_prefix="/", blocking=blocking)
