"""Seeded fuzz over every command's arguments (bad paths, FIFOs, /dev/zero, binary files, huge, negative
and non-finite numbers, odd unicode, missing arguments, existing outputs), in-process with CliRunner.

Every case must end in one of:
  exit 0  a result (the command did what was asked),
  exit 1  exactly one `error: ...` line on stderr (a user error kvc recognised),
  exit 2  click's usage error (an option value click itself rejects: a non-integer for an int, ...),
never an uncaught exception (a traceback), a hang, a signal, or a file written outside the case's output
path.
`kvc bench` gets only arguments that fail before benchmarking (a real benchmark takes minutes).
"""
from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvc.cli.main import cli

SEED = 20261128
CASES = 70

INTS = ["0", "1", "2", "4", "-1", "-7", "99999999999999999999", "-99999999999999999999"]
FLOATS = ["0", "0.5", "1", "-1", "1e-39", "-1e-39", "1e308", "nan", "inf", "-inf"]
NOT_NUMBERS = ["１２", "", "0x10", "1,5"]  # click's usage errors (exit 2)
ODD = ["", " ", "ünïcødé-\u202e-😀", "a" * 300, "-", "--", "../..", "~", "*"]


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    output: Path | None  # the one path this case may create or change (with what lies below it)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> dict[str, str]:
    """Inputs of every kind the cases draw from (paths as strings)."""
    root = tmp_path_factory.mktemp("fuzz")
    runner = CliRunner()
    model = root / "m" / "model.onnx"
    assert runner.invoke(cli, ["export", "tiny", "-o", str(model)]).exit_code == 0
    artifact = root / "tiny.kvc"
    assert runner.invoke(cli, ["compile", str(model), "-o", str(artifact), "--max-seq-len", "16"]).exit_code == 0
    os.mkfifo(root / "fifo")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "config.json").write_text('{"model_type": "llama", "hidden_size": -4}')
    (root / "text.txt").write_text("Once upon a time " * 20)
    (root / "bad-utf8.txt").write_bytes(b"caf\xe9 \xff")
    (root / "dir").mkdir()
    (root / "dir" / "user-file.txt").write_text("keep me")
    return {"root": str(root), "model": str(model), "artifact": str(artifact), "fifo": str(root / "fifo"),
            "zero": "/dev/zero", "binary": str(root / "binary.bin"), "list": str(root / "list.json"),
            "config": str(root / "config.json"), "text": str(root / "text.txt"),
            "bad_utf8": str(root / "bad-utf8.txt"), "dir": str(root / "dir"),
            "missing": str(root / "no" / "such" / "file"), "graph": str(artifact / "graph.onnx")}


class Generator:
    def __init__(self, seed: int, box: dict[str, str]):
        self.rng, self.box = random.Random(seed), box
        self.root = Path(box["root"])

    def pick(self, *options):
        return self.rng.choice(options)

    def path(self, *keys: str) -> str:
        return self.pick(*(self.box[k] for k in keys), *ODD)

    def number(self, *valid: str) -> str:
        """An integer option's value: mostly integers that are wrong for kvc, not for click."""
        return self.pick(*NOT_NUMBERS) if self.rng.random() < 0.1 else self.pick(*INTS, *valid)

    def real(self) -> str:
        return self.pick(*NOT_NUMBERS) if self.rng.random() < 0.1 else self.pick(*FLOATS)

    def output(self, i: int, suffix: str) -> tuple[str, Path | None]:
        """A fresh path, an existing input (must never change), or an unwritable place."""
        fresh = self.root / f"out-{i}" / f"o{suffix}"
        choice = self.pick("fresh", "fresh", "existing", "under_file", "odd")
        if choice == "fresh":
            return str(fresh), fresh.parent
        if choice == "under_file":
            return str(Path(self.box["binary"]) / f"o{suffix}"), None
        if choice == "odd":
            return str(self.root / f"out-{i}" / (self.pick(*ODD) or "x")), self.root / f"out-{i}"
        return self.path("model", "artifact", "dir", "text", "binary", "config", "fifo"), None

    def options(self, table: dict[str, callable], chance: float = 0.3) -> list[str]:
        """Each option of ``table`` with probability ``chance`` (lower for commands with many, so
        that some cases get past validation into the engine)."""
        args = []
        for flag, value in table.items():
            if self.rng.random() < chance:
                args += [flag] if value is None else [flag, value()]
        return args

    def case(self, i: int) -> Case:
        command = self.pick("plan", "plan", "export", "compile", "compile", "run", "run", "run",
                            "calibrate", "bench")
        return getattr(self, command)(i)

    def plan(self, i: int) -> Case:
        model = self.pick("tiny", "llama-2-7b", "llama-3.1-8b", "no-such-model", self.path(
            "artifact", "fifo", "zero", "binary", "list", "config", "dir", "missing", "model"))
        args = ["plan", model, *self.options({
            "--context": self.number, "--batch": self.number, "--memory": lambda: self.pick("80GB", "-1GB", "1e99TB", "x"),
            "--bandwidth": lambda: self.pick("3.35TB/s", "0GB/s", "-2GB/s", "nan"),
            "--kv-dtype": lambda: self.pick("int8", "fp8", "fp4"), "--weights-dtype": lambda: self.pick("fp16", "q4"),
            "--fp8-scales": lambda: self.pick("static", "dynamic"), "--json": None})]
        return Case(tuple(args), None)

    def export(self, i: int) -> Case:
        source = self.pick("tiny", "no-such-preset", self.path("fifo", "zero", "binary", "dir", "missing", "text"))
        out, allowed = self.output(i, ".onnx")
        args = ["export", source, "-o", out, *self.options({
            "--seed": self.number, "--tokenizer": lambda: self.path("binary", "fifo", "zero", "text"),
            "--overwrite": None, "--external-data": None})]
        return Case(tuple(args), allowed)

    def compile(self, i: int) -> Case:
        model = self.pick(self.box["model"], self.path("fifo", "zero", "binary", "dir", "missing", "graph"))
        out, allowed = self.output(i, ".kvc")
        args = ["compile", model, "-o", out, *self.options({
            "--max-seq-len": lambda: self.number("8", "16"), "--kv-dtype": lambda: self.pick("int8", "fp16", "fp4"),
            "--kv-scales": lambda: self.path("list", "binary", "fifo", "zero", "config"),
            "--config": lambda: self.path("config", "list", "binary", "fifo", "zero", "dir"),
            "--sliding-window": self.number, "--overwrite": None,
            "--tuning-db": lambda: self.path("dir", "artifact", "missing")})]
        return Case(tuple(args), allowed)

    def run(self, i: int) -> Case:
        artifact = self.pick(self.box["artifact"], self.path("dir", "fifo", "model", "missing", "zero"))
        ids = self.pick("1,2,3", "1,2,3", "-1", "99999999999999999999", "1,,x", "", "0")
        prompt = self.pick(["--prompt-ids", ids], ["--prompt-ids", ids], ["--prompt", self.pick("Once", *ODD)], [])
        args = ["run", artifact, *prompt, *self.options({
            "-n": lambda: self.number("4"), "--temperature": self.real, "--top-k": self.number,
            "--top-p": self.real, "--min-p": self.real, "--repetition-penalty": self.real,
            "--seed": self.number, "--stop": lambda: self.pick(*ODD), "--stop-token-id": self.number,
            "--on-overflow": lambda: self.pick("slide", "refuse", "wrap"), "--sink-tokens": self.number,
            "--threads": lambda: self.pick("0", "1", "-3", "99999999999999999999"),
            "--device": lambda: self.pick("cpu", "cuda", "tpu"), "--json": None, "--stats": None,
            "--chat": None, "--ignore-eos": None}, chance=0.1)]
        return Case(tuple(args), None)

    def calibrate(self, i: int) -> Case:
        model = self.path("model", "fifo", "zero", "binary", "missing", "graph")
        out, allowed = self.output(i, ".json")
        args = ["calibrate", model, "--text", self.path("text", "bad_utf8", "fifo", "zero", "binary"), "-o", out,
                *self.options({"--max-tokens": self.number, "--overwrite": None})]
        return Case(tuple(args), allowed)

    def bench(self, i: int) -> Case:
        source = self.path("fifo", "zero", "binary", "missing", "dir")
        args = ["bench", source, *self.options({"--contexts": lambda: self.pick("0", "-5", "x,y", ""),
                                                 "--gen": self.number, "--batch": self.number})]
        return Case(tuple(args), None)


def snapshot(root: Path, skip: Path | None) -> dict[str, tuple[int, int]]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st = path.lstat()
            state[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


def check(case: Case, result, before: dict, after: dict) -> None:
    where = f"kvc {' '.join(case.args)!r}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{where} raised instead of a one-line error:\n{trace}")
    assert result.exit_code in (0, 1, 2), f"{where}: exit {result.exit_code}"
    lines = result.stderr.strip().splitlines()
    if result.exit_code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: stderr {result.stderr!r}"
    if result.exit_code == 2:
        assert "Error:" in result.stderr and "Traceback" not in result.stderr, f"{where}: {result.stderr!r}"
    assert after == before, f"{where} changed files outside its output: " \
                            f"{sorted(set(after.items()) ^ set(before.items()))[:6]}"


class Hung(Exception):
    """A case ran past CASE_TIMEOUT_S (e.g. blocked opening a FIFO)."""


CASE_TIMEOUT_S = 120  # generous: one case is a tiny export + compile at most


def _hung(signum, frame):
    raise Hung(f"no result after {CASE_TIMEOUT_S} s")


def test_no_argument_ends_in_a_traceback_a_hang_or_a_stray_file(sandbox):
    gen = Generator(SEED, sandbox)
    root = Path(sandbox["root"])
    runner = CliRunner()
    previous = signal.signal(signal.SIGALRM, _hung)
    try:
        for i in range(CASES):
            case = gen.case(i)
            before = snapshot(root, case.output)
            signal.alarm(CASE_TIMEOUT_S)
            result = runner.invoke(cli, list(case.args), input=b"")
            signal.alarm(0)
            check(case, result, before, snapshot(root, case.output))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("command", ["export", "compile", "run", "calibrate", "plan", "bench"])
def test_missing_arguments_are_usage_errors(command):
    result = CliRunner().invoke(cli, [command])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
