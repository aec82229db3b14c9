"""The artifact is the trust boundary: typed manifest fields, fixed file names, cross-checks against the
graph / params, and a seeded fuzz over every manifest field (each case ends in one KvcError line or a
correct result; no other exception, no Python-level open() outside the artifact)."""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvc.errors import ArtifactError, KvcError
from kvc.runtime import load
from kvc.runtime.artifact import sha256_file, validate_artifact
from kvc.runtime.sampling import SamplingParams

GREEDY_4 = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
PROMPT = [1, 5, 9]


@pytest.fixture(scope="module")
def pristine(compiled):
    return compiled("tiny", capacity=16)


@pytest.fixture
def artifact(pristine, tmp_path):
    dst = tmp_path / "a.kvc"
    shutil.copytree(pristine, dst)
    return dst


def edit(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def refuse_engine(monkeypatch):
    import kvc.runtime.model as model_mod

    def must_not_run(*args, **kwargs):
        raise AssertionError("an engine was constructed for an inconsistent artifact")

    monkeypatch.setattr(model_mod, "_make_engine", must_not_run)


def test_edited_capacity_is_caught_by_the_graph_before_ort_starts(artifact, monkeypatch):
    """dea640d loaded this (the ORT engine allocated 32-slot caches for a 16-slot graph)."""
    refuse_engine(monkeypatch)
    edit(artifact, lambda m: m["cache"].update(capacity=32))
    with pytest.raises(ArtifactError, match="KV layout graph.onnx was compiled with"):
        load(artifact)


def test_edited_vocab_is_caught(artifact, monkeypatch):
    refuse_engine(monkeypatch)
    edit(artifact, lambda m: m["model"].update(vocab_size=100000))
    with pytest.raises(ArtifactError, match="vocab"):
        load(artifact)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "graph.onnx.data"])
def test_engine_paths_are_fixed_names_not_manifest_fields(artifact, monkeypatch, path):
    """dea640d opened root / engine_options["graph"] whatever it said."""
    refuse_engine(monkeypatch)
    edit(artifact, lambda m: m["engine_options"].update(graph=path))
    with pytest.raises(ArtifactError, match="engine_options.graph"):
        load(artifact)


def test_external_data_outside_the_file_list_is_refused(artifact, tmp_path, monkeypatch):
    """A graph (re-hashed in the manifest, as an attacker would) pointing its weights outside the artifact."""
    import onnx

    refuse_engine(monkeypatch)
    proto = onnx.load(str(artifact / "graph.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(proto, str(artifact / "graph.onnx"))
    digest = sha256_file(artifact / "graph.onnx")
    edit(artifact, lambda m: m["files"].update({"graph.onnx": digest}))
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        validate_artifact(artifact)


def test_unknown_and_missing_fields_are_refused(artifact):
    edit(artifact, lambda m: m.update(surprise=1))
    with pytest.raises(ArtifactError, match="unknown field 'surprise'"):
        validate_artifact(artifact)
    edit(artifact, lambda m: (m.pop("surprise"), m["cache"].pop("dtype")))
    with pytest.raises(ArtifactError, match="cache: missing dtype"):
        validate_artifact(artifact)


def test_manifest_is_typed(artifact):
    from kvc.contract import EngineKind, KvDtype, ScaleKind

    m = validate_artifact(artifact)
    assert m.engine is EngineKind.ORT and m.cache.dtype is KvDtype.FP32 and m.cache.scales is ScaleKind.NONE
    assert m.limits.vocab_size == 256 and m.limits.max_positions == 1024


# --- fuzz -------------------------------------------------------------------------------------------

BAD_VALUES = [None, True, -1, 0, 1, 2 ** 63, 1.5, float("nan"), "", "x", "../../etc/passwd", "/etc/passwd",
              "graph.onnx.data", [], [1], {}, {"a": 1}, "fp8", "tvm", "static_per_head"]


def field_paths(value, prefix=()):
    """Every key path of the JSON tree (lists: their first element), leaves and inner nodes."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield prefix + (key,)
            yield from field_paths(child, prefix + (key,))
    elif isinstance(value, list) and value:
        yield prefix + (0,)
        yield from field_paths(value[0], prefix + (0,))


def mutate(manifest: dict, path: tuple, rng: random.Random) -> str:
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = rng.choice(["delete", "value", "value", "extra"])
    if action == "delete":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
        return f"delete {path}"
    if action == "extra" and isinstance(parent, dict):
        parent["zz_extra"] = rng.choice(BAD_VALUES)
        return f"extra key beside {path}"
    value = rng.choice(BAD_VALUES)
    parent[last] = value
    return f"{path} = {value!r}"


class OpenGuard:
    """Records Python-level opens outside the artifact (sys.addaudithook; hooks cannot be removed, so the
    guard is switched on and off)."""

    active_root: Path | None = None
    escapes: list[str] = []
    installed = False

    @classmethod
    def install(cls):
        if not cls.installed:
            sys.addaudithook(cls._hook)
            cls.installed = True

    @classmethod
    def _hook(cls, event, args):
        if cls.active_root is None or event != "open" or not isinstance(args[0], (str, Path)):
            return
        path = Path(args[0]).resolve()
        if not path.is_relative_to(cls.active_root) and not path.is_relative_to(Path(sys.prefix).resolve()) \
                and "site-packages" not in str(path) and not str(path).startswith(("/proc", "/sys", "/dev")):
            cls.escapes.append(str(path))


def run_case(root: Path) -> list[int] | None:
    """Load and generate; None when refused with a KvcError (one line)."""
    try:
        model = load(root)
        return model.generate(PROMPT, GREEDY_4).token_ids
    except KvcError as error:
        assert "\n" not in str(error), str(error)
        return None


def test_fuzz_every_manifest_field(pristine, tmp_path):
    baseline = load(pristine).generate(PROMPT, GREEDY_4).token_ids
    original = json.loads((pristine / "manifest.json").read_text())
    paths = sorted(set(field_paths(original)), key=repr)
    paths = [p for p in paths if p[0] != "passes" or len(p) <= 2]  # the pass reports are informational
    rng = random.Random(20261128)
    root = tmp_path / "f.kvc"
    shutil.copytree(pristine, root)
    OpenGuard.install()
    outcomes = {"refused": 0, "ran": 0}
    for case in range(len(paths) * 2):
        manifest = copy.deepcopy(original)
        what = mutate(manifest, paths[case % len(paths)], rng)
        (root / "manifest.json").write_text(json.dumps(manifest))
        OpenGuard.active_root, OpenGuard.escapes = root.resolve(), []
        try:
            tokens = run_case(root)
        except Exception as exc:  # any other type is the bug this test looks for
            raise AssertionError(f"case {case} ({what}): {type(exc).__name__}: {exc}") from exc
        finally:
            OpenGuard.active_root = None
        assert not OpenGuard.escapes, f"case {case} ({what}) opened {OpenGuard.escapes}"
        assert tokens is None or tokens == baseline, f"case {case} ({what}) ran and gave {tokens}"
        outcomes["refused" if tokens is None else "ran"] += 1
    assert outcomes["refused"] > len(paths) and outcomes["ran"] > 0, outcomes


def test_fuzzed_manifests_give_one_line_cli_errors(pristine, tmp_path):
    """The CLI prints a refused manifest as one line and exits 1 (a sample of the cases above)."""
    from kvc.cli.main import cli

    original = json.loads((pristine / "manifest.json").read_text())
    paths = sorted(set(field_paths(original)), key=repr)
    rng = random.Random(7)
    root = tmp_path / "c.kvc"
    shutil.copytree(pristine, root)
    for path in rng.sample(paths, 12):
        manifest = copy.deepcopy(original)
        what = mutate(manifest, path, rng)
        (root / "manifest.json").write_text(json.dumps(manifest))
        result = CliRunner().invoke(cli, ["run", str(root), "--prompt-ids", "1,5,9", "--max-new-tokens", "2"])
        assert result.exit_code in (0, 1), f"{what}: exit {result.exit_code}\n{result.output}"
        if result.exit_code == 1:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: {result.output}"
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), what
