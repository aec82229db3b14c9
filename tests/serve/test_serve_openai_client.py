"""kvc serve driven by the official openai client: completions and chat, plain and streamed, against
the same requests run alone through kvc.load(...).generate."""
from __future__ import annotations

import pytest

from kvc.runtime.sampling import SamplingParams

openai = pytest.importorskip("openai")

KEY = "test-key"


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _alone(reference, prompt, max_tokens, **kw):
    return reference.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=max_tokens, **kw))


def _finish(result) -> str:
    return "length" if result.finish_reason.value == "length" else "stop"


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_equals_generate_alone(client, reference):
    prompt = "Once upon a time"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    ref = _alone(reference, prompt, 12)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == _finish(ref)
    assert out.usage.prompt_tokens == len(reference.encode(prompt))
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_from_token_ids(client, reference):
    ids = [1, 40, 41, 42, 43]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == _alone(reference, ids, 6).text


def test_streamed_completion_concatenates_to_the_same_text(client, reference):
    prompt = "The little dog"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = _alone(reference, prompt, 20)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [_finish(ref)]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_equals_generate_on_the_rendered_template(client, reference, server):
    _, state = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = state.chat_template.render(messages, add_generation_prompt=True)
    assert prompt == "<|system|>Be brief.\n<|user|>Hi there\n<|assistant|>"
    ref = _alone(reference, prompt, 10)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == _finish(ref)
    assert out.usage.completion_tokens == len(ref.token_ids)


def test_streamed_chat(client, reference, server):
    _, state = server
    messages = [{"role": "user", "content": "Tell me a story"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    ref = _alone(reference, state.chat_template.render(messages), 15)
    assert text == ref.text
    assert chunks[-1].choices[0].finish_reason == _finish(ref)


def test_stop_string_cuts_the_text(client, reference):
    prompt = "Once upon a time"
    full = _alone(reference, prompt, 24).text
    stop = full[5:7]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    ref = _alone(reference, prompt, 24, stop_strings=(stop,))
    assert out.choices[0].text == ref.text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_matches_generate(client, reference):
    prompt = "A cat"
    kw = dict(model="tiny", prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    first = client.completions.create(**kw).choices[0].text
    second = client.completions.create(**kw).choices[0].text
    ref = reference.generate(prompt, SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_new_tokens=16))
    assert first == second == ref.text


def test_wrong_api_key_is_401(server):
    url, _ = server
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_client_hangup_cancels_a_plain_request(server):
    """A non-streamed request whose client goes away ends as cancelled and frees its row."""
    import time

    import httpx

    url, state = server
    engine = state.model.engine
    forward = engine.forward
    engine.forward = lambda *args: (time.sleep(0.05), forward(*args))[1]  # 100 tokens take > 5 s
    try:
        before = state.scheduler.stats.snapshot().requests_by_end.get("cancelled", 0)
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            snap = state.scheduler.stats.snapshot()
            if snap.requests_by_end.get("cancelled", 0) == before + 1 and snap.rows_busy == 0:
                break
            assert time.monotonic() < deadline, "the abandoned request kept its row"
            time.sleep(0.05)
    finally:
        engine.forward = forward
