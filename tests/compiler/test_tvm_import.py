"""kvc.compiler.tvm.from_onnx beyond the single-node conformance cases.

* symbolic dims stay symbolic (one tir.Var per name) and one build serves several shapes;
* TensorScatter corner cases (no write_indices, an update longer than a circular cache);
* kvc's own graphs end to end: the tiny llama export after kvc's passes (KV ring buffer, fp32 / fp16 /
  int8 / fp8 caches), step by step through prefill, decode (with kvc's decode kernel) and wrap-around,
  vs ONNX Runtime CPU on the same graph: logits rtol 1e-3 atol 1e-4, caches as in _assert_cache_close;
* user errors come out as GraphError naming the problem;
* the CUDA build (codegen only: no GPU here).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tvm_case_helpers import OrtRunner, call_vm, load_node_cases, load_vm, ort_run, run_vm

from kvc.errors import GraphError

RTOL, ATOL = 1e-3, 1e-4


def _attention_model(q_shape, kv_shape, opset=24, **attrs) -> onnx.ModelProto:
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], **attrs)
    graph = helper.make_graph([node], "attention", [
        helper.make_tensor_value_info("Q", TensorProto.FLOAT, q_shape),
        helper.make_tensor_value_info("K", TensorProto.FLOAT, kv_shape),
        helper.make_tensor_value_info("V", TensorProto.FLOAT, kv_shape),
    ], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


# --- symbolic dims ----------------------------------------------------------------------------------

def test_dim_params_become_shared_symbolic_vars():
    from kvc.compiler.tvm.onnx_import import from_onnx

    mod = from_onnx(_attention_model(["batch", 4, "q_len", 8], ["batch", 2, "kv_len", 8], is_causal=1))
    q, k, v = mod["main"].params
    q_dims, k_dims = q.ty.shape.values, k.ty.shape.values
    assert [_dim_text(d) for d in q_dims] == ["batch", "4", "q_len", "8"]
    assert q_dims[0].same_as(k_dims[0])  # one variable for "batch", not two of the same name
    assert k_dims[2].same_as(v.ty.shape.values[2])


def _dim_text(dim) -> str:
    import tvm

    return str(int(dim)) if isinstance(dim, tvm.tirx.IntImm) else str(dim)


def test_one_build_runs_several_shapes(rng, llvm_fast):
    from kvc.compiler.tvm.onnx_import import from_onnx
    from kvc.compiler.tvm.target import build

    model = _attention_model(["batch", 4, "q_len", 8], ["batch", 2, "kv_len", 8], is_causal=1)
    executable = build(from_onnx(model), llvm_fast)
    for batch, q_len, kv_len in ((1, 1, 7), (3, 5, 5), (2, 4, 9)):
        feeds = {"Q": rng.standard_normal((batch, 4, q_len, 8), np.float32),
                 "K": rng.standard_normal((batch, 2, kv_len, 8), np.float32),
                 "V": rng.standard_normal((batch, 2, kv_len, 8), np.float32)}
        (got,) = run_vm(executable, list(feeds.values()))
        (want,) = ort_run(model, feeds)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_shape_dict_pins_and_names_dims():
    from kvc.compiler.tvm.onnx_import import from_onnx

    model = _attention_model(["batch", 4, "q_len", 8], ["batch", 2, "kv_len", 8])
    mod = from_onnx(model, shape_dict={"Q": [2, 4, 1, 8], "K": [2, 2, "cap", 8], "V": [2, 2, "cap", 8]})
    q, k, v = mod["main"].params
    assert [_dim_text(d) for d in q.ty.shape.values] == ["2", "4", "1", "8"]
    assert _dim_text(k.ty.shape.values[2]) == "cap" and k.ty.shape.values[2].same_as(v.ty.shape.values[2])
    with pytest.raises(GraphError, match="not graph inputs"):
        from_onnx(model, shape_dict={"query": [1, 4, 1, 8]})


# --- TensorScatter corner cases ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,with_indices", [("linear", False), ("circular", False), ("circular", True)])
def test_tensor_scatter_vs_reference(mode, with_indices, rng, llvm_fast):
    """Without write_indices (writes start at 0), and circular writes that wrap (index 3 of capacity 4)."""
    from onnx.reference import ReferenceEvaluator

    from kvc.compiler.tvm.onnx_import import from_onnx
    from kvc.compiler.tvm.target import build

    inputs = ["past", "update"] + (["write_indices"] if with_indices else [])
    node = helper.make_node("TensorScatter", inputs, ["present"], mode=mode, axis=2)
    value_infos = [helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, 4, 3]),
                   helper.make_tensor_value_info("update", TensorProto.FLOAT, ["batch", 2, "seq", 3])]
    if with_indices:
        value_infos.append(helper.make_tensor_value_info("write_indices", TensorProto.INT64, ["batch"]))
    graph = helper.make_graph([node], "scatter", value_infos,
                              [helper.make_tensor_value_info("present", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)
    feeds = {"past": rng.standard_normal((3, 2, 4, 3), np.float32),
             "update": rng.standard_normal((3, 2, 3, 3), np.float32)}
    if with_indices:
        feeds["write_indices"] = np.array([0, 1, 3], np.int64)
    (got,) = run_vm(build(from_onnx(model), llvm_fast), list(feeds.values()))
    (want,) = ReferenceEvaluator(model).run(None, feeds)
    np.testing.assert_array_equal(got, want)


# --- kvc graphs end to end -----------------------------------------------------------------------------

CAPACITY = 16
STEPS = (6, 1, 1, 5, 1, 1, 4, 1)  # prefill, decodes, chunks; 20 tokens > capacity 16: the ring wraps
DECODE_SHAPES = {"input_ids": ["batch", 1], "position_ids": ["batch", 1]}  # the decode entry point


@pytest.fixture(scope="module")
def kvc_ring_graph(exported):
    """kv dtype -> the tiny llama export after kvc's passes (ring capacity 16), as a ModelProto."""
    import onnx_ir as ir

    from kvc.passes.pipeline import PipelineOptions, default_passes, run_passes

    graphs = {}

    def make(kv_dtype: str) -> onnx.ModelProto:
        if kv_dtype not in graphs:
            _, _, path = exported("tiny")
            model = ir.load(path)
            run_passes(model, default_passes(PipelineOptions(capacity=CAPACITY, kv_dtype=kv_dtype)))
            graphs[kv_dtype] = ir.to_proto(model)
        return graphs[kv_dtype]

    return make


def ort_lowered(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph after the ORT engine's fp8 lowering (ONNX Runtime has no float8 TensorScatter)."""
    import onnx_ir as ir

    from kvc.passes.lower_ort_fp8_scatter import LowerOrtFp8ScatterPass

    lowered = ir.from_proto(model)
    LowerOrtFp8ScatterPass()(lowered)
    return ir.to_proto(lowered)


def tvm_lowered(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph after the TVM engine's lowering (ring Attention -> ai.kvc CacheAttention on the stored cache)."""
    import onnx_ir as ir

    from kvc.contract import EngineKind
    from kvc.passes.pipeline import lowering_passes, run_passes

    lowered = ir.from_proto(model)
    run_passes(lowered, lowering_passes(EngineKind.TVM))
    return ir.to_proto(lowered)


def _kernel_names(mod) -> set[str]:
    return {gv.name_hint for gv in mod.get_global_vars()
            if gv.name_hint.startswith(("decode_attention", "prefill_attention"))}


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8", "fp8"])
def test_kvc_ring_graph_matches_onnxruntime(kv_dtype, kvc_ring_graph, llvm_fast, rng):
    """Multi-token steps run the general module (symbolic seq: kvc's prefill kernel), single-token steps
    the decode entry point (kvc's decode kernel); both kernels read the int8 / fp8 / fp16 cache directly.
    Both engines get the same caches each step (ONNX Runtime's), so a difference cannot compound."""
    from kvc.compiler.tvm.onnx_import import from_onnx

    model = kvc_ring_graph(kv_dtype)
    lowered = tvm_lowered(model)
    general, decode = from_onnx(lowered), from_onnx(lowered, shape_dict=DECODE_SHAPES)
    assert _kernel_names(general) == {"prefill_attention"}
    assert _kernel_names(decode) == {"decode_attention_partial", "decode_attention_merge"}
    _assert_matches_onnxruntime(model, general, decode, llvm_fast, rng)


def _assert_matches_onnxruntime(model, general, decode, llvm_fast, rng, steps=STEPS):
    from kvc.compiler.tvm.target import build

    vms = {"general": load_vm(build(general, llvm_fast)), "decode": load_vm(build(decode, llvm_fast))}
    ort_runner = OrtRunner(ort_lowered(model))  # ONNX Runtime runs the graph as the ORT engine lowers it
    names = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    batch = 2
    caches = {i.name: np.zeros([batch] + [d.dim_value for d in i.type.tensor_type.shape.dim][1:],
                               helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
              for i in model.graph.input if i.name.startswith("past_key_values.")}
    past_len = np.zeros(batch, np.int64)
    for seq in steps:
        ids = rng.integers(0, 256, (batch, seq)).astype(np.int64)
        feeds = {"input_ids": ids, "position_ids": past_len[:, None] + np.arange(seq), "past_len": past_len, **caches}
        vm = vms["decode" if seq == 1 else "general"]
        got = dict(zip(outputs, call_vm(vm, [feeds[n] for n in names])))
        want = dict(zip(outputs, ort_runner.run(feeds)))
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=RTOL, atol=ATOL)
        for past in caches:
            present = _present_name(past, outputs)
            _assert_cache_close(got[present], want[present])
            caches[past] = want[present]
        past_len = past_len + seq


def test_attention_kernels_can_be_switched_off(kvc_ring_graph, llvm_fast, rng):
    """Without kernels (as on CUDA) CacheAttention decodes the stored cache and attends generically:
    the same results, ring wrap included."""
    from kvc.compiler.tvm.onnx_import import ImportOptions, from_onnx

    model = kvc_ring_graph("int8")
    off = ImportOptions(attention_kernels=False)
    general, decode = (from_onnx(tvm_lowered(model), shape_dict=shapes, options=off) for shapes in (None, DECODE_SHAPES))
    assert not _kernel_names(general) and not _kernel_names(decode)
    _assert_matches_onnxruntime(model, general, decode, llvm_fast, rng, steps=(6, 1, 12, 1))


def _present_name(past: str, outputs: list[str]) -> str:
    """past_key_values.{layer}.{kind}[_scale] -> present.{layer}.{kind}[_scale] (kvc.passes.kv_layout)."""
    present = "present." + past.removeprefix("past_key_values.")
    assert present in outputs, (past, outputs)
    return present


def _assert_cache_close(got: np.ndarray, want: np.ndarray) -> None:
    """Float caches and scale rings to the usual tolerance (float16 to its precision). Quantized codes:
    the engines compute the new K/V in different orders, so a value at a rounding tie may land one code
    apart; allow that for at most 0.1% of the codes, and nothing larger."""
    assert got.dtype == want.dtype
    if got.dtype in (np.float32, np.float16):
        rtol, atol = (RTOL, ATOL) if got.dtype == np.float32 else (2e-3, 2e-3)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=rtol, atol=atol)
        return
    if got.dtype == np.int8:
        step = np.abs(got.astype(np.int32) - want.astype(np.int32))
    else:  # float8 e4m3fn: codes are monotonic in magnitude within a sign
        step = np.abs(_signed_code(got) - _signed_code(want))
    assert step.max() <= 1 and np.count_nonzero(step) <= max(1, step.size // 1000), np.count_nonzero(step)


def _signed_code(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint8).astype(np.int32)
    return np.where(bits & 0x80, -(bits & 0x7F), bits)


# --- user errors ---------------------------------------------------------------------------------------

def _single_node(op_type, inputs, domain="", opset=24, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op_type, [name for name, _ in inputs], ["Y"], domain=domain, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


QKV = [("Q", [1, 4, 2, 8]), ("K", [1, 2, 3, 8]), ("V", [1, 2, 3, 8])]


@pytest.mark.parametrize("model,message", [
    (_single_node("Attention", QKV, qk_matmul_output_mode=5), "qk_matmul_output_mode=5"),
    (_single_node("Attention", [("Q", [1, 2, 24]), ("K", [1, 3, 24]), ("V", [1, 3, 24])]), "q_num_heads"),
    (_single_node("Attention", [("Q", [1, 3, 2, 8]), ("K", [1, 2, 3, 8]), ("V", [1, 2, 3, 8])]),
     "3 query heads are not a multiple of 2"),
    (_single_node("RotaryEmbedding", [("X", [1, 2, 3, 8]), ("cos", [4, 4]), ("sin", [4, 4])], domain="com.example"),
     "RotaryEmbedding"),
    (_single_node("TensorScatter", [("past", [1, 4, 3]), ("update", [1, 2, 3])], mode="ring"), "mode 'ring'"),
    (_single_node("NoSuchOp", [("X", [1])]), "NoSuchOp"),
])
def test_user_errors_are_graph_errors(model, message):
    from kvc.compiler.tvm.onnx_import import from_onnx

    with pytest.raises(GraphError, match=message):
        from_onnx(model)


def test_mixed_domains_of_one_op_are_refused():
    from kvc.compiler.tvm.onnx_import import from_onnx

    model = _single_node("Attention", QKV)
    extra = helper.make_node("Attention", ["Q", "K", "V"], ["Y2"], domain="com.microsoft", num_heads=4)
    model.graph.node.append(extra)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(GraphError, match="mixes Attention"):
        from_onnx(model)


# --- CUDA ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_spec():
    from kvc.compiler.tvm.target import TargetKind, TargetSpec, cuda_codegen_available

    if not cuda_codegen_available():
        pytest.skip("this apache-tvm wheel has no CUDA code generator (target.build.cuda missing)")
    return TargetSpec(TargetKind.CUDA, cuda_arch="sm_90")


@pytest.mark.parametrize("graph", ["attention", "ring_int8", "ring_int8_decode"])
def test_cuda_build(graph, cuda_spec, kvc_ring_graph, tmp_path):
    """dlight-scheduled CUDA kernels for a conformance Attention and kvc's int8 ring graph, its general entry
    (symbolic batch and seq) and its decode entry: the build yields a CUDA device module with kernels;
    the small one is also exported to a shared library (host code linked, device code embedded)."""
    from kvc.compiler.tvm.onnx_import import ImportOptions, from_onnx
    from kvc.compiler.tvm.target import TargetKind, build

    for_cuda = ImportOptions(target_kind=TargetKind.CUDA)
    if graph == "attention":
        mod = from_onnx(load_node_cases()["test_attention_4d_gqa_causal_nonpad_decode"].model, options=for_cuda)
    else:
        shapes = DECODE_SHAPES if graph.endswith("decode") else None
        mod = from_onnx(tvm_lowered(kvc_ring_graph("int8")), shape_dict=shapes, options=for_cuda)
    executable = build(mod, cuda_spec)
    devices = [m for host in executable.mod.imports for m in [host, *host.imports] if m.kind == "cuda"]
    assert len(devices) == 1
    assert "__global__" in devices[0].inspect_source()
    if graph == "attention":
        executable.export_library(str(tmp_path / "attention.so"))
        assert (tmp_path / "attention.so").stat().st_size > 0


def test_cpu_kernels_are_refused_for_cuda(cuda_spec, kvc_ring_graph):
    from kvc.compiler.tvm.onnx_import import from_onnx
    from kvc.compiler.tvm.target import build
    from kvc.errors import KvcError

    with pytest.raises(KvcError, match="CPU-only kernels"):
        build(from_onnx(tvm_lowered(kvc_ring_graph("fp32")), shape_dict=DECODE_SHAPES), cuda_spec)
