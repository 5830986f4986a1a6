"""Text out of one FHIR R4 resource: every note, report and string value a plugin can read, with offsets.

Where text is read, by resource type:

=================  ==================================================================
DocumentReference  ``content[i].attachment`` (inline base64 ``data``; text/plain or text/html)
DiagnosticReport   ``presentedForm[i]`` (an Attachment), ``conclusion``
Observation        ``valueString``, ``note[i].text``
Condition          ``note[i].text``
Procedure          ``note[i].text``
=================  ==================================================================

Problems are OperationOutcome issues, never exceptions. A resource that yields no text at all always gets
one issue with severity ``error`` and code ``required`` whose expression is the resource itself, so a caller
can tell "this resource gave nothing" apart from "one of its elements was skipped" (a ``warning``: an empty
note, an attachment given by url, a PDF) without reading diagnostics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

from fhirplug.fhir._attachment import decode_attachment, too_long
from fhirplug.fhir.outcome import Issue
from fhirplug.predictions import TextSource

__all__ = ["TEXT_ELEMENTS", "extract_texts", "has_text_elements"]

#: Per readable resource type, the elements text is read from (for messages and docs).
TEXT_ELEMENTS: dict[str, tuple[str, ...]] = {
    "DocumentReference": ("content.attachment",),
    "DiagnosticReport": ("presentedForm", "conclusion"),
    "Observation": ("valueString", "note.text"),
    "Condition": ("note.text",),
    "Procedure": ("note.text",),
}

# The clinically relevant date, first present wins; "a.b" reads b inside a (a Period's start).
_DATES: dict[str, tuple[str, ...]] = {
    "DocumentReference": ("date",),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "Condition": ("recordedDate", "onsetDateTime", "onsetPeriod.start"),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
}

# A candidate: (element suffix after the type, "attachment" | "string", the JSON value).
_Candidate = tuple[str, str, Any]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _candidates(resource: Mapping[str, Any]) -> Iterator[_Candidate]:
    rt = resource.get("resourceType")
    if rt == "DocumentReference":
        for i, content in enumerate(_list(resource.get("content"))):
            if isinstance(content, Mapping) and "attachment" in content:
                yield f"content[{i}].attachment", "attachment", content["attachment"]
    elif rt == "DiagnosticReport":
        for i, form in enumerate(_list(resource.get("presentedForm"))):
            yield f"presentedForm[{i}]", "attachment", form
        if "conclusion" in resource:
            yield "conclusion", "string", resource["conclusion"]
    elif rt == "Observation" and "valueString" in resource:
        yield "valueString", "string", resource["valueString"]
    if rt in ("Observation", "Condition", "Procedure"):
        for i, note in enumerate(_list(resource.get("note"))):
            if isinstance(note, Mapping) and "text" in note:
                yield f"note[{i}].text", "string", note["text"]


def has_text_elements(resource: Mapping[str, Any]) -> bool:
    """True when ``resource`` has at least one element text could be read from (usable or not)."""
    return next(_candidates(resource), None) is not None


def _reference(value: Any) -> dict[str, Any] | None:
    return copy.deepcopy(dict(value)) if isinstance(value, Mapping) else None


def _context(resource: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    rt = str(resource.get("resourceType"))
    if rt == "DocumentReference":
        context = resource.get("context")
        encounters = _list(context.get("encounter")) if isinstance(context, Mapping) else []
        encounter = _reference(encounters[0]) if encounters else None
    else:
        encounter = _reference(resource.get("encounter"))
    date: str | None = None
    for name in _DATES.get(rt, ()):
        head, _, tail = name.partition(".")
        value = resource.get(head)
        if tail and isinstance(value, Mapping):
            value = value.get(tail)
        if isinstance(value, str):
            date = value
            break
    return _reference(resource.get("subject")), encounter, date


def extract_texts(
    resource: Mapping[str, Any],
    *,
    reference: str,
    path: str | None = None,
    max_chars: int = 1_000_000,
) -> tuple[list[TextSource], list[Issue]]:
    """Read every text a resource holds.

    Args:
        resource: an R4 JSON object of a readable type, already validated.
        reference: how outputs will point at it (``DocumentReference/abc`` or a fullUrl).
        path: FHIRPath of the resource in the input, the prefix of issue expressions
            (``Bundle.entry[3].resource``); the resourceType when not given.
        max_chars: longest text read from one element; longer ones are reported as ``too-costly`` and skipped.

    Returns:
        ``(sources, issues)``. ``TextSource.element`` is the path within the resource
        (``DocumentReference.content[0].attachment``). When ``sources`` is empty, ``issues`` holds an
        ``error``/``required`` issue whose expression is ``path``.
    """
    rt = str(resource.get("resourceType"))
    prefix = path or rt
    subject, encounter, date = _context(resource)
    sources: list[TextSource] = []
    issues: list[Issue] = []
    seen = False
    for suffix, kind, value in _candidates(resource):
        seen = True
        element = f"{rt}.{suffix}"
        expression = f"{prefix}.{suffix}"
        if kind == "attachment":
            if not isinstance(value, Mapping):
                issues.append(Issue("error", "structure", "an Attachment must be a JSON object", (expression,)))
                continue
            decoded, found = decode_attachment(value, expression, max_chars)
            issues.extend(found)
            if decoded is None:
                continue
            text, original, offsets, ends = decoded.text, decoded.original, decoded.offsets, decoded.ends
        elif not isinstance(value, str):
            issues.append(Issue("error", "structure", f"{element} must be a string", (expression,)))
            continue
        elif len(value) > max_chars:
            issues.append(too_long(len(value), max_chars, expression))
            continue
        else:
            text, original, offsets, ends = value, value, None, None
        if not text.strip():
            issues.append(Issue("warning", "value", "the text is empty or only whitespace; skipped", (expression,)))
            continue
        sources.append(TextSource(reference, rt, element, text, original, offsets, subject, encounter, date, ends))
    if not sources:
        expected = ", ".join(f"{rt}.{e}" for e in TEXT_ELEMENTS.get(rt, ()))
        why = (
            "every text element was empty, not inline or unreadable (see the other issues)"
            if seen
            else f"it has none of the elements text is read from ({expected or 'none for this type'})"
        )
        issues.append(Issue("error", "required", f"{reference} gave no text to read: {why}", (prefix,)))
    return sources, issues
