"""Bad requests get a 4xx in OpenAI's error schema that says what is wrong, and the server keeps serving."""
from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")

AUTH = {"Authorization": "Bearer test-key"}
OK = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def http(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        yield client


def _error(response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


def _post(http, body, path="/v1/completions"):
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("raw, needle", [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
                                         (b"\xff\xfe", "not valid JSON"), (b"", "not valid JSON")])
def test_malformed_body(http, raw, needle):
    _error(http.post("/v1/completions", content=raw), 400, needle)


@pytest.mark.parametrize("field, value, needle", [
    ("temperature", "0.5", "temperature"), ("max_tokens", 2.5, "max_tokens"), ("max_tokens", True, "max_tokens"),
    ("prompt", 5, "prompt"), ("stop", 3, "stop"), ("stream", "yes", "stream"), ("seed", "1", "seed"),
    ("model", None, "model")])
def test_wrong_types(http, field, value, needle):
    error = _error(_post(http, OK | {field: value}), 400, needle)
    assert error["param"].split(".")[0] == field


def test_unknown_field_is_refused_like_openai(http):
    error = _error(_post(http, OK | {"temprature": 0.5}), 400, "Unrecognized request argument supplied: temprature")
    assert error["param"] == "temprature"


def test_missing_field(http):
    _error(_post(http, {"model": "tiny"}), 400, "Missing required parameter", "prompt")
    _error(_post(http, {"model": "tiny", "messages": []}, "/v1/chat/completions"), 400, "messages")


@pytest.mark.parametrize("field, value, needle", [
    ("temperature", -0.1, "temperature"), ("temperature", 2.5, "temperature"), ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"), ("max_tokens", 0, "max_tokens"), ("seed", -3, "seed"), ("n", 2, "n=2"),
    ("presence_penalty", 0.5, "presence_penalty"), ("logprobs", 3, "logprobs"), ("echo", True, "echo"),
    ("stop", ["a", "b", "c", "d", "e"], "stop sequences"), ("stop", [""], "stop")])
def test_invalid_sampling_values(http, field, value, needle):
    _error(_post(http, OK | {field: value}), 400, needle)


def test_chat_accepts_openai_fields_that_change_nothing(http):
    body = {"model": "tiny", "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
            "max_tokens": 2, "store": False, "metadata": {"a": "b"}, "parallel_tool_calls": True, "user": "u"}
    assert _post(http, body, "/v1/chat/completions").status_code == 200


def test_chat_checks(http):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _error(_post(http, base | {"messages": [{"role": "robot", "content": "x"}]}, "/v1/chat/completions"), 400, "role")
    _error(_post(http, base | {"messages": [{"role": "user"}]}, "/v1/chat/completions"), 400, "content")
    _error(_post(http, base | {"tools": [{"type": "function"}]}, "/v1/chat/completions"), 400, "tools")
    _error(_post(http, base | {"max_completion_tokens": 0}, "/v1/chat/completions"), 400, "max_completion_tokens")


def test_prompt_over_capacity(http, server):
    _, state = server
    capacity = state.model.capacity
    error = _error(_post(http, OK | {"prompt": "x" * (capacity + 5)}), 400, "exceeds", str(capacity))
    assert error["code"] == "context_length_exceeded"
    _error(_post(http, OK | {"prompt": [1] * (capacity + 1)}), 400, "capacity")


def test_token_ids_outside_the_vocabulary(http):
    for ids in ([1, 99999], [1, -4]):
        error = _error(_post(http, OK | {"prompt": ids}), 400, "outside", "vocabulary", str(ids[1]))
        assert error["param"] == "prompt"


def test_several_prompts_or_empty_prompt(http):
    _error(_post(http, OK | {"prompt": ["a", "b"]}), 400, "one prompt per request")
    _error(_post(http, OK | {"prompt": ""}), 400, "empty")


def test_oversized_body(http):
    _error(_post(http, OK | {"prompt": "x" * (80 * 1024)}), 413, "exceeds the limit")


def test_oversized_body_without_content_length(http):
    def body():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'
    _error(http.post("/v1/completions", content=body()), 413, "exceeds the limit")


def test_missing_key_is_401(server):
    url, _ = server
    _error(httpx.post(f"{url}/v1/completions", json=OK), 401, "API key")


def test_server_keeps_serving_after_bad_input(http):
    for raw in (b"{", b"null", json.dumps(OK | {"top_p": 9}).encode()):
        assert http.post("/v1/completions", content=raw).status_code == 400
    ok = _post(http, OK)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert http.get("/health").json() == {"status": "ok"}


def test_metrics_are_prometheus_text(http):
    _post(http, OK)
    text = http.get("/metrics").text
    for name in ("kvc_requests_total", "kvc_queue_depth", "kvc_batch_occupancy_mean", "kvc_kv_slots_in_use",
                 "kvc_generation_tokens_per_second", "kvc_time_to_first_token_seconds_bucket"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text
    count = [line for line in text.splitlines() if line.startswith("kvc_time_to_first_token_seconds_count")]
    assert int(count[0].split()[-1]) >= 1
    assert 'kvc_http_responses_total{model="tiny",code="400"}' in text
