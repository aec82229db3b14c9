"""`kvc compile`'s check of the compiled engine against the ORIGINAL graph, before the artifact is written.

The original (the concat-KV graph as the user gave it) runs on ONNX Runtime CPU; the compiled artifact runs
through the runtime as `kvc run` would load it. Both see the same seeded random tokens: one prefill call,
then one token per call (teacher forcing, so a single wrong step cannot hide behind diverging samples), long
enough to cross the model's own sliding window and the ring's wrap-around where those are exact (see
``plan_check``). Every step's logits must agree within the KV dtype's tolerance (``TOLERANCES``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from kvc.contract import (ATTENTION_MASK, INPUT_IDS, USE_CACHE_BRANCH, LOGITS, POSITION_IDS, KvDtype, WeightDtype, is_past,
                          is_present, past_for)
from kvc.errors import GraphError, KvcError

if TYPE_CHECKING:
    from kvc.compiler.model_description import ModelDescription
    from kvc.compiler.options import CompileOptions
    from kvc.passes.weight_quantize import WeightQuantOptions

CHECK_SEED = 0
SHORT_PROMPT = 6  # tokens, when there is no window or wrap to cross
DECODE_STEPS = 4  # one token per call after the prefill
LONG_PROMPT_LIMIT = 512  # longest prompt the check feeds to reach a window or the ring's wrap
NO_CHECK_HINT = "--no-check skips this check"

# Inputs of foreign exports that kvc's ring graph does not take, fed the way transformers / optimum do.
TOKEN_TYPE_IDS = "token_type_ids"
CACHE_POSITION = "cache_position"


class CheckMismatch(KvcError):
    """The compiled engine's logits differ from the original graph's: nothing was written."""


@dataclass(frozen=True)
class OriginalCheck:
    """What `kvc compile` needs for the check: the plan and the original's logits (from the input file, which
    the passes never touch: they rewrite the model in memory); ``against`` runs the staged artifact and compares."""
    plan: "CheckPlan"
    reference: "Reference"

    @classmethod
    def prepare(cls, onnx_path: Path, description: "ModelDescription",
                options: "CompileOptions") -> "OriginalCheck | None":
        """None with --no-check. The original applies only its own window, not one kvc adds
        (--sliding-window, an onnxruntime-genai builder's genai_config.json)."""
        if not options.check:
            return None
        config = description.config
        if description.layer_windows:  # the check crosses the narrowest layer window, within the capacity
            narrowest = min(w for w in description.layer_windows if w is not None)
            plan = plan_layer_windows_check(config.vocab_size, description.capacity, description.max_positions,
                                            narrowest)
        else:
            plan = plan_check(config.vocab_size, description.capacity, description.max_positions,
                              description.original_window, description.added_window)
        weights = options.weight_quant
        return cls(plan, reference_logits(onnx_path, plan, config.num_kv_heads, config.resolved_head_dim, weights))

    def against(self, artifact: Path, options: "CompileOptions") -> "CheckResult":
        """Raises CheckMismatch when the artifact's engine disagrees with the original."""
        compiled = compiled_logits(artifact, self.plan, options.device.value)
        return compare(self.reference, compiled, self.plan, options.kv_dtype, options.engine.value)


@dataclass(frozen=True)
class Tolerance:
    """max |compiled - original| over a step's logits must be <= absolute + relative * max |original|.

    Relative to the step's largest logit, so that the bound scales with the model's logit range."""
    absolute: float
    relative: float
    why: str

    def bound(self, reference: np.ndarray) -> float:
        return self.absolute + self.relative * float(np.max(np.abs(reference)))


# fp32: the same math in another order (fused attention, ring slots, TVM kernels): rounding only, measured
# <= 1e-6 of the logit range (tiny presets, stories260K). Stored caches add their codec's rounding to every
# cached K/V (fp16/bf16 keep 11/8 significant bits, int8 1/254 of each token's head range, fp8 E4M3 4 bits);
# measured on random tokens (the worst case: out-of-distribution activations): fp16 0.07%, int8 0.4% (tiny
# presets) to 3.5% (stories260K), fp8 4% to 7% of the logit range; the bounds leave 2-4x headroom on the
# worst. A bug such as a dropped sliding window moves logits by about their whole range (test_compile_check).
TOLERANCES = {
    KvDtype.FP32: Tolerance(1e-4, 1e-3, "rounding only"),
    KvDtype.FP16: Tolerance(1e-3, 2e-2, "float16 rounding of the cached keys and values"),
    KvDtype.BF16: Tolerance(1e-3, 5e-2, "bfloat16 rounding of the cached keys and values"),
    KvDtype.INT8: Tolerance(1e-3, 1.2e-1, "int8 quantization of the cached keys and values"),
    KvDtype.FP8: Tolerance(1e-3, 3e-1, "fp8 E4M3 quantization of the cached keys and values"),
}


@dataclass(frozen=True)
class CheckPlan:
    """The tokens both graphs see: ``prompt`` in one call, then each of ``decode`` in its own call."""
    prompt: tuple[int, ...]
    decode: tuple[int, ...]
    covers: str  # what the token count reaches, for the user

    @property
    def total(self) -> int:
        return len(self.prompt) + len(self.decode)


def plan_check(vocab_size: int, capacity: int, max_positions: int, window: Optional[int],
               override: Optional[int] = None, seed: int = CHECK_SEED) -> CheckPlan:
    """Prefill + DECODE_STEPS decode steps on seeded random tokens.

    ``window``: the original graph's own sliding window. With W <= capacity C the ring's wrap is exact
    (tokens it overwrites are outside every window), so the decode steps cross C (the prompt, C - 1 tokens,
    already crosses W); else they cross W when W < C; else they stay within C. ``override``: a window kvc
    adds (--sliding-window, genai_config.json) that the original graph does not apply: the two agree only
    before it binds, so the check stays within min(override, window)."""
    if override is not None:
        limit = min(capacity, max_positions, override, window or override)
        return _random_plan(vocab_size, limit, seed, f"within the added sliding window of {override}, which the "
                                                      "original graph does not apply")
    if window is None or window > capacity:
        wider = f" (the window of {window} is wider)" if window is not None else ""
        return _random_plan(vocab_size, min(capacity, max_positions), seed, f"within capacity {capacity}{wider}")
    if capacity - 1 + DECODE_STEPS <= min(max_positions, LONG_PROMPT_LIMIT + DECODE_STEPS):
        return _random_plan(vocab_size, capacity + DECODE_STEPS, seed,
                            f"past the window of {window} and the ring's wrap at {capacity}", prompt=capacity - 1)
    if window - 1 + DECODE_STEPS <= min(max_positions, capacity, LONG_PROMPT_LIMIT + DECODE_STEPS):
        return _random_plan(vocab_size, window + DECODE_STEPS, seed, f"past the window of {window}; not the "
                            f"ring's wrap at {capacity} (over {LONG_PROMPT_LIMIT} tokens)", prompt=window - 1)
    return _random_plan(vocab_size, min(capacity, max_positions), seed,
                        f"within the window of {window}; reaching it takes over {LONG_PROMPT_LIMIT} tokens")


def plan_layer_windows_check(vocab_size: int, capacity: int, max_positions: int, narrowest: int,
                             seed: int = CHECK_SEED) -> CheckPlan:
    """Per-layer windows (some layers full): the ring's wrap narrows the full layers, so the check stays within
    the capacity, and crosses the narrowest window where that fits."""
    limit = min(capacity, max_positions)
    if narrowest < limit and narrowest - 1 + DECODE_STEPS <= min(limit, LONG_PROMPT_LIMIT + DECODE_STEPS):
        return _random_plan(vocab_size, narrowest + DECODE_STEPS, seed, f"past the narrowest layer window of "
                            f"{narrowest}, within capacity {capacity}", prompt=narrowest - 1)
    why = "wider" if narrowest >= limit else f"over {LONG_PROMPT_LIMIT} tokens away"
    return _random_plan(vocab_size, limit, seed, f"within capacity {capacity} (the narrowest layer window of "
                        f"{narrowest} is {why})")


def _random_plan(vocab_size: int, limit: int, seed: int, covers: str, prompt: Optional[int] = None) -> CheckPlan:
    """``prompt`` tokens (default SHORT_PROMPT) then up to DECODE_STEPS, at most ``limit`` tokens in all."""
    steps = min(DECODE_STEPS, max(limit - 1, 0))
    prompt_len = prompt if prompt is not None else max(min(SHORT_PROMPT, limit - steps), 1)
    steps = min(steps, limit - prompt_len)
    tokens = np.random.default_rng(seed).integers(0, vocab_size, prompt_len + steps).tolist()
    return CheckPlan(tuple(tokens[:prompt_len]), tuple(tokens[prompt_len:]), covers)


# --------------------------------------------------------------------------- the original graph
class OriginalGraph:
    """The input graph on ONNX Runtime CPU, one sequence (batch 1), its cache concatenated step by step."""

    def __init__(self, source: Path | bytes, kv_heads: int, head_dim: int, onnx_path: Path):
        """``source``: the graph file, or the serialized graph (weights decoded); ``onnx_path`` names it."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            model = source if isinstance(source, bytes) else str(source)
            self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types; any failure means it cannot run
            raise GraphError(f"the original graph {onnx_path} does not run on ONNX Runtime CPU "
                             f"({_first_line(exc)}), so the compiled engine cannot be checked against it; "
                             f"{NO_CHECK_HINT}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        unknown = [n for n in self.inputs if not (is_past(n) or n in _FEEDERS)]
        if unknown:
            raise GraphError(f"cannot feed the original graph's input(s) {', '.join(unknown)} to check the compiled "
                             f"engine against it (kvc feeds {', '.join(_FEEDERS)} and the past key/values); "
                             f"{NO_CHECK_HINT}")
        self.past = {n: _empty_cache(i, kv_heads, head_dim) for n, i in self.inputs.items() if is_past(n)}
        self.length = 0
        self.computes_in_half = any(i.type == "tensor(float16)" for i in self.inputs.values())

    def step(self, tokens: list[int]) -> np.ndarray:
        """Run ``tokens`` after what came before; logits [len(tokens), vocab] as float64."""
        feed = {name: feeder(self.length, len(tokens), tokens) for name, feeder in _FEEDERS.items()
                if name in self.inputs}
        feed = {n: v.astype(_numpy_type(self.inputs[n].type)) for n, v in feed.items()}
        feed.update(self.past)
        try:
            results = dict(zip(self.output_names, self.session.run(None, feed)))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            raise GraphError(f"the original graph fails on ONNX Runtime CPU after {self.length} tokens "
                             f"({_first_line(exc)}), so the compiled engine cannot be checked against it; "
                             f"{NO_CHECK_HINT}") from None
        for name, value in results.items():
            if is_present(name) and past_for(name) in self.past:
                self.past[past_for(name)] = value
        self.length += len(tokens)
        logits = results[LOGITS] if LOGITS in results else results[self.output_names[0]]
        return np.asarray(logits, np.float64)[0, -len(tokens):]


_FEEDERS: dict[str, Callable[[int, int, list[int]], np.ndarray]] = {
    INPUT_IDS: lambda past, n, ids: np.array([ids]),
    ATTENTION_MASK: lambda past, n, ids: np.ones((1, past + n)),
    POSITION_IDS: lambda past, n, ids: np.arange(past, past + n)[None, :],
    TOKEN_TYPE_IDS: lambda past, n, ids: np.zeros((1, n)),
    CACHE_POSITION: lambda past, n, ids: np.arange(past, past + n),
    USE_CACHE_BRANCH: lambda past, n, ids: np.array([past > 0]),
}


def _empty_cache(info, kv_heads: int, head_dim: int) -> np.ndarray:
    """[batch 1, kv heads, 0 tokens, head dim]: the graph's static sizes, else the model description's."""
    dims = [1, kv_heads, 0, head_dim]
    for axis in (1, 3):
        if len(info.shape) == 4 and isinstance(info.shape[axis], int):
            dims[axis] = info.shape[axis]
    return np.zeros(dims, _numpy_type(info.type))


def _numpy_type(ort_type: str) -> np.dtype:
    names = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    if ort_type not in names:
        raise GraphError(f"the original graph has an input of type {ort_type}, which the compile check cannot "
                         f"feed; {NO_CHECK_HINT}")
    return np.dtype(names[ort_type])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:200]


@dataclass(frozen=True)
class Reference:
    """The original graph's logits: the prompt's [P, V], then one [1, V] per decode token."""
    logits: list[np.ndarray]
    computes_in_half: bool  # a float16 graph: float16 rounding on both sides, whatever the cache dtype


def reference_logits(onnx_path: Path, plan: CheckPlan, kv_heads: int, head_dim: int,
                     weights: "WeightQuantOptions | None" = None) -> Reference:
    """The original's logits; with stored weights other than fp32, the original with each weight replaced by
    its decoded stored values (kvc.passes.weight_quantize): the same scheme, so the fp32 tolerance holds."""
    source: Path | bytes = onnx_path
    if weights is not None and weights.dtype is not WeightDtype.FP32:
        import onnx_ir as ir

        from kvc.passes.weight_quantize import decode_weights_in_place

        model = ir.load(onnx_path)
        decode_weights_in_place(model, weights)
        source = ir.to_proto(model).SerializeToString()
    original = OriginalGraph(source, kv_heads, head_dim, onnx_path)
    steps = [original.step(list(plan.prompt))]
    steps += [original.step([token]) for token in plan.decode]
    return Reference(steps, original.computes_in_half)


# --------------------------------------------------------------------------- the compiled artifact
def compiled_logits(artifact: Path, plan: CheckPlan, device: str) -> list[np.ndarray]:
    """The same steps on the artifact as the runtime loads it; positions past capacity wrap in the ring."""
    from kvc.runtime.model import LoadOptions, load
    from kvc.runtime.ring_slots import storage_index

    try:  # written by this process a moment ago: no need to hash it again
        model = load(artifact, LoadOptions(device=device, verify_hashes=False))
    except KvcError as exc:  # e.g. a cuda artifact compiled on a machine without a GPU
        raise GraphError(f"cannot run the compiled artifact here to check it against the original graph ({exc}); "
                         f"compile where its device is, or {NO_CHECK_HINT}") from None
    engine = model.engine
    prompt = np.array([plan.prompt], np.int64)
    zero = np.zeros(1, np.int64)
    steps = [np.asarray(engine.forward(prompt, np.arange(len(plan.prompt))[None, :], zero), np.float64)[0]]
    for i, token in enumerate(plan.decode):
        position = np.array([len(plan.prompt) + i], np.int64)
        logits = engine.forward(np.array([[token]], np.int64), position[:, None],
                                storage_index(position, engine.capacity))
        steps.append(np.asarray(logits, np.float64)[0, -1:])
    return steps


@dataclass(frozen=True)
class CheckResult:
    max_abs_diff: float
    tolerance: float  # the bound at the step closest to failing
    summary: str


def tolerance_for(kv_dtype: KvDtype, computes_in_half: bool) -> Tolerance:
    """The cache dtype's tolerance; a float16 graph gets at least float16's."""
    tolerance = TOLERANCES[kv_dtype]
    half = TOLERANCES[KvDtype.FP16]
    if computes_in_half and tolerance.relative < half.relative:
        return Tolerance(half.absolute, half.relative, "float16 rounding (the graph computes in float16)")
    return tolerance


def compare(reference: Reference, compiled: list[np.ndarray], plan: CheckPlan, kv_dtype: KvDtype,
            engine: str) -> CheckResult:
    """Raise CheckMismatch at the first step out of tolerance; else the worst step's figures."""
    tolerance = tolerance_for(kv_dtype, reference.computes_in_half)
    worst = (0.0, tolerance.bound(reference.logits[0]))
    for index, (ref, got) in enumerate(zip(reference.logits, compiled)):
        if got.shape != ref.shape:
            raise CheckMismatch(f"the compiled {engine} engine returns logits of shape {got.shape} at "
                                f"{_step_name(index, plan)}, the original graph {ref.shape}; nothing was written "
                                f"({NO_CHECK_HINT})")
        diff = float(np.max(np.abs(got - ref))) if np.all(np.isfinite(got)) else float("inf")
        bound = tolerance.bound(ref)
        if not diff <= bound:
            raise CheckMismatch(f"the compiled {engine} engine does not match the original graph at "
                                f"{_step_name(index, plan)}: max |logit diff| {diff:.3g} > tolerance {bound:.3g} "
                                f"({kv_dtype.value} cache: {tolerance.why}); nothing was written. This is a kvc "
                                f"bug or a graph structure kvc misread: please report it ({NO_CHECK_HINT})")
        if diff / bound > worst[0] / worst[1]:
            worst = (diff, bound)
    summary = (f"check vs the original graph: {len(plan.prompt)}-token prompt + {len(plan.decode)} decode steps "
               f"({plan.covers}): max |logit diff| {worst[0]:.2e} (tolerance {worst[1]:.2e}, {kv_dtype.value} cache)")
    return CheckResult(worst[0], worst[1], summary)


def _step_name(index: int, plan: CheckPlan) -> str:
    if index == 0:
        return f"the prefill of {len(plan.prompt)} tokens"
    return f"decode step {index} (position {len(plan.prompt) + index - 1})"
