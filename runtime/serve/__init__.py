"""``kvc serve``: an OpenAI-compatible HTTP server over the continuous-batching scheduler
(kvc.runtime.scheduler). Needs the ``kvc[serve]`` extra (Starlette, uvicorn)."""
