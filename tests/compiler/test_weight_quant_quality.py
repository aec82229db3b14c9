"""Weight-precision quality on a model with trained weights (the real stories260K, tied embeddings):
perplexity and KL divergence vs fp32 weights on held-out text, through compiled ORT artifacts, with the
helpers of the KV-quantization quality test. Bounds are loose (README "Weight precision quality"):
a 260K-parameter model with 64-dim rows is a hard case for 4-bit weights."""
from __future__ import annotations

import pytest

from tests.compiler.test_kv_quant_quality import log_probs, mean_kl, perplexity
from tests.conftest import STORIES260K

# name: (compile flags, bound on the relative perplexity increase, bound on mean KL in nats/token)
CASES = {
    "fp16": (["--weights", "fp16"], 0.001, 1e-4),
    "bf16": (["--weights", "bf16"], 0.01, 5e-3),
    "int8": (["--weights", "int8"], 0.01, 5e-3),
    "int4": (["--weights", "int4"], 0.25, 0.25),
    "int4-asym": (["--weights", "int4", "--weight-scheme", "asymmetric"], 0.25, 0.25),
}

pytestmark = pytest.mark.skipif(not STORIES260K.is_dir(), reason="../shared/models/stories260K is not present")


@pytest.fixture(scope="module")
def artifacts(stories260k_variants):
    return stories260k_variants({"fp32": [], **{name: flags for name, (flags, _, _) in CASES.items()}})


def test_weight_precision_perplexity_and_kl_within_bounds(artifacts, record_property):
    reference = log_probs(artifacts["fp32"])
    base = perplexity(reference)
    assert 1.0 < base < 20.0
    for name, (_, ppl_bound, kl_bound) in CASES.items():
        scored = log_probs(artifacts[name])
        ppl, kl = perplexity(scored), mean_kl(reference, scored)
        record_property(f"{name}_ppl", ppl)
        record_property(f"{name}_kl", kl)
        print(f"{name}: ppl {ppl:.4f} ({(ppl - base) / base:+.2%} vs fp32 {base:.4f}), KL {kl:.2e}")
        assert abs(ppl - base) / base <= ppl_bound, f"{name}: ppl {ppl:.4f} vs fp32 {base:.4f}"
        assert 0.0 <= kl <= kl_bound, f"{name}: KL {kl:.2e}"
    assert mean_kl(reference, log_probs(artifacts["int4"])) > mean_kl(reference, log_probs(artifacts["int8"]))
