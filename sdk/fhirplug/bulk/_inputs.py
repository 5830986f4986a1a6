"""Finding the NDJSON a bulk run reads, hashing it, and cutting it into chunks of lines.

An INPUT is an NDJSON file (``.ndjson``, or gzip-compressed: recognised by its magic bytes, whatever its name), a
folder of them (``*.ndjson``, ``*.ndjson.gz``, sorted by name) or a FHIR Bulk Data export: a folder holding the
export's ``manifest.json`` (the kick-off status response, ``output[].type/url``), or that manifest file itself.
Each file is read once up front, streaming: its sha256 (of the bytes on disk), its line count and where each chunk
of lines starts. That pass is what makes a run resumable (the journal is keyed by those hashes) and it finds a
broken gzip before any work is done. Chunk boundaries depend only on the file and the chunk size, so every run,
engine and worker count cuts a file the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import unquote, urlparse

from fhirplug.errors import UsageError

__all__ = ["Chunk", "InputFile", "discover", "iter_chunks", "open_lines"]

#: A chunk also ends once it holds this many bytes, so a file of huge lines never makes a huge chunk.
CHUNK_BYTES = 16 * 1024 * 1024
_SUFFIXES = (".ndjson", ".ndjson.gz")
_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 1 << 20
_MANIFEST_BYTES = 16 * 1024 * 1024
_TYPE_WORD = re.compile(r"^[A-Z][A-Za-z]{2,63}$")


@dataclass(frozen=True)
class Chunk:
    """Lines ``first_line`` … ``first_line + lines - 1`` (1-based) of a file, starting at byte ``offset`` of its
    (decompressed) content."""

    index: int
    offset: int
    first_line: int
    lines: int


@dataclass
class InputFile:
    """One NDJSON file of the run.

    Attributes:
        path: where it is read from.
        label: how outputs and issues name it (the path as found from the INPUT given).
        resource_type: the type its name or the export manifest declares (None: not known, each line says).
        scored: False when ``resource_type`` is one the plugin does not read: the file is skipped, unparsed.
        gz: gzip-compressed.
        sha256, size: of the bytes on disk.
        lines: non-empty lines.
        chunks: the chunks of lines, in order (scored files only).
        identity: the file's device, inode, size, mtime and ctime when it was hashed: a file that differs later
            (rewritten, appended to, replaced) is refused rather than scored as bytes other than those hashed.
    """

    path: Path
    label: str
    resource_type: str | None
    scored: bool
    gz: bool = False
    sha256: str = ""
    size: int = 0
    lines: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    identity: tuple[int, ...] = ()

    def check_unchanged(self, strict: bool = True) -> None:
        """Raise UsageError when the file on disk is no longer the one that was hashed (``strict=False``: by size
        and mtime only, which another machine of a cluster sees the same)."""
        try:
            info = self.path.stat()
        except OSError as exc:
            raise UsageError(
                f"{self.label}: changed during the run ({exc.strerror or exc}); re-run to score it"
            ) from exc
        now = _identity(info)
        if self.identity and (now != self.identity if strict else now[2:4] != self.identity[2:4]):
            raise UsageError(
                f"{self.label}: changed during the run (it is not the file that was hashed); the chunks finished "
                "so far are kept, but its outputs would mix two versions: re-run the same command once it is whole"
            )


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _is_resource_type(word: str) -> bool:
    """True when fhir.resources has an R4B model module named after ``word`` (found without importing it)."""
    if not _TYPE_WORD.match(word):
        return False
    try:
        return importlib.util.find_spec(f"fhir.resources.R4B.{word.lower()}") is not None
    except (ImportError, ValueError):
        return False


def type_from_name(name: str) -> str | None:
    """The resource type a Bulk Data file name declares: ``DocumentReference.ndjson``, ``DocumentReference.002.
    ndjson.gz``, ``1.Patient.ndjson`` (bulk-data-client), ``Observation-3.ndjson``; None when none does."""
    stem = name
    for suffix in (".gz", ".ndjson", ".jsonl"):
        stem = stem.removesuffix(suffix)
    for word in re.split(r"[.\-_ ]", stem):
        if _is_resource_type(word):
            return word
    return None


def _regular(path: Path, given: str) -> os.stat_result:
    try:
        info = path.stat()
    except OSError as exc:
        raise UsageError(f"{given}: no such file or folder ({exc.strerror or exc})") from exc
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise UsageError(f"{given}: not a regular file or a folder (a pipe, device or socket is never read)")
    return info


def _read_json(path: Path, given: str) -> Any:
    """A JSON file of at most :data:`_MANIFEST_BYTES`, opened without following a link or blocking on a pipe."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"{given}: cannot read the Bulk Data export manifest ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{given}: the Bulk Data export manifest is not a regular file")
        data = handle.read(_MANIFEST_BYTES + 1)
    if len(data) > _MANIFEST_BYTES:
        raise UsageError(f"{given}: the Bulk Data export manifest is over {_MANIFEST_BYTES:,} bytes")
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise UsageError(f"{given}: the Bulk Data export manifest is nested too deeply to be a manifest") from exc
    except ValueError as exc:
        raise UsageError(f"{given}: cannot read the Bulk Data export manifest ({exc})") from exc


def _export_manifest(path: Path, given: str) -> list[tuple[Path, str | None]]:
    """The files a Bulk Data export manifest lists (``output[].url``, found beside it by file name), with types.

    The manifest is input from a server: each url's last segment must name a regular file in the manifest's own
    folder (no ``..``, no encoded ``/``, no link, pipe or device).
    """
    manifest = _read_json(path, given)
    outputs = manifest.get("output") if isinstance(manifest, dict) else None
    if not isinstance(outputs, list):
        raise UsageError(f"{given}: not a Bulk Data export manifest (expected an object with an 'output' array)")
    found: list[tuple[Path, str | None]] = []
    for i, entry in enumerate(outputs):
        url = entry.get("url") if isinstance(entry, dict) else None
        kind = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            raise UsageError(f"{given}: output[{i}] has no url")
        # A downloaded export keeps the server's file names; the URL's last segment is the local file.
        name = unquote(urlparse(url).path.rsplit("/", 1)[-1])
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise UsageError(f"{given}: output[{i}] url {url[:200]!r} does not end in a file name in the export folder")
        local = path.parent / name
        try:
            info = local.lstat()
        except OSError as exc:
            raise UsageError(
                f"{given}: output[{i}] is {url[:200]}, but {local} does not exist; download the export first"
            ) from exc
        if not stat.S_ISREG(info.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise UsageError(
                f"{given}: output[{i}] names {local}, which is {what}; an export's files are read only "
                "as regular files in its folder"
            )
        found.append((local, kind if isinstance(kind, str) and kind else None))
    return found


def _listed(given: str) -> list[tuple[Path, str | None]]:
    path = Path(given)
    info = _regular(path, given)
    if stat.S_ISDIR(info.st_mode):
        manifest = path / "manifest.json"
        if manifest.is_symlink() or manifest.exists():
            return _export_manifest(manifest, str(manifest))
        files = sorted(p for p in path.iterdir() if p.name.endswith(_SUFFIXES) and p.is_file())
        if not files:
            raise UsageError(f"{given}: the folder holds no .ndjson or .ndjson.gz file and no export manifest.json")
        return [(p, None) for p in files]
    if path.suffix == ".json" and info.st_size <= _MANIFEST_BYTES:
        try:
            head = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            head = None  # not one JSON document: read as NDJSON, whose lines say what is wrong
        if isinstance(head, dict) and isinstance(head.get("output"), list) and "transactionTime" in head:
            return _export_manifest(path, given)
    return [(path, None)]


def discover(inputs: Sequence[str], accepted: Sequence[str]) -> list[InputFile]:
    """The files the INPUTs name, in order (each once), not yet hashed.

    Raises:
        UsageError: an INPUT is missing, not a regular file or folder, or an export manifest is broken.
    """
    if not inputs:
        raise UsageError("give at least one INPUT (NDJSON file, folder, or Bulk Data export)")
    seen: set[Path] = set()
    files: list[InputFile] = []
    for given in inputs:
        for path, declared in _listed(given):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            kind = declared or type_from_name(path.name)
            files.append(InputFile(path, str(path), kind, kind is None or kind in accepted))
    return files


class _Hashing:
    """A binary reader that hashes and counts every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self.raw.readline(limit)
        self.digest.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(2) == _GZIP_MAGIC


def open_lines(path: Path, gz: bool) -> BinaryIO:
    """The file's (decompressed) content as a binary stream."""
    if gz:
        return cast(BinaryIO, gzip.open(path, "rb"))
    return path.open("rb")


def _read_line(stream: BinaryIO, limit: int) -> tuple[bytes | None, int]:
    """One line without its end: ``(line, bytes consumed)``; ``(None, n)`` for a line over ``limit`` bytes (it is
    read through in pieces, never held); ``(b"", 0)`` at the end."""
    line = stream.readline(limit + 1)
    if not line:
        return b"", 0
    consumed = len(line)
    if len(line) > limit and not line.endswith(b"\n"):
        while True:
            piece = stream.readline(_BLOCK)
            consumed += len(piece)
            if not piece or piece.endswith(b"\n"):
                return None, consumed
    return line.rstrip(b"\r\n"), consumed


def iter_lines(stream: BinaryIO, limit: int, first_line: int = 1) -> Iterator[tuple[int, bytes | None, int]]:
    """``(line number, line or None when over limit, bytes consumed)`` for every line, blank ones included."""
    number = first_line
    while True:
        line, consumed = _read_line(stream, limit)
        if consumed == 0:
            return
        yield number, line, consumed
        number += 1


def hash_and_chunk(file: InputFile, chunk_lines: int, limit: int) -> None:
    """Fill in ``file``'s hash, size, line count and chunks (one streaming read).

    Raises:
        UsageError: the file cannot be read, or is a broken gzip.
    """
    try:
        file.gz = _is_gzip(file.path)
        with file.path.open("rb") as raw:
            before = os.fstat(raw.fileno())
            if not stat.S_ISREG(before.st_mode):
                raise UsageError(f"{file.label}: not a regular file (a pipe, device or socket is never read)")
            hashing = _Hashing(raw)
            stream: Any = gzip.GzipFile(fileobj=cast(BinaryIO, hashing), mode="rb") if file.gz else hashing
            offset = 0
            current: Chunk | None = None
            chunk_bytes = 0
            for number, line, consumed in iter_lines(stream, limit):
                if current is None:
                    current = Chunk(len(file.chunks), offset, number, 0)
                offset += consumed
                chunk_bytes += consumed
                current = Chunk(current.index, current.offset, current.first_line, current.lines + 1)
                if line is None or line.strip():
                    file.lines += 1
                if current.lines >= chunk_lines or chunk_bytes >= CHUNK_BYTES:
                    file.chunks.append(current)
                    current, chunk_bytes = None, 0
            if current is not None:
                file.chunks.append(current)
            while hashing.read(_BLOCK):  # bytes after the gzip stream still belong to the file's hash
                pass
            file.identity = _identity(before)
            if _identity(os.fstat(raw.fileno())) != file.identity:
                raise UsageError(f"{file.label}: changed while it was being read; re-run once it is whole")
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"{file.label}: cannot be read ({why})") from exc
    file.sha256 = hashing.digest.hexdigest()
    file.size = hashing.size
    if not file.scored:
        file.chunks = []


def iter_chunks(
    file: InputFile, wanted: Sequence[Chunk], limit: int
) -> Iterator[tuple[Chunk, list[tuple[int, bytes | None]]]]:
    """The lines of each chunk of ``wanted`` (in file order): ``(line number, line or None when over limit)``,
    blank lines left out. A plain file seeks to each chunk; a gzip one is read through (it cannot seek)."""
    file.check_unchanged(strict=False)
    with open_lines(file.path, file.gz) as stream:
        position = 0
        for chunk in wanted:
            if not file.gz:
                stream.seek(chunk.offset)
            else:
                while position < chunk.offset:
                    skipped = stream.read(min(_BLOCK, chunk.offset - position))
                    if not skipped:
                        break
                    position += len(skipped)
            lines: list[tuple[int, bytes | None]] = []
            read = 0
            for number, line, consumed in iter_lines(stream, limit, chunk.first_line):
                read += consumed
                if line is None or line.strip():
                    lines.append((number, line))
                if number >= chunk.first_line + chunk.lines - 1:
                    break
            position = chunk.offset + read
            file.check_unchanged(strict=False)  # before a chunk of another version of the file is scored
            yield chunk, lines
