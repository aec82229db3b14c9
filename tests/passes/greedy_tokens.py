"""Greedy continuations shared by the foreign-exporter tests: transformers' generate and a kvc artifact."""
from __future__ import annotations

from pathlib import Path

NEW_TOKENS = 32
# Lengths 4, 13 and 21: the last two are past the 8-token windows of the Mistral fixtures.
PROMPTS = [[1, 5, 17, 99], [1, 3, 42, 8, 100, 61, 7, 19, 33, 12, 90, 4, 77], [1] + list(range(20, 40))]


def hf_greedy(hf, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    import torch

    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def kvc_greedy(artifact: Path, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    from kvc.runtime import load
    from kvc.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    return load(artifact).generate(prompt, params).token_ids
