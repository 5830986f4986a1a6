"""The run's state on disk: what makes ``fhirplug score`` resumable, idempotent and safe to kill at any moment.

Layout of the output folder::

    DIR/RiskAssessment.ndjson …     the outputs, one file per resource type (written last, by atomic rename)
    DIR/OperationOutcome.ndjson     one OperationOutcome per input line with problems
    DIR/manifest.json               the output manifest (Bulk Data's shape), written after the outputs
    DIR/.fhirplug-score/run.json    the run's identity (plugin, options, every input's sha256) and transactionTime
    DIR/.fhirplug-score/journal.ndjson   one line per finished chunk, appended and fsync'ed
    DIR/.fhirplug-score/chunks/F-C.part  a finished chunk's outputs (a header line with its counts, then lines)

A chunk is finished when its part file is renamed into place (written to a temporary name first, then
``os.replace``): a chunk killed half-way leaves only a temporary file, which the next run deletes and redoes.
A part renamed but not yet journaled when the process died is recovered from its header. The outputs are made
from the parts in input order, so a run killed any number of times and re-run with the same arguments ends
with the same bytes as one that never stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhirplug.errors import UsageError

__all__ = ["RunState", "instant", "part_name", "write_atomic", "write_part"]

STATE = ".fhirplug-score"
_FORMAT = 1


def instant(moment: datetime) -> str:
    """A FHIR instant in UTC to the millisecond (naive datetimes are taken as UTC)."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds")


def part_name(file_index: int, chunk_index: int) -> str:
    return f"{file_index:05d}-{chunk_index:08d}.part"


def write_atomic(path: Path, parts: Iterable[bytes]) -> None:
    """Write ``path`` so that it is never seen half-written: a temporary file, fsync, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        for part in parts:
            handle.write(part)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_part(chunks_dir: Path, file_index: int, chunk_index: int, counts: dict[str, Any], lines: list[bytes]) -> None:
    """Commit one chunk's outputs (any process may: worker, Spark executor)."""
    header = json.dumps({"file": file_index, "chunk": chunk_index, "counts": counts}, sort_keys=True).encode()
    write_atomic(chunks_dir / part_name(file_index, chunk_index), [header, b"\n", *(line + b"\n" for line in lines)])


def _read_header(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            header = json.loads(handle.readline())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and "counts" in header else None


class RunState:
    """The state folder of one output DIR, locked for this process while it is open."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.state = out / STATE
        self.chunks = self.state / "chunks"
        self.journal = self.state / "journal.ndjson"
        self.run: dict[str, Any] = {}
        self._lock: int | None = None

    @classmethod
    def open(cls, out: Path, key: str, transaction_time: datetime | None, restart: bool) -> RunState:
        """Open (or start) the run in ``out``.

        Raises:
            UsageError: ``out`` is a file, is not empty and holds no run, holds another run (without
                ``restart``), is being written by another process, or ``transaction_time`` differs from the
                time the run started with.
        """
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: is a file, not a folder; give a folder for the outputs")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from exc
        state = cls(out)
        if not state.state.is_dir():
            if any(out.iterdir()):
                raise UsageError(
                    f"--out {out}: the folder is not empty and holds no fhirplug score run; give an empty or new folder"
                )
            state.state.mkdir(exist_ok=True)  # another run may just have made it: the lock decides
        state._take_lock()
        run = state._read_run()
        if run is not None and run.get("key") != key:
            if not restart:
                state.close()
                raise UsageError(
                    f"--out {out}: holds a run of other inputs, plugin or options; give another folder, or "
                    "--restart to discard it"
                )
            state._discard()
            run = None
        elif run is not None and restart:
            state._discard()
            run = None
        if run is None:
            run = {"format": _FORMAT, "key": key, "transactionTime": instant(transaction_time or datetime.now(UTC))}
            write_atomic(state.state / "run.json", [json.dumps(run, indent=2).encode(), b"\n"])
        elif transaction_time is not None and run["transactionTime"] != instant(transaction_time):
            state.close()
            raise UsageError(
                f"--out {out}: the run started with transactionTime {run['transactionTime']}; resume it without "
                "--transaction-time (or with that time), or --restart"
            )
        state.run = run
        state.chunks.mkdir(exist_ok=True)
        for stale in state.chunks.glob(".*.tmp"):  # chunks killed half-way: redone
            stale.unlink(missing_ok=True)
        for stale in out.glob(".manifest.json.*.tmp"):  # a manifest killed half-way: written again
            stale.unlink(missing_ok=True)
        return state

    @property
    def transaction_time(self) -> datetime:
        return datetime.fromisoformat(self.run["transactionTime"])

    def _take_lock(self) -> None:
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"--out {self.out}: another fhirplug score is writing this folder") from exc
        self._lock = fd

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the lock (so does dying, SIGKILL included)
            self._lock = None

    def _read_run(self) -> dict[str, Any] | None:
        try:
            run = json.loads((self.state / "run.json").read_bytes())
        except (OSError, ValueError):
            return None
        return run if isinstance(run, dict) else None

    def _discard(self) -> None:
        """Remove a previous run: its outputs, manifest and state (the lock file stays, held)."""
        for path in self.out.iterdir():
            if path.name.endswith(".ndjson") or path.name == "manifest.json":
                path.unlink()
        shutil.rmtree(self.chunks, ignore_errors=True)
        for name in ("journal.ndjson", "run.json"):
            (self.state / name).unlink(missing_ok=True)

    # --- the journal ---------------------------------------------------------------------------------------------

    def finished(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Counts of every finished chunk by ``(file, chunk)``: the journal, plus parts committed but not
        journaled (the process died between the rename and the journal line)."""
        done: dict[tuple[int, int], dict[str, Any]] = {}
        for entry in self._entries():
            if "file" in entry:
                done[entry["file"], entry["chunk"]] = entry["counts"]
        for part in sorted(self.chunks.glob("*.part")):
            header = _read_header(part)
            if header is not None and (header["file"], header["chunk"]) not in done:
                self.record(header["file"], header["chunk"], header["counts"])
                done[header["file"], header["chunk"]] = header["counts"]
        return done

    def new_parts(self, seen: set[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
        """``((file, chunk), counts)`` of each committed part not in ``seen`` (parts other processes commit)."""
        for part in sorted(self.chunks.glob("*.part")):
            try:
                key = tuple(int(n) for n in part.stem.split("-"))
            except ValueError:
                continue
            if len(key) != 2 or key in seen:
                continue
            header = _read_header(part)
            if header is not None:
                yield (key[0], key[1]), header["counts"]

    def _entries(self) -> Iterator[dict[str, Any]]:
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            return
        for raw in data.splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # a line torn by a kill mid-write: its part is recovered from the part's header
            if isinstance(entry, dict):
                yield entry

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True).encode() + b"\n"
        with self.journal.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def record(self, file_index: int, chunk_index: int, counts: dict[str, Any]) -> None:
        """Journal a committed chunk."""
        self._append({"file": file_index, "chunk": chunk_index, "counts": counts})

    @property
    def complete(self) -> bool:
        return any(entry.get("complete") for entry in self._entries()) and (self.out / "manifest.json").is_file()

    # --- the outputs ---------------------------------------------------------------------------------------------

    def merge(self, order: list[tuple[int, int]], shared: frozenset[str]) -> dict[str, int]:
        """Write the outputs from the parts, in ``order``: one ``Type.ndjson`` per type; returns lines per type.

        Resources of ``shared`` types (the Device, the model card) are the same in every part: each distinct
        one is written once.
        """
        work = self.state / "merge"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        handles: dict[str, Any] = {}
        counts: dict[str, int] = {}
        written: set[bytes] = set()
        try:
            for file_index, chunk_index in order:
                with (self.chunks / part_name(file_index, chunk_index)).open("rb") as part:
                    part.readline()  # the header
                    for line in part:
                        kind, _, body = line.partition(b"\t")
                        name = kind.decode()
                        if name in shared:
                            if body in written:
                                continue
                            written.add(body)
                        if name not in handles:
                            handles[name] = (work / f"{name}.ndjson").open("wb")
                            counts[name] = 0
                        handles[name].write(body)
                        counts[name] += 1
            for handle in handles.values():
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            for handle in handles.values():
                handle.close()
        for old in self.out.glob("*.ndjson"):  # from an earlier try of this run that stopped mid-merge
            if old.stem not in counts:
                old.unlink()
        for name in sorted(counts):
            os.replace(work / f"{name}.ndjson", self.out / f"{name}.ndjson")
        shutil.rmtree(work, ignore_errors=True)
        return counts

    def finish(self, manifest: dict[str, Any]) -> None:
        """Write the manifest (last: its presence says the outputs are whole), journal completion, drop parts."""
        write_atomic(self.out / "manifest.json", [json.dumps(manifest, indent=2, ensure_ascii=False).encode(), b"\n"])
        self._append({"complete": True})
        with contextlib.suppress(OSError):
            shutil.rmtree(self.chunks)
