"""Fixtures for kvc serve: a tiny seeded artifact with a byte-level tokenizer and a chat template,
and a server on 127.0.0.1 (a free port) in a background thread, stopped after the test."""
from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CAPACITY = 128
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _byte_tokenizer():
    """256 ids: <unk>, <s>, </s>, then one token per byte (GPT-2's byte-to-character map), so any
    text encodes and any id the random model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    order = list(range(32, 256)) + [9, 10, 13] + [b for b in range(3, 32) if b not in (9, 10, 13)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chars[b]: 3 + i for i, b in enumerate(order)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


@pytest.fixture(scope="session")
def serve_artifact(exported, tmp_path_factory):
    from kvc.compiler.options import CompileOptions
    from kvc.compiler.pipeline import compile_model

    _, _, onnx_path = exported("tiny")
    source = tmp_path_factory.mktemp("serve-export")
    shutil.copytree(onnx_path.parent, source, dirs_exist_ok=True)
    _byte_tokenizer().save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    out = tmp_path_factory.mktemp("serve-artifact") / "tiny-chat.kvc"
    compile_model(source / onnx_path.name, out, CompileOptions(max_seq_len=CAPACITY), progress=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def reference(serve_artifact):
    """The artifact loaded alone (max_batch=1): what every served request must reproduce."""
    import kvc

    return kvc.load(serve_artifact)


@contextlib.contextmanager
def running_server(artifact, config):
    """Yields (base_url, ServerState) of a uvicorn server on a free loopback port."""
    import uvicorn

    from kvc.runtime.serve.app import build_app
    from kvc.runtime.serve.state import ServerState

    state = ServerState.load(artifact, config)
    server = uvicorn.Server(uvicorn.Config(build_app(state, manage_lifetime=True), host="127.0.0.1", port=0,
                                           log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def server(serve_artifact):
    from kvc.runtime.scheduler import SchedulerOptions
    from kvc.runtime.serve.state import ServerConfig

    config = ServerConfig(max_batch=4, model_name="tiny", api_key="test-key", timeout_s=60,
                          max_body_bytes=64 * 1024, scheduler=SchedulerOptions(prefill_chunk=16, max_queue=64))
    with running_server(serve_artifact, config) as (url, state):
        yield url, state
