"""Attention fusion on small torch modules exported to ONNX: scale forms, GQA head expansion forms,
torch's SDPA decomposition, past concat -> past/present I/O; and graphs that must stay unfused."""
from __future__ import annotations

import math
import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F

from kvc.passes.fusion_pipeline import run_fusions

B, H, S, P, D = 2, 4, 3, 5, 8


def repeat_heads(x: torch.Tensor, group: int, form: str) -> torch.Tensor:
    """Each kv head serves ``group`` query heads, written the ways exporters see it."""
    b, k, t, d = x.shape
    if form == "expand":  # HF repeat_kv
        return x[:, :, None].expand(b, k, group, t, d).reshape(b, k * group, t, d)
    if form == "repeat_interleave":
        return torch.repeat_interleave(x, group, dim=1)
    if form == "tile_grouped":
        return x[:, :, None].repeat(1, 1, group, 1, 1).reshape(b, k * group, t, d)
    if form == "tile_cyclic":  # head h reads kv head h % K: not Attention's grouping
        return x.repeat(1, group, 1, 1)
    raise ValueError(form)


class EagerAttention(torch.nn.Module):
    def __init__(self, kv_heads: int, form: str = "expand", scale: str = "mul", float_softmax: bool = False):
        super().__init__()
        self.group, self.form, self.scale, self.float_softmax = H // kv_heads, form, scale, float_softmax

    def forward(self, q, k_new, v_new, past_k, past_v, mask):
        k, v = torch.cat((past_k, k_new), dim=2), torch.cat((past_v, v_new), dim=2)
        kk, vv = repeat_heads(k, self.group, self.form), repeat_heads(v, self.group, self.form)
        scores = q @ kk.transpose(-1, -2)
        scores = scores * (1 / math.sqrt(D)) if self.scale == "mul" else scores / math.sqrt(D)
        scores = scores + mask
        probs = torch.softmax(scores.float() if self.float_softmax else scores, dim=-1).to(q.dtype)
        return probs @ vv, k, v


class SdpaAttention(torch.nn.Module):
    """torch's F.scaled_dot_product_attention: the exporter scales q and k by sqrt(scale) each."""

    def forward(self, q, k_new, v_new, past_k, past_v, mask):
        k, v = torch.cat((past_k, k_new), dim=2), torch.cat((past_v, v_new), dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3), k, v


def export(module: torch.nn.Module, kv_heads: int, path) -> ir.Model:
    q = torch.randn(B, H, S, D)
    k, v = torch.randn(B, kv_heads, S, D), torch.randn(B, kv_heads, S, D)
    pk, pv = torch.randn(B, kv_heads, P, D), torch.randn(B, kv_heads, P, D)
    mask = torch.zeros(B, 1, S, P + S)
    names = ["q", "k_new", "v_new", "past_key", "past_value", "attn_mask"]
    axes = {"q": {2: "seq"}, "k_new": {2: "seq"}, "v_new": {2: "seq"}, "past_key": {2: "past"},
            "past_value": {2: "past"}, "attn_mask": {2: "seq", 3: "total"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (q, k, v, pk, pv, mask), str(path), input_names=names,
                          output_names=["y", "present_key", "present_value"], dynamic_axes=axes,
                          opset_version=18, dynamo=False)
    return ir.load(path)


def feeds(kv_heads: int, seed: int, seq: int = S, past: int = P) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    mask = np.where(rng.random((B, 1, seq, past + seq)) < 0.2, -1e4, 0.0).astype(np.float32)
    return {"q": normal(B, H, seq, D), "k_new": normal(B, kv_heads, seq, D), "v_new": normal(B, kv_heads, seq, D),
            "past_key": normal(B, kv_heads, past, D), "past_value": normal(B, kv_heads, past, D), "attn_mask": mask}


def fuse_and_compare(kit, model_path, kv_heads) -> tuple[ir.Model, dict]:
    model = ir.load(model_path)
    reports = {r.name: r for r in run_fusions(model)}
    names = {v.name for v in ir.load(model_path).graph.inputs}  # an unused mask is not exported
    for seed, seq, past in ((0, S, P), (1, 1, 7), (2, 4, 0)):
        f = {k: v for k, v in feeds(kv_heads, seed, seq, past).items() if k in names}
        for want, got in zip(kit.run(model_path, f), kit.run(model, f)):
            np.testing.assert_allclose(got, want, rtol=kit.rtol, atol=kit.atol)
    return model, reports


@pytest.mark.parametrize("kv_heads, form", [(4, "expand"), (2, "expand"), (1, "expand"), (2, "repeat_interleave"),
                                            (2, "tile_grouped"), (1, "tile_cyclic")])
def test_gqa_forms_fuse_into_one_attention_with_past_and_present(kit, tmp_path, kv_heads, form):
    path = tmp_path / "attention.onnx"
    export(EagerAttention(kv_heads, form), kv_heads, path)
    model, reports = fuse_and_compare(kit, path, kv_heads)
    counts = kit.op_counts(model)
    assert counts["Attention"] == 1 and counts["Softmax"] == 0 and counts["MatMul"] == 0, counts
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    inputs = {v.name: v for v in model.graph.inputs}
    assert node.inputs[1] is inputs["k_new"] and node.inputs[2] is inputs["v_new"]
    assert node.inputs[3] is inputs["attn_mask"]
    assert node.inputs[4] is inputs["past_key"] and node.inputs[5] is inputs["past_value"]
    assert [o.name for o in node.outputs[1:]] == ["present_key", "present_value"]
    assert all(o.is_graph_output() for o in node.outputs)
    assert node.attributes["scale"].as_float() == pytest.approx(1 / math.sqrt(D))
    assert reports["attention"].notes == ["1 of 1 take past_key/past_value"]


@pytest.mark.parametrize("scale, float_softmax", [("div", False), ("mul", True)])
def test_scale_division_and_float_softmax_casts(kit, tmp_path, scale, float_softmax):
    path = tmp_path / "attention.onnx"
    export(EagerAttention(2, scale=scale, float_softmax=float_softmax), 2, path)
    model, _ = fuse_and_compare(kit, path, 2)
    assert kit.op_counts(model)["Attention"] == 1


def test_sdpa_decomposition_with_sqrt_scale_on_q_and_k(kit, tmp_path):
    path = tmp_path / "sdpa.onnx"
    export(SdpaAttention(), 4, path)
    model, _ = fuse_and_compare(kit, path, 4)
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.attributes["scale"].as_float() == pytest.approx(0.3, rel=1e-6)
    assert len(node.inputs) == 6


def test_cyclic_head_repeat_is_not_absorbed_as_grouped_query_attention(kit, tmp_path):
    """k.repeat(1, G, 1, 1) makes head h read kv head h % K, but Attention's GQA reads h // G: the
    fusion keeps the repeated K/V as full-head inputs (plain multi-head attention) and so cannot
    take the past concat in."""
    path = tmp_path / "cyclic.onnx"
    export(EagerAttention(2, "tile_cyclic"), 2, path)
    model, reports = fuse_and_compare(kit, path, 2)
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert len(node.inputs) == 4 and node.inputs[1].producer().op_type == "Tile"
    assert kit.op_counts(model)["Concat"] == 2  # present_key / present_value stay computed by Concat
    assert reports["attention"].notes == ["0 of 1 take past_key/past_value"]


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(D, 5)

    def forward(self, x):
        return torch.softmax(self.head(x), dim=-1)


def test_softmax_that_is_not_attention_stays_and_the_report_says_why(kit, tmp_path):
    path = tmp_path / "classifier.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Classifier().eval(), (torch.randn(2, D),), str(path), input_names=["x"],
                          output_names=["p"], opset_version=18, dynamo=False)
    model = ir.load(path)
    reports = {r.name: r for r in run_fusions(model)}
    assert kit.op_counts(model)["Softmax"] == 1 and kit.op_counts(model)["Attention"] == 0
    assert reports["attention"].matched == 0
    assert reports["attention"].notes == [
        "attention: 1 Softmax nodes not fused: its output does not feed a MatMul with values (not attention)"]
    x = np.random.default_rng(5).standard_normal((2, D)).astype(np.float32)
    np.testing.assert_allclose(kit.run(model, {"x": x})[0], kit.run(path, {"x": x})[0], rtol=kit.rtol, atol=kit.atol)


class RuntimeScale(torch.nn.Module):
    def forward(self, q, k, v, temperature):
        return torch.softmax((q @ k.transpose(-1, -2)) * temperature, dim=-1) @ v


def test_scale_from_an_input_is_not_fused(kit, tmp_path):
    path = tmp_path / "temperature.onnx"
    args = (torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.tensor(0.5))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(RuntimeScale(), args, str(path), input_names=["q", "k", "v", "temperature"],
                          output_names=["y"], opset_version=18, dynamo=False)
    model = ir.load(path)
    reports = {r.name: r for r in run_fusions(model)}
    assert kit.op_counts(model)["Attention"] == 0
    assert reports["attention"].notes == [
        "attention: 1 Softmax nodes not fused: scale factors are not constant scalars"]


class CroppedMaskAttention(torch.nn.Module):
    """transformers' sdpa/eager attention as optimum exports it: the mask is cropped to the repeated present
    key's length, so the mask reads the shape of the Concat the past fusion folds into Attention."""

    def __init__(self, kv_heads: int, reads_values: bool = False):
        super().__init__()
        self.group, self.reads_values = H // kv_heads, reads_values

    def forward(self, q, k_new, v_new, past_k, past_v, mask):
        k, v = torch.cat((past_k, k_new), dim=2), torch.cat((past_v, v_new), dim=2)
        kk, vv = repeat_heads(k, self.group, "expand"), repeat_heads(v, self.group, "expand")
        mask = mask[:, :, :, : kk.shape[-2]]
        if self.reads_values:  # a mask that depends on the cached values: nothing can fold the Concat
            mask = mask + 0.5 * kk.amax(dim=-1)[:, :, None, :]
        scores = (q @ kk.transpose(-1, -2)) * (1 / math.sqrt(D)) + mask
        return torch.softmax(scores, dim=-1) @ vv, k, v


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mask_cropped_to_the_present_key_length_takes_the_past(kit, tmp_path, kv_heads):
    """The crop's Shape reads of the present key are rebuilt from past length + new length (they made a cycle)."""
    path = tmp_path / "cropped.onnx"
    export(CroppedMaskAttention(kv_heads), kv_heads, path)
    model, reports = fuse_and_compare(kit, path, kv_heads)  # also: the graph sorts, so it has no cycle
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    inputs = {v.name: v for v in model.graph.inputs}
    assert node.inputs[4] is inputs["past_key"] and node.inputs[5] is inputs["past_value"]
    assert kit.op_counts(model)["Concat"] == 0 or all(
        inputs["past_key"] not in n.inputs for n in model.graph if n.op_type == "Concat")
    assert reports["attention"].notes[-1] == "1 of 1 take past_key/past_value"
    past_readers = {n.op_type for n, _ in inputs["past_key"].uses() if n.graph is model.graph}
    assert past_readers <= {"Attention", "Shape"}, past_readers


def test_mask_reading_cached_values_keeps_the_concat_and_names_the_node(kit, tmp_path):
    """Folding the Concat would make the mask read Attention's own output: the past fusion is refused with the
    node that blocks it, and the graph stays correct (and acyclic)."""
    path = tmp_path / "value_mask.onnx"
    export(CroppedMaskAttention(4, reads_values=True), 4, path)
    model, reports = fuse_and_compare(kit, path, 4)
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert len(node.inputs) == 4 and node.inputs[1].producer().op_type == "Concat"
    notes = reports["attention"].notes
    assert notes[-1] == "0 of 1 take past_key/past_value", notes
    (blocked,) = [n for n in notes if "keeps its Concat cache" in n]
    assert "ReduceMax node" in blocked and "reads the values of 'present_key'" in blocked, blocked
    assert repr(node.name) in blocked


class SelectedScoresAttention(torch.nn.Module):
    """GPT-2's eager attention (transformers 4.x): the scores are selected by a causal bias sliced by the lengths,
    with a large negative fill, before the additive mask; ``form`` writes the selection the ways exporters see."""

    def __init__(self, form: str, fill: float = torch.finfo(torch.float32).min, additive: bool = True):
        super().__init__()
        self.form, self.fill, self.additive = form, fill, additive
        self.register_buffer("bias", torch.tril(torch.ones(32, 32, dtype=torch.bool))[None, None])

    def forward(self, q, k_new, v_new, past_k, past_v, mask):
        k, v = torch.cat((past_k, k_new), dim=2), torch.cat((past_v, v_new), dim=2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        total, seq = k.shape[-2], q.shape[-2]
        causal = self.bias[:, :, total - seq:total, :total]
        fill = torch.full([], self.fill, dtype=scores.dtype)
        if self.form == "keep":  # torch.where(causal, scores, fill)
            scores = torch.where(causal, scores, fill)
        else:  # scores.masked_fill(~causal, fill): Where(not causal, fill, scores)
            scores = scores.masked_fill(~causal, self.fill)
        if self.additive:
            scores = scores + mask
        return torch.softmax(scores, dim=-1) @ v, k, v


@pytest.mark.parametrize("form, additive", [("keep", True), ("drop", True), ("keep", False)])
def test_scores_selected_by_a_boolean_mask_fuse_with_it_as_an_additive_mask(kit, tmp_path, form, additive):
    path = tmp_path / "selected.onnx"
    export(SelectedScoresAttention(form, additive=additive), 4, path)
    model, reports = fuse_and_compare(kit, path, 4)  # the causal part matters: prefills of 3 and 4 tokens
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert kit.op_counts(model)["Softmax"] == 0 and len(node.inputs) == 6
    assert reports["attention"].notes[-1] == "1 of 1 take past_key/past_value"


def test_scores_selected_with_a_small_fill_are_not_fused(kit, tmp_path):
    """A fill of -1 leaves the unselected scores weight in the softmax: not a mask, so not Attention's."""
    path = tmp_path / "small_fill.onnx"
    export(SelectedScoresAttention("keep", fill=-1.0), 4, path)
    model, reports = fuse_and_compare(kit, path, 4)
    assert kit.op_counts(model)["Attention"] == 0
    assert "at most -10000" in reports["attention"].notes[0], reports["attention"].notes
