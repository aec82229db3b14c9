"""Write outputs atomically, and never destroy what kvc did not write.

Outputs are built in a staging directory beside the target, ``.kvc-staging-<pid>-<hex>``, and moved
into place only when the block succeeds. An owner file beside it (``<staging>.owner``: pid, host,
process start time) marks it as kvc's: a later run removes the staging data of owners that are dead
(SIGKILL, power loss). SIGINT, SIGTERM and SIGHUP inside a block raise ``kvc.errors.Interrupted``,
which unwinds it like any error, so the staging data goes too.

``overwrite`` replaces an existing directory only when it is a kvc artifact (``manifest.json`` and
only files it lists, no symbolic links) that holds neither the working directory nor an input.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from kvc.contract import MANIFEST_FILE
from kvc.errors import Interrupted, OutputError

STAGING_PREFIX = ".kvc-staging-"
OWNER_SUFFIX = ".owner"
OLD_SUFFIX = ".old"  # a replaced output, moved aside until the new one is in place
_STAGING_RE = re.compile(r"^\.kvc-staging-(\d+)-[0-9a-f]+$")
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_START_TOLERANCE_S = 2.0  # process start times are read at a coarse resolution


# --------------------------------------------------------------------------- signals
def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into ``Interrupted`` inside the block (signals a caller ignores, e.g.
    SIGHUP under nohup, stay ignored). Only the main thread can install handlers; elsewhere a no-op."""
    if not _in_main_thread():
        yield
        return
    previous = {}
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while a commit or a cleanup must finish; delivered after."""
    if not (_in_main_thread() and hasattr(signal, "pthread_sigmask")):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------- staging ownership
@dataclass(frozen=True)
class StagingOwner:
    pid: int
    host: str
    started: Optional[float]  # the process's start time (epoch s): tells a reused pid apart

    @staticmethod
    def current() -> "StagingOwner":
        return StagingOwner(os.getpid(), socket.gethostname(), _process_start(os.getpid()))

    def is_dead(self) -> bool:
        """True only when provably dead: another host's processes cannot be checked, so they live."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        started = _process_start(self.pid)
        if started is None:
            return not _pid_exists(self.pid)
        return self.started is not None and abs(started - self.started) > _START_TOLERANCE_S


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil missing, no such process, access denied
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> Optional[StagingOwner]:
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read(4096))
        return StagingOwner(int(raw["pid"]), str(raw["host"]),
                            float(raw["started"]) if raw.get("started") is not None else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or not ours: leave it alone


def sweep_stale_staging(parent: Path) -> list[Path]:
    """Remove staging data in ``parent`` whose owner process is dead; the removed paths."""
    removed = []
    try:
        entries = [e.name for e in os.scandir(parent)]
    except OSError:
        return removed
    for name in entries:
        stem = name[:-len(OWNER_SUFFIX)] if name.endswith(OWNER_SUFFIX) else None
        if stem is None or not _STAGING_RE.match(stem):
            continue
        owner = _read_owner(parent / name)
        if owner is not None and owner.is_dead():
            stage = parent / stem
            _remove_staging(stage)
            removed.append(stage)
    return removed


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _remove_staging(stage: Path) -> None:
    """The staging directory, a moved-aside old output, then the owner file (last: it marks the rest)."""
    _remove_path(stage)
    _remove_path(stage.with_name(stage.name + OLD_SUFFIX))
    stage.with_name(stage.name + OWNER_SUFFIX).unlink(missing_ok=True)


def _make_parent(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot create the output directory {parent} ({_reason(exc)}); "
                          "choose a writable location") from None
    if not parent.is_dir():
        raise OutputError(f"{parent} is not a directory; choose an output path inside a directory")


def _create_staging(stage: Path) -> None:
    owner = json.dumps(asdict(StagingOwner.current()))
    try:
        fd = os.open(stage.with_name(stage.name + OWNER_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        stage.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write in {stage.parent} ({_reason(exc)}); choose a writable output "
                          "location") from None


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A fresh kvc-owned directory in ``parent``, removed when the block ends (whatever the block
    did not move out of it is discarded). Stale staging data of dead kvc runs is swept first."""
    parent = Path(parent)
    _make_parent(parent)
    sweep_stale_staging(parent)
    with raise_on_signals():
        stage = parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            _create_staging(stage)
            yield stage
        finally:
            with signals_deferred():
                _remove_staging(stage)


# --------------------------------------------------------------------------- what may be replaced
def check_output_dir(target: str | os.PathLike, overwrite: bool, keep: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output directory that exists (without ``overwrite``) or that ``overwrite`` may not
    replace: see ``why_not_replaceable``. ``keep``: inputs that must survive (the source model, ...)."""
    target = Path(target)
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise OutputError(f"{target} already exists; remove it or pass --overwrite")
    problem = why_not_replaceable(target, keep)
    if problem is not None:
        raise OutputError(f"--overwrite will not replace {target}: {problem}; remove it yourself or choose "
                          "another output path")


def why_not_replaceable(target: Path, keep: Iterable[str | os.PathLike] = ()) -> Optional[str]:
    """None when ``target`` is a kvc artifact directory that may be replaced, else the reason."""
    if target.is_symlink():
        return "it is a symbolic link"
    if not target.is_dir():
        return "it is a file, not a kvc artifact directory"
    resolved = target.resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: nothing of it can be inside target
        cwd = None
    if cwd is not None and _contains(resolved, cwd):
        return "it is or holds the current directory"
    for path in keep:
        if _contains(resolved, Path(path).resolve()):
            return f"it holds the input {path}"
    return artifact_problem(target)


def _contains(directory: Path, path: Path) -> bool:
    return path == directory or directory in path.parents


def artifact_problem(root: Path) -> Optional[str]:
    """None when ``root`` holds kvc's manifest.json and nothing it does not list, else the reason."""
    from kvc.userfiles import read_user_json

    manifest = root / MANIFEST_FILE
    if manifest.is_symlink() or not manifest.is_file():
        return f"it has no {MANIFEST_FILE}, so it is not a kvc artifact"
    try:
        raw = read_user_json(manifest, "artifact manifest", error=OutputError)
    except OutputError:
        return f"its {MANIFEST_FILE} is not a kvc manifest"
    listed = raw.get("files")
    if "format_version" not in raw or not isinstance(listed, dict):
        return f"its {MANIFEST_FILE} is not a kvc manifest (no format_version and files)"
    unlisted = []
    for rel in _walk(root):
        if rel.startswith("!"):
            return rel[1:]
        if rel != MANIFEST_FILE and rel not in listed:
            unlisted.append(rel)
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        return f"it holds files its manifest does not list ({shown})"
    return None


def _walk(root: Path) -> Iterator[str]:
    """POSIX relative paths of the files below ``root``; a problem as '!reason' (symlink, unreadable)."""
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        for name in dirnames + filenames:
            if (Path(dirpath) / name).is_symlink():
                yield f"!it contains a symbolic link {(Path(dirpath) / name).relative_to(root).as_posix()}"
                return
        for name in filenames:
            yield (Path(dirpath) / name).relative_to(root).as_posix()
    if errors:
        yield f"!kvc cannot list all of it ({errors[0].filename}: {_reason(errors[0])})"


# --------------------------------------------------------------------------- atomic writers
@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False,
               keep: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a staging directory that becomes ``target`` only if the block succeeds. An existing
    ``target`` is replaced only with ``overwrite`` and only when ``check_output_dir`` allows it."""
    target = Path(target)
    keep = tuple(keep)
    check_output_dir(target, overwrite, keep)
    with staging_dir(target.parent) as stage:
        yield stage
        with signals_deferred():
            check_output_dir(target, overwrite, keep)  # again: the block may have run for minutes
            _replace(stage, target)


def _replace(stage: Path, target: Path) -> None:
    """Move ``stage`` to ``target``; an old ``target`` goes aside first (the sweep owns it) and then."""
    old = stage.with_name(stage.name + OLD_SUFFIX)
    try:
        if os.path.lexists(target):
            os.replace(target, old)
        os.replace(stage, target)
    except OSError as exc:
        raise OutputError(f"cannot move the new output into place at {target} ({_reason(exc)}); "
                          "choose a writable location") from None
    _remove_path(old)


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory whose files are moved into ``directory`` only on success, replacing
    files of the same names (callers decide first whether they may: see kvc.models.export)."""
    directory = Path(directory)
    with staging_dir(directory) as stage:
        yield stage
        with signals_deferred():
            move_files(stage, directory, sorted(p.name for p in stage.iterdir()))


def move_files(stage: Path, directory: Path, names: Iterable[str]) -> None:
    for name in names:
        try:
            os.replace(stage / name, directory / name)
        except OSError as exc:
            raise OutputError(f"cannot write {directory / name} ({_reason(exc)}); choose a writable "
                              "location") from None


def atomic_write_text(target: str | os.PathLike, text: str, overwrite: bool = False,
                      is_ours: Callable[[Path], bool] = lambda p: False,
                      keep: Iterable[str | os.PathLike] = ()) -> Path:
    """Write one text file atomically. An existing ``target`` is replaced only with ``overwrite``,
    only when it is a regular file ``is_ours`` recognises as kvc's output, and never an input."""
    target = Path(target)
    check_output_file(target, overwrite, is_ours, keep)
    with staging_dir(target.parent) as stage:
        (stage / target.name).write_text(text, encoding="utf-8")
        with signals_deferred():
            check_output_file(target, overwrite, is_ours, keep)
            move_files(stage, target.parent, [target.name])
    return target


def check_output_file(target: Path, overwrite: bool, is_ours: Callable[[Path], bool],
                      keep: Iterable[str | os.PathLike] = ()) -> None:
    if any(Path(k).resolve() == target.resolve() for k in keep):
        raise OutputError(f"{target} is also an input; choose another output path")
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise OutputError(f"{target} already exists; remove it or pass --overwrite")
    if target.is_symlink() or not target.is_file() or not is_ours(target):
        raise OutputError(f"--overwrite will not replace {target}: kvc did not write it; remove it yourself "
                          "or choose another output path")


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
