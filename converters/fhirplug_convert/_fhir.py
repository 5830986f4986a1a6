"""FHIR training data: note texts labelled with the patient's coded Conditions active at the note's date.

Texts come from the runtime's own extraction (``fhirplug.fhir.extract.extract_texts``), so the model trains on
exactly the text it will read when serving. A note's labels are the label-map codes (in ``data.code_system``) of
the Conditions of the same patient that are active on the note's date: onset on or before it, and no abatement
or an abatement on or after it. Dates compare by calendar day (``YYYY-MM-DD`` prefix) because a note and the
Conditions recorded at the same encounter share the day but not always the second. Conditions that are
``entered-in-error`` or ``refuted``, or that have no ``onsetDateTime``, label nothing.

Synthea writes each note twice (a DocumentReference and a DiagnosticReport): identical (patient, text) pairs are
kept once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirplug.errors import ConvertError, InputError
from fhirplug_convert.datasets import Example
from fhirplug_convert.recipe import Recipe

__all__ = ["read_fhir_examples"]

_NOT_TRUE = ("entered-in-error", "refuted")


@dataclass(frozen=True)
class _Condition:
    code: str
    onset: str
    abatement: str | None


def patient_key(reference: Mapping[str, Any] | None) -> str | None:
    """``Patient/123``, ``urn:uuid:123`` and ``http://server/Patient/123`` all name patient ``123``."""
    if not reference or not isinstance(reference.get("reference"), str):
        return None
    value: str = reference["reference"]
    if value.startswith("urn:uuid:"):
        return value.removeprefix("urn:uuid:")
    return value.rstrip("/").rsplit("/", 1)[-1]


def _day(value: Any) -> str | None:
    return value[:10] if isinstance(value, str) and value else None


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".json", ".ndjson"))
        if not found:
            raise ConvertError(f"{path}: no .json or .ndjson files in the folder")
        return found
    if not path.exists():
        raise ConvertError(f"{path}: data file not found")
    return [path]


def _resources(path: Path) -> Iterator[tuple[dict[str, Any], str, str, str]]:
    from fhirplug.fhir.reader import iter_resources

    for file in _files(path):
        try:
            raw = file.read_bytes()
            for resource, reference, where in iter_resources(raw, source_name=file.name):
                yield resource, reference, where, file.name
        except InputError as exc:
            raise ConvertError(f"{file}: {exc}") from exc
        except OSError as exc:
            raise ConvertError(f"{file}: cannot read it ({exc.strerror})") from exc


def _condition(resource: Mapping[str, Any], system: str, codes: set[str]) -> list[_Condition]:
    status = resource.get("verificationStatus", {}).get("coding", [])
    if any(c.get("code") in _NOT_TRUE for c in status if isinstance(c, Mapping)):
        return []
    onset = _day(resource.get("onsetDateTime"))
    if onset is None:
        return []
    abatement = _day(resource.get("abatementDateTime"))
    return [
        _Condition(c["code"], onset, abatement)
        for c in resource.get("code", {}).get("coding", [])
        if isinstance(c, Mapping) and c.get("system") == system and c.get("code") in codes
    ]


def read_fhir_examples(path: Path, recipe: Recipe) -> list[Example]:
    """Labelled notes from a FHIR Bundle, NDJSON file, or a folder of them (one Synthea bundle per patient).

    Returns:
        One :class:`Example` per distinct (patient, text), grouped by patient; ``where`` is the note's reference.

    Raises:
        ConvertError: unreadable input, a note without a subject or a date, or no note at all.
    """
    from fhirplug.fhir.extract import extract_texts

    system = recipe.data.code_system
    by_code = {entry.code: entry.label for entry in recipe.labels if entry.system == system}
    if not by_code:
        raise ConvertError(
            f"no label in the label map has system {system!r} (data.code_system); FHIR Condition codes cannot "
            "be matched to labels"
        )
    conditions: dict[str, list[_Condition]] = defaultdict(list)
    notes: list[tuple[str, str, str, str]] = []  # (patient, day, text, where)
    skipped = 0
    for resource, reference, where, file in _resources(path):
        kind = resource.get("resourceType")
        if kind == "Condition":
            patient = patient_key(resource.get("subject"))
            if patient is not None:
                conditions[patient] += _condition(resource, system, set(by_code))
            continue
        if kind not in recipe.inputs.resource_types:
            continue
        sources, _issues = extract_texts(resource, reference=reference, path=where)
        if not sources:
            skipped += 1  # nothing readable (a PDF, a url-only attachment): the runtime would skip it too
            continue
        for source in sources:
            patient = patient_key(source.subject)
            day = _day(source.date)
            if patient is None or day is None:
                missing = "subject" if patient is None else "date"
                raise ConvertError(
                    f"{file}: {reference} ({where}) has no {missing}; training labels come from the "
                    "patient's Conditions at the note's date"
                )
            if source.text.strip():
                notes.append((patient, day, source.text, reference))
    if not notes:
        raise ConvertError(
            f"{path}: no note text in {', '.join(recipe.inputs.resource_types)} resources"
            + (f" ({skipped} without readable text)" if skipped else "")
        )
    seen: set[tuple[str, str]] = set()
    examples = []
    for patient, day, text, reference in notes:
        if (patient, text) in seen:
            continue
        seen.add((patient, text))
        active = {
            by_code[c.code]
            for c in conditions.get(patient, [])
            if c.onset <= day and (c.abatement is None or c.abatement >= day)
        }
        labels = tuple(label for label in recipe.label_names if label in active)
        if not recipe.output.multi_label and len(labels) != 1:
            raise ConvertError(
                f"{reference}: {len(labels)} active label(s) {list(labels)} on {day}; a multi-class recipe needs "
                "exactly one per note (set output.multi_label = true)"
            )
        examples.append(Example(text, labels, group=patient, where=reference))
    return examples
