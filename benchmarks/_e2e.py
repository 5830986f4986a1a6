"""End-to-end FHIR work, done two ways on the same input Bundle.

- fhirplug: ``plugin.predict(bundle_bytes)`` (validate FHIR, decode attachments, window every note, batch,
  run, aggregate) then ``result.to_fhir("collection")`` serialized to JSON;
- the Optimum path: ``json.loads`` + base64 decode of the same Bundle, a transformers ``pipeline`` over the
  notes (truncated to one window), then the same output resources (``fhirplug.fhir.writer``) serialized to
  JSON.

The two do different amounts of model work: fhirplug reads every token of a long note (overlapping windows),
the pipeline reads the first window and drops the rest. Both counts are reported with the timings.
"""

from __future__ import annotations

import base64
import csv
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhirplug.fhir.writer import ModelInfo, build_resources, to_bundle
from fhirplug.manifest import Manifest
from fhirplug.predictions import SNIPPET_CHARS, Evidence, Prediction, TextSource

_ELEMENT = "DocumentReference.content[0].attachment"


def read_csv_texts(path: Path, column: str, n: int, seed: int) -> list[str]:
    """A fixed, seeded sample of ``n`` non-empty texts from ``column`` of a CSV."""
    csv.field_size_limit(1 << 24)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise SystemExit(f"{path}: no column {column!r}; columns: {reader.fieldnames}")
        texts = [row[column] for row in reader if row[column] and row[column].strip()]
    if not texts:
        raise SystemExit(f"{path}: column {column!r} holds no text")
    return random.Random(seed).sample(texts, min(n, len(texts)))


def make_bundle(texts: Sequence[str], seed: int = 0) -> bytes:
    """A collection Bundle: one DocumentReference per text, base64 text/plain UTF-8, one Patient subject each."""
    rng = random.Random(seed)
    entries = []
    for i, text in enumerate(texts):
        resource = {
            "resourceType": "DocumentReference",
            "id": f"note-{i:05d}",
            "status": "current",
            "subject": {"reference": f"Patient/bench-{i:05d}"},
            "date": "2024-01-01T00:00:00Z",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                    }
                }
            ],
        }
        entries.append({"fullUrl": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}", "resource": resource})
    return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode("utf-8")


def decode_bundle(data: bytes) -> list[TextSource]:
    """What the Optimum path does to read the Bundle: json + base64, nothing validated."""
    sources = []
    for entry in json.loads(data)["entry"]:
        resource = entry["resource"]
        text = base64.b64decode(resource["content"][0]["attachment"]["data"]).decode("utf-8")
        sources.append(
            TextSource(
                f"DocumentReference/{resource['id']}",
                "DocumentReference",
                _ELEMENT,
                text,
                text,
                subject=resource.get("subject"),
            )
        )
    return sources


def _chosen(scores: dict[int, float], manifest: Manifest) -> list[int]:
    """The same decision rule as fhirplug's text-classification task, on the pipeline's scores."""
    labels = manifest.outputs.labels
    thresholds = manifest.calibration.thresholds
    if manifest.outputs.multi_label:
        default = manifest.calibration.default_threshold
        return [k for k, score in scores.items() if score >= thresholds.get(labels[k].label, default)]
    top = max(scores, key=scores.__getitem__)
    limit = thresholds.get(labels[top].label)
    return [] if limit is not None and scores[top] < limit else [top]


@dataclass
class Outcome:
    """One pass: the output Bundle JSON, the (source reference, code) pairs, seconds per phase."""

    json: str
    pairs: list[tuple[str, str]]
    #: read_s: FHIR in → texts; model_s: tokenize + model + decisions; write_s: resources + Bundle + JSON.
    phases: dict[str, float]


E2EPath = Callable[[bytes], Outcome]


def pipeline_path(
    pipe: Any, manifest: Manifest, model: ModelInfo, label_index: dict[str, int], window: int, batch: int
) -> E2EPath:
    """Bundle bytes → output Bundle JSON, with a transformers pipeline doing the model work."""
    labels = manifest.outputs.labels

    def run(data: bytes) -> Outcome:
        t0 = time.perf_counter()
        sources = decode_bundle(data)
        t1 = time.perf_counter()
        outputs = pipe([s.text for s in sources], truncation=True, max_length=window, batch_size=batch, top_k=None)
        predictions = []
        for source, scored in zip(sources, outputs, strict=True):
            scores = {label_index[item["label"]]: float(item["score"]) for item in scored}
            for k in _chosen(scores, manifest):
                spec = labels[k]
                snippet = source.text[:SNIPPET_CHARS]
                evidence = Evidence(source.reference, source.element, 0, len(snippet), snippet)
                predictions.append(
                    Prediction(
                        source=source,
                        label=spec.label,
                        system=spec.system,
                        code=spec.code,
                        display=spec.display,
                        probability=scores[k],
                        evidence=evidence,
                    )
                )
        t2 = time.perf_counter()
        resources = build_resources(predictions, sources, model, recorded=datetime.now(UTC).replace(microsecond=0))
        out = json.dumps(to_bundle(resources, "collection"))
        t3 = time.perf_counter()
        pairs = [(p.source.reference, p.code) for p in predictions]
        return Outcome(out, pairs, {"read_s": t1 - t0, "model_s": t2 - t1, "write_s": t3 - t2})

    return run


def fhirplug_path(plugin: Any) -> E2EPath:
    """Bundle bytes → output Bundle JSON with fhirplug (``predict`` then ``to_fhir("collection")``)."""

    def run(data: bytes) -> Outcome:
        result = plugin.predict(data, source_name="bench-bundle")
        if result.has_errors:
            raise RuntimeError(f"fhirplug reported errors on the benchmark Bundle: {result.issues[:3]}")
        t0 = time.perf_counter()
        out = json.dumps(result.to_fhir("collection"))
        t1 = time.perf_counter()
        pairs = [(p.source.reference, p.code) for p in result.predictions]
        phases = {"read_s": result.timings["read_s"], "model_s": result.timings["predict_s"], "write_s": t1 - t0}
        return Outcome(out, pairs, phases)

    return run


def first_windows(plugin: Any, texts: Sequence[str]) -> list[str]:
    """Each text cut where fhirplug's first window ends: the part a truncating pipeline reads."""
    out = []
    for enc in plugin.session.tokenizer.encode_batch(list(texts)):
        ends = [e for (_, e), special in zip(enc.offsets, enc.special_tokens_mask, strict=True) if not special]
        out.append(texts[len(out)][: max(ends, default=0)])
    return out


def run_passes(jobs: dict[str, tuple[E2EPath, bytes]], rounds: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """``rounds`` interleaved passes of every job over its Bundle (the first job rotating per round).

    Returns:
        per job: each pass's seconds and phases, and the last pass's outcome.
    """
    for run, data in jobs.values():  # warm-up on a slice: first calls allocate, later ones reuse
        entries = json.loads(data)["entry"][:8]
        run(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode())
    names = list(jobs)
    done: dict[str, dict[str, Any]] = {
        n: {"notes": len(json.loads(data)["entry"]), "pass_seconds": [], "phases": []} for n, (_, data) in jobs.items()
    }
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run, data = jobs[name]
            started = time.perf_counter()
            outcome = run(data)
            seconds = time.perf_counter() - started
            done[name]["pass_seconds"].append(seconds)
            done[name]["phases"].append(outcome.phases)
            done[name]["last"] = outcome
            progress(f"  e2e round {r + 1}/{rounds} {name}: {done[name]['notes'] / seconds:.1f} notes/s")
    return done


def agreement(a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]], notes: int) -> float:
    """Share of notes for which both paths predicted exactly the same set of codes."""

    def by_note(pairs: Sequence[tuple[str, str]]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for ref, code in pairs:
            out.setdefault(ref, set()).add(code)
        return out

    left, right = by_note(a), by_note(b)
    refs = [f"DocumentReference/note-{i:05d}" for i in range(notes)]
    return sum(left.get(r, set()) == right.get(r, set()) for r in refs) / notes
