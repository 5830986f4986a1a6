"""Bulk scoring: a plugin over FHIR Bulk Data NDJSON, resumable, on local worker processes or Apache Spark.

>>> from fhirplug.bulk import score
>>> result = score("plugins/medical-abstracts-mesh/bundle", ["export/"], "scored/", workers=2)
>>> result.counts["RiskAssessment"], result.error_lines

The output folder is laid out as a Bulk Data export is: ``RiskAssessment.ndjson`` (or ``Condition.ndjson``, …),
``Device.ndjson``, ``DocumentReference.ndjson`` (the model card), ``Provenance.ndjson`` (one per note with
predictions), ``OperationOutcome.ndjson`` (one per input line with problems, naming ``file:line``) and
``manifest.json`` (counts per type, the plugin's identity and manifest hash, every input with its sha256, and
``transactionTime``). A run killed at any point and started again with the same arguments resumes from its
journal and ends with the same bytes as a run that never stopped; so do ``workers=1`` and ``workers=N``, and the
local and Spark engines. Memory does not grow with the input: lines are read a chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fhirplug._budget import DEFAULT_BUDGET, Budget
from fhirplug._explain import EVIDENCE_SEGMENTS
from fhirplug.bulk._inputs import InputFile, discover, hash_and_chunk
from fhirplug.bulk._journal import RunState
from fhirplug.bulk._progress import Progress
from fhirplug.bulk._score import SHARED_TYPES, PluginSpec
from fhirplug.errors import UsageError

__all__ = ["DEFAULT_CHUNK_LINES", "ScoreResult", "score"]

#: Lines per chunk: the unit of work, of memory in flight and of what a killed run redoes.
DEFAULT_CHUNK_LINES = 500
_FORMAT = 1


@dataclass
class ScoreResult:
    """What a bulk run wrote.

    Attributes:
        out: the output folder.
        manifest: the output manifest (as written to ``out/manifest.json``).
        counts: lines written per output type (OperationOutcome included).
        lines, notes, predictions: input lines read, texts scored, predictions made.
        error_lines: input lines with at least one error (each has an OperationOutcome).
        skipped: resources of types the plugin does not read, by type (not an error).
        no_text: resources of a type it reads that carry no text to read (a coded Condition), by type.
        resumed_chunks: chunks a previous, interrupted run had finished (0: a fresh run).
        already_complete: the folder held this run, finished; nothing was redone.
    """

    out: Path
    manifest: dict[str, Any]
    counts: dict[str, int]
    lines: int
    notes: int
    predictions: int
    error_lines: int
    skipped: dict[str, int] = field(default_factory=dict)
    no_text: dict[str, int] = field(default_factory=dict)
    resumed_chunks: int = 0
    already_complete: bool = False

    @classmethod
    def _from(cls, out: Path, manifest: dict[str, Any], **extra: Any) -> ScoreResult:
        about = manifest["extension"]["fhirplug"]
        counts = {o["type"]: o["count"] for o in manifest["output"] + manifest["error"]}
        return cls(
            out,
            manifest,
            counts,
            about["lines"],
            about["notes"],
            about["predictions"],
            about["errorLines"],
            about["skipped"],
            about["noText"],
            **extra,
        )


def _check(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


def _effective_segments(spec: PluginSpec) -> int:
    """What the plugin will occlude: its default when not given, and 0 for every value that turns it off."""
    value = EVIDENCE_SEGMENTS if spec.evidence_segments is None else spec.evidence_segments
    return value if value >= 2 else 0


def _run_key(
    plugin_sha: str, variant: str, spec: PluginSpec, budget: Budget, chunk_lines: int, files: list[InputFile]
) -> str:
    """The run's identity: what the outputs depend on (never the engine or the worker count)."""
    identity = {
        "format": _FORMAT,
        "plugin": plugin_sha,
        "variant": variant,
        "provider": spec.provider,
        "budget": asdict(budget),
        "chunk_lines": chunk_lines,
        # Evidence offsets are part of the output: keyed on the effective setting (below 2 = no occlusion), left
        # out at today's default so that runs started before the option existed still resume.
        **({"evidence_segments": segments} if (segments := _effective_segments(spec)) != EVIDENCE_SEGMENTS else {}),
        "inputs": [[f.label, f.sha256] for f in files],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def score(
    plugin: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    engine: Literal["local", "spark"] = "local",
    workers: int = 1,
    trusted_keys: Sequence[str | os.PathLike[str]] = (),
    allow_unsigned: bool = False,
    provider: str = "auto",
    variant: str = "auto",
    threads: int | None = None,
    budget: Budget | None = None,
    chunk_lines: int = DEFAULT_CHUNK_LINES,
    transaction_time: datetime | None = None,
    restart: bool = False,
    progress: bool | None = None,
    spark: Any = None,
    spark_master: str | None = None,
    evidence_segments: int | None = None,
) -> ScoreResult:
    """Score every note of NDJSON ``inputs`` into the Bulk-Data-shaped folder ``out`` (resuming a run found there).

    Args:
        plugin: a bundle path or a discovered plugin's name; verified as ``load_plugin`` does (by the main process
            and again by each worker).
        inputs: ``.ndjson`` / ``.ndjson.gz`` files, folders of them, Bulk Data export folders (with their
            ``manifest.json``) or export manifests.
        out: the output folder: new, empty, or one holding this same run (which is resumed, or left as it is if
            finished).
        engine: ``local`` (worker processes) or ``spark`` (the ``[spark]`` extra).
        workers: local worker processes (each loads the plugin; the cores are shared among them); for Spark
            without ``spark``/``spark_master``: ``local[workers]``.
        budget: held per input line (one line is one input, as one ``predict`` call).
        chunk_lines: lines per chunk (part of the run's identity: resume with the same value).
        transaction_time: the run's time, written into every resource (``recorded``, ``occurrenceDateTime`` …) and
            the manifest; default: when the run first started (kept in the journal, so a resumed run keeps it).
        restart: discard a different (or finished) run found in ``out`` instead of refusing.
        progress: a progress bar (tqdm on a terminal) or periodic line on stderr; None: only on a terminal.
        spark: a SparkSession to use (e.g. under ``spark-submit``; Spark Connect works too).
        spark_master: the master of a session started here (default: the active session, else ``local[workers]``).
        evidence_segments: text classification: sentences occluded per predicted note to find its evidence
            (``Plugin.evidence_segments``; None: the plugin's default, 8); 0 or 1: no occlusion, the evidence is
            the model window — one model pass per note instead of up to nine. Part of the run's identity.

    Raises:
        UsageError: bad arguments, a missing or unreadable input, an unusable ``out``.
        PluginError, SignatureError, …: the plugin cannot be loaded or trusted (before any input is read).
        MissingExtraError: ``engine="spark"`` without pyspark.
    """
    from fhirplug.bundle import verify_bundle
    from fhirplug.registry import resolve_plugin
    from fhirplug.runtime import choose_variant

    if engine not in ("local", "spark"):
        raise UsageError(f"engine must be 'local' or 'spark', got {engine!r}")
    workers = _check(workers, "workers")
    chunk_lines = _check(chunk_lines, "chunk_lines")
    if budget is not None and not isinstance(budget, Budget):
        raise UsageError(f"budget must be a fhirplug Budget, got {type(budget).__name__}")
    budget = budget or DEFAULT_BUDGET
    if isinstance(inputs, str | os.PathLike):
        raise UsageError("inputs must be a sequence of paths, not one path: score(plugin, [path], out)")
    path = resolve_plugin(plugin)
    bundle = verify_bundle(path, trusted_keys=[Path(k) for k in trusted_keys], allow_unsigned=allow_unsigned)
    choice = choose_variant(bundle.manifest, provider, variant)
    accepted = bundle.manifest.inputs.resource_types
    if evidence_segments is not None:
        evidence_segments = _check(evidence_segments, "evidence_segments", minimum=0)
    spec = PluginSpec(
        str(path),
        tuple(str(k) for k in trusted_keys),
        allow_unsigned,
        provider,
        variant,
        threads,
        budget,
        evidence_segments,
    )

    files = discover([str(i) for i in inputs], accepted)
    for file in files:
        hash_and_chunk(file, chunk_lines, budget.max_request_bytes)
    key = _run_key(bundle.manifest_sha256, choice.variant.precision, spec, budget, chunk_lines, files)
    try:
        state = RunState.open(Path(out), key, transaction_time, restart)
    except OSError as exc:  # a read-only or full folder, a file where the state folder belongs …
        raise UsageError(f"--out {out}: cannot be written ({exc.strerror or exc})") from exc
    try:
        return _run(
            state, bundle, choice.variant.precision, spec, files, engine, workers, progress, spark, spark_master
        )
    except OSError as exc:  # a full disk, a folder made read-only, an input deleted mid-run …
        where = f" ({exc.filename})" if exc.filename else ""
        raise UsageError(
            f"--out {out}: the run stopped on an I/O error: {exc.strerror or exc}{where}; the chunks finished so "
            "far are kept: fix it and re-run the same command to resume"
        ) from exc
    finally:
        state.close()


def _run(
    state: RunState,
    bundle: Any,
    precision: str,
    spec: PluginSpec,
    files: list[InputFile],
    engine: str,
    workers: int,
    progress: bool | None,
    spark: Any,
    spark_master: str | None,
) -> ScoreResult:
    """The run once its state is open: score the pending chunks, merge, write the manifest."""
    budget = spec.budget or DEFAULT_BUDGET
    if state.complete:
        manifest = json.loads((state.out / "manifest.json").read_bytes())
        return ScoreResult._from(state.out, manifest, already_complete=True)
    finished = state.finished()
    pending = {i: [c for c in f.chunks if (i, c.index) not in finished] for i, f in enumerate(files) if f.scored}
    total = sum(c.lines for i in pending for c in files[i].chunks)
    done_lines = sum(c.lines for i in pending for c in files[i].chunks if (i, c.index) in finished)
    resumed = sum(1 for i in pending for c in files[i].chunks if (i, c.index) in finished)
    show = Progress(total, done_lines, enabled=progress if progress is not None else _tty())
    sizes = {(i, c.index): c.lines for i in pending for c in files[i].chunks}

    def done(file_index: int, chunk_index: int, counts: dict[str, Any]) -> None:
        state.record(file_index, chunk_index, counts)
        finished[file_index, chunk_index] = counts
        show.update(sizes.get((file_index, chunk_index), 0), int(counts["notes"]))

    try:
        if engine == "local":
            from fhirplug.bulk._local import run_local

            run_local(state, files, pending, spec, workers=workers, limit=budget.max_request_bytes, done=done)
        else:
            from fhirplug.bulk._spark import run_spark

            master = spark_master if spark_master or spark is not None else None
            run_spark(
                state,
                files,
                pending,
                spec,
                limit=budget.max_request_bytes,
                done=done,
                spark=spark,
                master=master or (None if _active_spark() else f"local[{workers}]"),
            )
    finally:
        show.close()
    order = [(i, c.index) for i in sorted(pending) for c in files[i].chunks]
    for file in files:  # every input is still the file that was hashed (the run's identity says so)
        file.check_unchanged()
    missing = [k for k in order if k not in finished]
    if missing:
        raise UsageError(
            f"{len(missing)} chunk(s) were not scored (first: file {missing[0][0]}, chunk {missing[0][1]})"
        )
    counts = state.merge(order, SHARED_TYPES)
    manifest = _manifest(
        state,
        bundle.manifest.name,
        bundle.manifest.version,
        bundle.manifest_sha256,
        precision,
        files,
        [finished[k] for k in order],
        counts,
    )
    state.finish(manifest)
    return ScoreResult._from(state.out, manifest, resumed_chunks=resumed)


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _active_spark() -> bool:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return False
    return SparkSession.getActiveSession() is not None


def _manifest(
    state: RunState,
    name: str,
    version: str,
    manifest_sha256: str,
    variant: str,
    files: list[InputFile],
    chunk_counts: list[dict[str, Any]],
    counts: dict[str, int],
) -> dict[str, Any]:
    """The output manifest, in the shape of a Bulk Data export's (``output``/``error`` with type, url, count)."""
    skipped: Counter[str] = Counter()
    no_text: Counter[str] = Counter()
    for file in files:
        if not file.scored and file.resource_type:
            skipped[file.resource_type] += file.lines
    totals = Counter[str]()
    for chunk in chunk_counts:
        skipped.update(chunk["skipped"])
        no_text.update(chunk["no_text"])
        for field_name in ("lines", "notes", "predictions", "error_lines"):
            totals[field_name] += chunk[field_name]
    kinds = sorted(k for k in counts if k != "OperationOutcome")
    return {
        "transactionTime": state.run["transactionTime"],
        "request": f"fhirplug score {name} {version}",
        "requiresAccessToken": False,
        "output": [{"type": k, "url": f"{k}.ndjson", "count": counts[k]} for k in kinds],
        "error": (
            [{"type": "OperationOutcome", "url": "OperationOutcome.ndjson", "count": counts["OperationOutcome"]}]
            if "OperationOutcome" in counts
            else []
        ),
        "extension": {
            "fhirplug": {
                "plugin": {"name": name, "version": version, "manifestSha256": manifest_sha256, "variant": variant},
                "inputs": [
                    {
                        "file": f.label,
                        "type": f.resource_type,
                        "sha256": f.sha256,
                        "bytes": f.size,
                        "lines": f.lines,
                        "scored": f.scored,
                    }
                    for f in files
                ],
                "lines": totals["lines"] + sum(f.lines for f in files if not f.scored),
                "notes": totals["notes"],
                "predictions": totals["predictions"],
                "errorLines": totals["error_lines"],
                "skipped": dict(sorted(skipped.items())),
                "noText": dict(sorted(no_text.items())),
            }
        },
    }
