"""The KV/artifact contract: every name and enum that passes, builds, engines, plan and bench share.

Standard library only, so the CLI, the runtime and the planner can import it without pulling in
onnx, onnxruntime, torch or TVM. No other module spells these strings; it imports them from here
(tests/test_contract.py checks).

Graph I/O of a compiled (ring-buffer) graph, described in full in kvc.passes.kv_layout:
  inputs   input_ids [B, S] int64, position_ids [B, S] int64, past_len [B] int64,
           past_key_values.{i}.key/.value [B, kv_heads, C, head_dim] (cache dtype),
           past_key_values.{i}.key_scale/.value_scale [B, kv_heads, C, 1] float32 (per-token scales)
  outputs  logits [B, S, vocab], present.{i}.* aliasing the matching past_key_values.{i}.*
"""
from __future__ import annotations

import enum
import re

# --- graph I/O names ------------------------------------------------------------------------
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"  # the concat (export) form's input; the ring graph has none
PAST_LEN = "past_len"
USE_CACHE_BRANCH = "use_cache_branch"  # optimum's merged decoder (If on it): true once a past exists
LOGITS = "logits"
BATCH_DIM = "batch"

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
SCALE_SUFFIX = "_scale"
KINDS = ("key", "value")

PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
PAST_ANY_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)(_scale)?$")
PRESENT_ANY_RE = re.compile(r"^present\.(\d+)\.(key|value)(_scale)?$")


def past_name(layer: int, kind: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def past_scale_name(layer: int, kind: str) -> str:
    return past_name(layer, kind) + SCALE_SUFFIX


def present_scale_name(layer: int, kind: str) -> str:
    return present_name(layer, kind) + SCALE_SUFFIX


def is_past(name: str) -> bool:
    """A cache input (tensor or scale ring)."""
    return PAST_ANY_RE.match(name) is not None


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def present_for(past: str) -> str:
    """present.{i}.{kind}[_scale] for past_key_values.{i}.{kind}[_scale]."""
    if not is_past(past):
        raise ValueError(f"{past!r} is not a cache input name")
    return PRESENT_PREFIX + past[len(PAST_PREFIX):]


def is_present(name: str) -> bool:
    """A cache output (tensor or scale ring)."""
    return PRESENT_ANY_RE.match(name) is not None


def past_for(present: str) -> str:
    if PRESENT_ANY_RE.match(present) is None:
        raise ValueError(f"{present!r} is not a cache output name")
    return PAST_PREFIX + present[len(PRESENT_PREFIX):]


# --- graph metadata keys (metadata_props) -----------------------------------------------------
MODEL_CONFIG_KEY = "kvc.model_config"  # ModelConfig.to_dict() as JSON, written by kvc export
LAYOUT_KEY = "kvc.kv_layout"  # KvCacheLayout as JSON, written by the ring-buffer pass
GENERATION_KEY = "kvc.generation"  # generation defaults (eos, bos, chat template) as JSON
EXPORTER_KEY = "kvc.exporter"  # "kvc <version>", written by kvc export


# --- cache storage --------------------------------------------------------------------------
class KvDtype(str, enum.Enum):
    """Storage type of the KV cache."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # symmetric, one float32 scale per token per kv head
    FP8 = "fp8"  # float8 E4M3 (fn), static per-head or dynamic per-token per-head scales

    @property
    def bytes_per_element(self) -> int:
        return _BYTES[self]

    @property
    def tvm_dtype(self) -> str:
        """TVM / DLPack dtype name of the cache tensor."""
        return _TVM_DTYPES[self]

    @property
    def onnx_type(self) -> str:
        """ONNX Runtime's type string of the cache tensor (NodeArg.type)."""
        return _ORT_TYPES[self]

    @property
    def quantized(self) -> bool:
        return self in (KvDtype.INT8, KvDtype.FP8)


_BYTES = {KvDtype.FP32: 4, KvDtype.FP16: 2, KvDtype.BF16: 2, KvDtype.INT8: 1, KvDtype.FP8: 1}
_TVM_DTYPES = {KvDtype.FP32: "float32", KvDtype.FP16: "float16", KvDtype.BF16: "bfloat16",
               KvDtype.INT8: "int8", KvDtype.FP8: "float8_e4m3fn"}
_ORT_TYPES = {KvDtype.FP32: "tensor(float)", KvDtype.FP16: "tensor(float16)",
              KvDtype.BF16: "tensor(bfloat16)", KvDtype.INT8: "tensor(int8)",
              KvDtype.FP8: "tensor(float8e4m3fn)"}
KV_DTYPE_NAMES = tuple(d.value for d in KvDtype)


def parse_kv_dtype(text: str) -> KvDtype:
    """--kv-dtype text -> KvDtype (case-insensitive); a KvcError naming the choices otherwise."""
    return _parse_choice(KvDtype, text, "KV-cache dtype")


def _parse_choice(kind: type[enum.Enum], text: str, what: str):
    """``text`` as a member of the string enum ``kind`` (case-insensitive); a KvcError naming the choices."""
    from kvc.errors import KvcError

    try:
        return kind(text.lower())
    except ValueError:
        raise KvcError(f"unknown {what} {text!r}; choose one of {[m.value for m in kind]}") from None


# --- weight storage ---------------------------------------------------------------------------
class WeightDtype(str, enum.Enum):
    """Storage type of the weight matrices and the embedding table (`kvc compile --weights`)."""

    FP32 = "fp32"
    FP16 = "fp16"  # stored half, cast to float32 before the matmul
    BF16 = "bf16"
    INT8 = "int8"  # weight-only, per-block scales along the input dim (DequantizeLinear block_size)
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return _WEIGHT_BITS[self]

    @property
    def quantized(self) -> bool:
        return self in (WeightDtype.INT8, WeightDtype.INT4)


_WEIGHT_BITS = {WeightDtype.FP32: 32, WeightDtype.FP16: 16, WeightDtype.BF16: 16, WeightDtype.INT8: 8,
                WeightDtype.INT4: 4}
WEIGHT_DTYPE_NAMES = tuple(d.value for d in WeightDtype)
WEIGHT_BLOCK_SIZES = (32, 64, 128)


def parse_weight_dtype(text: str) -> WeightDtype:
    """--weights text -> WeightDtype (case-insensitive); a KvcError naming the choices otherwise."""
    return _parse_choice(WeightDtype, text, "weight dtype")


SCALE_TVM_DTYPE = "float32"  # per-token scale rings


class ScaleKind(str, enum.Enum):
    NONE = "none"  # fp32 / fp16 / bf16
    PER_TOKEN = "per_token"  # [batch, kv_heads, C, 1] float32 rings beside the cache (I/O)
    STATIC_PER_HEAD = "static_per_head"  # constants in the graph, one per layer and kv head


class CacheLayoutKind(str, enum.Enum):
    RING = "ring"  # fixed-capacity in-place ring buffer [batch, kv_heads, C, head_dim]


# --- artifact --------------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
# Fixed file names inside an artifact: the runtime opens these (when listed and hashed), never a path
# read from a manifest field.
GRAPH_FILE = "graph.onnx"
GRAPH_DATA_FILE = "graph.onnx.data"
PARAMS_FILE = "params.safetensors"
LIB_DIR = "lib"
TUNING_DIR = "tuning"
TOKENIZER_FILE = "tokenizer.json"
ORT_ENTRY = "forward"  # the ORT engine's one entry point (its graph serves prefill and decode)
TVM_TARGETS = ("llvm", "cuda")  # TVM target kinds an artifact's lib/<kind>.so is built for


def lib_file(target_kind: str) -> str:
    return f"{LIB_DIR}/{target_kind}.so"


def cache_io_names(num_layers: int, with_scales: bool) -> list[tuple[str, str]]:
    """(input, output) pairs of every cache tensor in graph order (as KvCacheLayout.cache_names)."""
    pairs = []
    for layer in range(num_layers):
        for kind in KINDS:
            pairs.append((past_name(layer, kind), present_name(layer, kind)))
            if with_scales:
                pairs.append((past_scale_name(layer, kind), present_scale_name(layer, kind)))
    return pairs


class EngineKind(str, enum.Enum):
    ORT = "ort"  # ONNX Runtime: optimized graph + in-place IO binding
    TVM = "tvm"  # Apache TVM: Relax + own TIR kernels -> lib/<target>.so


class Entry(str, enum.Enum):
    """Entry points of a compiled model (TVM functions; the ORT graph serves all of them)."""

    PREFILL = "prefill"  # any number of tokens per row
    DECODE = "decode"  # one token per row, any batch
    DECODE_B1 = "decode_b1"  # one token, batch 1, every shape static (TVM; MetaSchedule can tune it)


ENTRY_NAMES = tuple(e.value for e in Entry)


# --- engine-private ops: written by an engine's lowering passes, read only by that engine's build ---

KVC_DOMAIN = "ai.kvc"
KVC_DOMAIN_VERSION = 1
CACHE_ATTENTION_OP = "CacheAttention"  # TVM: Attention over the stored ring (kvc.passes.lower_tvm_cache_attention)
QUANTIZED_RING_WRITE_OP = "QuantizedRingWrite"  # TVM: a quantized cache's whole write (lower_tvm_quantized_writes)
PACKED_MATMUL_OP = "PackedMatMul"  # TVM: X @ W on pre-packed (and quantized) weights (kvc.passes.lower_tvm_weight_codes)
PACKED_GATHER_OP = "PackedGather"  # TVM: embedding rows read from a PackedMatMul weight (kvc.passes.lower_tvm_weight_codes)
