"""Reading a bundle directory without trusting it: only regular files, never blocking, never following a link.

A bundle comes from somewhere else, so its directory is hostile input. :class:`BundleDir` opens the bundle
directory once and walks it through directory file descriptors (``os.scandir(fd)``, ``lstat`` semantics), so
a name is looked up relative to the directory that was checked, not re-resolved from a path that may have been
swapped since. Every file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink fails to open, a FIFO opens
without waiting for a writer), ``fstat``-ed, and read only if it is a regular file of the size the walk saw:
a FIFO, a device, a socket or a file swapped for a link between the walk and the read is refused by name,
never read and never waited on.

Also here: :func:`load_json`, JSON parsing with limits (nesting depth, integer digits, duplicate keys, no
NaN/Infinity), so a hostile manifest or task file is an error of the caller's choosing, not a
``RecursionError`` or a ``ValueError`` about Python's integer-string limit.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fhirplug.errors import FhirplugError, IntegrityError

__all__ = [
    "MAX_DIRS",
    "MAX_DIR_DEPTH",
    "MAX_ENTRIES",
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "BundleDir",
    "Entry",
    "load_json",
]

#: Deepest nesting of arrays and objects a bundle JSON file may have (the manifest needs 5).
MAX_JSON_DEPTH = 64
#: Most digits an integer in a bundle JSON file may have (an int64 has 19).
MAX_INT_DIGITS = 20
#: A bundle is a handful of files; these bound what a hostile directory tree can make the walk do.
MAX_ENTRIES = 10_000
MAX_DIR_DEPTH = 8
#: Each directory holds a descriptor open while the bundle is read.
MAX_DIRS = 32
#: Longest float literal (Python's repr of a float is at most 24 characters).
_MAX_FLOAT_CHARS = 64

_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A JSON string (possessive, so a hostile string cannot make it backtrack) or a bracket.
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


@dataclass(frozen=True)
class Entry:
    """One thing found in the bundle directory: its path relative to the bundle, what it is, its size."""

    name: str
    kind: str
    size: int


class BundleDir:
    """An opened bundle directory. Use as a context manager; it holds directory descriptors until closed.

    Args:
        root: the bundle directory (it may itself be reached through a link: the caller named it).
        error: the error raised for an unreadable directory.

    Raises:
        ``error``: ``root`` is not a directory or cannot be opened.
    """

    def __init__(self, root: Path, error: type[FhirplugError]) -> None:
        self.root = root
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise error(f"{root}: not a plugin bundle directory (it does not exist or is a file)") from exc
        #: Directory descriptors by bundle-relative path ("" is the root).
        self._dirs: dict[str, int] = {"": fd}
        self._entries: dict[str, Entry] | None = None

    def __enter__(self) -> BundleDir:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def entries(self) -> dict[str, Entry]:
        """Everything in the bundle, walked once without following links: regular files, directories,
        links and special files, by bundle-relative POSIX path."""
        if self._entries is None:
            found: dict[str, Entry] = {}
            self._walk("", found)
            self._entries = found
        return self._entries

    def _walk(self, prefix: str, found: dict[str, Entry]) -> None:
        if prefix.count("/") + 1 > MAX_DIR_DEPTH:
            raise IntegrityError(f"{self.root / prefix}: directories nested deeper than {MAX_DIR_DEPTH} levels")
        with os.scandir(self._dirs[prefix]) as listing:
            items = sorted(listing, key=lambda e: e.name)
        for item in items:
            name = f"{prefix}/{item.name}" if prefix else item.name
            if len(found) >= MAX_ENTRIES:
                raise IntegrityError(f"{self.root}: more than {MAX_ENTRIES} entries; this is not a plugin bundle")
            try:
                info = item.stat(follow_symlinks=False)
            except OSError as exc:
                raise IntegrityError(f"{self.root / name}: cannot be examined ({exc.strerror})") from exc
            kind = _kind(info.st_mode)
            found[name] = Entry(name, kind, info.st_size)
            if kind == "directory":
                if len(self._dirs) > MAX_DIRS:
                    raise IntegrityError(f"{self.root}: more than {MAX_DIRS} directories; this is not a plugin bundle")
                try:
                    self._dirs[name] = os.open(item.name, _OPEN_DIR, dir_fd=self._dirs[prefix])
                except OSError as exc:
                    raise IntegrityError(
                        f"{self.root / name}: the directory changed while it was read ({exc.strerror})"
                    ) from exc
                self._walk(name, found)

    def read(self, name: str, error: type[FhirplugError], *, max_bytes: int | None = None) -> bytes | None:
        """The bytes of the regular file ``name``, or None when there is no such entry.

        The file is opened relative to its (already opened) directory with ``O_NOFOLLOW | O_NONBLOCK``; the
        open descriptor must be a regular file of the size the walk recorded (when it recorded one), at most
        ``max_bytes``, and exactly that many bytes are read.

        Raises:
            ``error``: ``name`` is a link, a directory, a FIFO, a device or a socket, changed size, is over
            ``max_bytes`` or cannot be read. The message names the file.
        """
        where = self.root / name
        parent, _, base = name.rpartition("/")
        seen = self.entries().get(name)
        if seen is None:
            return None
        if seen.kind != "file":
            raise error(f"{where}: is a {seen.kind}, not a regular file; a bundle holds regular files only")
        dir_fd = self._dirs.get(parent)
        if dir_fd is None:
            raise error(f"{where}: its directory is not part of the bundle")
        try:
            fd = os.open(base, _OPEN_FILE, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise error(f"{where}: was replaced by a symbolic link while the bundle was read") from exc
            raise error(f"{where}: cannot be opened ({exc.strerror})") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise error(f"{where}: is a {_kind(info.st_mode)}, not a regular file (it was swapped)")
            if info.st_size != seen.size:
                raise error(
                    f"{where}: its size changed from {seen.size} to {info.st_size} bytes while the bundle was read"
                )
            if max_bytes is not None and info.st_size > max_bytes:
                raise error(f"{where}: is {info.st_size} bytes, more than the {max_bytes} allowed")
            return _read_exactly(fd, info.st_size, where, error)
        finally:
            os.close(fd)


def _read_exactly(fd: int, size: int, where: Path, error: type[FhirplugError]) -> bytes:
    # The descriptor is non-blocking, but a regular file never returns EAGAIN: a short read means it shrank.
    chunks = []
    left = size
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 30))  # one read for any real bundle file: no copy to join
            if not chunk:
                raise error(f"{where}: ended after {size - left} of its {size} bytes (it changed while read)")
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise error(f"{where}: cannot be read ({exc.strerror})") from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # b"" for an empty file


class _Limit(Exception):
    """Raised from inside json.loads hooks; becomes the caller's error class."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Limit(f"duplicate key {key[:80]!r} (JSON keys must be unique; which one counts is ambiguous)")
        out[key] = value
    return out


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Limit(f"an integer of {digits} digits; at most {MAX_INT_DIGITS} are allowed")
    return int(text)


def _float(text: str) -> float:
    if len(text) > _MAX_FLOAT_CHARS:
        raise _Limit(f"a number written with {len(text)} characters; at most {_MAX_FLOAT_CHARS} are allowed")
    value = float(text)
    if not math.isfinite(value):
        raise _Limit(f"the number {text[:24]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise _Limit(f"{text} is not JSON (NaN and Infinity are not allowed)")


def _depth(data: bytes) -> int:
    deepest = depth = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def load_json(
    data: bytes | str, source: str | Path, error: type[FhirplugError], *, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse UTF-8 JSON with limits: nesting depth, integer digits, unique keys, no NaN or Infinity.

    Raises:
        ``error``: the bytes are not UTF-8, not JSON, or break a limit; the message names ``source``.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Counted before parsing: json's recursive parser would otherwise hit Python's recursion limit first.
    deepest = _depth(raw)
    if deepest > max_depth:
        raise error(f"{source}: JSON nested {deepest} levels deep; at most {max_depth} are allowed")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _Limit as exc:
        raise error(f"{source}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON ({exc})") from exc
    except (RecursionError, ValueError) as exc:  # belt and braces: the depth scan should have caught it
        raise error(f"{source}: not usable JSON ({type(exc).__name__})") from exc
