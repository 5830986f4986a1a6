"""Text out of one FHIR R4 resource: every note, report and string value a plugin can read, with offsets.

Where text is read, by resource type:

=================  ==================================================================
DocumentReference  ``content[i].attachment`` (inline base64 ``data``; text/plain or text/html)
DiagnosticReport   ``presentedForm[i]`` (an Attachment), ``conclusion``
Observation        ``valueString``, ``note[i].text``
Condition          ``note[i].text``
Procedure          ``note[i].text``
=================  ==================================================================

Text that is not Unicode (a lone surrogate from a JSON ``\\ud800`` escape or a decoded attachment) is an
``error``/``invalid`` issue for its element: tokenizers cannot take it.

:func:`check_codes` checks the required code bindings the runtime relies on, which fhir.resources R4B does not
enforce: a ``status: "bogus"`` would otherwise pass as a real note; and the id's form (R4B checks its characters,
not its length of 1 to 64).

A :class:`TextAllowance` caps the characters all texts of one input may take (the plugin's ``max_input_chars``):
texts are taken in input order, and the first one that would pass the cap and every later one are
``too-costly`` issues. Once the cap is reached nothing more is decoded, so memory stays bounded by the cap, not
by the input (an HTML attachment's offset arrays cost 16 bytes a character).

Problems are OperationOutcome issues, never exceptions. A resource that yields no text at all always gets
one issue with severity ``error`` and code ``required`` whose expression is the resource itself, so a caller
can tell "this resource gave nothing" apart from "one of its elements was skipped" (a ``warning``: an empty
note, an attachment given by url, a PDF) without reading diagnostics.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fhirplug.fhir._attachment import decode_attachment, not_text, too_long
from fhirplug.fhir._json import is_text
from fhirplug.fhir.outcome import Issue
from fhirplug.predictions import TextSource

__all__ = ["TEXT_ELEMENTS", "TextAllowance", "check_codes", "entered_in_error", "extract_texts", "has_text_elements"]

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

# Required bindings on code elements (FHIR R4, http://hl7.org/fhir/R4/valueset-<name>.html): element, value set.
_CODES: dict[str, tuple[tuple[str, str, frozenset[str]], ...]] = {
    "DocumentReference": (
        ("status", "document-reference-status", frozenset({"current", "superseded", "entered-in-error"})),
        ("docStatus", "composition-status", frozenset({"preliminary", "final", "amended", "entered-in-error"})),
    ),
    "DiagnosticReport": (
        (
            "status",
            "diagnostic-report-status",
            frozenset(
                {
                    *("registered", "partial", "preliminary", "final", "amended", "corrected", "appended"),
                    *("cancelled", "entered-in-error", "unknown"),
                }
            ),
        ),
    ),
    "Observation": (
        (
            "status",
            "observation-status",
            frozenset(
                {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error"}
                | {"unknown"}
            ),
        ),
    ),
    "Procedure": (
        (
            "status",
            "event-status",
            frozenset(
                {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error"}
                | {"unknown"}
            ),
        ),
    ),
}
# Required bindings on Condition's CodeableConcepts: element, code system, codes.
_CONCEPTS: tuple[tuple[str, str, frozenset[str]], ...] = (
    (
        "clinicalStatus",
        "http://terminology.hl7.org/CodeSystem/condition-clinical",
        frozenset({"active", "recurrence", "relapse", "inactive", "remission", "resolved"}),
    ),
    (
        "verificationStatus",
        "http://terminology.hl7.org/CodeSystem/condition-ver-status",
        frozenset({"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"}),
    ),
)
# Attachment.contentType is bound (required) to BCP 13 MIME types: type "/" subtype, then ;name=value parameters
# (RFC 6838 restricted names, RFC 2045 tokens or quoted strings).
_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_MIME = re.compile(rf"""{_NAME}/{_NAME}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"(?:[^"\\]|\\.)*"))*[ \t]*;?[ \t]*""")

# FHIR R4 id (http://hl7.org/fhir/R4/datatypes.html#id): 1 to 64 of these characters.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_LIMIT_FIX = (
    "Split the input, or raise the limit: load_plugin(..., budget=Budget(max_input_chars=N)) or --max-input-chars N "
    "(read_fhir(..., max_total_chars=N))"
)

# A candidate: (element suffix after the type, "attachment" | "string", the JSON value).
_Candidate = tuple[str, str, Any]


@dataclass
class TextAllowance:
    """The characters the texts of one input may still take, shared by every resource of that input.

    Attributes:
        limit: characters all texts together may have (the plugin passes what is left of its
            ``max_input_chars``).
        used: characters of the texts taken so far.
        spent: True once a text did not fit: it and every later text are refused, undecoded.
    """

    limit: int
    used: int = 0
    spent: bool = False

    def refused(self, label: str, expression: str, chars: int | None = None) -> Issue:
        """The ``too-costly`` issue for the text ``label`` (``reference element``) not taken; ``chars``: its
        length, when it was decoded."""
        if chars is None:
            what = (
                f"{label}: the texts before this one in the input already reach the limit of {self.limit:,} "
                "characters (max_input_chars); this one was not decoded or read"
            )
        else:
            what = (
                f"{label}: this text ({chars:,} characters) would bring the input's texts to "
                f"{self.used + chars:,} characters, over the limit of {self.limit:,} (max_input_chars); it was "
                "not read"
            )
        return Issue("error", "too-costly", f"{what}. {_LIMIT_FIX}", (expression,))

    def take(self, chars: int) -> bool:
        """Count a text of ``chars`` characters if it fits; else mark the allowance spent. True if it fits."""
        if self.spent or self.used + chars > self.limit:
            self.spent = True
            return False
        self.used += chars
        return True


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


def _attachments(resource: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for suffix, kind, value in _candidates(resource):
        if kind == "attachment" and isinstance(value, Mapping):
            yield suffix, value


def check_codes(resource: Mapping[str, Any], path: str | None = None) -> list[Issue]:
    """Issues for codes outside the required bindings the runtime relies on; [] when all are valid.

    Checked: ``status`` of DocumentReference, DiagnosticReport, Observation and Procedure,
    ``DocumentReference.docStatus``, ``Condition.clinicalStatus`` and ``verificationStatus`` (when present, a
    coding from the HL7 code system with a code of the value set), and the MIME type form of every
    ``contentType`` of an Attachment text is read from. Each issue is an ``error``/``code-invalid`` whose
    expression is the element; a resource with one is not to be read. An ``id`` that is not 1 to 64 of
    ``A-Z a-z 0-9 - .`` (R4B checks the characters, not the length) is an ``error``/``invalid``, for every type.

    Args:
        resource: an R4 JSON object (a missing or non-string ``status`` is left to model validation).
        path: FHIRPath of the resource, the prefix of issue expressions; the resourceType when not given.
    """
    rt = str(resource.get("resourceType"))
    prefix = path or rt
    issues: list[Issue] = []
    rid = resource.get("id")
    if isinstance(rid, str) and not _ID.fullmatch(rid):
        issues.append(
            Issue(
                "error",
                "invalid",
                f"the id {rid!a:.80} ({len(rid):,} characters) is not a FHIR id: 1 to 64 of A-Z a-z 0-9 - . "
                "(http://hl7.org/fhir/R4/datatypes.html#id); the resource was not read",
                (f"{prefix}.id",),
            )
        )
    for element, value_set, codes in _CODES.get(rt, ()):
        value = resource.get(element)
        if isinstance(value, str) and value not in codes:
            issues.append(
                Issue(
                    "error",
                    "code-invalid",
                    f"{rt}.{element} {value!a:.80} is not in the required value set "
                    f"http://hl7.org/fhir/ValueSet/{value_set} ({' | '.join(sorted(codes))}); the resource was "
                    "not read",
                    (f"{prefix}.{element}",),
                )
            )
    if rt == "Condition":
        for element, system, codes in _CONCEPTS:
            concept = resource.get(element)
            if not isinstance(concept, Mapping):
                continue
            codings = [c for c in _list(concept.get("coding")) if isinstance(c, Mapping)]
            ours = [(i, c) for i, c in enumerate(codings) if c.get("system") == system]
            bad = [(i, c) for i, c in ours if c.get("code") not in codes]
            if bad or not ours:
                i, coding = bad[0] if bad else (None, {})
                where = f"{prefix}.{element}" + (f".coding[{i}].code" if i is not None else "")
                got = f"code {coding.get('code')!a:.80}" if bad else "no coding from that system"
                issues.append(
                    Issue(
                        "error",
                        "code-invalid",
                        f"Condition.{element} must have a coding from {system} with one of "
                        f"{' | '.join(sorted(codes))} (a required binding); got {got}; the resource was not read",
                        (where,),
                    )
                )
    for suffix, attachment in _attachments(resource):
        content_type = attachment.get("contentType")
        if isinstance(content_type, str) and not _MIME.fullmatch(content_type):
            issues.append(
                Issue(
                    "error",
                    "code-invalid",
                    f"contentType {content_type!a:.80} is not a MIME type (type/subtype[; name=value], BCP 13, "
                    "e.g. text/plain; charset=utf-8); the resource was not read",
                    (f"{prefix}.{suffix}.contentType",),
                )
            )
    return issues


def entered_in_error(resource: Mapping[str, Any]) -> str | None:
    """The element that marks ``resource`` as entered-in-error (``status``, ``docStatus``,
    ``verificationStatus``), or None. Such a record was made by mistake: it must not be predicted from.
    """
    for element in ("status", "docStatus"):
        if resource.get(element) == "entered-in-error":
            return element
    if resource.get("resourceType") == "Condition":
        status = resource.get("verificationStatus")
        codings = _list(status.get("coding")) if isinstance(status, Mapping) else []
        if any(isinstance(c, Mapping) and c.get("code") == "entered-in-error" for c in codings):
            return "verificationStatus"
    return None


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
    element: str | None = None,
    context: Mapping[str, Any] | None = None,
    allowance: TextAllowance | None = None,
) -> tuple[list[TextSource], list[Issue]]:
    """Read every text a resource holds.

    Args:
        resource: an R4 JSON object of a readable type, already validated.
        reference: how outputs will point at it (``DocumentReference/abc`` or a fullUrl).
        path: FHIRPath of the resource in the input, the prefix of issue expressions
            (``Bundle.entry[3].resource``); the resourceType when not given.
        max_chars: longest text read from one element; longer ones are reported as ``too-costly`` and skipped.
        element: the start of ``TextSource.element`` (the resourceType when not given); for a contained
            resource its path in the container, ``DiagnosticReport.contained[0]``.
        context: the container of a contained resource: its subject, encounter and date stand in for those
            the contained resource lacks.
        allowance: the characters the input's texts may still take; a text past it is a ``too-costly`` issue,
            and once it is spent no text is decoded at all.

    Returns:
        ``(sources, issues)``. ``TextSource.element`` is the path within the resource
        (``DocumentReference.content[0].attachment``). When ``sources`` is empty, ``issues`` holds an
        ``error``/``required`` issue whose expression is ``path`` (or, when the allowance refused a text, its
        ``too-costly`` issue says why instead).
    """
    rt = str(resource.get("resourceType"))
    prefix = path or rt
    subject, encounter, date = _context(resource)
    if context is not None:
        outer = _context(context)
        subject, encounter, date = subject or outer[0], encounter or outer[1], date or outer[2]
    sources: list[TextSource] = []
    issues: list[Issue] = []
    seen = False
    over = False  # a text was refused by the allowance: that issue says why nothing was read
    for suffix, kind, value in _candidates(resource):
        seen = True
        name = f"{element or rt}.{suffix}"
        expression = f"{prefix}.{suffix}"
        if allowance is not None and allowance.spent:
            issues.append(allowance.refused(f"{reference} {name}", expression))
            over = True
            continue
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
            issues.append(Issue("error", "structure", f"{rt}.{suffix} must be a string", (expression,)))
            continue
        elif not is_text(value):
            issues.append(not_text(value, expression))
            continue
        elif len(value) > max_chars:
            issues.append(too_long(len(value), max_chars, expression))
            continue
        else:
            text, original, offsets, ends = value, value, None, None
        if not text.strip():
            issues.append(Issue("warning", "value", "the text is empty or only whitespace; skipped", (expression,)))
            continue
        if allowance is not None and not allowance.take(len(text)):
            issues.append(allowance.refused(f"{reference} {name}", expression, len(text)))
            over = True
            continue
        sources.append(
            TextSource(reference, rt, name, text, original, offsets, subject, encounter, date, ends, expression)
        )
    if not sources and not over:
        expected = ", ".join(f"{rt}.{e}" for e in TEXT_ELEMENTS.get(rt, ()))
        why = (
            "every text element was empty, not inline or unreadable (see the other issues)"
            if seen
            else f"it has none of the elements text is read from ({expected or 'none for this type'})"
        )
        issues.append(Issue("error", "required", f"{reference} gave no text to read: {why}", (prefix,)))
    return sources, issues
