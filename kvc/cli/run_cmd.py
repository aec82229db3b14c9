"""`kvc run ARTIFACT --prompt "..."`: stream generated text to stdout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kvc.errors import GenerationError, KvcError
from kvc.userfiles import MAX_TEXT_BYTES, check_text, decode_utf8, read_stream_bytes


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise GenerationError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _prompt_text(prompt: str) -> str:
    """--prompt TEXT, or stdin for '-': at most MAX_TEXT_BYTES of strict UTF-8 either way."""
    if prompt != "-":
        return check_text(prompt, "--prompt", GenerationError)
    data = read_stream_bytes(sys.stdin.buffer, "the prompt on stdin", MAX_TEXT_BYTES, GenerationError)
    return decode_utf8(data, "the prompt on stdin", GenerationError)


def require_cuda_device() -> None:
    """Refuse --device cuda on a machine without a usable CUDA device before loading: ONNX Runtime's
    GPU build lists CUDAExecutionProvider regardless, then silently runs on the CPU."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        usable = cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (OSError, AttributeError):  # no NVIDIA driver library
        usable = False
    if not usable:
        raise KvcError("--device cuda: this machine has no usable CUDA device (no NVIDIA driver or GPU); "
                       "use --device cpu")


@click.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, help="Prompt text; '-' reads it from stdin.")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids instead of text, e.g. 1,5,9.")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable).")
@click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Stop token id (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS tokens.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("--on-overflow", type=click.Choice(["refuse", "slide"]), default="refuse", show_default=True,
              help="slide: let the ring buffer wrap (sliding-window attention over the last capacity tokens).")
@click.option("--sink-tokens", type=int, default=0, show_default=True,
              help="With --on-overflow slide: keep the first N tokens in the cache forever (attention sinks, "
                   "StreamingLLM-style); the other capacity-N slots slide. Keys keep their true RoPE positions "
                   "(window attention with sinks over absolute positions, no re-rotation).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=0, help="Compute threads (0: engine default).")
@click.option("--stats", is_flag=True, help="Print prefill/decode speed, time to first token, KV bytes (stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run(artifact: Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int, temperature: float,
        top_k: int, top_p: float, min_p: float, repetition_penalty: float, seed: int | None,
        stop_strings: tuple[str, ...], stop_token_ids: tuple[int, ...], ignore_eos: bool, chat: bool,
        system: str | None, on_overflow: str, sink_tokens: int, device: str, threads: int, stats: bool,
        as_json: bool) -> None:
    """Generate text with a compiled ARTIFACT (see `kvc compile`)."""
    from kvc.runtime.generate import Overflow, OverflowPolicy
    from kvc.runtime.model import LoadOptions, load
    from kvc.runtime.sampling import SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise GenerationError("give exactly one of --prompt TEXT (or '-' for stdin) and --prompt-ids 1,2,3")
    overflow = Overflow(OverflowPolicy(on_overflow), sink_tokens=sink_tokens)  # checked before loading
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, max_new_tokens=max_new_tokens,
                            stop_strings=stop_strings, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
    text = _prompt_text(prompt) if prompt is not None else None  # before loading: stdin may be bad
    for value, what in [(system, "--system"), *((s, "--stop") for s in stop_strings)]:
        if value is not None:
            check_text(value, what, GenerationError)
    if device == "cuda":
        require_cuda_device()
    model = load(artifact, LoadOptions(device=device, threads=threads))
    if prompt_ids is not None:
        request = _parse_ids(prompt_ids)
    else:
        request = _apply_chat(model, text, system) if chat else text
    if as_json:
        result = model.generate(request, params, overflow)
        click.echo(json.dumps(result.to_dict()))
        return
    if model.tokenizer is None:  # nothing to detokenize with: the ids are the output
        result = model.generate(request, params, overflow)
        click.echo(",".join(str(t) for t in result.token_ids))
        if stats:
            _print_stats(result)
        return
    with _Spinner(enabled=sys.stderr.isatty()) as spinner:
        for event in model.stream(request, params, overflow):
            spinner.stop()
            if event.text:
                click.echo(event.text, nl=False)
                sys.stdout.flush()
    click.echo()
    result = model.last_result
    if stats:
        _print_stats(result)


def _apply_chat(model, text: str, system: str | None) -> str:
    from kvc.runtime.chat_template import ChatTemplate

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return ChatTemplate.from_dir(model.root).render(messages, add_generation_prompt=True)


def _print_stats(result) -> None:
    s = result.stats
    click.echo(f"finish: {result.finish_reason.value}; prompt {s.prompt_tokens} tokens "
               f"({s.prefix_cache_tokens} from prefix cache), generated {s.generated_tokens}", err=True)
    click.echo(f"prefill {s.prefill_tokens_per_s:.1f} tok/s, decode {s.decode_tokens_per_s:.1f} tok/s, "
               f"time to first token {s.time_to_first_token_s * 1e3:.1f} ms, KV in use {s.kv_bytes_in_use / 1e6:.3f} MB",
               err=True)


class _Spinner:
    """A 'prefilling...' status on stderr while waiting for the first token, only on a terminal."""

    def __init__(self, enabled: bool):
        self.status = None
        if enabled:
            from rich.console import Console

            self.status = Console(stderr=True).status("prefilling...")

    def __enter__(self):
        if self.status is not None:
            self.status.start()
        return self

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __exit__(self, *exc) -> None:
        self.stop()
