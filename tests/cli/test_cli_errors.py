"""User mistakes end in one `error:` line and exit 1, never a traceback, a hang, exhausted memory or
lost data: unreadable/binary/oversized/special files, bad output paths, invalid UTF-8, --device cuda
without a GPU, outputs that would replace inputs, signals during export."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvc.cli.main import cli
from tests.conftest import STORIES260K, has_gpu

KVC = [sys.executable, "-c", "from kvc.cli.main import cli; cli()"]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments: str) -> None:
    """CliRunner result or CompletedProcess: exit 1, stderr exactly one `error:` line."""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    lines = result.stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, result.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def kvc_subprocess(*args, input: bytes | None = None, memory: int = 1 << 30, timeout: float = 60):
    """The real `kvc` in a child with capped address space (a runaway read fails there, not here)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    done = subprocess.run([*KVC, *map(str, args)], input=input, capture_output=True, timeout=timeout,
                          preexec_fn=limit)
    done.stderr = done.stderr.decode(errors="replace")
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(model.onnx, artifact) of the tiny preset."""
    root = tmp_path_factory.mktemp("errors")
    assert invoke("export", "tiny", "-o", root / "m" / "model.onnx").exit_code == 0
    assert invoke("compile", root / "m" / "model.onnx", "-o", root / "tiny.kvc", "--max-seq-len", "32").exit_code == 0
    return root / "m" / "model.onnx", root / "tiny.kvc"


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


# --------------------------------------------------------------------------- bounded user files
def test_plan_of_dev_zero_is_refused_without_reading_it():
    assert_one_line_error(kvc_subprocess("plan", "/dev/zero"), "/dev/zero is a device")


def test_plan_of_a_fifo_is_refused_without_blocking(fifo):
    assert_one_line_error(kvc_subprocess("plan", fifo, timeout=180), "FIFO")  # blocking would hang for ever


@pytest.mark.parametrize("content, fragment", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not valid UTF-8"),
    (b"[" * 100_000, "RecursionError"),  # nesting deeper than the recursion limit
    (b'{"vocab_size": 1' + b"0" * 5000 + b"}", "ValueError"),  # an int over Python's digit limit
    (b"[1, 2]", "not an object"),
], ids=["binary", "deep-nesting", "huge-int", "list"])
def test_plan_of_a_bad_json_file_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    assert_one_line_error(invoke("plan", path), fragment)


def test_compile_config_and_scales_are_read_bounded(tiny, tmp_path, fifo):
    model, _ = tiny
    binary = tmp_path / "scales.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(invoke("compile", model, "-o", tmp_path / "a.kvc", "--kv-dtype", "fp8",
                                 "--kv-scales", binary), "not valid UTF-8")
    assert_one_line_error(kvc_subprocess("compile", model, "-o", tmp_path / "b.kvc", "--config", fifo,
                                         memory=16 << 30, timeout=120), "FIFO")
    assert_one_line_error(invoke("compile", "/dev/zero", "-o", tmp_path / "c.kvc"), "is a device")
    assert sorted(os.listdir(tmp_path)) == ["pipe.json", "scales.json"]


# --------------------------------------------------------------------------- output paths
def test_an_output_below_a_file_is_one_line(tiny, tmp_path):
    model, _ = tiny
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(invoke("export", "tiny", "-o", blocker / "m" / "model.onnx"), "output directory")
    assert_one_line_error(invoke("compile", model, "-o", blocker / "out.kvc"), "output directory")


def test_compile_refuses_to_overwrite_the_directory_holding_its_model(tiny, tmp_path):
    model, artifact = tiny
    before = sorted(os.listdir(model.parent))
    assert_one_line_error(invoke("compile", model, "-o", model.parent, "--overwrite"), "holds the input")
    assert sorted(os.listdir(model.parent)) == before
    graph = artifact / "graph.onnx"
    assert_one_line_error(invoke("compile", graph, "-o", artifact, "--overwrite"), "holds the input")
    assert graph.is_file()


def test_compile_refuses_to_overwrite_the_current_directory(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert_one_line_error(invoke("compile", model, "-o", ".", "--overwrite"), "current directory")
    assert (work / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- prompts and devices
def test_invalid_utf8_on_stdin_is_one_line(tiny):
    _, artifact = tiny
    assert_one_line_error(invoke("run", artifact, "--prompt", "-", input=b"Once \xff\xfe upon"), "not valid UTF-8")


def test_undecodable_argv_prompt_is_one_line(tiny):
    _, artifact = tiny
    # argv bytes that are not UTF-8 reach Python as lone surrogates
    done = subprocess.run([os.fsencode(a) for a in [*KVC, "run", str(artifact)]] + [b"--prompt", b"caf\xe9"],
                          capture_output=True, timeout=120)
    done.stderr = done.stderr.decode(errors="replace")
    assert_one_line_error(done, "not valid UTF-8")


@pytest.mark.skipif(has_gpu(), reason="a CUDA device is present: --device cuda is served")
def test_device_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(tiny):
    _, artifact = tiny
    assert_one_line_error(invoke("run", artifact, "--prompt-ids", "1,2", "-n", "2", "--device", "cuda"), "cuda")


# --------------------------------------------------------------------------- calibrate outputs
@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    if not STORIES260K.is_dir():
        pytest.skip("../shared/models/stories260K is not present")
    out = tmp_path_factory.mktemp("stories") / "model.onnx"
    assert invoke("export", STORIES260K / "stories260K.bin", "-o", out).exit_code == 0
    return out


def test_calibrate_never_writes_over_its_inputs(stories, tmp_path):
    text = tmp_path / "sample.txt"
    text.write_text("Once upon a time there was a cat. " * 4)
    assert_one_line_error(invoke("calibrate", stories, "--text", text, "-o", text), "is also an input")
    assert text.read_text().startswith("Once upon a time")
    scales = tmp_path / "scales.json"
    assert invoke("calibrate", stories, "--text", text, "-o", scales).exit_code == 0
    assert_one_line_error(invoke("calibrate", stories, "--text", text, "-o", scales), "--overwrite")
    assert invoke("calibrate", stories, "--text", text, "-o", scales, "--overwrite").exit_code == 0
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xc3\x28 invalid")
    assert_one_line_error(invoke("calibrate", stories, "--text", bad, "-o", tmp_path / "s2.json"), "UTF-8")


# --------------------------------------------------------------------------- signals
def test_sigterm_during_export_leaves_no_staging_data(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    child = subprocess.Popen([*KVC, "export", "tiny", "-o", str(out / "model.onnx")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.listdir(out) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until the export has started writing
    assert child.poll() is None, "the export finished before it could be interrupted"
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["error: interrupted by SIGTERM; no partial output was left"]
    assert os.listdir(out) == []
