"""kvc compile checks the compiled engine against the original graph before writing anything
(kvc.compiler.original_check): a correct compile passes and says what it covered, a wrong one (a pass that
drops the window, an engine whose weights differ from the original) is refused with nothing written,
--no-check skips the check, an original input it cannot feed is refused."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from kvc.compiler.options import CompileOptions
from kvc.compiler.original_check import DECODE_STEPS, CheckMismatch, plan_check
from kvc.contract import EngineKind, KvDtype
from kvc.errors import GraphError

CAPACITY = 64
CHECK_LINE = re.compile(r"check vs the original graph: (\d+)-token prompt \+ (\d+) decode steps \((.*)\): "
                        r"max \|logit diff\| (\S+) \(tolerance (\S+),")


def compile_lines(onnx_path: Path, out: Path, **options) -> list[str]:
    from kvc.compiler.pipeline import compile_model

    lines: list[str] = []
    compile_model(onnx_path, out, CompileOptions(max_seq_len=CAPACITY, **options), progress=lines.append)
    return lines


def check_line(lines: list[str]) -> re.Match:
    found = [m for line in lines if (m := CHECK_LINE.match(line))]
    assert len(found) == 1, lines
    return found[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".kvc-staging")]


@pytest.fixture
def drop_window(monkeypatch):
    """A deliberately wrong pass pipeline: the ring-buffer pass is told the model has no window."""
    import kvc.compiler.pipeline as pipeline

    right = pipeline.pipeline_options
    monkeypatch.setattr(pipeline, "pipeline_options",
                        lambda description: dataclasses.replace(right(description), sliding_window=None))


# --------------------------------------------------------------------------- the plan
def test_plan_crosses_the_window_and_the_ring_wrap_when_both_are_exact():
    plan = plan_check(vocab_size=100, capacity=64, max_positions=1024, window=8)
    assert (len(plan.prompt), len(plan.decode)) == (63, DECODE_STEPS)  # decode positions 63..66 wrap at 64
    assert "window of 8" in plan.covers and "wrap at 64" in plan.covers
    assert all(0 <= t < 100 for t in plan.prompt + plan.decode)
    assert plan == plan_check(100, 64, 1024, 8)  # seeded


def test_plan_without_a_window_stays_within_capacity_and_short():
    assert plan_check(100, 64, 1024, None).total == 6 + DECODE_STEPS
    tiny = plan_check(100, 3, 1024, None)
    assert tiny.total == 3 and len(tiny.prompt) >= 1
    assert plan_check(100, 1, 1024, None).total == 1


def test_plan_crosses_a_window_when_the_wrap_is_too_far():
    plan = plan_check(100, capacity=2048, max_positions=4096, window=100)
    assert (len(plan.prompt), len(plan.decode)) == (99, DECODE_STEPS)
    assert "not the ring's wrap" in plan.covers


def test_plan_stays_within_a_user_window_the_original_does_not_apply():
    plan = plan_check(100, 64, 1024, window=None, override=5)
    assert plan.total == 5  # from token 6 on the compiled graph legitimately differs


# --------------------------------------------------------------------------- end to end on ONNX Runtime
def test_correct_compile_passes_past_window_and_wrap(exported, tmp_path):
    _, _, onnx_path = exported("tiny-mistral")  # window 8 < capacity 64
    out = tmp_path / "ok.kvc"
    match = check_line(compile_lines(onnx_path, out))
    assert (match.group(1), match.group(2)) == (str(CAPACITY - 1), str(DECODE_STEPS))
    assert float(match.group(4)) < 1e-5 < float(match.group(5))
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("kv_dtype", [KvDtype.FP32, KvDtype.INT8])
def test_a_pass_that_drops_the_window_is_refused_and_nothing_written(exported, tmp_path, drop_window, kv_dtype):
    _, _, onnx_path = exported("tiny-mistral")
    out = tmp_path / "wrong.kvc"
    with pytest.raises(CheckMismatch, match=r"does not match the original graph at .*max \|logit diff\| .* > "
                                            r"tolerance .*--no-check"):
        compile_lines(onnx_path, out, kv_dtype=kv_dtype)
    assert_nothing_written(out)


def test_no_check_skips_the_check(exported, tmp_path, drop_window):
    _, _, onnx_path = exported("tiny-mistral")
    out = tmp_path / "unchecked.kvc"
    lines = compile_lines(onnx_path, out, check=False)
    assert not [line for line in lines if CHECK_LINE.match(line)]
    assert (out / "manifest.json").is_file()  # written although wrong: that is what --no-check means


def test_an_engine_whose_weights_differ_from_the_original_is_refused(exported, tmp_path, monkeypatch):
    """The lowered graph's lm_head scaled by 1.01 before the engine build: a 1% logit error fails fp32."""
    import kvc.compiler.pipeline as pipeline

    build = pipeline._build

    def build_perturbed(entry_graphs, *args):
        from kvc.contract import Entry

        model = entry_graphs[Entry.PREFILL]  # the ORT engine's one graph
        head = max((v for v in model.graph.initializers.values() if v.const_value is not None
                    and v.shape is not None and len(v.shape) == 2), key=lambda v: v.shape[0] * v.shape[1])
        import onnx_ir as ir

        head.const_value = ir.tensor(head.const_value.numpy() * np.float32(1.01), name=head.name)
        return build(entry_graphs, *args)

    monkeypatch.setattr(pipeline, "_build", build_perturbed)
    _, _, onnx_path = exported("tiny")
    out = tmp_path / "perturbed.kvc"
    with pytest.raises(CheckMismatch, match="the compiled ort engine does not match"):
        compile_lines(onnx_path, out)
    assert_nothing_written(out)


def test_an_original_input_kvc_cannot_feed_is_refused_unless_no_check(exported, tmp_path):
    _, _, onnx_path = exported("tiny")
    proto = onnx.load(onnx_path)
    proto.graph.input.append(onnx.helper.make_tensor_value_info("beam_idx", onnx.TensorProto.INT64, [1]))
    odd = tmp_path / "odd" / "model.onnx"
    odd.parent.mkdir()
    onnx.save(proto, odd)
    with pytest.raises(GraphError, match=r"cannot feed the original graph's input\(s\) beam_idx.*--no-check"):
        compile_lines(odd, tmp_path / "odd.kvc")
    assert_nothing_written(tmp_path / "odd.kvc")
    compile_lines(odd, tmp_path / "odd.kvc", check=False)
    assert (tmp_path / "odd.kvc" / "manifest.json").is_file()


def test_cli_no_check_flag(exported, tmp_path):
    from click.testing import CliRunner

    from kvc.cli.main import cli

    _, _, onnx_path = exported("tiny")
    args = ["compile", str(onnx_path), "-o", str(tmp_path / "a.kvc"), "--max-seq-len", "16"]
    checked = CliRunner().invoke(cli, args, catch_exceptions=False)
    unchecked = CliRunner().invoke(cli, args[:3] + [str(tmp_path / "b.kvc")] + args[4:] + ["--no-check"],
                                   catch_exceptions=False)
    assert checked.exit_code == 0 and unchecked.exit_code == 0, (checked.output, unchecked.output)
    assert "check vs the original graph" in checked.output
    assert "check vs the original graph" not in unchecked.output


def test_cli_refusal_is_one_line_and_exit_1(exported, tmp_path, drop_window):
    from click.testing import CliRunner

    from kvc.cli.main import cli

    _, _, onnx_path = exported("tiny-mistral")
    out = tmp_path / "wrong.kvc"
    result = CliRunner().invoke(cli, ["compile", str(onnx_path), "-o", str(out), "--max-seq-len", str(CAPACITY)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if "does not match the original graph" in line] == \
        [result.output.strip().splitlines()[-1]]
    assert_nothing_written(out)


# --------------------------------------------------------------------------- TVM
def test_tvm_engine_is_checked_too(exported, tmp_path, drop_window):
    _, _, onnx_path = exported("tiny-mistral")
    out = tmp_path / "wrong-tvm.kvc"
    with pytest.raises(CheckMismatch, match="the compiled tvm engine does not match"):
        compile_lines(onnx_path, out, engine=EngineKind.TVM, cpu="generic")
    assert_nothing_written(out)
