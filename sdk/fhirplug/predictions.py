"""Typed results: where text came from (:class:`TextSource`) and what the model said (:class:`Prediction`)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Entity", "Evidence", "Prediction", "TextSource"]

#: Characters of context a human-readable evidence snippet may hold.
SNIPPET_CHARS = 160


@dataclass(frozen=True, eq=False)
class TextSource:
    """One piece of text read from a FHIR resource, with the way back to the original.

    Attributes:
        reference: how outputs point at the source: ``ResourceType/id``, else the Bundle entry's fullUrl.
        resource_type: e.g. ``DocumentReference``.
        element: FHIRPath of the element the text came from, e.g.
            ``DocumentReference.content[0].attachment`` or ``DiagnosticReport.conclusion``.
        text: the text the model reads (HTML markup removed, entities decoded).
        original: the element's decoded content (for an attachment: the decoded ``data``) that offsets point into.
        offsets: ``offsets[i]`` is the index in ``original`` of ``text[i]``; None when text is original.
        subject: the source's ``subject`` Reference (JSON), copied to outputs.
        encounter: the source's encounter Reference (JSON), copied to outputs.
        date: the source's clinically relevant date (ISO string) if it has one.
        ends: ``ends[i]`` is the index in ``original`` just past the source of ``text[i]``: a character decoded
            from ``&eacute;`` stands for all 8 characters of it. None when each ``text[i]`` comes from the one
            character ``original[offsets[i]]``.
        location: FHIRPath of the element in its input (``Bundle.entry[3].resource.content[0].attachment``), for
            issues about this text; None when the text did not come from a FHIR input.
    """

    reference: str
    resource_type: str
    element: str
    text: str
    original: str
    offsets: array[int] | None = None
    subject: dict[str, Any] | None = None
    encounter: dict[str, Any] | None = None
    date: str | None = None
    ends: array[int] | None = None
    location: str | None = None

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        """Map a ``[start, end)`` span of ``text`` to the matching span of ``original``."""
        if self.offsets is None:
            return start, end
        if start >= end:
            pos = self.offsets[start] if start < len(self.offsets) else len(self.original)
            return pos, pos
        # Without ends, a span ending in a decoded character reference would stop after its "&".
        stop = self.ends[end - 1] if self.ends is not None else self.offsets[end - 1] + 1
        return self.offsets[start], stop


@dataclass(frozen=True)
class Evidence:
    """The span of the source that supports a prediction (offsets into ``TextSource.original``).

    ``contribution`` is set when the span was found by occlusion (text-classification, see
    :mod:`fhirplug._explain`): how much the code's probability drops when the span is removed from the note.
    """

    reference: str
    element: str
    start: int
    end: int
    snippet: str
    contribution: float | None = None


@dataclass(frozen=True)
class Entity:
    """A mention found by a token-classification plugin (``Prediction.entity``).

    Attributes:
        type: the entity type (a label of the plugin, e.g. ``Disease``).
        text: the mention as it appears in ``TextSource.text``.
        start: start of the mention in ``TextSource.text`` (the evidence holds the span in the original).
        end: end (exclusive) in ``TextSource.text``.
        resource: the FHIR resource a coded mention becomes (``Condition``, ``MedicationStatement``).
        coded: False when no concept scored above the plugin's threshold (``code`` is then "").
        coding_method: ``exact``, ``normalized``, ``nearest`` or ``none``.
        coding_score: 1.0 for dictionary hits, the cosine similarity for nearest neighbours.
        negated, possible, historical: the assertion (see :mod:`fhirplug._assertion`).
        subject: ``patient``, ``family`` or ``other``.
        hypothetical: the mention states no fact, only a condition or a plan ("return if chest pain", "should a
            rash develop", "watch for bleeding"); the writer records nothing for it (see :mod:`fhirplug.fhir.writer`).
        relationship: HL7 v3 RoleCode of the relative for ``family``.
    """

    type: str
    text: str
    start: int
    end: int
    resource: str
    coded: bool
    coding_method: str
    coding_score: float
    negated: bool = False
    possible: bool = False
    historical: bool = False
    subject: str = "patient"
    relationship: str | None = None
    hypothetical: bool = False


@dataclass(frozen=True)
class Prediction:
    """One coded prediction for one source text."""

    source: TextSource = field(repr=False)
    label: str
    system: str
    code: str
    display: str
    #: Calibrated probability (temperature-scaled) of this code for this text.
    probability: float
    evidence: Evidence
    #: Task-specific extras (e.g. the decision threshold that was applied).
    details: dict[str, Any] = field(default_factory=dict)
    #: token-classification: the mention, its coding and its assertion; None for text-classification.
    entity: Entity | None = None
