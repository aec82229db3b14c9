"""Newer families end to end: HF checkpoint dir -> kvc export -> kvc compile (ORT engine) -> 32 greedy tokens
equal to transformers' ``generate``; and ``--config config.json`` resolving each family.

The prompt (8 tokens) + 32 new tokens cross Phi-3's 16-token sliding window and Gemma2's 5-token window on its
sliding layers (each layer reads its own window's mask; capacity 48); Gemma2 with window 64 never binds it.
"""
from __future__ import annotations

import pytest
import torch

from kvc.models.config import ModelConfig, NormKind, NormPlacement, QkNorm
from tests.models.family_cases import CASES, build_hf

pytest.importorskip("transformers")

CAPACITY, NEW_TOKENS = 48, 32
PROMPT = [5, 17, 99, 3, 42, 8, 100, 61]
COMPILED = CASES


@pytest.fixture(scope="module", params=COMPILED, ids=[c.name for c in COMPILED])
def exported_family(request, tmp_path_factory):
    """(case, HF model, HF checkpoint dir, kvc export path) via load_source, as `kvc export DIR` does."""
    from kvc.models.export import export_onnx
    from kvc.models.loaders.source import load_source

    case = request.param
    hf = build_hf(case)
    checkpoint = tmp_path_factory.mktemp(f"hf-{case.name}")
    hf.save_pretrained(checkpoint, safe_serialization=True)
    loaded = load_source(str(checkpoint))
    onnx_path = tmp_path_factory.mktemp(f"export-{case.name}") / "model.onnx"
    export_onnx(loaded.model, loaded.config, onnx_path)
    return case, hf, checkpoint, onnx_path


EXPECTED_FUSIONS = ("rms_norm", "rotary", "attention", "kv_ring_buffer")


def expected_fusions(c: ModelConfig) -> dict[str, int]:
    """Fused-op counts: every RMSNorm (block, q/k and final), RoPE on q and k of each rotary layer, every layer's
    attention and ring."""
    per_block = {NormPlacement.PRE: 2, NormPlacement.SANDWICH: 4, NormPlacement.POST: 2}[c.norm_placement]
    per_block += 0 if c.qk_norm is QkNorm.NONE else 2
    rms = 0 if c.norm is NormKind.LAYER else c.num_layers * per_block + 1
    rope_layers = sum(c.uses_rope(i) for i in range(c.num_layers))
    return {"rms_norm": rms, "rotary": 2 * rope_layers, "attention": c.num_layers, "kv_ring_buffer": c.num_layers}


def compile_artifact(onnx_path, out, engine: str = "ort"):
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model

    return compile_model(onnx_path, out, CompileOptions(engine=EngineKind(engine), device=Device("cpu"),
                                                        max_seq_len=CAPACITY, kv_dtype="fp32"),
                         progress=lambda *_: None)


def hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # generate all steps, as kvc's ignore_eos does
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def kvc_greedy(artifact, prompt: list[int], steps: int) -> list[int]:
    from kvc.runtime import load
    from kvc.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=steps, ignore_eos=True)
    return load(artifact).generate(prompt, params).token_ids


def test_ort_engine_greedy_tokens_equal_transformers_generate(exported_family, tmp_path):
    case, hf, _, onnx_path = exported_family
    result = compile_artifact(onnx_path, tmp_path / "out.kvc")
    assert result.manifest.model["family"] == case.expected.family.value
    assert {r.name: r.matched for r in result.reports if r.name in EXPECTED_FUSIONS} == expected_fusions(case.expected)
    assert kvc_greedy(tmp_path / "out.kvc", PROMPT, NEW_TOKENS) == hf_greedy(hf, PROMPT, NEW_TOKENS)


def test_compile_config_option_resolves_the_family(exported_family):
    """`kvc compile --config config.json` on a graph without kvc metadata gets the family's exact config."""
    import onnx_ir as ir

    from kvc.compiler.model_description import model_config_for

    case, _, checkpoint, onnx_path = exported_family
    model = ir.load(str(onnx_path))
    model.metadata_props.clear()
    config, source = model_config_for(model, checkpoint / "config.json")
    assert config == case.expected.replace(name=checkpoint.name) and source.endswith("config.json")


# softcaps, sandwich norms, (1 + w) RMSNorm, GeLU; per-layer windows that bind (5 of 48 slots)
TVM_CASES = [c for c in COMPILED if c.name == "gemma2-window-5"]


@pytest.mark.slow  # ~25 s of CPU for the TVM build
@pytest.mark.parametrize("case", TVM_CASES, ids=lambda c: c.name)
def test_tvm_engine_greedy_tokens_equal_transformers_generate(case, tmp_path):
    pytest.importorskip("tvm")
    from kvc.models.export import export_onnx
    from kvc.models.loaders.source import load_source

    hf = build_hf(case)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded = load_source(str(tmp_path / "hf"))
    export_onnx(loaded.model, loaded.config, tmp_path / "model.onnx")
    compile_artifact(tmp_path / "model.onnx", tmp_path / "tvm.kvc", engine="tvm")
    assert kvc_greedy(tmp_path / "tvm.kvc", PROMPT, NEW_TOKENS) == hf_greedy(hf, PROMPT, NEW_TOKENS)
