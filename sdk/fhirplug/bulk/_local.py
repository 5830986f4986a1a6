"""The local engine: N worker processes, each holding one verified plugin, fed chunks of lines in input order.

The main process reads the inputs (streaming, a chunk at a time) and keeps at most two chunks per worker in
flight, so memory does not grow with the input: a 5 GB export needs what a 50 MB one does. Workers commit each
chunk's outputs themselves (:func:`~fhirplug.bulk._journal.write_part`) and hand back only its counts, which the
main process journals. ``workers=1`` scores in the main process (no pool to start).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from fhirplug.bulk._inputs import Chunk, InputFile, iter_chunks
from fhirplug.bulk._journal import RunState, write_part
from fhirplug.bulk._score import PluginSpec, plugin_for, score_lines
from fhirplug.errors import FhirplugError

__all__ = ["run_local"]

Done = Callable[[int, int, dict[str, Any]], None]

_WORKER: dict[str, Any] = {}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _orphaned() -> None:
    """Exit when the main process dies (SIGKILL included): a pool worker would otherwise wait on its queue forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def _init(spec: PluginSpec, chunks_dir: str, recorded: datetime) -> None:
    threading.Thread(target=_orphaned, daemon=True, name="fhirplug-orphan-watch").start()
    _WORKER.update(spec=spec, chunks=Path(chunks_dir), recorded=recorded, error=None)
    try:
        plugin_for(spec)
    except FhirplugError as exc:  # reported by the first task: exceptions with odd constructors do not unpickle
        _WORKER["error"] = (exc.exit_code, str(exc))


def _work(file_index: int, chunk_index: int, label: str, lines: list[tuple[int, bytes | None]]) -> Any:
    if _WORKER["error"] is not None:
        return ("error", *_WORKER["error"])
    result = score_lines(plugin_for(_WORKER["spec"]), label, lines, _WORKER["recorded"])
    write_part(_WORKER["chunks"], file_index, chunk_index, result.counts, result.lines)
    return ("ok", file_index, chunk_index, result.counts)


def _raise(code: int, message: str) -> None:
    error = FhirplugError(message)
    error.exit_code = code
    raise error


def run_local(
    state: RunState,
    files: Sequence[InputFile],
    pending: Mapping[int, Sequence[Chunk]],
    spec: PluginSpec,
    *,
    workers: int,
    limit: int,
    done: Done,
) -> None:
    """Score every pending chunk; ``done(file, chunk, counts)`` after each one is committed."""
    recorded = state.transaction_time
    chunks = (
        (i, chunk, files[i].label, lines)
        for i in sorted(pending)
        for chunk, lines in iter_chunks(files[i], pending[i], limit)
    )
    if workers == 1:
        plugin = plugin_for(spec)
        for i, chunk, label, lines in chunks:
            result = score_lines(plugin, label, lines, recorded)
            write_part(state.chunks, i, chunk.index, result.counts, result.lines)
            done(i, chunk.index, result.counts)
        return
    # Each worker gets its share of the cores for onnxruntime, unless told otherwise.
    spec = spec if spec.threads is not None else replace(spec, threads=max(1, _cores() // workers))
    context = multiprocessing.get_context("spawn")  # no inherited locks or threads from the main process
    pool = cf.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init, initargs=(spec, str(state.chunks), recorded)
    )
    in_flight: set[cf.Future[Any]] = set()

    def collect(wait_for: int) -> None:
        nonlocal in_flight
        while len(in_flight) > wait_for:
            finished, in_flight = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                outcome = future.result()
                if outcome[0] == "error":
                    _raise(outcome[1], outcome[2])
                done(outcome[1], outcome[2], outcome[3])

    try:
        for i, chunk, label, lines in chunks:
            in_flight.add(pool.submit(_work, i, chunk.index, label, lines))
            collect(2 * workers - 1)
        collect(0)
    except cf.process.BrokenProcessPool as exc:
        raise FhirplugError(
            f"a worker process died ({exc}); the chunks finished so far are kept: re-run the same command to resume"
        ) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
