"""Apache Spark: predict over a DataFrame of FHIR JSON (e.g. bulk-export NDJSON read with ``spark.read.text``).

The work is a plain partition function, :func:`predict_rows`, so it runs (and is tested) without Spark; Spark only
distributes it. Each executor process loads and verifies the plugin once (cached by path and options), reads the
partition's FHIR as the runtime does, and predicts in chunks so batching and length bucketing apply. Output: one
row per coded prediction, plus one row per input problem (``severity``/``diagnostics`` set, ``code`` null) — a
bad record never stops the partition, and is reported next to the good ones.

    from fhirplug.spark import predict_dataframe
    notes = spark.read.text("DocumentReference.ndjson")          # column "value": one resource per line
    codes = predict_dataframe(notes, "plugins/medical-abstracts-mesh/bundle", allow_unsigned=True)

Needs the ``[spark]`` extra (pyspark) for :func:`predict_dataframe`; :func:`predict_rows` needs nothing more than
the runtime.

For whole Bulk Data exports written back as FHIR NDJSON (per-type files, OperationOutcome per bad line, a
manifest, resumable), use :func:`fhirplug.bulk.score` / ``fhirplug score --engine spark`` instead: the same
scoring on executors through ``mapInArrow``, with output identical to the local engine's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

from fhirplug._budget import Budget
from fhirplug.errors import MissingExtraError, UsageError
from fhirplug.fhir.outcome import Issue
from fhirplug.plugin import Plugin, load_plugin
from fhirplug.predictions import TextSource

__all__ = ["OUTPUT_SCHEMA", "predict_dataframe", "predict_rows"]

#: The output rows' Spark schema (DDL). ``key``: the input row's key column (or its index in the partition).
OUTPUT_SCHEMA = (
    "key string, reference string, element string, system string, code string, display string, "
    "probability double, start int, end int, snippet string, severity string, issue_code string, diagnostics string"
)
_FIELDS = [part.strip().split(" ")[0] for part in OUTPUT_SCHEMA.split(",")]


@functools.lru_cache(maxsize=4)
def _plugin(
    path: str,
    allow_unsigned: bool,
    trusted_keys: tuple[str, ...],
    variant: str,
    threads: int | None,
    budget: Budget | None = None,
) -> Plugin:
    return load_plugin(
        path, allow_unsigned=allow_unsigned, trusted_keys=trusted_keys, variant=variant, threads=threads, budget=budget
    )


def predict_rows(
    rows: Iterable[tuple[Any, str | bytes | None]],
    plugin: str,
    *,
    allow_unsigned: bool = False,
    trusted_keys: tuple[str, ...] = (),
    variant: str = "auto",
    threads: int | None = None,
    chunk: int = 256,
    budget: Budget | None = None,
) -> Iterator[dict[str, Any]]:
    """Predict ``(key, FHIR JSON)`` rows; yield one dict per prediction and one per input problem.

    Args:
        rows: the key (any string the caller joins back on) and the FHIR JSON text of one resource, Bundle or
            NDJSON chunk; a None or empty text is reported as a problem.
        plugin: a bundle path or an installed plugin's name (loaded once per process).
        chunk: rows read before each model run (bigger: better batching, more memory).
        budget: the plugin's :class:`~fhirplug.Budget`, held per chunk; texts past it are reported as problem
            rows (``issue_code`` ``too-costly``) and the rest predicted.
    """
    from fhirplug.fhir.reader import read_fhir

    loaded = _plugin(plugin, allow_unsigned, tuple(trusted_keys), variant, threads, budget)
    types = loaded.manifest.inputs.resource_types
    pending: list[tuple[str, TextSource]] = []
    problems: list[tuple[str, Issue]] = []

    def flush() -> Iterator[dict[str, Any]]:
        keys = {id(source): key for key, source in pending}
        left_out: list[Issue] = []
        predictions = loaded.predict_sources([s for _, s in pending], issues=left_out, names=[k for k, _ in pending])
        problems.extend((issue.source or "", issue) for issue in left_out)
        for p in predictions:
            yield _row(
                key=keys.get(id(p.source), ""),
                reference=p.evidence.reference,
                element=p.evidence.element,
                system=p.system,
                code=p.code or None,
                display=p.display,
                probability=float(p.probability),
                start=p.evidence.start,
                end=p.evidence.end,
                snippet=p.evidence.snippet,
            )
        for key, issue in problems:
            yield _row(
                key=key,
                severity=issue.severity,
                issue_code=issue.code,
                diagnostics=issue.diagnostics,
                element=", ".join(issue.expression) or None,
            )
        pending.clear()
        problems.clear()

    for index, (given, text) in enumerate(rows):
        key = str(given) if given is not None else str(index)
        if not text:
            problems.append((key, Issue("error", "required", "the row holds no FHIR JSON")))
        else:
            try:
                read = read_fhir(text, resource_types=types, max_chars=loaded.max_chars, source_name=f"row {key}")
            except Exception as exc:  # one bad row never stops the partition
                problems.append((key, Issue("error", "exception", f"the row could not be read: {exc}"[:300])))
            else:
                pending.extend((key, source) for source in read.sources)
                problems.extend((key, issue) for issue in read.issues if issue.severity != "information")
        if len(pending) + len(problems) >= chunk:
            yield from flush()
    if pending or problems:
        yield from flush()


def _row(**values: Any) -> dict[str, Any]:
    return {name: values.get(name) for name in _FIELDS}


def predict_dataframe(
    df: Any,
    plugin: str,
    *,
    text_column: str = "value",
    key_column: str | None = None,
    allow_unsigned: bool = False,
    trusted_keys: tuple[str, ...] = (),
    variant: str = "auto",
    threads: int | None = 1,
    chunk: int = 256,
    budget: Budget | None = None,
) -> Any:
    """A DataFrame of predictions (schema :data:`OUTPUT_SCHEMA`) for ``df[text_column]``'s FHIR JSON.

    ``threads`` defaults to 1: Spark already runs one task per core. ``key_column`` (default: none, the row's
    index within its partition) is copied to ``key`` so results join back to the input; a row whose key is null
    is not predicted, and gets a problem row (``issue_code`` ``required``, ``key`` null).

    Raises:
        MissingExtraError: pyspark (or pyarrow) is not installed.
        UsageError: ``df`` is not a DataFrame, a column name is empty, ``chunk`` is not a positive integer.
    """
    try:
        import pyarrow  # noqa: F401  (mapInArrow's batches)
        from pyspark.sql import DataFrame
    except ImportError as exc:
        raise MissingExtraError("spark", "fhirplug.spark.predict_dataframe") from exc
    if not isinstance(df, DataFrame):  # a Spark Connect DataFrame is one too
        raise UsageError(f"df must be a pyspark DataFrame, not {type(df).__name__}")
    for name, column in (("text_column", text_column), ("key_column", key_column)):
        if column is not None and (not isinstance(column, str) or not column):
            raise UsageError(f"{name} must be a column name, got {column!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise UsageError(f"chunk must be an integer ≥ 1, got {chunk!r}")
    columns = [key_column, text_column] if key_column is not None else [text_column]
    options = {
        "allow_unsigned": allow_unsigned,
        "trusted_keys": tuple(trusted_keys),
        "variant": variant,
        "threads": threads,
        "chunk": chunk,
        "budget": budget,
    }
    # mapInArrow, not RDD.mapPartitions: DataFrame calls only, so the same code runs on Spark Connect.
    return df.select(*columns).mapInArrow(
        functools.partial(_arrow_partition, plugin=plugin, keyed=key_column is not None, options=options),
        OUTPUT_SCHEMA,
    )


def _arrow_partition(batches: Iterator[Any], plugin: str, keyed: bool, options: dict[str, Any]) -> Iterator[Any]:
    """mapInArrow's function, on an executor: the partition's rows through :func:`predict_rows`, as Arrow."""
    import pyarrow as pa

    types = {"string": pa.string(), "double": pa.float64(), "int": pa.int32()}
    schema = pa.schema([(name, types[kind]) for name, kind in (f.split() for f in OUTPUT_SCHEMA.split(","))])

    chunk = options["chunk"]
    unkeyed: list[dict[str, Any]] = []  # keyed rows whose key is null: reported, never predicted

    def pairs() -> Iterator[tuple[Any, Any]]:
        for batch in batches:
            for start in range(0, batch.num_rows, chunk):  # a chunk of rows in Python at a time, not the batch
                piece = batch.slice(start, chunk)
                for row in zip(*(column.to_pylist() for column in piece.columns), strict=True):
                    if not keyed:
                        yield None, row[0]
                    elif row[0] is None:
                        # Its index would stand in for the key and could equal another row's real key: the
                        # predictions would join to the wrong record.
                        why = "the row's key column is null: it was not predicted (its results could not be joined)"
                        unkeyed.append(_row(severity="error", issue_code="required", diagnostics=why))
                    else:
                        yield row[0], row[1]

    out: list[dict[str, Any]] = []
    for row in predict_rows(pairs(), plugin, **options):
        out += [*unkeyed, row]
        unkeyed.clear()
        if len(out) >= chunk:
            yield pa.RecordBatch.from_pylist(out, schema=schema)
            out = []
    out += unkeyed
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=schema)
