"""End-to-end KV-quantization quality on a model with trained weights (random weights say nothing
about KV-quantization error): perplexity and KL divergence of int8 / fp8 caches vs the fp32 cache
on held-out text, through compiled ORT artifacts (prefill reads the quantized cache too)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvc.runtime import load
from tests.conftest import STORIES260K

DATA = Path(__file__).resolve().parents[1] / "data"
HELDOUT = DATA / "heldout_stories.txt"  # evaluation text
CALIBRATION = DATA / "calibration_stories.txt"  # other stories: static scales never see the evaluation text
# Stated bounds (README "KV-cache quantization quality"): relative perplexity increase.
PPL_BOUND = {"fp16": 0.001, "int8": 0.01, "fp8": 0.03, "fp8-static": 0.03}

pytestmark = pytest.mark.skipif(not STORIES260K.is_dir(), reason="../shared/models/stories260K is not present")


@pytest.fixture(scope="module")
def stories(stories260k_variants):
    from click.testing import CliRunner

    from kvc.cli.main import cli

    stories260k_variants({"fp32": []})  # exports the model
    scales = stories260k_variants.root / "scales.json"
    if not scales.exists():
        calib = CliRunner().invoke(cli, ["calibrate", str(stories260k_variants.onnx_path), "--text", str(CALIBRATION),
                                         "-o", str(scales)])
        assert calib.exit_code == 0, calib.output
    return stories260k_variants({"fp32": [], "fp16": ["--kv-dtype", "fp16"], "int8": ["--kv-dtype", "int8"],
                                 "fp8": ["--kv-dtype", "fp8"],
                                 "fp8-static": ["--kv-dtype", "fp8", "--kv-scales", str(scales)]})


def log_probs(artifact: Path) -> list[np.ndarray]:
    """Per story: log-softmax of the logits at every position (teacher forcing, one prefill)."""
    model = load(artifact)
    out = []
    for story in HELDOUT.read_text().strip().split("\n"):
        ids = model.encode(story)
        logits = model.prefill(np.array([ids], dtype=np.int64))[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        out.append((ids, logits - np.log(np.exp(logits).sum(-1, keepdims=True))))
    return out


def perplexity(scored) -> float:
    nll = [-lp[np.arange(len(ids) - 1), ids[1:]] for ids, lp in scored]
    return float(np.exp(np.concatenate(nll).mean()))


def mean_kl(reference, other) -> float:
    kls = [(np.exp(r) * (r - o)).sum(-1) for (_, r), (_, o) in zip(reference, other)]
    return float(np.concatenate(kls).mean())


def test_quantized_cache_perplexity_and_kl_within_bounds(stories, record_property):
    reference = log_probs(stories["fp32"])
    base = perplexity(reference)
    assert 1.0 < base < 20.0, f"fp32 perplexity {base:.3f}: the trained model should predict this text well"
    report = {}
    for name, bound in PPL_BOUND.items():
        scored = log_probs(stories[name])
        ppl, kl = perplexity(scored), mean_kl(reference, scored)
        report[name] = (ppl, (ppl - base) / base, kl)
        record_property(f"{name}_ppl", ppl)
        record_property(f"{name}_kl", kl)
        assert abs(ppl - base) / base <= bound, f"{name}: ppl {ppl:.4f} vs fp32 {base:.4f} (bound {bound:.1%})"
        assert kl >= 0.0
    print("\nKV cache quality on held-out text (fp32 ppl %.4f):" % base)
    for name, (ppl, rel, kl) in report.items():
        print(f"  {name:10s} ppl {ppl:.4f} ({rel:+.3%})  mean KL {kl:.2e} nats/token")
