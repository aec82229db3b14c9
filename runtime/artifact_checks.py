"""Cross-checks of a manifest against the engine files it describes, before any engine starts.

ORT: graph.onnx is parsed without its external data (no ONNX Runtime involved); its inputs, outputs,
element types and KV-layout metadata must be the manifest's, and every external-data location must
be a file the manifest lists. TVM: params.safetensors' header (JSON, read with bounded I/O) must be
well formed, hold every weight an entry point passes and a vocab-sized embedding. Nothing native is
loaded here.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from kvc.contract import (GRAPH_FILE, INPUT_IDS, LAYOUT_KEY, PARAMS_FILE, PAST_LEN, POSITION_IDS, EngineKind,
                          KvDtype, is_scale)
from kvc.errors import ArtifactError
from kvc.runtime.artifact import Manifest, TvmOptions, _check_listed_path

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def check_engine_files(root: Path, manifest: Manifest) -> None:
    if manifest.engine is EngineKind.ORT:
        check_ort_graph(root, manifest)
    else:
        check_tvm_params(root, manifest)


def _listed(manifest: Manifest, rel: str) -> None:
    if rel not in manifest.files:
        raise ArtifactError(f"artifact does not list {rel}, which its {manifest.engine.value} engine needs; recompile")


# --- ORT --------------------------------------------------------------------------------------------

def check_ort_graph(root: Path, manifest: Manifest) -> None:
    import onnx
    from google.protobuf.message import DecodeError

    from kvc.passes.graph_checks import all_tensors

    _listed(manifest, GRAPH_FILE)
    try:
        proto = onnx.load(str(root / GRAPH_FILE), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"{GRAPH_FILE} is not a readable ONNX model ({str(exc)[:200]}); recompile") from None
    for tensor in all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(manifest, tensor)
    _check_layout(manifest, {p.key: p.value for p in proto.metadata_props}.get(LAYOUT_KEY))
    entry = manifest.entry_points[0]
    _compare_values("input", {v.name: v for v in proto.graph.input}, entry.inputs, manifest)
    _compare_values("output", {v.name: v for v in proto.graph.output}, entry.outputs, manifest)


def _check_external(manifest: Manifest, tensor) -> None:
    location = {e.key: e.value for e in tensor.external_data}.get("location", "")
    _check_listed_path(Path("."), location)
    if location not in manifest.files:
        raise ArtifactError(f"{GRAPH_FILE} stores tensor {tensor.name!r} in {location!r}, which the artifact does "
                            "not list; refusing to load")


def _check_layout(manifest: Manifest, text: str | None) -> None:
    try:
        layout = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        layout = None
    cache = manifest.cache
    want = {"layout": cache.layout.value, "capacity": cache.capacity, "dtype": cache.dtype.value,
            "scales": cache.scales.value, "num_layers": cache.num_layers, "num_kv_heads": cache.num_kv_heads,
            "head_dim": cache.head_dim, "sliding_window": cache.sliding_window}
    if cache.layer_windows:
        want["layer_windows"] = list(cache.layer_windows)
    if layout != want:
        raise ArtifactError(f"manifest.json's cache {want} differs from the KV layout {GRAPH_FILE} was compiled "
                            f"with ({str(layout)[:300]}); the manifest was edited: recompile")


def _onnx_elem_types() -> dict[KvDtype, int]:
    from onnx import TensorProto as T

    return {KvDtype.FP32: T.FLOAT, KvDtype.FP16: T.FLOAT16, KvDtype.BF16: T.BFLOAT16, KvDtype.INT8: T.INT8,
            KvDtype.FP8: T.FLOAT8E4M3FN}


def _expected_elem_type(name: str, manifest: Manifest) -> int | None:
    from onnx import TensorProto as T

    if name in (INPUT_IDS, POSITION_IDS, PAST_LEN):
        return T.INT64
    if name in manifest.entry_points[0].aliases or name in manifest.entry_points[0].aliases.values():
        return T.FLOAT if is_scale(name) else _onnx_elem_types()[manifest.cache.dtype]
    return None  # logits: float32 or float16, ORT reports it


def _compare_values(kind: str, graph: dict, listed: dict, manifest: Manifest) -> None:
    if set(graph) != set(listed):
        raise ArtifactError(f"{GRAPH_FILE}'s {kind}s {sorted(graph)[:6]}... differ from the manifest's "
                            f"{sorted(listed)[:6]}...; recompile")
    for name, value in graph.items():
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim)
        if dims != tuple(listed[name]):
            raise ArtifactError(f"{GRAPH_FILE}'s {kind} {name} has shape {list(dims)}, the manifest says "
                                f"{list(listed[name])}; recompile")
        want = _expected_elem_type(name, manifest)
        if want is not None and tensor_type.elem_type != want:
            raise ArtifactError(f"{GRAPH_FILE}'s {kind} {name} has ONNX element type {tensor_type.elem_type}, "
                                f"the manifest's cache dtype needs {want}; recompile")


# --- TVM --------------------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets}, validated against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (size,)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ArtifactError(f"{PARAMS_FILE} has a bad header length; recompile")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactError(f"{PARAMS_FILE}'s header is not JSON; recompile") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{PARAMS_FILE}'s header is not a JSON object; recompile")
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and 0 <= o <= data for o in info["data_offsets"])
              and info["data_offsets"][0] <= info["data_offsets"][1])
        if not ok:
            raise ArtifactError(f"{PARAMS_FILE}: tensor {name!r} has a malformed header entry; recompile")
    return header


def check_tvm_params(root: Path, manifest: Manifest) -> None:
    eo = manifest.engine_options
    assert isinstance(eo, TvmOptions)
    _listed(manifest, PARAMS_FILE)
    _listed(manifest, eo.lib)
    header = read_safetensors_header(root / PARAMS_FILE)
    for entry, names in eo.entry_params.items():
        missing = [n for n in names if n not in header]
        if missing:
            raise ArtifactError(f"entry {entry} passes weights {missing[:3]} that {PARAMS_FILE} does not hold; "
                                "recompile")
    vocab = manifest.limits.vocab_size
    if not any(_holds_vocab(i["shape"], vocab) for i in header.values()):
        raise ArtifactError(f"no weight in {PARAMS_FILE} has the model's vocab size {vocab} (the embedding): "
                            "manifest.json's model.vocab_size was edited; recompile")


def _holds_vocab(shape: list[int], vocab: int) -> bool:
    """A [V, H] table, or one packed as kvc.passes.lower_tvm_weight_codes stores it: [V/T, H, T] (T/2: 4-bit)."""
    if len(shape) == 2:
        return vocab in shape
    return len(shape) == 3 and shape[0] * shape[2] in (vocab, vocab // 2)
