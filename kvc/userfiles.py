"""Bounded reads of files a user names (configs, scales, manifests, prompts, sample text).

Every CLI path and every loader that reads user JSON or text goes through here, so a FIFO, a device
(``kvc plan /dev/zero``), a directory, a binary or a huge file ends in one KvcError line instead of a
hang, an exhausted memory or a traceback. Standard library only (the CLI imports it before torch).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from kvc.errors import KvcError

MiB = 1 << 20
# Hugging Face tokenizer.json files reach ~20 MB (large vocabularies); every other JSON kvc reads is KBs.
MAX_JSON_BYTES = 64 * MiB
MAX_TEXT_BYTES = 64 * MiB  # prompts, calibration text, chat templates


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_user_bytes(path: str | os.PathLike, what: str, limit: int = MAX_JSON_BYTES,
                    error: type[KvcError] = KvcError) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them, else ``error`` naming ``what``."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # refused before open: opening a FIFO blocks
            raise error(f"{what} {path} is {_kind(mode)}; pass a regular file")
        # O_NONBLOCK: a FIFO swapped in after the stat still cannot block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except (OSError, ValueError) as exc:  # permissions, name too long, embedded NUL, ...
        raise error(f"cannot open {what} {path} ({_reason(exc)}); pass a readable file") from None
    with os.fdopen(fd, "rb") as f:
        return _read_bounded(f, os.fstat(fd).st_mode, path, what, limit, error)


def _read_bounded(f: BinaryIO, mode: int, path: Path, what: str, limit: int, error: type[KvcError]) -> bytes:
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {_kind(mode)}; pass a regular file")
    try:
        data = f.read(limit + 1)  # one byte more tells "too large" from "exactly the limit"
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({_reason(exc)}); pass a readable file") from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {_size(limit)}, more than any {what} kvc reads; "
                    "pass the right file")
    return data


def check_regular_file(path: str | os.PathLike, what: str, limit: int | None = None,
                       error: type[KvcError] = KvcError) -> Path:
    """``path`` if it is a regular file (of at most ``limit`` bytes), for readers that open it
    themselves (ONNX, safetensors, llama2.c); else ``error``."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except (OSError, ValueError) as exc:
        raise error(f"cannot open {what} {path} ({_reason(exc)}); pass a readable file") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {_kind(st.st_mode)}; pass a regular file")
    if limit is not None and st.st_size > limit:
        raise error(f"{what} {path} is larger than {_size(limit)}, more than any {what} kvc reads; "
                    "pass the right file")
    return path


def read_stream_bytes(stream: BinaryIO, what: str, limit: int = MAX_TEXT_BYTES,
                      error: type[KvcError] = KvcError) -> bytes:
    """At most ``limit`` bytes of an open binary stream (stdin), else ``error``."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} is larger than {_size(limit)}; pass a shorter one")
    return data


def decode_utf8(data: bytes, what: str, error: type[KvcError] = KvcError) -> str:
    """``data`` as UTF-8 (a leading BOM dropped), else ``error`` naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                    "pass UTF-8 text") from None


def check_text(text: str, what: str, error: type[KvcError] = KvcError) -> str:
    """Refuse text holding lone surrogates (undecodable bytes in argv arrive as those)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} is not valid UTF-8 (undecodable byte at character {exc.start}); "
                    "pass UTF-8 text") from None
    return text


def read_user_text(path: str | os.PathLike, what: str, limit: int = MAX_TEXT_BYTES,
                   error: type[KvcError] = KvcError) -> str:
    """A UTF-8 text file, bounded and checked (see ``read_user_bytes``)."""
    return decode_utf8(read_user_bytes(path, what, limit, error), f"{what} {path}", error)


def parse_json(data: bytes | str, where: str, what: str, error: type[KvcError] = KvcError) -> Any:
    """JSON text -> value; a binary, truncated, absurdly nested or huge-number document is ``error``."""
    text = decode_utf8(data, f"{what} {where}", error) if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"cannot read {what} {where} as JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                    f"pass a valid {what}") from None
    except (ValueError, RecursionError) as exc:  # an int of > 4300 digits; nesting deeper than the stack
        raise error(f"cannot read {what} {where} as JSON ({type(exc).__name__}: {str(exc)[:80]}); "
                    f"pass a valid {what}") from None


def read_user_json(path: str | os.PathLike, what: str, limit: int = MAX_JSON_BYTES,
                   error: type[KvcError] = KvcError) -> dict[str, Any]:
    """A JSON object from a user file, bounded and checked; any other JSON value is ``error``."""
    data = parse_json(read_user_bytes(path, what, limit, error), str(path), what, error)
    if not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {type(data).__name__}, not an object; pass a valid {what}")
    return data


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n} bytes"
