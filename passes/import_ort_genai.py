"""onnxruntime-genai model-builder graphs -> kvc's standard form (ONNX Attention, RotaryEmbedding,
RMSNormalization), so the ring-buffer pass and both engines take them like kvc's own exports.

The builder's decoder (fp32 CPU build) uses com.microsoft contrib ops:
  * ``SimplifiedLayerNormalization(x, scale)`` -> ``RMSNormalization``;
  * ``SkipSimplifiedLayerNormalization(x, skip, scale[, bias])`` -> ``Add`` (+ bias) -> ``RMSNormalization``,
    the sum (output 3) being the next residual;
  * ``RotaryEmbedding(x, position_ids, cos, sin)`` -> the standard ``RotaryEmbedding(x, cos, sin, position_ids)``;
  * ``GroupQueryAttention(q[kv packed] | q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
    cos, sin)`` -> (Split) -> RotaryEmbedding on q and k when ``do_rotary`` -> 4-D
    ``Attention(q_BHSD, k_BKSD, v_BKSD, mask_B1ST, past_key_BKPD, past_value_BKPD)`` -> (Y, present_key,
    present_value), the concat form kvc's attention fusion produces.

GQA's rotary positions (past length + i) and its mask (causal, keys where attention_mask is 1) come from
``seqlens_k = ReduceSum(attention_mask) - 1`` and ``total_sequence_length = attention_mask.shape[1]``; a probe
checks that the graph computes exactly these before anything changes. Positions then come from a
``position_ids`` input (added when the graph has none, as kvc's runtime feeds it), the mask is rebuilt from
``attention_mask`` (the ring-buffer pass replaces it by its own). What the standard form cannot say is refused
in one line naming the node and attribute (a sliding window, smooth softmax, quantized caches, ...): never
dropped. Legend: B batch, S new tokens, P past, T = P + S, H query heads, K kv heads, D head size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kvc.contract import (ATTENTION_MASK, INPUT_IDS, PAST_RE, POSITION_IDS, PRESENT_RE, cache_io_names, past_name,
                          present_name)
from kvc.errors import GraphError
from kvc.passes._patterns import ProbeError, SampleDims, attr_int, const_array, opset_version, run_slice
from kvc.passes.base import KvcPass, PassReport

MS_DOMAIN = "com.microsoft"
TARGET_OPSET = 23  # Attention, RotaryEmbedding, RMSNormalization
GQA = "GroupQueryAttention"
MHA = "MultiHeadAttention"
NBITS = "MatMulNBits"
ONNX_DOMAIN_CONTRIB = ("SimplifiedLayerNormalization",)  # ONNX Runtime's, though in the default domain
LOWERED = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", GQA, MHA, NBITS)
# Attributes each contrib op may carry, with the values the standard form expresses (None: any value).
_ALLOWED_ATTRS = {
    "SimplifiedLayerNormalization": {"axis": None, "epsilon": None, "stash_type": None},
    "SkipSimplifiedLayerNormalization": {"epsilon": None},
    "RotaryEmbedding": {"interleaved": None, "num_heads": None, "rotary_embedding_dim": None, "scale": (1.0,),
                        "is_packed_batching": (0,)},
    GQA: {"num_heads": None, "kv_num_heads": None, "scale": None, "softcap": None, "local_window_size": (-1,),
          "do_rotary": None, "rotary_interleaved": None, "smooth_softmax": (0,), "qk_output": (0,)},
    MHA: {"num_heads": None, "scale": None, "mask_filter_value": None, "unidirectional": (0,)},
    NBITS: {"K": None, "N": None, "bits": (4, 8), "block_size": None, "accuracy_level": None},
}
_WHY = {"local_window_size": "a per-layer sliding window inside the graph",
        "smooth_softmax": "smooth softmax (an extra zero logit)", "qk_output": "exposed attention scores",
        "scale": "a rotary output scale", "is_packed_batching": "packed (ragged) batches"}
_GQA_EXTRA_INPUTS = {9: "position_ids", 10: "attention_bias", 11: "head_sink"}
# MultiHeadAttention inputs the lowering does not take (the builder's fp16-on-CPU graphs leave them empty and
# concatenate the past themselves, which kvc's attention fusion then folds into Attention's past inputs).
_MHA_UNSUPPORTED_INPUTS = {3: "bias", 4: "key_padding_mask", 6: "past_key", 7: "past_value",
                           8: "past_sequence_length", 9: "cache_indirection"}


@dataclass(frozen=True)
class _MaskSignals:
    """Shared by every layer: the builder's attention_mask and the concat-form mask built from it."""

    attention_mask: ir.Value
    position_ids: ir.Value


class ImportOrtGenaiPass(KvcPass):
    name = "import_ort_genai"
    changes_io = True  # adds position_ids when the graph computes positions inside GroupQueryAttention

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        contrib = [n for n in model.graph if _is_contrib(n)]
        if not contrib:
            return report
        _refuse_unsupported(contrib)  # everything that can refuse, before the graph changes
        gqa = [n for n in contrib if n.op_type == GQA]
        mha = [n for n in contrib if n.op_type == MHA]
        mha_head_dim = _mha_head_dim(mha) if mha else None
        if gqa:
            _check_gqa_inputs(model, gqa)
        _upgrade_opset(model)
        upcast = _upcast_fp16(model)
        counts = {op: 0 for op in LOWERED}
        signals = _signals(model.graph) if gqa or mha else None
        mask_cache: dict[ir.DataType, ir.Value] = {}
        for node in contrib:
            _LOWER[node.op_type](model.graph, node, signals, mask_cache)
            counts[node.op_type] += 1
        if mha_head_dim is not None:
            _fix_cache_head_size(model.graph, mha_head_dim)
        counts["Shape"] = _rewrite_past_shapes(model.graph)
        _order_caches(model.graph)
        _forget_intermediate_shapes(model.graph)
        RemoveUnusedNodesPass()(model)
        model.graph.sort()
        if MS_DOMAIN in model.graph.opset_imports and not any(n.domain == MS_DOMAIN for n in model.graph.all_nodes()):
            del model.graph.opset_imports[MS_DOMAIN]
        report.matched = sum(counts.values())
        report.notes.append("lowered " + ", ".join(f"{n} {op}" for op, n in counts.items() if n))
        if upcast:
            report.notes.append(f"float16 graph computed in float32 ({upcast} tensors upcast exactly): kvc's "
                                "passes and CPU engines take float32 models; choose the cache dtype with --kv-dtype")
        return report


def _is_contrib(node: ir.Node) -> bool:
    """com.microsoft ops, and the one ONNX Runtime registers in the default domain."""
    return node.domain == MS_DOMAIN or (node.domain in ("", "ai.onnx") and node.op_type in ONNX_DOMAIN_CONTRIB)


# --- refusals (read only) --------------------------------------------------------------------

def _refuse_unsupported(nodes: list[ir.Node]) -> None:
    for node in nodes:
        where = f"{MS_DOMAIN} {node.op_type} node {node.name!r}"
        allowed = _ALLOWED_ATTRS.get(node.op_type)
        if allowed is None:
            raise GraphError(f"{where}: kvc cannot lower this onnxruntime contrib op to standard ONNX "
                             f"(supported: {', '.join(LOWERED)}); build the model with -p fp32 -e cpu")
        for attr_name, attr in node.attributes.items():
            if attr_name not in allowed:
                raise GraphError(f"{where}: attribute {attr_name} is not supported by kvc's import; "
                                 "re-build without the option that sets it")
            values = allowed[attr_name]
            if values is not None and attr.value not in values:
                what = _WHY.get(attr_name, attr_name)
                raise GraphError(f"{where}: {attr_name}={attr.value} ({what}) has no equivalent in kvc's ring "
                                 "form and is not dropped; this model cannot be compiled")
        if node.op_type == GQA:
            for index, what in _GQA_EXTRA_INPUTS.items():
                if len(node.inputs) > index and node.inputs[index] is not None:
                    raise GraphError(f"{where}: input {index} ({what}) is not supported by kvc's import")
        if node.op_type == MHA:
            _refuse_mha_form(node, where)
        if node.op_type == NBITS:
            _refuse_nbits_form(node, where)
        if node.op_type == "RotaryEmbedding" and node.inputs[0].shape is not None \
                and node.inputs[0].shape.rank() == 3 and not attr_int(node, "num_heads", 0):
            _rotary_heads(node)
        if node.op_type == "RotaryEmbedding" and (node.inputs[1] is None or node.inputs[1].shape is None
                                                  or node.inputs[1].shape.rank() != 2):
            raise GraphError(f"{where}: position_ids are not a [batch, sequence] tensor (a start offset is not "
                             "supported by kvc's import)")
        if node.op_type == "SkipSimplifiedLayerNormalization" and any(
                len(node.outputs) > i and node.outputs[i] is not None and node.outputs[i].uses() for i in (1, 2)):
            raise GraphError(f"{where}: its mean / inverse-std outputs are used; kvc's RMSNormalization has none")
        if node.op_type == "SimplifiedLayerNormalization" and len(node.outputs) > 1 and node.outputs[1] is not None \
                and node.outputs[1].uses():
            raise GraphError(f"{where}: its inverse-std output is used; kvc's RMSNormalization has none")


def _refuse_mha_form(node: ir.Node, where: str) -> None:
    for index, what in _MHA_UNSUPPORTED_INPUTS.items():
        if len(node.inputs) > index and node.inputs[index] is not None:
            raise GraphError(f"{where}: input {index} ({what}) is not supported by kvc's import")
    if any(v is not None and v.uses() for v in node.outputs[1:]):
        raise GraphError(f"{where}: its present outputs are used; kvc's import takes the past as a Concat")
    if any(v is None or v.shape is None or v.shape.rank() != 3 for v in node.inputs[:3]):
        raise GraphError(f"{where}: query, key and value are not 3-D [batch, sequence, hidden] tensors")
    width = node.inputs[0].shape[-1]
    heads = attr_int(node, "num_heads", 0)
    if not isinstance(width, int) or heads < 1 or width % heads:
        raise GraphError(f"{where}: query width {width} is not num_heads x a fixed head size")


def _refuse_nbits_form(node: ir.Node, where: str) -> None:
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        raise GraphError(f"{where}: input 4 (g_idx, act-order quantization) is not supported by kvc's import")
    if any(const_array(v) is None for v in node.inputs[1:3]):
        raise GraphError(f"{where}: its quantized weights or scales are not constants")
    zero_points = node.inputs[3] if len(node.inputs) > 3 else None
    if zero_points is not None and (const_array(zero_points) is None or zero_points.dtype != ir.DataType.UINT8):
        raise GraphError(f"{where}: zero points that are not packed uint8 constants are not supported")


def _mha_head_dim(nodes: list[ir.Node]) -> int:
    sizes = {n.inputs[0].shape[-1] // attr_int(n, "num_heads", 1) for n in nodes}
    if len(sizes) != 1:
        raise GraphError(f"{MHA} nodes disagree on the head size ({sorted(sizes)}); one cache layout per model")
    return sizes.pop()


def _check_gqa_inputs(model: ir.Model, nodes: list[ir.Node]) -> None:
    """Caches are past_key_values.N.* inputs and present.N.* outputs; seqlens_k and the total length are
    attention_mask's row sums minus one and its width (checked by running them on a sample mask)."""
    mask = _graph_input(model.graph, ATTENTION_MASK)
    for node in nodes:
        where = f"{GQA} node {node.name!r}"
        past_k, past_v = node.inputs[3], node.inputs[4] if len(node.inputs) > 4 else None
        if past_k is None or past_v is None or not (PAST_RE.match(past_k.name or "")
                                                     and PAST_RE.match(past_v.name or "")):
            raise GraphError(f"{where}: its past key/value are not {past_name('N', 'key')}/value graph inputs; "
                             "re-build the model with a KV cache")
        if not all(o is not None and o.is_graph_output() and PRESENT_RE.match(o.name or "")
                   for o in node.outputs[1:3]):
            raise GraphError(f"{where}: its present key/value are not {present_name('N', 'key')}/value graph outputs")
        if mask is None:
            raise GraphError(f"{where}: the graph has no {ATTENTION_MASK} input from which its seqlens_k and "
                             "total_sequence_length are computed; kvc cannot tell the sequence lengths")
        _probe_lengths(model, node, mask, where)


def _probe_lengths(model: ir.Model, node: ir.Node, mask: ir.Value, where: str) -> None:
    rng = np.random.default_rng(0)
    sample = (rng.random((3, 11)) < 0.7).astype(mask.dtype.numpy() if mask.dtype else np.int64)
    sample[:, 0] = 1
    try:
        seqlens, total = run_slice([node.inputs[5], node.inputs[6]], {mask: sample},
                                   dict(model.graph.opset_imports), SampleDims())
    except ProbeError as e:
        raise GraphError(f"{where}: seqlens_k / total_sequence_length are not computed from "
                         f"{ATTENTION_MASK} alone ({e}); kvc cannot tell the sequence lengths") from None
    if not (np.array_equal(np.asarray(seqlens).reshape(-1), sample.sum(axis=1) - 1)
            and int(np.asarray(total).reshape(-1)[0]) == sample.shape[1]):
        raise GraphError(f"{where}: seqlens_k is not sum({ATTENTION_MASK}) - 1 or total_sequence_length is not "
                         f"its width; kvc cannot tell the sequence lengths")


def _graph_input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _upgrade_opset(model: ir.Model) -> None:
    if opset_version(model) < TARGET_OPSET:
        from onnxscript.version_converter import convert_version

        convert_version(model, TARGET_OPSET, fallback=True)
    for imports in (model.opset_imports, model.graph.opset_imports):
        imports[""] = max(imports.get("", 0), TARGET_OPSET)
    model.ir_version = max(model.ir_version, 10)


def _upcast_fp16(model: ir.Model) -> int:
    """float16 weights, constants, casts and I/O -> float32 (exact), so the graph is a float32 model."""
    f16, f32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    changed = 0
    for value in model.graph.initializers.values():
        if value.dtype == f16 and value.const_value is not None:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
            changed += 1
    for node in model.graph.all_nodes():
        if node.op_type == "Cast" and attr_int(node, "to", 0) == f16:
            node.attributes["to"] = ir.AttrInt64("to", int(f32))
            changed += 1
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == f16:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float32)))
                changed += 1
        for value in node.outputs:
            if value.dtype == f16:
                value.type = ir.TensorType(f32)
    for value in list(model.graph.inputs) + list(model.graph.outputs) + list(model.graph.initializers.values()):
        if value.dtype == f16:
            value.type = ir.TensorType(f32)
            changed += 1
    return changed


# --- shared signals --------------------------------------------------------------------------

def _signals(graph: ir.Graph) -> _MaskSignals:
    position_ids = _graph_input(graph, POSITION_IDS)
    if position_ids is None:
        ids = _graph_input(graph, INPUT_IDS)
        dims = list(ids.shape) if ids is not None and ids.shape is not None else ["batch_size", "sequence_length"]
        position_ids = ir.val(POSITION_IDS, ir.DataType.INT64, dims)
        names = [v.name for v in graph.inputs]
        graph.inputs.insert(names.index(INPUT_IDS) + 1 if INPUT_IDS in names else 0, position_ids)
    return _MaskSignals(_graph_input(graph, ATTENTION_MASK), position_ids)


def _concat_mask(graph: ir.Graph, signals: _MaskSignals, seq_1: ir.Value, dtype: ir.DataType,
                 cache: dict) -> ir.Value:
    """[B, 1, S, T] additive mask: query i (absolute T - S + i) sees key j iff j <= T - S + i and
    attention_mask[b, j] is 1 (GQA's causal, right-padded semantics)."""
    if dtype in cache:
        return cache[dtype]
    tape = ir.tape.Tape(graph)

    def const(array: np.ndarray) -> ir.Value:
        return tape.op("Constant", [], {"value": ir.tensor(array)})

    zero, one = const(np.array(0, np.int64)), const(np.array(1, np.int64))
    total_1 = tape.op("Shape", [signals.attention_mask], {"start": 1, "end": 2})
    keys_T = tape.op("Range", [zero, tape.op("Squeeze", [total_1]), one])
    offset = tape.op("Sub", [total_1, seq_1])
    queries_S1 = tape.op("Unsqueeze", [tape.op("Add", [tape.op("Range", [zero, tape.op("Squeeze", [seq_1]), one]),
                                                       offset]), const(np.array([1], np.int64))])
    causal_ST = tape.op("LessOrEqual", [keys_T, queries_S1])
    present_B11T = tape.op("Unsqueeze", [tape.op("Cast", [signals.attention_mask], {"to": ir.DataType.BOOL}),
                                         const(np.array([1, 2], np.int64))])
    visible = tape.op("And", [causal_ST, present_B11T])
    np_dtype = dtype.numpy()
    lowest = const(np.array(np.finfo(np_dtype).min, np_dtype))
    cache[dtype] = tape.op("Where", [visible, const(np.array(0, np_dtype)), lowest])
    return cache[dtype]


# --- lowering, one op each ---------------------------------------------------------------------

def _replace(graph: ir.Graph, old: ir.Node, pairs: list[tuple[ir.Value | None, ir.Value]]) -> None:
    """Each new value takes over an old output (its name too, when the old one is a graph output)."""
    for old_value, new_value in pairs:
        if old_value is None:
            continue
        new_value.shape, new_value.type = old_value.shape, old_value.type
        was_output, name = old_value.is_graph_output(), old_value.name
        old_value.replace_all_uses_with(new_value, replace_graph_outputs=True)
        if was_output:
            old_value.name = None
            new_value.name = name
    graph.remove(old, safe=True)


def _lower_simplified_ln(graph: ir.Graph, node: ir.Node, _signals, _cache) -> None:
    tape = ir.tape.Tape(graph)
    y = tape.op("RMSNormalization", [node.inputs[0], node.inputs[1]],
                {"axis": attr_int(node, "axis", -1), "epsilon": _attr_float(node, "epsilon", 1e-5),
                 "stash_type": attr_int(node, "stash_type", 1)})
    _replace(graph, node, [(node.outputs[0], y)])


def _lower_skip_simplified_ln(graph: ir.Graph, node: ir.Node, _signals, _cache) -> None:
    tape = ir.tape.Tape(graph)
    total = tape.op("Add", [node.inputs[0], node.inputs[1]])
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        total = tape.op("Add", [total, node.inputs[3]])
    y = tape.op("RMSNormalization", [total, node.inputs[2]],
                {"axis": -1, "epsilon": _attr_float(node, "epsilon", 1e-5), "stash_type": 1})
    summed = node.outputs[3] if len(node.outputs) > 3 else None
    _replace(graph, node, [(node.outputs[0], y), (summed, total)])


def _lower_rotary(graph: ir.Graph, node: ir.Node, _signals, _cache) -> None:
    x, position_ids, cos, sin = node.inputs[:4]
    tape = ir.tape.Tape(graph)
    attrs = {"interleaved": attr_int(node, "interleaved", 0)}
    for name in ("num_heads", "rotary_embedding_dim"):
        if attr_int(node, name, 0):
            attrs[name] = attr_int(node, name, 0)
    if x.shape is not None and x.shape.rank() == 3 and "num_heads" not in attrs:
        attrs["num_heads"] = _rotary_heads(node)
    if x.shape is not None and x.shape.rank() == 4:  # contrib 4-D is BSHD, the standard op's is BHSD
        x_bhsd = tape.op("Transpose", [x], {"perm": [0, 2, 1, 3]})
        y = tape.op("Transpose", [tape.op("RotaryEmbedding", [x_bhsd, cos, sin, position_ids], attrs)],
                    {"perm": [0, 2, 1, 3]})
    else:
        y = tape.op("RotaryEmbedding", [x, cos, sin, position_ids], attrs)
    _replace(graph, node, [(node.outputs[0], y)])


def _rotary_heads(node: ir.Node) -> int:
    """The contrib op infers heads from a 3-D input as hidden / (2 * cache width); the standard op needs them."""
    hidden, width = node.inputs[0].shape[-1], _cache_width(node.inputs[2])
    if not isinstance(hidden, int) or width is None or attr_int(node, "rotary_embedding_dim", 0) \
            or hidden % (2 * width):
        raise GraphError(f"{MS_DOMAIN} RotaryEmbedding node {node.name!r}: num_heads is not given and cannot be "
                         "inferred (hidden size or cos_cache width unknown, or a partial rotary dim)")
    return hidden // (2 * width)


def _lower_gqa(graph: ir.Graph, node: ir.Node, signals: _MaskSignals, mask_cache: dict) -> None:
    heads, kv_heads = attr_int(node, "num_heads", 0), attr_int(node, "kv_num_heads", 0)
    past_key, past_value = node.inputs[3], node.inputs[4]
    head_dim = _head_dim(node, past_key, heads, kv_heads)
    tape = ir.tape.Tape(graph)
    q, k, v = _split_qkv(tape, node, heads, kv_heads, head_dim)
    if attr_int(node, "do_rotary", 0):
        cos, sin = node.inputs[7], node.inputs[8]
        rotary = {"interleaved": attr_int(node, "rotary_interleaved", 0)}
        half = _cache_width(cos)
        if half is not None and 2 * half != head_dim:
            rotary["rotary_embedding_dim"] = 2 * half
        q = tape.op("RotaryEmbedding", [q, cos, sin, signals.position_ids], {**rotary, "num_heads": heads})
        k = tape.op("RotaryEmbedding", [k, cos, sin, signals.position_ids], {**rotary, "num_heads": kv_heads})
    q4, k4, v4 = (_to_heads_first(tape, t, n, head_dim) for t, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    dtype = past_key.dtype or ir.DataType.FLOAT
    seq_1 = ir.tape.Tape(graph).op("Shape", [k4], {"start": 2, "end": 3})
    mask = _concat_mask(graph, signals, seq_1, dtype, mask_cache)
    tape = ir.tape.Tape(graph)
    scale = _attr_float(node, "scale", 0.0) or 1.0 / math.sqrt(head_dim)
    attrs = {"scale": scale}
    if _attr_float(node, "softcap", 0.0) > 0:
        attrs["softcap"] = _attr_float(node, "softcap", 0.0)
    y4, present_key, present_value = tape.op_multi_out(
        "Attention", [q4, k4, v4, mask, past_key, past_value], attrs, num_outputs=3)
    y = tape.op("Reshape", [tape.op("Transpose", [y4], {"perm": [0, 2, 1, 3]}),
                            tape.op("Constant", [], {"value": ir.tensor(np.array([0, 0, heads * head_dim],
                                                                                 np.int64))})])
    for past in (past_key, past_value):  # the ring pass needs static kv heads and head size
        past.shape = ir.Shape([past.shape[0] if past.shape is not None else "batch_size", kv_heads,
                               past.shape[2] if past.shape is not None else "past_sequence_length", head_dim])
    _replace(graph, node, [(node.outputs[0], y), (node.outputs[1], present_key), (node.outputs[2], present_value)])
    for present in (present_key, present_value):
        present.shape = ir.Shape([past_key.shape[0], kv_heads, "total_sequence_length", head_dim])


def _head_dim(node: ir.Node, past_key: ir.Value, heads: int, kv_heads: int) -> int:
    where = f"{GQA} node {node.name!r}"
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise GraphError(f"{where}: num_heads={heads}, kv_num_heads={kv_heads} are not whole query-head groups")
    query, key = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    width = query.shape[-1] if query.shape is not None else None
    if isinstance(width, int):
        return width // (heads + 2 * kv_heads) if key is None else width // heads
    size = past_key.shape[3] if past_key.shape is not None else None
    if isinstance(size, int):
        return size
    raise GraphError(f"{where}: its head size is unknown (query width and past key dim 3 are symbolic)")


def _split_qkv(tape: ir.tape.Tape, node: ir.Node, heads: int, kv_heads: int, head_dim: int):
    query = node.inputs[0]
    key = node.inputs[1] if len(node.inputs) > 1 else None
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if key is not None and value is not None:
        return query, key, value
    sizes = tape.op("Constant", [], {"value": ir.tensor(np.array([heads * head_dim, kv_heads * head_dim,
                                                                  kv_heads * head_dim], np.int64))})
    return tape.op_multi_out("Split", [query, sizes], {"axis": -1}, num_outputs=3)


def _to_heads_first(tape: ir.tape.Tape, x_BSN: ir.Value, heads: int, head_dim: int) -> ir.Value:
    shape = tape.op("Constant", [], {"value": ir.tensor(np.array([0, 0, heads, head_dim], np.int64))})
    return tape.op("Transpose", [tape.op("Reshape", [x_BSN, shape])], {"perm": [0, 2, 1, 3]})


def _cache_width(cos: ir.Value) -> int | None:
    array = const_array(cos)
    if array is not None and array.ndim == 2:
        return int(array.shape[1])
    return cos.shape[-1] if cos.shape is not None and isinstance(cos.shape[-1], int) else None


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def _lower_mha(graph: ir.Graph, node: ir.Node, signals: _MaskSignals, mask_cache: dict) -> None:
    """MultiHeadAttention on 3-D q/k/v (+ attention_bias) -> the unfused scaled-dot-product form
    (MatMul, scale, Add bias, Softmax, MatMul), which kvc's attention fusion turns into Attention
    after tracing K/V back through the builder's repeat_kv to Concat(past, new). With an attention_mask
    input, the bias is rebuilt from it (causal + padding): the builder's own fp16-on-CPU mask subgraph
    fails in ONNX Runtime for multi-token steps with a past."""
    heads = attr_int(node, "num_heads", 0)
    query, key, value = node.inputs[:3]
    head_dim = query.shape[-1] // heads
    dtype = query.dtype or ir.DataType.FLOAT
    tape = ir.tape.Tape(graph)
    shape = tape.op("Constant", [], {"value": ir.tensor(np.array([0, 0, heads, head_dim], np.int64))})
    q4 = tape.op("Transpose", [tape.op("Reshape", [query, shape])], {"perm": [0, 2, 1, 3]})
    k_t = tape.op("Transpose", [tape.op("Reshape", [key, shape])], {"perm": [0, 2, 3, 1]})
    v4 = tape.op("Transpose", [tape.op("Reshape", [value, shape])], {"perm": [0, 2, 1, 3]})
    scale = _attr_float(node, "scale", 0.0) or 1.0 / math.sqrt(head_dim)
    scores = tape.op("Mul", [tape.op("MatMul", [q4, k_t]),
                             tape.op("Constant", [], {"value": ir.tensor(np.array(scale, dtype.numpy()))})])
    bias = node.inputs[5] if len(node.inputs) > 5 else None
    if bias is not None and signals.attention_mask is not None:
        seq_1 = tape.op("Shape", [query], {"start": 1, "end": 2})
        bias = _concat_mask(graph, signals, seq_1, dtype, mask_cache)
    if bias is not None:
        scores = tape.op("Add", [scores, bias])
    probs = tape.op("Softmax", [scores], {"axis": -1})
    merged = tape.op("Constant", [], {"value": ir.tensor(np.array([0, 0, heads * head_dim], np.int64))})
    y = tape.op("Reshape", [tape.op("Transpose", [tape.op("MatMul", [probs, v4])], {"perm": [0, 2, 1, 3]}), merged])
    _replace(graph, node, [(node.outputs[0], y)])


def _rewrite_past_shapes(graph: ir.Graph) -> int:
    """Shape(past_key_values.N.*) -> [batch, K, attention_mask width - input_ids length, D]: the builder's mask
    subgraph reads the past length off the cache, which the ring form replaces by a fixed capacity."""
    mask, ids = _graph_input(graph, ATTENTION_MASK), _graph_input(graph, INPUT_IDS)
    shapes = [n for n in graph if n.op_type == "Shape" and n.domain == "" and n.inputs[0] is not None
              and PAST_RE.match(n.inputs[0].name or "") and not n.attributes]
    if not shapes or mask is None or ids is None:
        return 0
    for node in shapes:
        past = node.inputs[0]
        if past.shape is None or not isinstance(past.shape[1], int) or not isinstance(past.shape[3], int):
            continue  # left for the ring pass to report
        tape = ir.tape.Tape(graph)
        batch = tape.op("Shape", [ids], {"start": 0, "end": 1})
        past_len = tape.op("Sub", [tape.op("Shape", [mask], {"start": 1, "end": 2}),
                                   tape.op("Shape", [ids], {"start": 1, "end": 2})])
        heads = tape.op("Constant", [], {"value": ir.tensor(np.array([past.shape[1]], np.int64))})
        size = tape.op("Constant", [], {"value": ir.tensor(np.array([past.shape[3]], np.int64))})
        _replace(graph, node, [(node.outputs[0], tape.op("Concat", [batch, heads, past_len, size], {"axis": 0}))])
    return len(shapes)


def _forget_intermediate_shapes(graph: ir.Graph) -> None:
    """The builder declares intermediate shapes with dim names that do not always hold (its repeat_kv outputs
    reuse the new tokens' length for the total length), and ONNX Runtime plans buffers by them: drop them
    all; canonicalize infers them again."""
    for node in graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None


def _order_caches(graph: ir.Graph) -> None:
    """The builder lists all keys, then all values; kvc's engines bind caches layer by layer, key then value."""
    layers = sum(1 for v in graph.inputs if PAST_RE.match(v.name or ""))
    order = cache_io_names(layers // 2, with_scales=False)
    for values, rank_of in ((graph.inputs, {name: i for i, (name, _) in enumerate(order)}),
                            (graph.outputs, {name: i for i, (_, name) in enumerate(order)})):
        caches = sorted((v for v in values if v.name in rank_of), key=lambda v: rank_of[v.name])
        others = [v for v in values if v.name not in rank_of]
        if len(caches) != len(order):
            return  # unpaired caches: left for the ring pass to report
        values.clear()
        values.extend(others + caches)


def _lower_nbits(graph: ir.Graph, node: ir.Node, _signals, _cache) -> None:
    """MatMulNBits -> MatMul with the weights dequantized at compile time (exact: (q - zero) * scale per block).
    The weights are then stored in the activations' float type: correct on both engines, without the
    int4/int8 memory saving."""
    a = node.inputs[0]
    weight_KN = _dequantize_nbits(node).astype((a.dtype or ir.DataType.FLOAT).numpy())
    name = f"{node.inputs[1].name}_dequantized"
    weight = ir.Value(name=name, shape=ir.Shape(list(weight_KN.shape)), type=ir.TensorType(ir.DataType(a.dtype)),
                      const_value=ir.tensor(weight_KN, name=name))
    graph.register_initializer(weight)
    tape = ir.tape.Tape(graph)
    y = tape.op("MatMul", [a, weight])
    if len(node.inputs) > 5 and node.inputs[5] is not None:
        y = tape.op("Add", [y, node.inputs[5]])
    _replace(graph, node, [(node.outputs[0], y)])


def _dequantize_nbits(node: ir.Node) -> np.ndarray:
    """[K, N] float weights of a MatMulNBits node (B: [N, blocks, block_size * bits / 8] uint8, low bits first)."""
    k, n = attr_int(node, "K", 0), attr_int(node, "N", 0)
    bits, block = attr_int(node, "bits", 4), attr_int(node, "block_size", 32)
    blocks = -(-k // block)
    packed = const_array(node.inputs[1]).reshape(n, blocks, -1)
    scales = const_array(node.inputs[2]).astype(np.float32).reshape(n, blocks)
    quantized = _unpack(packed, bits).reshape(n, blocks, block).astype(np.float32)
    zero_points = node.inputs[3] if len(node.inputs) > 3 else None
    if zero_points is None:
        zeros = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    else:
        zeros = _unpack(const_array(zero_points).reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    weight_NK = ((quantized - zeros[..., None]) * scales[..., None]).reshape(n, blocks * block)[:, :k]
    return np.ascontiguousarray(weight_NK.T)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _fix_cache_head_size(graph: ir.Graph, head_dim: int) -> None:
    """The builder names the caches' head-size dim (kv_cache_dim); the ring pass needs it fixed."""
    for value in list(graph.inputs) + list(graph.outputs):
        if (PAST_RE.match(value.name or "") or PRESENT_RE.match(value.name or "")) and value.shape is not None \
                and value.shape.rank() == 4 and not isinstance(value.shape[3], int):
            value.shape = ir.Shape([*list(value.shape)[:3], head_dim])


_LOWER = {MHA: _lower_mha, NBITS: _lower_nbits, "SimplifiedLayerNormalization": _lower_simplified_ln,
          "SkipSimplifiedLayerNormalization": _lower_skip_simplified_ln,
          "RotaryEmbedding": _lower_rotary, GQA: _lower_gqa}
