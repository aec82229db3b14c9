"""Tiny fused decoders built directly with onnx-ir, in the form the fusion passes produce.

Per layer: MatMul projections -> [RotaryEmbedding] -> Attention(Q, K, V, mask, past_key, past_value)
-> (Y, present_key, present_value) -> MatMul -> residual Add; Gather embedding in front, MatMul to
logits at the end; the additive mask [B, 1, S, P+S] is computed in-graph from ``attention_mask``
(causal + padding, plus a sliding window when the spec has one). Opset 23, ir_version 10.
The numpy oracle (ring_oracle.py) evaluates the same weights in float64.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kvc.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MODEL_CONFIG_KEY,
    PAST_LEN,
    POSITION_IDS,
    past_name,
    present_name,
)
from kvc.passes.kv_layout import KvCacheLayout

FLOAT, INT64, BOOL = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int = 48
    hidden_size: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: two query heads per kv head
    head_dim: int = 8
    num_layers: int = 2
    rope: bool = True
    sliding_window: Optional[int] = None
    max_positions: int = 512
    rope_theta: float = 10000.0
    unfused_layers: frozenset[int] = field(default_factory=frozenset)  # negative tests: concat outside Attention


@dataclass(frozen=True)
class LayerWeights:
    wq: np.ndarray  # [E, H*D]
    wk: np.ndarray  # [E, K*D]
    wv: np.ndarray
    wo: np.ndarray  # [H*D, E]


@dataclass(frozen=True)
class DecoderWeights:
    embed: np.ndarray  # [V, E]
    layers: tuple[LayerWeights, ...]
    lm_head: np.ndarray  # [E, V]
    rope_cos: np.ndarray  # [max_positions, D/2] float32, shared by graph and oracle
    rope_sin: np.ndarray


def random_weights(spec: DecoderSpec, seed: int = 0) -> DecoderWeights:
    rng = np.random.default_rng(seed)
    E, H, K, D = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    layers = tuple(LayerWeights(wq=normal((E, H * D), 2 / np.sqrt(E)), wk=normal((E, K * D), 2 / np.sqrt(E)),
                                wv=normal((E, K * D), 1 / np.sqrt(E)), wo=normal((H * D, E), 1 / np.sqrt(H * D)))
                   for _ in range(spec.num_layers))
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, D, 2) / D)
    angles = np.arange(spec.max_positions)[:, None] * inv_freq[None, :]
    return DecoderWeights(embed=normal((spec.vocab_size, E), 1.0), layers=layers,
                          lm_head=normal((E, spec.vocab_size), 1 / np.sqrt(E)),
                          rope_cos=np.cos(angles).astype(np.float32), rope_sin=np.sin(angles).astype(np.float32))


class _Builder:
    def __init__(self, spec: DecoderSpec, weights: DecoderWeights):
        self.spec, self.w = spec, weights
        self.tape = ir.tape.Tape()

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self.tape.initializer(ir.tensor(np.asarray(array), name=name))

    def op(self, op_type: str, *inputs, **attrs) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attrs or None)

    def heads(self, x_BSE: ir.Value, w: np.ndarray, n_heads: int, name: str) -> ir.Value:
        shape = self.const(f"{name}.shape", np.array([0, 0, n_heads, self.spec.head_dim], np.int64))
        x_BSHD = self.op("Reshape", self.op("MatMul", x_BSE, self.const(f"{name}.weight", w)), shape)
        return self.op("Transpose", x_BSHD, perm=[0, 2, 1, 3])

    def rope(self, x_BHSD: ir.Value, position_ids: ir.Value) -> ir.Value:
        if not self.spec.rope:
            return x_BHSD
        return self.op("RotaryEmbedding", x_BHSD, self.cos, self.sin, position_ids)

    def mask(self, input_ids: ir.Value, attention_mask: ir.Value) -> ir.Value:
        """Additive [B, 1, S, T] mask: key j visible to query i (at T-S+i) if causal, not padding, in window."""
        zero, one = self.const("m.zero", np.array(0, np.int64)), self.const("m.one", np.array(1, np.int64))
        ax0, ax1 = self.const("m.ax0", np.array([0], np.int64)), self.const("m.ax1", np.array([1], np.int64))
        total = self.op("Squeeze", self.op("Shape", attention_mask, start=1, end=2), ax0)
        seq = self.op("Squeeze", self.op("Shape", input_ids, start=1, end=2), ax0)
        q_pos = self.op("Range", self.op("Sub", total, seq), total, one)
        k_pos = self.op("Range", zero, total, one)
        dist_ST = self.op("Sub", self.op("Unsqueeze", q_pos, ax1), self.op("Unsqueeze", k_pos, ax0))
        allowed_ST = self.op("GreaterOrEqual", dist_ST, zero)
        if self.spec.sliding_window is not None:
            window = self.const("m.window", np.array(self.spec.sliding_window, np.int64))
            allowed_ST = self.op("And", allowed_ST, self.op("Less", dist_ST, window))
        keys_B1T = self.op("Cast", self.op("Unsqueeze", attention_mask, ax1), to=BOOL)
        allowed_BST = self.op("And", self.op("Unsqueeze", allowed_ST, ax0), keys_B1T)
        lowest = self.const("m.lowest", np.array(np.finfo(np.float32).min, np.float32))
        additive = self.op("Where", allowed_BST, self.const("m.fzero", np.array(0, np.float32)), lowest)
        return self.op("Unsqueeze", additive, ax1)

    def attention(self, layer: int, q, k, v, mask, past_k, past_v) -> tuple[ir.Value, ir.Value, ir.Value]:
        if layer in self.spec.unfused_layers:
            axis_k = self.op("Concat", past_k, k, axis=2)
            axis_v = self.op("Concat", past_v, v, axis=2)
            return self.op("Attention", q, axis_k, axis_v, mask), axis_k, axis_v
        y, pk, pv = self.tape.op_multi_out("Attention", [q, k, v, mask, past_k, past_v], num_outputs=3)
        return y, pk, pv

    def build(self, config_metadata: bool) -> ir.Model:
        s = self.spec
        batch, seq = "batch", "seq"
        input_ids = ir.val("input_ids", INT64, [batch, seq])
        attention_mask = ir.val("attention_mask", INT64, [batch, "total_seq"])
        position_ids = ir.val("position_ids", INT64, [batch, seq])
        pasts = [(ir.val(past_name(i, "key"), FLOAT, [batch, s.num_kv_heads, "past_seq", s.head_dim]),
                  ir.val(past_name(i, "value"), FLOAT, [batch, s.num_kv_heads, "past_seq", s.head_dim]))
                 for i in range(s.num_layers)]
        self.cos = self.const("rope.cos", self.w.rope_cos)
        self.sin = self.const("rope.sin", self.w.rope_sin)

        x = self.op("Gather", self.const("embed", self.w.embed), input_ids)
        mask = self.mask(input_ids, attention_mask)
        presents = []
        merge = self.const("merge.shape", np.array([0, 0, s.num_heads * s.head_dim], np.int64))
        for i, (lw, (past_k, past_v)) in enumerate(zip(self.w.layers, pasts)):
            q = self.rope(self.heads(x, lw.wq, s.num_heads, f"l{i}.q"), position_ids)
            k = self.rope(self.heads(x, lw.wk, s.num_kv_heads, f"l{i}.k"), position_ids)
            v = self.heads(x, lw.wv, s.num_kv_heads, f"l{i}.v")
            y, pk, pv = self.attention(i, q, k, v, mask, past_k, past_v)
            y_BSE = self.op("Reshape", self.op("Transpose", y, perm=[0, 2, 1, 3]), merge)
            x = self.op("Add", x, self.op("MatMul", y_BSE, self.const(f"l{i}.o.weight", lw.wo)))
            for value, name in ((pk, present_name(i, "key")), (pv, present_name(i, "value"))):
                value.name, value.dtype = name, FLOAT
                value.shape = ir.Shape([batch, s.num_kv_heads, "total_seq", s.head_dim])
                presents.append(value)
        logits = self.op("MatMul", x, self.const("lm_head", self.w.lm_head))
        logits.name, logits.dtype, logits.shape = "logits", FLOAT, ir.Shape([batch, seq, s.vocab_size])

        graph = ir.Graph([input_ids, attention_mask, position_ids, *[t for kv in pasts for t in kv]],
                         [logits, *presents], nodes=self.tape.nodes, initializers=self.tape.initializers,
                         opset_imports={"": 23}, name="synthetic_decoder")
        model = ir.Model(graph, ir_version=10, producer_name="kvc-tests")
        if config_metadata:
            model.metadata_props[MODEL_CONFIG_KEY] = json.dumps(model_config_dict(s))
        return model


def model_config_dict(spec: DecoderSpec) -> dict:
    """The kvc exporter's metadata for this spec (ModelConfig.to_dict()); invalid specs: build without it."""
    from kvc.models.config import Family, ModelConfig

    return ModelConfig(family=Family.LLAMA, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                       num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                       intermediate_size=4 * spec.hidden_size, head_dim=spec.head_dim,
                       max_position_embeddings=spec.max_positions, sliding_window=spec.sliding_window,
                       name="synthetic").to_dict()


def build_fused_decoder(spec: DecoderSpec, weights: DecoderWeights, *, config_metadata: bool = True) -> ir.Model:
    return _Builder(spec, weights).build(config_metadata)


def session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # TensorScatter warns on every run that it copies (no IO binding here)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def fuse(model: ir.Model) -> None:
    """The fusion phase (canonicalize, RMSNorm, RoPE, attention) that precedes the ring-buffer pass."""
    from kvc.passes.fusion_pipeline import run_fusions

    run_fusions(model)


# --- runners ---------------------------------------------------------------------------------

_STORAGE = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: np.uint16,
            ir.DataType.INT8: np.int8, ir.DataType.FLOAT8E4M3FN: np.uint8}  # bf16/fp8 held as raw bits
_DECODED = {ir.DataType.BFLOAT16: ml_dtypes.bfloat16, ir.DataType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn}


class RingRunner:
    """Runs a ring graph step by step the way the runtime will: each cache input and its present
    output are bound to one buffer (IO binding), so the graph updates it in place."""

    def __init__(self, model: ir.Model, batch: int, extra_outputs: tuple[str, ...] = ()):
        self.layout = KvCacheLayout.read_from(model)
        self.extra_outputs = extra_outputs
        self.extras: dict[str, np.ndarray] = {}  # extra outputs of the last step
        self.session = session(model)
        inputs = {v.name: v for v in model.graph.inputs}
        self.buffers: dict[str, tuple[np.ndarray, ir.DataType]] = {}
        for past, _ in self.layout.cache_names():
            dtype = inputs[past].dtype
            shape = [batch if not isinstance(d, int) else d for d in inputs[past].shape]
            self.buffers[past] = (np.zeros(shape, _STORAGE[dtype]), dtype)  # zero bits are 0.0 in every dtype

    def cache(self, name: str) -> np.ndarray:
        """The buffer behind input ``name``, decoded to a numpy dtype (views, not copies)."""
        array, dtype = self.buffers[name]
        return array.view(_DECODED[dtype]) if dtype in _DECODED else array

    def step(self, ids_BS: np.ndarray, pos_BS: np.ndarray, past_len_B: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids_BS, np.int64))
        binding.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(pos_BS, np.int64))
        binding.bind_cpu_input(PAST_LEN, np.ascontiguousarray(past_len_B, np.int64))
        binding.bind_output(LOGITS)  # outputs come back in binding order: logits, extras, caches
        for name in self.extra_outputs:
            binding.bind_output(name)
        for past, present in self.layout.cache_names():
            array, dtype = self.buffers[past]
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, int(dtype))
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # not copy_outputs_to_cpu: bf16 caches have no numpy type in ORT
        self.extras = {name: outputs[1 + i].numpy() for i, name in enumerate(self.extra_outputs)}
        return outputs[0].numpy()


class ConcatRunner:
    """Runs a concat-form graph (synthetic or exported) with growing past tensors and a 0/1 attention_mask."""

    def __init__(self, model: ir.Model, batch: int):
        self.session = session(model)
        self.past_names = [v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")]
        self.past = {}
        for value in model.graph.inputs:
            if value.name in self.past_names:
                _, heads, _, dim = value.shape
                self.past[value.name] = np.zeros((batch, heads, 0, dim), np.float32)
        self.mask = np.zeros((batch, 0), np.int64)

    def step(self, ids_BS: np.ndarray, pos_BS: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones(ids_BS.shape, np.int64)], axis=1)
        feed = {INPUT_IDS: ids_BS, POSITION_IDS: pos_BS, ATTENTION_MASK: self.mask, **self.past}
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, feed)))
        self.past = {name: out[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return out[LOGITS]
