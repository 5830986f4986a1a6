"""Reading FHIR input files and streams with a byte cap, never blocking on a FIFO or a device.

``Path.read_bytes()`` waits forever for a FIFO's writer and reads ``/dev/zero`` until memory runs out; an input
given on the command line (or to ``Plugin.predict_files``) is opened non-blocking, must be a regular file, and is
read up to the budget's ``max_request_bytes`` — past that it is refused as ``too-costly`` before it is parsed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from fhirplug.fhir.outcome import Issue

__all__ = ["read_input_file", "read_input_stream"]

_CHUNK = 1 << 20


def _too_large(limit: int, name: str) -> Issue:
    return Issue(
        "error",
        "too-costly",
        f"the input is larger than {limit:,} bytes (max_request_bytes); it was not read. Split it, or raise the "
        "limit: load_plugin(..., budget=Budget(max_request_bytes=N)) or --max-request-bytes N",
        (),
        name,
    )


def _read_capped(read: BinaryIO, limit: int) -> bytes | None:
    """Up to ``limit`` bytes, or None when there are more."""
    parts: list[bytes] = []
    size = 0
    while chunk := read.read(min(_CHUNK, limit + 1 - size)):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(parts)


def read_input_file(path: str | os.PathLike[str], limit: int) -> tuple[bytes | None, Issue | None]:
    """The bytes of the regular file ``path`` (at most ``limit``), or None and the issue saying why not."""
    name = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(Path(path), flags)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return None, Issue("error", "not-found", f"cannot read the file ({why})", (), name)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a pipe, device or socket)"
            return None, Issue("error", "not-found", f"cannot read the file: it is {kind}", (), name)
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            data = _read_capped(handle, limit)
    except OSError as exc:
        return None, Issue("error", "not-found", f"cannot read the file ({exc.strerror or exc})", (), name)
    finally:
        if fd >= 0:
            os.close(fd)
    if data is None:
        return None, _too_large(limit, name)
    return data, None


def read_input_stream(stream: BinaryIO, limit: int, name: str = "<stdin>") -> tuple[bytes | None, Issue | None]:
    """At most ``limit`` bytes of ``stream`` (standard input): an endless stream stops at the cap."""
    try:
        data = _read_capped(stream, limit)
    except OSError as exc:
        return None, Issue("error", "not-found", f"cannot read the input ({exc.strerror or exc})", (), name)
    if data is None:
        return None, _too_large(limit, name)
    return data, None
