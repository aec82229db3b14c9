"""Torch reference for ``--on-overflow slide`` with attention sinks, on the explicit concat past."""
from __future__ import annotations


def torch_greedy_with_sinks(model, prompt: list[int], steps: int, capacity: int, sinks: int,
                            return_logits: bool = False):
    """Greedy decoding where no query ever sees more than ``capacity`` tokens: before a step that
    would, the concat past is pruned to its first ``sinks`` entries + its last ``capacity - sinks - 1``
    (so the new token sees the sinks and the ``capacity - sinks`` most recent tokens, itself included).
    Keys keep the rotary positions they were computed at; position_ids are the true positions.

    Schedule as kvc's runtime: the first ``capacity`` prompt tokens in one call, then one per call.
    Returns the generated ids (and, with ``return_logits``, the logits each token was picked from)."""
    import torch

    from kvc.models import empty_past

    past = empty_past(model.config, 1)
    position = 0
    chunks = [prompt[:capacity]] + [[t] for t in prompt[capacity:]]

    def run(ids: list[int]) -> torch.Tensor:
        nonlocal past, position
        held = past[0][0].shape[2]
        if held + len(ids) > capacity:
            assert len(ids) == 1 and held == capacity, "only single-token steps may overflow"
            recent = capacity - sinks - 1
            past = [tuple(torch.cat((x[:, :, :sinks], x[:, :, held - recent:held]), dim=2) for x in kv)
                    for kv in past]
        total = past[0][0].shape[2] + len(ids)
        positions = torch.arange(position, position + len(ids))[None]
        logits, past = model(torch.tensor([ids]), torch.ones(1, total, dtype=torch.long), positions, past)
        position += len(ids)
        return logits[0, -1]

    out, picked_from = [], []
    with torch.no_grad():
        for chunk in chunks:
            last = run(chunk)
        for step in range(steps):
            token = int(last.argmax())
            out.append(token)
            picked_from.append(last.numpy().copy())
            if step + 1 < steps:
                last = run([token])
    return (out, picked_from) if return_logits else out
