"""RoPE fusion on small torch modules exported to ONNX: rotate-half and interleaved rotations, cos/sin
computed in-graph or gathered from a table, BSHD layout, partial rotary; and a near miss."""
from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch

from kvc.passes.fusion_pipeline import FusionOptions, run_fusions

B, H, S, D = 2, 3, 4, 16
MAX_POSITIONS = 64


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).reshape(x.shape)


class Rope(torch.nn.Module):
    """x [B, H, S, D] (or [B, S, H, D] with ``bshd``), position_ids [B, S]."""

    def __init__(self, rotation: str = "half", cos_source: str = "in_graph", bshd: bool = False, rotary_dim: int = D):
        super().__init__()
        self.rotation, self.cos_source, self.bshd, self.rotary_dim = rotation, cos_source, bshd, rotary_dim
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        self.register_buffer("inv_freq", inv_freq)
        freqs = torch.arange(MAX_POSITIONS).float()[:, None] * inv_freq
        self.register_buffer("cos_table", torch.cat((freqs, freqs), dim=-1).cos())
        self.register_buffer("sin_table", torch.cat((freqs, freqs), dim=-1).sin())

    def cos_sin(self, position_ids):
        if self.cos_source == "table":  # HF's older cos_cached[position_ids]
            return self.cos_table[position_ids], self.sin_table[position_ids]
        freqs = position_ids[..., None].float() * self.inv_freq
        if self.rotation == "every_two":
            b, s, half = freqs.shape
            pairs = lambda t: t[..., None].expand(b, s, half, 2).reshape(b, s, 2 * half)  # noqa: E731
            return pairs(freqs.cos()), pairs(freqs.sin())
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x, position_ids):
        cos, sin = self.cos_sin(position_ids)
        cos, sin = (cos.unsqueeze(2), sin.unsqueeze(2)) if self.bshd else (cos.unsqueeze(1), sin.unsqueeze(1))
        rotate = rotate_half if self.rotation == "half" else rotate_every_two
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        out = rot * cos + rotate(rot) * sin
        return torch.cat((out, rest), dim=-1) if self.rotary_dim < D else out


class NotARotation(Rope):
    def forward(self, x, position_ids):
        cos, sin = self.cos_sin(position_ids)
        half = D // 2
        swapped = torch.cat((-x[..., :half], x[..., half:]), dim=-1)  # negates, but does not rotate
        return x * cos.unsqueeze(1) + swapped * sin.unsqueeze(1)


def export(module, path, bshd: bool = False):
    x = torch.randn(B, S, H, D) if bshd else torch.randn(B, H, S, D)
    positions = torch.arange(S).expand(B, S).contiguous()
    seq_axis = 1 if bshd else 2
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x, positions), str(path), input_names=["x", "position_ids"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", seq_axis: "seq"},
                                                            "position_ids": {0: "batch", 1: "seq"}},
                          opset_version=18, dynamo=False)


def fuse_and_compare(kit, path, options=FusionOptions(), bshd=False):
    model = ir.load(path)
    reports = {r.name: r for r in run_fusions(model, options)}
    rng = np.random.default_rng(0)
    for batch, seq in ((B, S), (3, 7), (1, 1)):
        shape = (batch, seq, H, D) if bshd else (batch, H, seq, D)
        feeds = {"x": rng.standard_normal(shape).astype(np.float32),
                 "position_ids": rng.integers(0, MAX_POSITIONS, (batch, seq), dtype=np.int64)}
        np.testing.assert_allclose(kit.run(model, feeds)[0], kit.run(path, feeds)[0], rtol=kit.rtol, atol=kit.atol)
    return model, reports


def rope_node(model):
    (node,) = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    return node


@pytest.mark.parametrize("rotation", ["half", "every_two"])
def test_in_graph_cos_sin_become_a_cache_read_by_position_ids(kit, tmp_path, rotation):
    export(Rope(rotation), tmp_path / "rope.onnx")
    model, reports = fuse_and_compare(kit, tmp_path / "rope.onnx", FusionOptions(max_positions=MAX_POSITIONS))
    assert kit.op_counts(model) == {"RotaryEmbedding": 1}
    node = rope_node(model)
    assert node.attributes["interleaved"].as_int() == (rotation == "every_two")
    assert node.inputs[3].name == "position_ids"
    cos_cache = node.inputs[1].const_value.numpy()
    freqs = np.arange(MAX_POSITIONS)[:, None] * Rope().inv_freq.numpy()
    np.testing.assert_allclose(cos_cache, np.cos(freqs), rtol=1e-6, atol=1e-6)
    assert reports["rotary"].notes == ["1 of 1 read cos/sin caches by position_ids"]


def test_a_gathered_table_gives_its_own_row_count(kit, tmp_path):
    export(Rope(cos_source="table"), tmp_path / "rope.onnx")
    model, _ = fuse_and_compare(kit, tmp_path / "rope.onnx")  # no max_positions needed
    node = rope_node(model)
    assert list(node.inputs[1].shape) == [MAX_POSITIONS, D // 2] and node.inputs[3].name == "position_ids"


def test_without_max_positions_cos_sin_stay_in_graph_at_half_width(kit, tmp_path):
    export(Rope(), tmp_path / "rope.onnx")
    model, reports = fuse_and_compare(kit, tmp_path / "rope.onnx")
    node = rope_node(model)
    assert len(node.inputs) == 3 and node.inputs[1].producer().op_type == "Slice"
    assert "max_position_embeddings unknown" in " ".join(reports["rotary"].notes)


def test_bshd_layout_is_wrapped_in_transposes(kit, tmp_path):
    export(Rope(bshd=True), tmp_path / "rope.onnx", bshd=True)
    model, _ = fuse_and_compare(kit, tmp_path / "rope.onnx", FusionOptions(max_positions=MAX_POSITIONS), bshd=True)
    node = rope_node(model)
    assert node.inputs[0].producer().op_type == "Transpose"
    assert kit.op_counts(model) == {"RotaryEmbedding": 1, "Transpose": 2}


def test_partial_rotary_sets_rotary_embedding_dim(kit, tmp_path):
    export(Rope(rotary_dim=8), tmp_path / "rope.onnx")
    model, _ = fuse_and_compare(kit, tmp_path / "rope.onnx", FusionOptions(max_positions=MAX_POSITIONS))
    assert kit.op_counts(model) == {"RotaryEmbedding": 1}
    node = rope_node(model)
    assert node.attributes["rotary_embedding_dim"].as_int() == 8 and node.inputs[0].name == "x"


def test_negated_half_that_does_not_rotate_is_not_fused(kit, tmp_path):
    export(NotARotation(), tmp_path / "rope.onnx")
    model, reports = fuse_and_compare(kit, tmp_path / "rope.onnx", FusionOptions(max_positions=MAX_POSITIONS))
    assert kit.op_counts(model)["RotaryEmbedding"] == 0
    assert reports["rotary"].notes == ["rotary: 1 rotations (Neg nodes) not fused: "
                                       "the rotated term is neither rotate_half nor rotate-every-two of x"]
