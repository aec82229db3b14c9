"""kvc.fsutil: atomic writes never destroy what kvc did not write, and leave no staging data behind
when the process is interrupted (SIGINT/SIGTERM/SIGHUP) or killed (SIGKILL: swept by the next run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvc.errors import KvcError
from kvc.fsutil import atomic_dir

MANIFEST = "manifest.json"

# A child that stages an output, says so, and waits to be signalled inside the atomic block.
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kvc.fsutil import atomic_dir
    with atomic_dir(Path(sys.argv[1]) / "out.kvc") as stage:
        (stage / "graph.onnx").write_bytes(b"x" * 4096)
        print("staged", flush=True)
        time.sleep(120)
""")


def fake_artifact(root: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A directory shaped like a kvc artifact: manifest.json listing every other file."""
    files = {"graph.onnx": b"graph", "tokenizer.json": b"{}", **(extra or {})}
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / MANIFEST).write_text(json.dumps({"format_version": 1, "files": {rel: "0" * 64 for rel in files}}))
    return root


def _as_a_foreground_program() -> None:
    """Background jobs start with SIGINT ignored (`cmd &`) and nohup ignores SIGHUP; children inherit
    that. The child here stands for a program the user can interrupt: give both their default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_child(parent: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(parent)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=_as_a_foreground_program)
    assert child.stdout.readline().strip() == "staged", child.stderr.read()
    return child


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_inside_the_atomic_block_leaves_nothing_behind(tmp_path, sig):
    child = start_child(tmp_path)
    child.send_signal(sig)
    child.wait(timeout=60)
    assert child.returncode != 0
    assert sorted(os.listdir(tmp_path)) == [], "staging data or a half-written output was left behind"


def test_staging_of_a_killed_process_is_swept_by_the_next_run(tmp_path):
    child = start_child(tmp_path)
    child.kill()  # SIGKILL cannot be handled: the next run cleans up
    child.wait(timeout=60)
    assert os.listdir(tmp_path), "the killed child left its staging data (the case under test)"
    with atomic_dir(tmp_path / "other.kvc") as stage:
        (stage / "graph.onnx").write_bytes(b"y")
    assert sorted(os.listdir(tmp_path)) == ["other.kvc"]


def test_the_sweep_leaves_live_owners_and_foreign_directories_alone(tmp_path):
    from kvc.fsutil import sweep_stale_staging

    child = start_child(tmp_path)
    try:
        (tmp_path / ".kvc-staging-1-abc").mkdir()  # kvc's name, but no owner file: not provably ours
        (tmp_path / "user-data").mkdir()
        assert sweep_stale_staging(tmp_path) == []
        assert len(os.listdir(tmp_path)) == 4  # the child's staging dir and owner file, and the two above
    finally:
        child.kill()
        child.wait(timeout=60)
    assert len(sweep_stale_staging(tmp_path)) == 1  # the killed child's
    assert sorted(os.listdir(tmp_path)) == [".kvc-staging-1-abc", "user-data"]


def test_overwrite_replaces_a_kvc_artifact(tmp_path):
    target = fake_artifact(tmp_path / "out.kvc", {"lib/cpu.so": b"so"})
    with atomic_dir(target, overwrite=True) as stage:
        (stage / "new").write_text("new")
    assert sorted(os.listdir(target)) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["out.kvc"]


def test_without_overwrite_an_existing_output_is_refused(tmp_path):
    target = fake_artifact(tmp_path / "out.kvc")
    with pytest.raises(KvcError, match="already exists; remove it or pass --overwrite"):
        with atomic_dir(target) as stage:
            (stage / "new").write_text("new")


def refused(target: Path, match: str) -> None:
    before = sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) if target.is_dir() else None
    with pytest.raises(KvcError, match=match):
        with atomic_dir(target, overwrite=True) as stage:
            (stage / "new").write_text("new")
    after = sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) if target.is_dir() else None
    assert before == after, "a refused overwrite changed the directory"


def test_overwrite_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    refused(home, "no manifest.json")


def test_overwrite_refuses_an_artifact_holding_files_it_does_not_list(tmp_path):
    target = fake_artifact(tmp_path / "out.kvc")
    (target / "notes.txt").write_text("mine")
    refused(target, r"does not list \(notes.txt\)")


def test_overwrite_refuses_a_manifest_that_is_not_kvcs(tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    (target / MANIFEST).write_text('{"name": "a web app"}')
    (target / "index.js").write_text("")
    refused(target, "not a kvc manifest")


def test_overwrite_refuses_symlinks(tmp_path):
    target = fake_artifact(tmp_path / "out.kvc")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (target / "link").symlink_to(outside)
    refused(target, "symbolic link")
    link = tmp_path / "link.kvc"
    link.symlink_to(fake_artifact(tmp_path / "real.kvc"))
    refused(link, "symbolic link")


def test_overwrite_refuses_the_current_directory_and_its_parents(tmp_path, monkeypatch):
    target = fake_artifact(tmp_path / "out.kvc", {"sub/x": b""})
    monkeypatch.chdir(target / "sub")
    refused(Path(".."), "current directory")
    monkeypatch.chdir(target)
    refused(Path("."), "current directory")


def test_overwrite_refuses_a_directory_holding_an_input(tmp_path):
    from kvc.fsutil import check_output_dir

    target = fake_artifact(tmp_path / "out.kvc")
    with pytest.raises(KvcError, match="holds the input"):
        check_output_dir(target, True, keep=[target / "graph.onnx"])


def test_overwrite_refuses_a_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"weights")
    with pytest.raises(KvcError, match="is a file"):
        with atomic_dir(target, overwrite=True) as stage:
            (stage / "new").write_text("new")
    assert target.read_bytes() == b"weights"


def test_an_unwritable_output_location_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KvcError, match="cannot create the output directory"):
        with atomic_dir(blocker / "out.kvc"):
            pass


def test_atomic_write_text_replaces_only_files_kvc_wrote(tmp_path):
    from kvc.fsutil import atomic_write_text

    target = tmp_path / "scales.json"
    target.write_text("user's")
    with pytest.raises(KvcError, match="already exists"):
        atomic_write_text(target, "new")
    with pytest.raises(KvcError, match="kvc did not write it"):
        atomic_write_text(target, "new", overwrite=True, is_ours=lambda p: False)
    with pytest.raises(KvcError, match="is also an input"):
        atomic_write_text(target, "new", overwrite=True, is_ours=lambda p: True, keep=[target])
    assert target.read_text() == "user's"
    atomic_write_text(target, "new", overwrite=True, is_ours=lambda p: True)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["scales.json"]


def test_signal_handlers_are_restored_after_the_block(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with atomic_dir(tmp_path / "a.kvc") as stage:
        assert signal.getsignal(signal.SIGTERM) is not before
        (stage / "f").write_text("")
    assert signal.getsignal(signal.SIGTERM) is before
