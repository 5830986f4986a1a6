"""Scoring one chunk of NDJSON lines: the work both engines run, one plugin per process.

Each line is one input on its own budget (as one ``predict`` call would be) and all lines of the chunk run
through the model together (:meth:`~fhirplug.Plugin.predict_batch`: length-bucketed batches across notes).
Each line with predictions gets its own resources and its own Provenance (entity: the note; targets: its
predictions), so what is written for a note never depends on how the input was chunked, which engine ran or how
many workers there were. A line with problems gets one OperationOutcome naming ``file:line``.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from fhirplug._budget import Budget
from fhirplug.fhir.extract import has_text_elements
from fhirplug.fhir.outcome import Issue
from fhirplug.fhir.reader import read_fhir
from fhirplug.fhir.writer import build_resources, to_ndjson
from fhirplug.plugin import Plugin, load_plugin
from fhirplug.predictions import TextSource

__all__ = ["ChunkResult", "PluginSpec", "plugin_for", "score_lines"]

#: Outputs that are the same resource for every note (the Device and its model card): written once per run.
SHARED_TYPES = frozenset({"Device", "DocumentReference"})
_OUTCOME_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://fhirplug.dev/fhir/bulk/OperationOutcome")


@dataclass(frozen=True)
class PluginSpec:
    """How every process of a run loads the plugin (picklable: sent to worker processes and Spark executors)."""

    path: str
    trusted_keys: tuple[str, ...] = ()
    allow_unsigned: bool = False
    provider: str = "auto"
    variant: str = "auto"
    threads: int | None = None
    budget: Budget | None = None
    #: ``Plugin.evidence_segments`` (None: the plugin's default, 8 occluded sentences per predicted note).
    evidence_segments: int | None = None

    def load(self) -> Plugin:
        return load_plugin(
            self.path,
            trusted_keys=self.trusted_keys,
            allow_unsigned=self.allow_unsigned,
            provider=self.provider,
            variant=self.variant,
            threads=self.threads,
            budget=self.budget,
            evidence_segments=self.evidence_segments,
        )


_LOADED: dict[PluginSpec, Plugin] = {}


def plugin_for(spec: PluginSpec) -> Plugin:
    """The process's plugin for ``spec``, loaded and verified on first use."""
    if spec not in _LOADED:
        _LOADED[spec] = spec.load()
    return _LOADED[spec]


@dataclass
class ChunkResult:
    """What a chunk gave: output lines (``Type<TAB>json``) in input order and the chunk's counts."""

    lines: list[bytes]
    counts: dict[str, Any]


def _outcome(name: str, issues: list[Issue]) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "id": str(uuid.uuid5(_OUTCOME_NAMESPACE, name)),
        "issue": [i.to_fhir() for i in issues],
    }


def _line(resource_type: str, text: str) -> bytes:
    return f"{resource_type}\t{text}".encode()


def _peek(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # the reader says precisely what is wrong with it (nesting too deep included)
    return value if isinstance(value, dict) else None


def score_lines(plugin: Plugin, label: str, lines: list[tuple[int, bytes | None]], recorded: datetime) -> ChunkResult:
    """Score the lines of one chunk (``(line number, line or None when it was over the byte limit)``).

    A resource of a type the plugin does not read is counted in ``skipped``, one of a type it reads that has no
    element text is read from (a coded Condition, a numeric Observation) in ``no_text``: neither is an error in a
    Bulk Data export, where most resources are of that kind.
    """
    accepted = plugin.manifest.inputs.resource_types
    skipped: Counter[str] = Counter()
    no_text: Counter[str] = Counter()
    reads: list[tuple[str, list[TextSource], list[Issue]]] = []
    for number, raw in lines:
        name = f"{label}:{number}"
        if raw is None:
            limit = plugin.budget.max_request_bytes
            why = f"the line is longer than {limit:,} bytes (max_request_bytes); it was not read"
            reads.append((name, [], [Issue("error", "too-costly", why, (), name)]))
            continue
        peeked = _peek(raw)
        kind = peeked.get("resourceType") if peeked is not None else None
        if isinstance(kind, str) and "contained" not in (peeked or {}):
            if kind not in accepted and kind != "Bundle":
                skipped[kind] += 1
                continue
            if kind in accepted and peeked is not None and not has_text_elements(peeked):
                no_text[kind] += 1
                continue
        try:
            read = read_fhir(
                raw,
                resource_types=accepted,
                max_chars=plugin.max_chars,
                source_name=name,
                max_total_chars=plugin.budget.max_input_chars,
            )
        except Exception as exc:  # the reader reports problems as issues; should one escape, it is this line's
            message = f"the line could not be read: {type(exc).__name__}: {exc}"[:300]
            reads.append((name, [], [Issue("error", "exception", message, (), name)]))
            continue
        reads.append((name, list(read.sources), [i for i in read.issues if i.severity != "information"]))
    batch = plugin.predict_batch([s for _, s, _ in reads], names=[[n] * len(s) for n, s, _ in reads])
    out: list[bytes] = []
    seen: set[tuple[str, str]] = set()
    types: Counter[str] = Counter()
    notes = predictions = bad = 0
    for (name, sources, issues), (predicted, more) in zip(reads, batch, strict=True):
        notes += len(sources)
        predictions += len(predicted)
        found = issues + [i for i in more if i.severity != "information"]
        for resource in build_resources(predicted, sources, plugin.model_info, recorded=recorded) if predicted else []:
            key = (resource["resourceType"], resource["id"])
            if key[0] in SHARED_TYPES:  # the Device and the card: once per chunk (the merge keeps one per run)
                if key in seen:
                    continue
                seen.add(key)
            warnings: list[Issue] = []
            text = to_ndjson([resource], warnings=warnings).rstrip("\n")
            found.extend(replace(w, source=w.source or name) for w in warnings)
            out.append(_line(key[0], text))
            types[key[0]] += 1
        if found:
            bad += any(i.is_error for i in found)
            out.append(
                _line("OperationOutcome", json.dumps(_outcome(name, found), ensure_ascii=False, separators=(",", ":")))
            )
    counts = {
        "lines": len(lines),
        "notes": notes,
        "predictions": predictions,
        "error_lines": bad,
        "skipped": dict(sorted(skipped.items())),
        "no_text": dict(sorted(no_text.items())),
    }
    return ChunkResult(out, counts)
