"""Rotary position embedding subgraphs -> opset-23 RotaryEmbedding.

Shape legend: B batch, H heads, S sequence, D head size, R rotated size (D unless partial),
P cache rows (max positions). ``x`` is rotated in [B, H, S, D] ("BHSD") or [B, S, H, D]
("BSHD") layout; RotaryEmbedding takes BHSD, so BSHD inputs get a Transpose on each side
(later cancelled against the graph's own transposes).

Rules, applied in order:

* ``RotateHalfFusion`` (exporters: HF / kvc / GPT-J): ``x * cos + rot(x) * sin`` where ``rot`` is
  rotate_half (``cat(-x2, x1)``) or rotate-every-two (``stack(-x_odd, x_even).flatten``). Which
  one, is checked by running ``rot`` on sample data. cos/sin are full width [.., D]; the
  half-width cache RotaryEmbedding needs comes from:
    - a table materialised as an initializer of max_position_embeddings rows when cos/sin are
      computed from position ids and constants only (Gather from a table, or position_ids *
      inv_freq in-graph); RotaryEmbedding then reads position_ids;
    - otherwise the in-graph cos/sin sliced to half width ([B, S, D/2], no position ids) when
      they are cos/sin of Concat(freqs, freqs).
* ``RealImagFusion`` (ONNX's own function body): ``real = cos*x1 - sin*x2``,
  ``imag = sin*x1 + cos*x2``, then Concat (halves) or interleave; cos/sin are half width,
  Gather(cache, position_ids) or [B, S, D/2].
* ``PartialRotaryFusion``: Concat(RotaryEmbedding(x[..., :R]), x[..., R:]) -> rotary_embedding_dim=R.
* ``Rotary3dInputFusion``: Reshape 3-D [B, S, H*D] -> BSHD -> RotaryEmbedding -> Reshape back
  becomes RotaryEmbedding on the 3-D input with num_heads=H.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass, RemoveUnusedNodesPass
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import no_op_transpose_rule, transpose_transpose_rule

from kvc.passes._patterns import (FLOAT_TYPES, ProbeError, SampleDims, attr_int, const_ints, const_scalar,
                                  downstream_nodes, explain_no_match, rank, run_slice,
                                  sample_like, static_dim, summarize)
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.reshape_inferred_dim import is_known

MIN_OPSET = 23
_BHSD_FROM_BSHD = [0, 2, 1, 3]
_ROTATION_OPS = frozenset({"Slice", "Split", "Neg", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Gather",
                           "Identity", "Transpose", "Flatten"})
_COS_WRAPPERS = frozenset({"Cast", "Mul", "Identity"})  # dtype casts, attention_scaling


@dataclass
class _Caches:
    """What RotaryEmbedding reads: caches [P, R/2] + position ids, or [B, S, R/2] without ids."""

    cos: ir.Value | np.ndarray
    sin: ir.Value | np.ndarray
    position_ids: ir.Value | None = None
    half_slice: int | None = None  # slice in-graph cos/sin (or caches) to this width first
    table_key: ir.Value | None = None  # for materialised tables: the in-graph cos they replace
    squeeze_axis: int | None = None  # in-graph cos/sin are 4-D: squeeze their heads axis first


@dataclass
class _Plan:
    layout: str
    interleaved: bool
    caches: _Caches


class _CacheRegistry:
    """One derivation and one initializer per cos/sin pair, shared by every layer that uses it
    (tables can be max_position_embeddings x head_size/2: evaluate them once)."""

    def __init__(self, taken_names: set[str]):
        self._values: dict[tuple[int, str], ir.Value] = {}
        self._caches: dict[tuple, _Caches | ProbeError] = {}
        self._taken = taken_names

    def caches(self, cos3: ir.Value, sin3: ir.Value, squeeze: int | None, size: int, interleaved: bool,
               max_positions: int | None, opsets: dict[str, int]) -> _Caches:
        key = (id(cos3), id(sin3), squeeze, size, interleaved)
        if key not in self._caches:
            try:
                self._caches[key] = _full_width_caches(cos3, sin3, squeeze, size, interleaved, max_positions, opsets)
            except ProbeError as e:
                self._caches[key] = e
        found = self._caches[key]
        if isinstance(found, ProbeError):
            raise found
        return found

    def value(self, op, key: ir.Value, kind: str, array: np.ndarray) -> ir.Value:
        if (id(key), kind) not in self._values:
            name = next(n for n in (f"rotary_{kind}_cache_{i}" for i in range(len(self._taken) + 1))
                        if n not in self._taken)
            self._taken.add(name)
            self._values[(id(key), kind)] = op.initializer(ir.tensor(array), name=name)
        return self._values[(id(key), kind)]


class RotateHalfFusion(pattern.RewriteRuleClassBase):
    def __init__(self, max_positions: int | None, registry: _CacheRegistry):
        super().__init__("RotateHalf", remove_nodes=False)  # cos/sin feed several layers
        self._max_positions, self._registry = max_positions, registry

    def pattern(self, op, x, cos4, rotated, sin4):
        return op.Add(op.Mul(x, cos4), op.Mul(rotated, sin4))

    def check(self, context, x, cos4, rotated, sin4, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        head_size = static_dim(x, -1)
        if rank(x) != 4 or head_size is None or head_size % 2 or x.dtype not in FLOAT_TYPES:
            return result.fail("x is not a 4-D float tensor with a known, even head size")
        if not _reaches(rotated, x, _ROTATION_OPS, depth=8):
            return result.fail("the rotated term is not computed from x by slicing and negation")
        opsets = dict(context.graph_or_function.opset_imports)
        try:
            interleaved = _rotation_kind(x, rotated, opsets)
            layout, cos3, sin3, squeeze = _heads_axis(cos4, sin4)
            caches = self._registry.caches(cos3, sin3, squeeze, head_size, interleaved, self._max_positions, opsets)
        except ProbeError as e:
            return result.fail(str(e))
        self._plan = _Plan(layout, interleaved, caches)
        return result

    def rewrite(self, op, x, **_):
        return _emit(op, x, self._plan, self._registry)


class RealImagFusion(pattern.RewriteRuleClassBase):
    """ONNX's RotaryEmbedding function body (and code written like it)."""

    def __init__(self, split: str, interleaved: bool):
        super().__init__(f"RealImag{'Interleaved' if interleaved else ''}{split.title()}", remove_nodes=False)
        self._split, self._interleaved = split, interleaved

    def pattern(self, op, x, cos4, sin4, concat_axis, unsqueeze_axis, out_shape):
        if self._split == "split":
            x1, x2 = op.Split(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["x1", "x2"])
        else:
            x1 = op.Slice(x, _allow_other_inputs=True, _outputs=["x1"])
            x2 = op.Slice(x, _allow_other_inputs=True, _outputs=["x2"])
        real = op.Sub(op.Mul(cos4, x1), op.Mul(sin4, x2))
        imag = op.Add(op.Mul(sin4, x1), op.Mul(cos4, x2))
        if not self._interleaved:
            return op.Concat(real, imag, axis=concat_axis)
        pairs = op.Concat(op.Unsqueeze(real, unsqueeze_axis), op.Unsqueeze(imag, unsqueeze_axis), axis=concat_axis)
        return op.Reshape(pairs, out_shape, _allow_other_attributes=True)

    def check(self, context, x, cos4, sin4, x1, x2, concat_axis, **b) -> pattern.MatchResult:
        result = pattern.MatchResult()
        size = static_dim(x, -1)
        if rank(x) != 4 or size is None or size % 2 or x.dtype not in FLOAT_TYPES:
            return result.fail("x is not a 4-D float tensor with a known, even head size")
        if concat_axis.as_int() not in (-1, 3 if not self._interleaved else 4):
            return result.fail("halves are not joined on the last axis")
        problem = _halves_problem(x1, x2, size, self._interleaved)
        if not problem and self._interleaved:
            problem = _interleave_problem(b.get("unsqueeze_axis"), b.get("out_shape"), x)
        if problem:
            return result.fail(problem)
        try:
            layout, cos3, sin3, squeeze = _heads_axis(cos4, sin4)
            caches = _half_width_caches(cos3, sin3, squeeze, size // 2)
        except ProbeError as e:
            return result.fail(str(e))
        self._plan = _Plan(layout, self._interleaved, caches)
        return result

    def rewrite(self, op, x, **_):
        return _emit(op, x, self._plan, None)


class PartialRotaryFusion(pattern.RewriteRuleClassBase):
    """Concat(RotaryEmbedding(x[..., :R]), x[..., R:]) -> RotaryEmbedding(x, rotary_embedding_dim=R)."""

    def __init__(self, split: str):
        super().__init__(f"PartialRotary{split.title()}", remove_nodes=False)
        self._split = split

    def pattern(self, op, x, lengths, concat_axis):
        if self._split == "split":
            rot, rest = op.Split(x, lengths, _allow_other_attributes=True, _outputs=["rot", "rest"])
        else:
            rot = op.Slice(x, _allow_other_inputs=True, _outputs=["rot"])
            rest = op.Slice(x, _allow_other_inputs=True, _outputs=["rest"])
        wrapped = pattern.OrValue([op.Transpose(rot, perm=_BHSD_FROM_BSHD), rot], tag_var="wrap_in",
                                  tag_values=[True, False])
        rope = op.RotaryEmbedding(wrapped, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["rope"])
        unwrapped = pattern.OrValue([op.Transpose(rope, perm=_BHSD_FROM_BSHD), rope], tag_var="wrap_out",
                                    tag_values=[True, False])
        return op.Concat(unwrapped, rest, axis=concat_axis)

    def check(self, context, x, rot, rest, rope, concat_axis, wrap_in, wrap_out, **b) -> pattern.MatchResult:
        result = pattern.MatchResult()
        size = static_dim(x, -1)
        if wrap_in != wrap_out:
            return result.fail("transposes around RotaryEmbedding do not match")
        if rank(x) != 4 or size is None or concat_axis.as_int() not in (-1, 3):
            return result.fail("x is not 4-D with a known head size joined on the last axis")
        attrs = rope.producer().attributes
        if "rotary_embedding_dim" in attrs or "num_heads" in attrs:
            return result.fail("RotaryEmbedding already has rotary_embedding_dim or num_heads")
        rotary = _split_point(rot, rest, size, b.get("lengths"), self._split)
        if rotary is None:
            return result.fail("x is not split into a rotated prefix and an untouched rest")
        self._rotary = rotary
        return result

    def rewrite(self, op, x, rope, wrap_in, **_):
        node = rope.producer()
        source = op.Transpose(x, perm=_BHSD_FROM_BSHD) if wrap_in else x
        attrs = dict(node.attributes.items())
        out = op.RotaryEmbedding(source, *node.inputs[1:], **attrs, rotary_embedding_dim=self._rotary)
        return op.Transpose(out, perm=_BHSD_FROM_BSHD) if wrap_in else out


class Rotary3dInputFusion(pattern.RewriteRuleClassBase):
    """Reshape([B,S,H*D] -> [B,S,H,D]) -> RoPE (BSHD) -> Reshape back  ->  3-D RotaryEmbedding."""

    def __init__(self):
        super().__init__("Rotary3dInput", remove_nodes=False)

    def pattern(self, op, x3, split_shape, merge_shape):
        x4 = op.Reshape(x3, split_shape, _allow_other_attributes=True, _outputs=["x4"])
        rope = op.RotaryEmbedding(op.Transpose(x4, perm=_BHSD_FROM_BSHD), _allow_other_inputs=True,
                                  _allow_other_attributes=True, _outputs=["rope"])
        return op.Reshape(op.Transpose(rope, perm=_BHSD_FROM_BSHD), merge_shape, _allow_other_attributes=True,
                          _outputs=["y"])

    def check(self, context, x3, x4, rope, merge_shape, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        heads, size = static_dim(x4, 2), static_dim(x4, 3)
        if rank(x3) != 3 or rank(x4) != 4 or heads is None or size is None:
            return result.fail("input is not 3-D split into known heads and head size")
        if static_dim(x3, 2) not in (heads * size, None) or list(x3.shape)[:2] != list(x4.shape)[:2]:
            return result.fail("the Reshape does not split only the last axis into heads")
        if not _is_shape_of(merge_shape, x3):
            return result.fail("the output is not reshaped back to the input's shape")
        if "num_heads" in rope.producer().attributes:
            return result.fail("RotaryEmbedding already has num_heads")
        self._heads = heads
        return result

    def rewrite(self, op, x3, rope, **_):
        node = rope.producer()
        return op.RotaryEmbedding(x3, *node.inputs[1:], **dict(node.attributes.items()), num_heads=self._heads)


class FuseRotaryPass(KvcPass):
    name = "rotary"
    min_opset = MIN_OPSET

    def __init__(self, max_positions: int | None = None) -> None:
        super().__init__()
        self.max_positions = max_positions

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        max_positions = self.max_positions
        rotate_half = _rotate_half_rules(model, max_positions)
        report.matched = rotate_half.apply_to_model(model) + _real_imag_rules().apply_to_model(model)
        if report.matched:
            _follow_up_rules().apply_to_model(model)
            _transpose_cleanup().apply_to_model(model)
            IdentityEliminationPass()(model)
            RemoveUnusedNodesPass()(model)
            report.notes.extend(_cache_notes(model, max_positions))
        report.notes.extend(summarize(self.name, "rotations (Neg nodes)", _leftover_reasons(model, rotate_half)))
        return report


# --- the rotation ------------------------------------------------------------------------------------

def _reaches(value: ir.Value, target: ir.Value, ops: frozenset[str], depth: int) -> bool:
    """True when ``target`` is an ancestor of ``value`` through ``ops`` within ``depth`` nodes."""
    frontier = [value]
    for _ in range(depth):
        nodes = [v.producer() for v in frontier if v is not None and v.producer() is not None]
        nodes = [n for n in nodes if n.op_type in ops and n.domain == ""]
        frontier = [i for n in nodes for i in n.inputs]
        if any(v is target for v in frontier):
            return True
    return False


def _rotation_kind(x: ir.Value, rotated: ir.Value, opsets: dict[str, int]) -> bool:
    """Run the rotation on sample data: False for rotate_half, True for rotate-every-two."""
    dims = SampleDims()
    sample = sample_like(x, dims, np.random.default_rng(0))
    (got,) = run_slice([rotated], {x: sample}, opsets, dims)
    half = sample.shape[-1] // 2
    if np.array_equal(got, np.concatenate([-sample[..., half:], sample[..., :half]], axis=-1)):
        return False
    pairs = np.stack([-sample[..., 1::2], sample[..., 0::2]], axis=-1).reshape(sample.shape)
    if np.array_equal(got, pairs):
        return True
    raise ProbeError("the rotated term is neither rotate_half nor rotate-every-two of x")


def _halves_problem(x1: ir.Value, x2: ir.Value, size: int, interleaved: bool) -> str | None:
    node = x1.producer()
    if node.op_type == "Split":
        axis, lengths = attr_int(node, "axis", 0), const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        halves = lengths in (None, [size // 2] * 2) and (lengths or attr_int(node, "num_outputs", 2) == 2)
        return None if axis in (-1, 3) and halves and not interleaved else "x is not split into two halves"
    first, second = _slice_params(x1, size), _slice_params(x2, size)
    want = ((0, size, 2), (1, size, 2)) if interleaved else ((0, size // 2, 1), (size // 2, size, 1))
    return None if (first, second) == want else "x is not sliced into halves (or even/odd elements)"


def _slice_params(sliced: ir.Value, size: int) -> tuple[int, int, int] | None:
    """(start, end, step) of a Slice on the last axis of a tensor of ``size`` elements there."""
    node = sliced.producer()
    if node is None or node.op_type != "Slice":
        return None
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = const_ints(ins[1]), const_ints(ins[2])
    axes = const_ints(ins[3]) if ins[3] is not None else None
    steps = const_ints(ins[4]) if ins[4] is not None else [1]
    last = (rank(node.inputs[0]) or 0) - 1
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (-1, last):
        return None
    start, end, step = starts[0], ends[0], steps[0]
    if step == 2 and end == size + 1:
        end = size  # x[1::2] written with end = size + 1 (ONNX's function body)
    return start, min(end, size), step


def _interleave_problem(unsqueeze_axis: ir.Value | None, out_shape: ir.Value | None, x: ir.Value) -> str | None:
    if const_ints(unsqueeze_axis) not in ([-1], [4]):
        return "real and imaginary parts are not interleaved on a new last axis"
    if not _is_shape_of(out_shape, x):
        return "interleaved pairs are not reshaped back to x's shape"
    return None


def _is_shape_of(shape: ir.Value | None, x: ir.Value) -> bool:
    node = shape.producer() if shape is not None else None
    if node is not None and node.op_type == "Shape" and node.inputs[0] is x and not node.attributes:
        return True
    wanted = const_ints(shape)
    return wanted is not None and x.shape is not None and x.shape.is_static() and wanted == list(x.shape)


def _split_point(rot: ir.Value, rest: ir.Value, size: int, lengths: ir.Value | None, split: str) -> int | None:
    if split == "split":
        node = rot.producer()
        parts = const_ints(lengths)
        ok = parts is not None and len(parts) == 2 and sum(parts) == size and attr_int(node, "axis", 0) in (-1, 3)
        return parts[0] if ok and parts[1] > 0 else None
    first, second = _slice_params(rot, size), _slice_params(rest, size)
    contiguous = first and second and first[0] == 0 and first[2] == 1 == second[2] and first[1] == second[0]
    if contiguous and second[1] == size:
        return first[1] if first[1] < size else None
    return None


# --- cos / sin -----------------------------------------------------------------------------------------

def _heads_axis(cos4: ir.Value, sin4: ir.Value) -> tuple[str, ir.Value, ir.Value, int | None]:
    """Layout of x from the axis cos/sin broadcast over heads; the cos/sin to read caches from,
    and the axis to squeeze from them when they are 4-D (not an Unsqueeze of a 3-D tensor)."""
    found = []
    for value in (cos4, sin4):
        node = value.producer()
        axes = const_ints(node.inputs[1]) if node is not None and node.op_type == "Unsqueeze" else None
        if axes is not None and len(axes) == 1 and axes[0] % 4 in (1, 2) and rank(node.inputs[0]) in (3, None):
            found.append((axes[0] % 4, node.inputs[0], None))
        elif rank(value) == 4 and [static_dim(value, 1), static_dim(value, 2)].count(1) == 1:
            axis = 1 if static_dim(value, 1) == 1 else 2
            found.append((axis, value, axis))
        else:
            raise ProbeError("cos/sin are not broadcast over the heads axis")
    if found[0][0] != found[1][0] or found[0][2] != found[1][2]:
        raise ProbeError("cos and sin are broadcast over different axes")
    layout = "BHSD" if found[0][0] == 1 else "BSHD"
    return layout, found[0][1], found[1][1], found[0][2]


def _full_width_caches(cos3: ir.Value, sin3: ir.Value, squeeze: int | None, size: int, interleaved: bool,
                       max_positions: int | None, opsets: dict[str, int]) -> _Caches:
    """Half-width caches from full-width cos/sin [B, S, D] (each frequency used twice)."""
    positions = _position_source(cos3, sin3)
    reasons = []
    if positions is not None:
        rows = max_positions or _table_rows(cos3)
        if rows is None:
            reasons.append("max_position_embeddings unknown")
        else:
            try:
                cos, sin = _materialise(cos3, sin3, squeeze, positions, rows, interleaved, opsets)
                return _Caches(cos, sin, positions, table_key=cos3)
            except ProbeError as e:
                reasons.append(str(e))
    else:
        reasons.append("cos/sin do not depend on a single position-ids input")
    if not interleaved and _duplicated_frequencies(cos3) and _duplicated_frequencies(sin3):
        return _Caches(cos3, sin3, None, half_slice=size // 2, squeeze_axis=squeeze)
    raise ProbeError("cannot derive half-width cos/sin caches: " + "; ".join(reasons))


def _position_source(cos3: ir.Value, sin3: ir.Value) -> ir.Value | None:
    """The one non-constant graph input cos and sin are computed from (read through Shape too)."""
    leaves: set[ir.Value] = set()
    seen: set[ir.Value] = set()
    stack = [cos3, sin3]
    while stack:
        value = stack.pop()
        if value in seen or ir.convenience.get_const_tensor(value) is not None:
            continue
        seen.add(value)
        node = value.producer()
        if node is None:
            leaves.add(value)
        elif node.op_type not in ("Shape", "Size"):
            stack.extend(i for i in node.inputs if i is not None)
    if len(leaves) != 1:
        return None
    (leaf,) = leaves
    integer = leaf.dtype in (ir.DataType.INT64, ir.DataType.INT32)
    return leaf if integer and rank(leaf) == 2 else None


def _table_rows(cos3: ir.Value) -> int | None:
    """Rows of a constant cos table gathered by position (HF's older cos_cached[position_ids])."""
    value = cos3
    for _ in range(6):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Gather" and ir.convenience.get_const_tensor(node.inputs[0]) is not None:
            return static_dim(node.inputs[0], 0)
        value = node.inputs[0]
    return None


def _materialise(cos3: ir.Value, sin3: ir.Value, squeeze: int | None, positions: ir.Value, rows: int,
                 interleaved: bool, opsets: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate cos/sin for positions 0..rows-1; check they are per-position lookups; halve."""
    dims = SampleDims()
    batch = _probe_batch(positions, dims)

    def evaluate(ids: np.ndarray) -> list[np.ndarray]:
        tables = run_slice([cos3, sin3], {positions: ids}, opsets, dims)
        return [t if squeeze is None else np.squeeze(t, axis=squeeze) for t in tables]

    all_positions = np.tile(np.arange(rows, dtype=positions.dtype.numpy())[None, :], (batch, 1))
    cos, sin = (t[0] for t in evaluate(all_positions))
    picks = np.random.default_rng(0).integers(0, rows, size=(batch, 5)).astype(all_positions.dtype)
    cos_p, sin_p = evaluate(picks)
    if not (np.array_equal(cos_p, cos[picks]) and np.array_equal(sin_p, sin[picks])):
        raise ProbeError("cos/sin are not a per-position lookup of position ids")
    first, second = (slice(0, None, 2), slice(1, None, 2)) if interleaved else \
        (slice(0, cos.shape[-1] // 2), slice(cos.shape[-1] // 2, None))
    if not (np.allclose(cos[:, first], cos[:, second]) and np.allclose(sin[:, first], sin[:, second])):
        raise ProbeError("cos/sin do not repeat each frequency the way the rotation pairs elements")
    return np.ascontiguousarray(cos[:, first]), np.ascontiguousarray(sin[:, first])


def _probe_batch(positions: ir.Value, dims: SampleDims) -> int:
    """Rows of the probe's position ids: the size the probe gives the batch symbol of position_ids, so that a
    cos/sin slice reading the batch from another input's shape (transformers 4.57's inv_freq.expand(batch, ...))
    agrees with the fed rows; 2 when the batch is not a named symbol."""
    dim = positions.shape[0] if positions.shape is not None and len(positions.shape) == 2 else None
    if isinstance(dim, int):
        return dim
    try:
        return dims.size(dim) if dim is not None else 2
    except ProbeError:
        return 2


def _duplicated_frequencies(value: ir.Value) -> bool:
    """cos/sin of Concat(f, f) (through casts and constant scaling): both halves are equal."""
    for _ in range(6):
        node = value.producer()
        if node is None:
            return False
        if node.op_type in ("Cos", "Sin"):
            concat = node.inputs[0].producer()
            return (concat is not None and concat.op_type == "Concat" and len(concat.inputs) == 2
                    and concat.inputs[0] is concat.inputs[1] and attr_int(concat, "axis", 0) in (-1, 2))
        if node.op_type not in _COS_WRAPPERS:
            return False
        if node.op_type == "Mul" and const_scalar(node.inputs[1]) is None:
            return False
        value = node.inputs[0]
    return False


def _half_width_caches(cos3: ir.Value, sin3: ir.Value, squeeze: int | None, half: int) -> _Caches:
    """Caches for the real/imaginary form, whose cos/sin are already half width."""
    if squeeze is not None:
        if static_dim(cos3, -1) != half or static_dim(sin3, -1) != half:
            raise ProbeError("cos/sin are not [batch, seq, head_size/2] broadcast over heads")
        return _Caches(cos3, sin3, None, squeeze_axis=squeeze)
    (cos_src, cos_width), (sin_src, sin_width) = _strip_prefix_slice(cos3), _strip_prefix_slice(sin3)
    cos_node, sin_node = cos_src.producer(), sin_src.producer()
    gathered = all(n is not None and n.op_type == "Gather" and attr_int(n, "axis", 0) == 0 and rank(n.inputs[0]) == 2
                   for n in (cos_node, sin_node))
    if gathered and cos_node.inputs[1] is sin_node.inputs[1] and cos_width == sin_width:
        cache_width = static_dim(cos_node.inputs[0], 1)
        width = cos_width if cos_width is not None and cos_width != cache_width else None
        return _Caches(cos_node.inputs[0], sin_node.inputs[0], cos_node.inputs[1], half_slice=width)
    if rank(cos3) == 3 and static_dim(cos3, -1) in (half, None):
        # A prefix slice that keeps everything is dropped.
        cos = cos_src if cos_width is not None and static_dim(cos_src, -1) == cos_width else cos3
        sin = sin_src if sin_width is not None and static_dim(sin_src, -1) == sin_width else sin3
        return _Caches(cos, sin, None)
    raise ProbeError("cos/sin are neither Gather(cache, position_ids) nor [batch, seq, head_size/2]")


def _strip_prefix_slice(value: ir.Value) -> tuple[ir.Value, int | None]:
    node = value.producer()
    if node is not None and node.op_type == "Slice":
        size = static_dim(node.inputs[0], -1)
        params = _slice_params(value, size if size is not None else 1 << 62)
        if params and params[0] == 0 and params[2] == 1:
            return node.inputs[0], params[1]
    return value, None


# --- emitting --------------------------------------------------------------------------------------------

def _emit(op, x: ir.Value, plan: _Plan, registry: _CacheRegistry | None) -> ir.Value:
    caches = plan.caches
    cos, sin = caches.cos, caches.sin
    one_for_all_rows = caches.position_ids is None and not _same_batch(cos, x)
    if isinstance(cos, np.ndarray):
        cos = registry.value(op, caches.table_key, "cos", cos)
        sin = registry.value(op, caches.table_key, "sin", sin)
    if caches.squeeze_axis is not None:
        axes = _int64s(op, caches.squeeze_axis)
        cos, sin = op.Squeeze(cos, axes), op.Squeeze(sin, axes)
    if caches.half_slice is not None:
        start, end, axis = (_int64s(op, v) for v in (0, caches.half_slice, -1))
        cos, sin = op.Slice(cos, start, end, axis), op.Slice(sin, start, end, axis)
    source = op.Transpose(x, perm=_BHSD_FROM_BSHD) if plan.layout == "BSHD" else x
    if one_for_all_rows:
        # cos/sin computed once for all rows ([1, S, D/2], from an in-graph arange): RotaryEmbedding wants
        # one per row; Expand to x's batch (a no-op where it already is)
        rows = op.Concat(op.Shape(source, start=0, end=1), _int64s(op, 1, 1), axis=0)
        cos, sin = op.Expand(cos, rows), op.Expand(sin, rows)
    inputs = [source, cos, sin] + ([caches.position_ids] if caches.position_ids is not None else [])
    out = op.RotaryEmbedding(*inputs, interleaved=int(plan.interleaved))
    return op.Transpose(out, perm=_BHSD_FROM_BSHD) if plan.layout == "BSHD" else out


def _same_batch(cos: ir.Value, x: ir.Value) -> bool:
    if isinstance(cos, np.ndarray) or cos.shape is None or x.shape is None or not len(cos.shape) or not len(x.shape):
        return False
    return is_known(cos.shape[0]) and cos.shape[0] == x.shape[0]


def _int64s(op, *values: int) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))


# --- pass plumbing ------------------------------------------------------------------------------------

def _rotate_half_rules(model: ir.Model, max_positions: int | None) -> pattern.RewriteRuleSet:
    """Built per run: the rule holds the run's max_positions and its table registry."""
    registry = _CacheRegistry(set(model.graph.initializers))
    return pattern.RewriteRuleSet([RotateHalfFusion.rule(max_positions, registry)], commute=True)


# Rule sets are built per run: their rules keep a match's plan between check and rewrite.
def _real_imag_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([RealImagFusion.rule(split, interleaved) for split, interleaved in
                                   (("split", False), ("slices", False), ("slices", True))], commute=True)


def _follow_up_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([PartialRotaryFusion.rule("split"), PartialRotaryFusion.rule("slices"),
                                   Rotary3dInputFusion.rule()])


def _transpose_cleanup() -> pattern.RewriteRuleSet:
    """The BSHD wrappers meet the graph's own transposes: cancel them."""
    return pattern.RewriteRuleSet([transpose_transpose_rule, no_op_transpose_rule])


def _cache_notes(model: ir.Model, max_positions: int | None) -> list[str]:
    nodes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    with_ids = sum(1 for n in nodes if len(n.inputs) > 3 and n.inputs[3] is not None)
    notes = [f"{with_ids} of {len(nodes)} read cos/sin caches by position_ids"]
    if with_ids < len(nodes) and max_positions is None:
        notes.append("cos/sin without position_ids stay computed in-graph (max_position_embeddings unknown)")
    return notes


def _leftover_reasons(model: ir.Model, rules: pattern.RewriteRuleSet) -> list[str]:
    """Why each remaining Neg feeding a rotation (the RoPE signature) was not fused."""
    reasons = []
    for node in model.graph:
        if node.op_type != "Neg" or not any(u.op_type in ("Concat", "Unsqueeze") for u, _ in node.outputs[0].uses()):
            continue
        anchors = [n for n in downstream_nodes(node, 5) if n.op_type in ("Add", "Concat", "Reshape")]
        reasons.append(explain_no_match(rules.rules, model, anchors) if anchors else "no Add of the two products")
    return reasons
