"""Inputs validated before any engine runs (token ids, positions), and Python-API values that must be
refused with one clear error or do the obvious thing. Both engines where an engine is involved."""
from __future__ import annotations

import numpy as np
import pytest

from kvc.errors import GenerationError, KvcError
from kvc.runtime import load
from kvc.runtime.generate import Overflow, OverflowPolicy
from kvc.runtime.sampling import Sampler, SamplingParams
from kvc.runtime.stopping import FinishReason

ENGINES = ["ort", "tvm"]


@pytest.fixture(scope="module", params=ENGINES)
def tiny(request, compiled):
    return load(compiled("tiny", capacity=16, engine=request.param))


@pytest.mark.parametrize("bad", [-1, 256, 2 ** 40])
def test_token_ids_outside_the_vocab_are_refused(tiny, bad):
    """dea640d: ORT wrapped -1 to the last row of the embedding, TVM read outside it (or crashed)."""
    with pytest.raises(GenerationError, match=f"token id {bad} is outside the model's vocabulary"):
        tiny.generate([1, bad, 3], SamplingParams(temperature=0.0, max_new_tokens=2))
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        tiny.prefill(np.array([[1, bad]]))
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        tiny.engine.forward(np.array([[bad]]), np.array([[0]]), np.array([0]))


def test_positions_past_the_model_are_refused_by_the_engine(tiny):
    top = tiny.manifest.limits.max_positions
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        tiny.engine.forward(np.array([[1]]), np.array([[top]]), np.array([0]))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_slide_stops_with_length_at_the_models_last_position(compiled, preset, engine):
    """--on-overflow slide used to run positions past max_position_embeddings: GPT-2's learned table ends
    there (ORT: Gather out of range, TVM: out-of-bounds read). Now the last token fed sits at position
    max_positions - 1 and the run ends with finish_reason length."""
    model = load(compiled(preset, capacity=16, engine=engine))
    top = model.manifest.limits.max_positions
    prompt = [1, 2, 3]
    result = model.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=top + 10, ignore_eos=True),
                            Overflow(OverflowPolicy.SLIDE))
    assert result.finish_reason is FinishReason.LENGTH
    assert len(prompt) + len(result.token_ids) == top + 1  # the last token is emitted, never fed


def test_prompt_longer_than_the_models_positions_is_refused_even_when_sliding(tiny):
    top = tiny.manifest.limits.max_positions
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        tiny.generate([1] * (top + 1), SamplingParams(temperature=0.0, max_new_tokens=1), OverflowPolicy.SLIDE)


def test_capacity_above_the_models_positions_is_refused_at_compile_time():
    from kvc.compiler.options import CompileOptions

    with pytest.raises(KvcError, match="exceeds the model's 1024 positions"):
        CompileOptions(max_seq_len=4096).capacity_for(1024)
    assert CompileOptions(max_seq_len=1024).capacity_for(1024) == 1024


# --- Python API ---------------------------------------------------------------------------------------

def test_a_single_stop_string_is_one_stop_not_its_letters():
    assert SamplingParams(stop_strings="The end").stop_strings == ("The end",)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)


def test_bytes_prompts_are_refused(tiny):
    with pytest.raises(GenerationError, match="got bytes"):
        tiny.generate(b"Once upon a time")


@pytest.mark.parametrize("options, fragment", [
    ({"max_batch": 0}, "max_batch"), ({"max_batch": True}, "max_batch"), ({"device": "gpu"}, "'cuda'"),
    ({"threads": -1}, "threads"), ({"device": "tpu"}, "device")])
def test_load_options_are_validated(compiled, options, fragment):
    from kvc.runtime.model import LoadOptions

    with pytest.raises(KvcError, match=fragment):
        LoadOptions(**options)


def test_tiny_temperatures_are_refused_before_they_make_nan():
    """1e-39 validated at dea640d; logits / 1e-39 overflowed to inf and sampling drew from NaN."""
    with pytest.raises(GenerationError, match="temperature"):
        SamplingParams(temperature=1e-39)
    sampler = Sampler(SamplingParams(temperature=1e-4, seed=0), 1)
    assert sampler.sample(np.array([[1.0, 3.0, 2.0]], np.float32), [[]])[0] == 1


def test_nan_logits_stop_sampling_with_an_error():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), 1)
    with pytest.raises(GenerationError, match="not finite"):
        sampler.sample(np.array([[np.nan, 1.0]], np.float32), [[]])


def test_cuda_is_never_a_silent_cpu_run(compiled):
    """onnxruntime-gpu lists CUDAExecutionProvider without a GPU; dea640d then ran on CPU without a word."""
    from kvc.runtime.ort_engine import check_session_device

    class CpuOnlySession:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(KvcError, match="could not start its CUDA provider"):
        check_session_device(CpuOnlySession(), "cuda")
    check_session_device(CpuOnlySession(), "cpu")


def test_cuda_load_on_this_machine_refuses_or_runs_on_cuda(compiled):
    from tests.conftest import has_gpu

    if has_gpu():
        pytest.skip("a GPU is present: the refusal path cannot be reached here")
    with pytest.raises(KvcError, match="cuda"):
        load(compiled("tiny", capacity=16), device="cuda")
