"""``kvc serve``: an OpenAI-compatible HTTP server with continuous batching (extra: kvc[serve])."""
from __future__ import annotations

import os

import click

from kvc.errors import KvcError


@click.command("serve")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Requests decoding together (cache rows; one more row is allocated for prefill).")
@click.option("--api-key", default=None, envvar="KVC_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set KVC_API_KEY).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests waiting for a row; more get 503.")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may take from arrival to its last token.")
@click.option("--prefill-chunk", default=128, show_default=True, type=click.IntRange(1),
              help="Prompt tokens prefilled between two decode steps.")
@click.option("--prefix-cache-tokens", default=8192, show_default=True, type=click.IntRange(0),
              help="Prompt tokens whose KV is kept for reuse by later prompts (0: off).")
@click.option("--model-name", default=None, help="The model id clients pass (default: the artifact's name).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0), help="Engine threads (0: all cores).")
@click.option("--ray", "use_ray", is_flag=True, help="Serve through Ray Serve (extra: kvc[ray]).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1),
              help="With --ray: copies of the model, each with its own engine.")
@click.option("--ray-address", default=None, help="With --ray: join this Ray cluster instead of starting one.")
def serve(artifact: str, host: str, port: int, max_batch: int, api_key: str | None, max_queue: int,
          timeout_s: float, prefill_chunk: int, prefix_cache_tokens: int, model_name: str | None, threads: int,
          use_ray: bool, replicas: int, ray_address: str | None) -> None:
    """Serve ARTIFACT with OpenAI's /v1/completions, /v1/chat/completions and /v1/models."""
    config = _config(max_batch, model_name or os.path.basename(os.path.abspath(artifact)), api_key, timeout_s,
                     threads, max_queue, prefill_chunk, prefix_cache_tokens)
    if use_ray:
        _serve_ray(artifact, config, replicas, host, port, ray_address)
    else:
        if replicas != 1 or ray_address:
            raise click.UsageError("--replicas and --ray-address need --ray")
        _serve_local(artifact, config, host, port)


def _config(max_batch, model_name, api_key, timeout_s, threads, max_queue, prefill_chunk, prefix_cache_tokens):
    try:
        from kvc.runtime.serve.state import ServerConfig
    except ImportError as exc:
        raise KvcError(f"kvc serve needs the serve extra ({exc.name} is missing): pip install 'kvc[serve]'") from None
    from kvc.runtime.scheduler import SchedulerOptions

    return ServerConfig(max_batch=max_batch, model_name=model_name, api_key=api_key, timeout_s=timeout_s,
                        threads=threads, scheduler=SchedulerOptions(max_queue=max_queue, prefill_chunk=prefill_chunk,
                                                                    prefix_cache_tokens=prefix_cache_tokens))


def _serve_local(artifact: str, config, host: str, port: int) -> None:
    try:
        import uvicorn
    except ImportError:
        raise KvcError("kvc serve needs uvicorn: pip install 'kvc[serve]'") from None
    from kvc.runtime.serve.app import build_app
    from kvc.runtime.serve.state import ServerState

    state = ServerState.load(artifact, config)
    click.echo(f"serving {state.model_name} (capacity {state.model.capacity} tokens, {config.max_batch} rows) "
               f"on http://{host}:{port}/v1", err=True)
    uvicorn.run(build_app(state, manage_lifetime=True), host=host, port=port, log_level="warning")


def _serve_ray(artifact: str, config, replicas: int, host: str, port: int, address: str | None) -> None:
    try:
        from kvc.runtime.serve.ray_app import run
    except ImportError:
        raise KvcError("kvc serve --ray needs Ray Serve: pip install 'kvc[ray]'") from None
    click.echo(f"serving {config.model_name} with Ray Serve, {replicas} replicas, on http://{host}:{port}/v1", err=True)
    run(artifact, config, replicas, host, port, blocking=True, address=address)
