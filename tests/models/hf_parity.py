"""The parity checks of own torch models vs transformers, shared by test_parity_hf.py (Llama family,
GPT-2) and test_families.py (Qwen3, Phi-3, Gemma, ...): a left-padded prefill with an empty past, then
decode steps with a non-empty past, once with each side's own cache and once with the own model reading
HF's cache; fp32 logits (and the prefill's cache) within ``TOL``."""
from __future__ import annotations

import torch

from kvc.models import empty_past
from kvc.models.loaders.hf import load_hf_checkpoint

TOL = 1e-4
PROMPT, PAD, DECODE_STEPS = 9, 3, 3  # row 1 of the batch is left-padded by PAD tokens


def saved_pair(case, hf: torch.nn.Module, tmp_path_factory):
    """(case, HF model, own model loaded from the HF model's safetensors, checkpoint dir)."""
    directory = tmp_path_factory.mktemp(case.name)
    hf.save_pretrained(directory, safe_serialization=True)
    return case, hf, load_hf_checkpoint(directory).model, directory


def padded_prompt(seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, PROMPT), generator=gen)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :PAD] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def hf_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of a transformers DynamicCache's layers (5.x: .layers[i].keys; 4.x: key_cache)."""
    if hasattr(cache, "layers"):
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    return [(k.clone(), v.clone()) for k, v in zip(cache.key_cache, cache.value_cache)]


def hf_cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """hf_layers, every layer left-padded with zeros to the longest layer.

    Sliding-window layers keep only their last window - 1 tokens; the zeros stand for keys outside the
    window, which the own model's window mask never lets a query see.
    """
    layers = hf_layers(cache)
    longest = max(k.shape[2] for k, _ in layers)
    return [(_left_pad(k, longest), _left_pad(v, longest)) for k, v in layers]


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = torch.zeros(*t.shape[:2], length - t.shape[2], t.shape[3], dtype=t.dtype)
    return torch.cat((pad, t), dim=2)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def check_prefill(hf: torch.nn.Module, own: torch.nn.Module, vocab: int) -> None:
    ids, mask, positions = padded_prompt(seed=2, vocab=vocab)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    got, presents = own(ids, mask, positions, empty_past(own.config, 2))
    real = mask.bool()  # padded query rows are fully masked and meaningless in both
    assert max_diff(got[real], want.logits[real]) <= TOL
    # a sliding layer of HF's keeps only its last window - 1 tokens; the own cache keeps all (its mask applies the window)
    for (k, v), (hk, hv) in zip(presents, hf_layers(want.past_key_values)):
        kept = hk.shape[2]
        assert max_diff(k[:, :, -kept:], hk) <= TOL and max_diff(v[:, :, -kept:], hv) <= TOL


@torch.no_grad()
def check_decode_steps(hf: torch.nn.Module, own: torch.nn.Module, vocab: int) -> None:
    ids, mask, positions = padded_prompt(seed=3, vocab=vocab)
    cache = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
    _, past = own(ids, mask, positions, empty_past(own.config, 2))
    gen = torch.Generator().manual_seed(4)
    for _ in range(DECODE_STEPS):
        hf_past = hf_cache_tensors(cache)  # HF updates its cache in place on the next call
        step = torch.randint(0, vocab, (2, 1), generator=gen)
        mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
        positions = positions[:, -1:] + 1
        want = hf(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True).logits
        got, past = own(step, mask, positions, past)
        assert max_diff(got, want) <= TOL
        kept = hf_past[0][0].shape[2]
        from_hf_cache, _ = own(step, mask[:, -(kept + 1):], positions, hf_past)
        assert max_diff(from_hf_cache, want) <= TOL
