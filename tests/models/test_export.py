"""Exported ONNX (concat form) in ONNX Runtime CPU vs the torch model: prefill + decode."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kvc.models.export import past_names, present_names, read_model_config

FAMILIES = ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]
TOL = 1e-4


def ort_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(sess, config, ids, mask, pos, past):
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feed.update({n: t for n, t in zip(past_names(config), [t for kv in past for t in kv])})
    out = sess.run(None, feed)
    presents = out[1:]
    return out[0], [(presents[2 * i], presents[2 * i + 1]) for i in range(config.num_layers)]


def run_torch(model, ids, mask, pos, past):
    with torch.no_grad():
        logits, presents = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos),
                                 [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in past])
    return logits.numpy(), [(k.numpy(), v.numpy()) for k, v in presents]


@pytest.mark.parametrize("preset", FAMILIES)
def test_prefill_and_16_decode_steps_match_torch(exported, preset, rng):
    model, config, path = exported(preset)
    sess = ort_session(path)
    batch, prompt = 2, 7
    ids = rng.integers(0, config.vocab_size, (batch, prompt), dtype=np.int64)
    mask = np.ones((batch, prompt), np.int64)
    mask[1, :3] = 0  # second sequence left-padded by 3
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    empty = [(np.zeros((batch, config.num_kv_heads, 0, config.resolved_head_dim), np.float32),) * 2
             for _ in range(config.num_layers)]
    got, past_o = run_onnx(sess, config, ids, mask, pos, empty)
    want, past_t = run_torch(model, ids, mask, pos, empty)
    # Rows of padding queries are fully masked and meaningless; compare real tokens only.
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], atol=TOL, rtol=0)
    for step in range(16):
        nxt = want[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        got, past_o = run_onnx(sess, config, nxt, mask, pos, past_o)
        want, past_t = run_torch(model, nxt, mask, pos, past_t)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"decode step {step}")
        for (ko, vo), (kt, vt) in zip(past_o, past_t):
            np.testing.assert_allclose(ko, kt, atol=TOL, rtol=0)
            np.testing.assert_allclose(vo, vt, atol=TOL, rtol=0)
    assert past_o[0][0].shape[2] == 7 + 16


def test_graph_interface_and_metadata(exported):
    _, config, path = exported("tiny")
    proto = onnx.load(str(path))
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    assert names_in[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names_in[3:] == past_names(config)
    assert names_out == ["logits"] + present_names(config)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[3].type.tensor_type.shape.dim]
    assert dims == ["batch", config.num_kv_heads, "past_seq", config.resolved_head_dim]
    assert read_model_config(proto) == config
    onnx.checker.check_model(proto, full_check=True)


def test_large_models_use_external_data(tmp_path):
    from kvc.models import random_model
    from kvc.models.export import ExportOptions, export_onnx
    from kvc.models.presets import RANDOM_PRESETS

    config = RANDOM_PRESETS["tiny"]
    path = export_onnx(random_model(config), config, tmp_path / "m.onnx", ExportOptions(external_data=True))
    assert (tmp_path / "m.onnx.data").stat().st_size > 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    sess = ort_session(path)
    assert sess.get_inputs()[0].name == "input_ids"
