"""The bounded load of the load tests: 64 requests from 16 concurrent openai clients, mixed prompt
lengths, some streamed, some abandoned midway; and the check that every completed greedy response
equals the same request run alone through kvc.load(...).generate."""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import openai

from kvc.runtime.sampling import SamplingParams

REQUESTS, CLIENTS = 64, 16
WORDS = "the cat sat on a mat and then a dog ran far away to see the big red sun".split()


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    max_tokens: int
    stream: bool
    abandon: bool  # read two chunks, then hang up


def make_jobs(seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(REQUESTS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 20)))
        abandon = i % 8 == 5
        jobs.append(Job(i, prompt, 100 if abandon else rng.randrange(1, 40), stream=abandon or i % 3 == 0,
                        abandon=abandon))
    return jobs


async def run_job(client, job: Job) -> tuple[str, str | None, int | None]:
    """(text, finish_reason, completion tokens) as the client saw them."""
    kw = dict(model="tiny", prompt=job.prompt, max_tokens=job.max_tokens, temperature=0)
    if not job.stream:
        out = await client.completions.create(**kw)
        return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens
    extra = {"ignore_eos": True} if job.abandon else {}
    stream = await client.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                             extra_body=extra)
    text, finish, tokens, seen = "", None, None, 0
    async for chunk in stream:
        seen += 1
        if job.abandon and seen == 2:
            await stream.close()
            return text, None, None
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, finish, tokens


async def drive(base_url: str, jobs: list[Job], clients: int = CLIENTS) -> dict[int, tuple]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="test-key", max_retries=0, timeout=120)
    todo = list(jobs)
    results: dict[int, tuple] = {}

    async def worker():
        while todo:
            job = todo.pop(0)
            results[job.index] = await run_job(client, job)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout=150)
    await client.close()
    return results


def expected(reference, job: Job) -> tuple[str, str, int]:
    ref = reference.generate(job.prompt, SamplingParams(temperature=0.0, max_new_tokens=job.max_tokens))
    return ref.text, "length" if ref.finish_reason.value == "length" else "stop", len(ref.token_ids)


def check_results(reference, jobs: list[Job], results: dict[int, tuple]) -> None:
    assert sorted(results) == [j.index for j in jobs]  # nothing lost
    for job in jobs:
        if not job.abandon:
            assert results[job.index] == expected(reference, job), job  # nothing mixed between requests
