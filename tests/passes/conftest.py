"""Fixtures for the fusion-pass tests: ONNX Runtime runs, decoder feeds, kvc and HF exports."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

RTOL, ATOL = 1e-3, 1e-4  # fp32 before/after fusion


class Kit:
    """Helpers the fusion tests share (a fixture, since test modules cannot import conftest)."""

    rtol, atol = RTOL, ATOL

    @staticmethod
    def ort_session(model: ir.Model | onnx.ModelProto | Path) -> ort.InferenceSession:
        if isinstance(model, ir.Model):
            model = ir.to_proto(model)
        source = str(model) if isinstance(model, Path) else model.SerializeToString()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    @staticmethod
    def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return Kit.ort_session(model).run(None, feeds)

    @staticmethod
    def op_counts(model: ir.Model) -> Counter:
        return Counter(node.op_type for node in model.graph)

    @staticmethod
    def decoder_feeds(rng: np.random.Generator, *, num_layers: int, kv_heads: int, head_dim: int, vocab: int,
                      batch: int, seq: int, past: int, left_pad: int = 0) -> dict[str, np.ndarray]:
        """Random inputs for a flat-KV decoder; the last sequence is left-padded by ``left_pad``."""
        mask = np.ones((batch, past + seq), np.int64)
        mask[-1, :left_pad] = 0
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:].astype(np.int64)
        feeds = {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64), "attention_mask": mask,
                 "position_ids": positions}
        for i in range(num_layers):
            for kv in ("key", "value"):
                past_kv = rng.standard_normal((batch, kv_heads, past, head_dim)).astype(np.float32)
                feeds[f"past_key_values.{i}.{kv}"] = past_kv
        return feeds

    @staticmethod
    def assert_same_outputs(before: list[np.ndarray], after: list[np.ndarray], names: list[str],
                            attention_mask: np.ndarray | None = None) -> None:
        """Compare decoder outputs on real tokens only: logits of padding queries and cache slots of
        padding keys are meaningless (fully masked rows may legitimately differ)."""
        for name, want, got in zip(names, before, after):
            if attention_mask is not None and name == "logits":
                keep = attention_mask[:, -want.shape[1]:].astype(bool)
                want, got = want[keep], got[keep]
            elif attention_mask is not None and name.startswith("present."):
                keep = attention_mask.astype(bool)
                want, got = want.transpose(0, 2, 1, 3)[keep], got.transpose(0, 2, 1, 3)[keep]
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.fixture(scope="session")
def kit() -> type[Kit]:
    return Kit


def _export_kvc_dynamo(model, config, path: Path) -> None:
    from kvc.contract import MODEL_CONFIG_KEY
    from kvc.models.export import _FlatKV, _sample_inputs, input_names, present_names

    args = _sample_inputs(config)  # the same trace inputs as kvc's TorchScript export
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in args[3:]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_FlatKV(model.eval(), config.num_layers).eval(), args, str(path),
                          input_names=input_names(config), output_names=["logits"] + present_names(config),
                          dynamic_shapes=shapes, opset_version=18, dynamo=True, verbose=False, optimize=False,
                          external_data=False)
    proto = onnx.load(str(path))
    proto.metadata_props.add(key=MODEL_CONFIG_KEY, value=config.to_json())  # as kvc's own exporter does
    onnx.save(proto, str(path))


@pytest.fixture(scope="session")
def kvc_export(tmp_path_factory):
    """Factory: (preset, exporter) -> (config, path) of a seeded kvc model's ONNX export."""
    cache: dict[tuple[str, str], tuple] = {}

    def make(preset: str, exporter: str = "torchscript"):
        if (preset, exporter) not in cache:
            from kvc.models import random_model
            from kvc.models.export import export_onnx
            from kvc.models.presets import RANDOM_PRESETS

            config = RANDOM_PRESETS[preset]
            model = random_model(config, seed=0)
            path = tmp_path_factory.mktemp(f"kvc-{preset}-{exporter}") / "model.onnx"
            if exporter == "torchscript":
                export_onnx(model, config, path)
            else:
                _export_kvc_dynamo(model, config, path)
            cache[(preset, exporter)] = (config, path)
        return cache[(preset, exporter)]

    return make


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory):
    """Factory: (arch, exporter) -> _hf_exports.HfExport of a tiny seeded transformers model."""
    import _hf_exports

    cache: dict[tuple[str, str], _hf_exports.HfExport] = {}

    def make(arch: str, exporter: str):
        if (arch, exporter) not in cache:
            cache[(arch, exporter)] = _hf_exports.export_hf(arch, exporter, tmp_path_factory.mktemp(f"hf-{arch}"))
        return cache[(arch, exporter)]

    return make
