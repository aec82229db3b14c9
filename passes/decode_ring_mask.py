"""Decode only (TVM's decode entries, kvc.passes.lower_tvm_decode_entry): drop the ring mask from attention
when nonpad_kv_seqlen already says the same thing.

Why: the ring pass builds one additive mask [B, 1, S, C] per step from ``past_len`` (Sub, Mod,
comparisons and a Where over all C slots). kvc's decode attention kernel reads only the live slots,
but the mask itself is computed over the compiled capacity, so a 32768-slot build paid for 32768
slots on every step of a short chat (measured 2.1x at context 128 vs a 256-slot build).

When it is exact: with one new token per row (S = 1) and no sliding window narrower than the
capacity, slot c is visible iff c < min(past_len + 1, C) (the slot holds storage index c while
nothing has wrapped, and every slot is visible once the ring is full). That is exactly the
``nonpad_kv_seqlen`` input Attention already gets, and the kernel never reads slots at or beyond
it. So the mask carries no information and is removed; its subgraph becomes dead code.

The mask is only dropped when its whole producing subgraph is provably the ring pass's: every
initializer it reads is a ``kvc_ring.*`` constant (and not the window's), the only graph input it
reads is ``past_len``, and other values are read only through Shape. Anything else (a user mask, a
sliding window, a prefill with S > 1) is left untouched.
"""
from __future__ import annotations

import onnx_ir as ir

from kvc.contract import CACHE_ATTENTION_OP, KVC_DOMAIN, PAST_LEN
from kvc.passes.kv_ring_buffer import RING_INITIALIZER_PREFIX

WINDOW_INITIALIZER = RING_INITIALIZER_PREFIX + "window"
MASK_INPUT = 3  # the same in both forms below
# Attention(Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen);
# ai.kvc CacheAttention(Q, K, V, attn_mask, nonpad_kv_seqlen, K scale, V scale) (lower_tvm_cache_attention)
NONPAD_INPUT = {("", "Attention"): 6, ("ai.onnx", "Attention"): 6, (KVC_DOMAIN, CACHE_ATTENTION_OP): 4}


def drop_redundant_ring_masks(graph: ir.Graph) -> int:
    """Remove the ring mask from every Attention of the decode graph ``graph`` (one new token per
    row: the caller has fixed the query length to 1; intermediate shapes may not say so yet) where
    nonpad_kv_seqlen implies it; returns how many Attention nodes lost their mask. Dead nodes are
    left for the caller's optimizer."""
    dropped = 0
    for node in graph:
        if not _is_ring_attention(node):
            continue
        mask = node.inputs[MASK_INPUT]
        if mask is None or not _is_ring_mask_without_window(graph, mask):
            continue
        node.replace_input_with(MASK_INPUT, None)
        dropped += 1
    return dropped


def _is_ring_attention(node: ir.Node) -> bool:
    nonpad = NONPAD_INPUT.get((node.domain, node.op_type))
    return nonpad is not None and len(node.inputs) > nonpad and node.inputs[nonpad] is not None


def _is_ring_mask_without_window(graph: ir.Graph, mask: ir.Value) -> bool:
    """Whether ``mask`` is computed from past_len, kvc_ring constants and shapes only, with no window."""
    initializers = {id(v): name for name, v in graph.initializers.items()}
    inputs = {id(v): v.name for v in graph.inputs}
    seen, stack = set(), [mask]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if id(value) in initializers:
            name = initializers[id(value)]
            if not name.startswith(RING_INITIALIZER_PREFIX) or name.startswith(WINDOW_INITIALIZER):
                return False  # not the ring's, or a window's (kvc_ring.window_<W>)
            continue
        if id(value) in inputs:
            if inputs[id(value)] != PAST_LEN:
                return False
            continue
        producer = value.producer()
        if producer is None:
            return False  # an outer-scope or unnamed value: not provably the ring's
        if producer.op_type == "Shape":
            continue  # reads only the shape (the new keys' length S, fixed to 1 in decode)
        if producer.op_type == "Constant":
            return False  # folded constants lose the ring's names: cannot prove there is no window
        stack.extend(v for v in producer.inputs if v is not None)
    return True
