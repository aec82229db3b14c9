"""`kvc compile --sliding-window N` on a kvc export (whose metadata says: no window): the model
description applies the option, the ring pass takes it, and the artifact decodes exactly as the torch
model with that window (issue #11 item 6: this used to be refused on every kvc export)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.conftest import torch_greedy

WINDOW, CAPACITY = 4, 16
PROMPT = [1, 5, 9, 3, 7, 11]
STEPS = 14  # prompt 6 + 14 = 20 tokens > capacity 16: the ring wraps too


def windowed_torch_model(model, window: int):
    from kvc.models import build_model

    config = dataclasses.replace(model.config, sliding_window=window)
    windowed = build_model(config)
    windowed.load_state_dict(model.state_dict())
    return windowed.eval()


def artifact_greedy(artifact, prompt: list[int], steps: int) -> list[int]:
    from kvc.runtime import load

    model = load(artifact)
    out = [int(model.prefill(np.array([prompt]))[0, -1].argmax())]
    past = len(prompt)
    while len(out) < steps:
        out.append(int(model.decode(np.array([out[-1]]), np.array([past]))[0].argmax()))
        past += 1
    return out


@pytest.mark.parametrize("engine", ["ort"])
def test_sliding_window_option_on_a_kvc_export_matches_torch_with_that_window(exported, tmp_path, engine):
    from kvc.compiler.options import CompileOptions
    from kvc.compiler.pipeline import compile_model
    from kvc.contract import EngineKind

    model, config, onnx_path = exported("tiny")
    assert config.sliding_window is None  # the export's metadata has no window
    out = tmp_path / "windowed.kvc"
    result = compile_model(onnx_path, out, CompileOptions(engine=EngineKind(engine), max_seq_len=CAPACITY,
                                                          sliding_window=WINDOW), progress=lambda *_: None)
    assert result.manifest.cache.sliding_window == WINDOW
    assert result.manifest.model["sliding_window"] == WINDOW
    want = torch_greedy(windowed_torch_model(model, WINDOW), PROMPT, STEPS)
    assert artifact_greedy(out, PROMPT, STEPS) == want
    assert want != torch_greedy(model, PROMPT, STEPS)  # the window changes the tokens: the test can fail
