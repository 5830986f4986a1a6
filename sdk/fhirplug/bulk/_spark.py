"""The Spark engine (``[spark]`` extra): the same chunks scored by :func:`~fhirplug.bulk._score.score_lines` on
executors, through ``mapInArrow``.

The driver cuts the inputs into chunks exactly as the local engine does and sends Spark one small row per task
(a chunk of a plain NDJSON file, which an executor seeks to; every pending chunk of a gzip file, which it reads
through). Each Python worker loads and verifies the plugin once and keeps it; each task commits its chunks' part
files into ``DIR/.fhirplug-score/chunks`` and returns only their counts as Arrow batches. The driver journals
parts as they appear and makes the outputs as the local engine does, so both engines write the same bytes.

Inputs, the plugin bundle and ``--out`` must be at paths every executor can read and write: any path in
``local[N]``; on a cluster, a shared file system (NFS, a mounted volume) and the bundle shipped with
``--archives`` or installed on every node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from fhirplug.bulk._inputs import Chunk, InputFile, iter_chunks
from fhirplug.bulk._journal import RunState, write_part
from fhirplug.bulk._score import PluginSpec, plugin_for, score_lines
from fhirplug.errors import FhirplugError, MissingExtraError

__all__ = ["run_spark"]

Done = Callable[[int, int, dict[str, Any]], None]

_TASKS = "file long, path string, label string, gz boolean, chunks string"
_RESULTS = "file long, chunk long, counts string"
_POLL_S = 0.5
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


def _score_partition(
    batches: Iterator[Any], spec: PluginSpec, chunks_dir: str, recorded: str, limit: int
) -> Iterator[Any]:
    """mapInArrow's function, on an executor: score each task's chunks, commit their parts, yield their counts."""
    import pyarrow as pa

    plugin = plugin_for(spec)
    when = datetime.fromisoformat(recorded)
    for batch in batches:
        for task in batch.to_pylist():
            file = InputFile(Path(task["path"]), task["label"], None, True, gz=task["gz"])
            wanted = [Chunk(*c) for c in json.loads(task["chunks"])]
            for chunk, lines in iter_chunks(file, wanted, limit):
                result = score_lines(plugin, file.label, lines, when)
                write_part(Path(chunks_dir), task["file"], chunk.index, result.counts, result.lines)
                row = {"file": task["file"], "chunk": chunk.index, "counts": json.dumps(result.counts)}
                yield pa.RecordBatch.from_pylist([row])


def _session(spark: Any, master: str | None) -> tuple[Any, bool]:
    """The session to use, and whether this call started it (and so stops it)."""
    if spark is not None:
        return spark, False
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and master is None:
        return active, False
    builder = SparkSession.builder.appName("fhirplug-score").config("spark.ui.showConsoleProgress", "false")
    if master is not None:
        builder = builder.master(master)
    # Executors start their own Python: by default the one running this (where fhirplug is installed). A local
    # SparkContext reads PYSPARK_PYTHON, spark-submit the conf.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = builder.config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
    session = builder.getOrCreate()
    with contextlib.suppress(Exception):  # Spark Connect has no SparkContext; its logs are the server's
        session.sparkContext.setLogLevel("ERROR")
    return session, True


def run_spark(
    state: RunState,
    files: Sequence[InputFile],
    pending: Mapping[int, Sequence[Chunk]],
    spec: PluginSpec,
    *,
    limit: int,
    done: Done,
    spark: Any = None,
    master: str | None = None,
) -> None:
    """Score every pending chunk on Spark; ``done(file, chunk, counts)`` as each committed part appears.

    Raises:
        MissingExtraError: pyspark (or pyarrow) is not installed.
        FhirplugError: the Spark job failed (its first line says why).
    """
    try:
        import pyarrow  # noqa: F401  (mapInArrow's batches)
        import pyspark  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("spark", "fhirplug score --engine spark") from exc
    tasks: list[tuple[int, str, str, bool, str]] = []
    for i in sorted(pending):
        file, wanted = files[i], list(pending[i])
        if not wanted:
            continue
        rows = [[c.index, c.offset, c.first_line, c.lines] for c in wanted]
        path = str(file.path.resolve())
        if file.gz:  # one task reads the file through: a gzip stream cannot seek
            tasks.append((i, path, file.label, True, json.dumps(rows)))
        else:
            tasks.extend((i, path, file.label, False, json.dumps([row])) for row in rows)
    if not tasks:
        return
    session, started = _session(spark, master)
    spec = spec if spec.threads is not None else PluginSpec(**{**spec.__dict__, "threads": 1})  # a task per core
    try:
        frame = session.createDataFrame(tasks, _TASKS).repartition(len(tasks))
        work = partial(
            _score_partition,
            spec=spec,
            chunks_dir=str(state.chunks.resolve()),
            recorded=state.run["transactionTime"],
            limit=limit,
        )
        failure: list[BaseException] = []

        def job() -> None:
            try:
                frame.mapInArrow(work, _RESULTS).collect()
            except BaseException as exc:
                failure.append(exc)

        seen = {key for key, _ in state.new_parts(set())}  # finished before this run started
        runner = threading.Thread(target=job, name="fhirplug-spark-job", daemon=True)
        runner.start()
        while runner.is_alive():
            runner.join(_POLL_S)
            _journal_new(state, seen, done)
        _journal_new(state, seen, done)
        if failure:
            first = _reason(failure[0])
            raise FhirplugError(
                f"the Spark job failed: {first[:300]}; finished chunks are kept: re-run to resume"
            ) from failure[0]
    finally:
        if started:
            session.stop()


def _reason(exc: BaseException) -> str:
    """The line of a Spark failure that says why: the Python worker's exception, else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    return (raised[-1] if raised else lines[0] if lines else type(exc).__name__)[:300]


def _journal_new(state: RunState, seen: set[tuple[int, int]], done: Done) -> None:
    """Journal the parts executors committed since the last look (their headers hold the counts)."""
    for key, counts in state.new_parts(seen):
        seen.add(key)
        done(key[0], key[1], counts)
