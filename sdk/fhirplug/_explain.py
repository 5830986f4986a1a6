"""Evidence that explains: which sentence of a note drives a text-classification code, found by occlusion.

A note's model text is cut into sentences (:func:`split_sentences`), merged into at most ``N`` contiguous
segments when it has more (:func:`merge_segments`), and re-scored with each segment removed: all ``N`` occluded
copies go through the plugin's own model path (``ModelSession.run`` and the task's ``scores``) in one batched
pass, under the same window gate as any other work. The contribution of segment ``s`` to label ``k`` is::

    p_k(note) - p_k(note without s)

and a prediction's evidence becomes the segment with the largest positive contribution, its offsets mapped to
the original with :meth:`~fhirplug.predictions.TextSource.to_original`. The cost is bounded:

- ``N`` is :data:`EVIDENCE_SEGMENTS` (8) for plain evidence and :data:`EXPLAIN_SEGMENTS` (32) with
  ``explain=True``; a note costs about ``N × its windows`` more windows (charged as exactly that);
- a note over :data:`MAX_CHARS` characters or :data:`MAX_WINDOWS` windows keeps the window evidence (the window
  that gave the code its highest probability), as does a note of one segment;
- occlusion windows count against the input's ``max_input_windows`` (see :mod:`fhirplug._budget`): a note whose
  occlusion the input can no longer pay for keeps the window evidence.

Each prediction's ``details`` say how its evidence was found: ``evidence`` is ``occlusion`` or ``window``, and
``evidence_reason`` says why when it is ``window``. With ``explain=True``, ``details["explanation"]`` lists every
segment as ``{"start", "end", "text", "contribution"}`` (original offsets), highest contribution first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fhirplug.predictions import SNIPPET_CHARS, Evidence, Prediction, TextSource

__all__ = [
    "EVIDENCE_SEGMENTS",
    "EXPLAIN_SEGMENTS",
    "MAX_CHARS",
    "MAX_WINDOWS",
    "ExplainGroup",
    "explain_groups",
    "merge_segments",
    "occlude",
    "split_sentences",
]

#: Segments a note is cut into for plain prediction evidence.
EVIDENCE_SEGMENTS = 8
#: Segments with ``explain=True`` (also the most any call may ask for).
EXPLAIN_SEGMENTS = 32
#: Longest note (characters of model text) that is explained by occlusion; longer ones keep window evidence.
MAX_CHARS = 20_000
#: Most model windows of a note that is explained by occlusion (each occluded copy costs about as many again).
MAX_WINDOWS = 4

#: Where a sentence ends: a run of . ! ? ; (with closing quotes or brackets) followed by whitespace or the end,
#: or a line break. "7.2" and "e.g.x" do not end one; "Dr. Smith" does (no abbreviation list: simple, and a
#: short extra segment costs one occluded copy, not a wrong answer).
#: A run is tried only from its first mark and never given back (possessive), so a run of marks with no space
#: after it ("......x") costs its length once, not its length squared.
_END = re.compile(r"(?<![.!?;])[.!?;]++[)\]\"'”’»]*+(?=\s|$)|\n")

#: ``(predictions, model text by id(source), windows the input may still spend)``: one input of a call.
ExplainGroup = tuple[Sequence[Prediction], Mapping[int, str], int]
#: Texts → ``[n_texts, n_labels]`` probabilities through the plugin's model path (NaN rows: not run).
Scorer = Callable[[list[str]], np.ndarray]


def split_sentences(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` spans of the sentences of ``text``, in order, without surrounding whitespace.

    A sentence ends after . ! ? or ; (and any closing quote or bracket) when whitespace or the end of the text
    follows, and at every line break, so blank lines and list lines split too. One pass over the text: linear
    time, whatever its length. A text of only whitespace has no sentence.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _END.finditer(text):
        _strip(text, start, match.end(), spans)
        start = match.end()
    _strip(text, start, len(text), spans)
    return spans


def _strip(text: str, start: int, end: int, into: list[tuple[int, int]]) -> None:
    piece = text[start:end]
    body = piece.strip()
    if body:
        lead = len(piece) - len(piece.lstrip())
        into.append((start + lead, start + lead + len(body)))


def merge_segments(spans: Sequence[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """At most ``limit`` contiguous segments from sentence spans, about equal in characters.

    Each segment runs from its first sentence's start to its last one's end; with ``len(spans) <= limit`` the
    sentences are the segments. Linear in the number of sentences.
    """
    if limit < 1:
        raise ValueError(f"limit must be ≥ 1, got {limit}")
    if len(spans) <= limit:
        return list(spans)
    total = sum(end - start for start, end in spans)
    groups: list[tuple[int, int]] = []
    first = 0
    size = 0
    for i, (start, end) in enumerate(spans):
        size += end - start
        if len(groups) == limit - 1:
            continue
        # Cut when this group reached its share of the characters, or when every later sentence must start a
        # group of its own for the count to come out at ``limit``.
        if size * limit >= total * (len(groups) + 1) or len(spans) - i - 1 == limit - len(groups) - 1:
            groups.append((spans[first][0], end))
            first = i + 1
    if first < len(spans):
        groups.append((spans[first][0], spans[-1][1]))
    return groups


def occlude(text: str, span: tuple[int, int]) -> str:
    """``text`` without ``span`` (the whitespace around it is kept, so no two words are glued together)."""
    start, end = span
    return text[:start] + text[end:]


def _snippet(source: TextSource, start: int, end: int) -> str:
    text = source.original[start:end]
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"


@dataclass
class _Plan:
    """One note to occlude: its segments (model-text offsets) and where its copies sit in the batch."""

    text: str
    segments: list[tuple[int, int]]
    first: int = 0


def _plan(text: str, limit: int, windows_of: Callable[[str], int], left: int) -> tuple[_Plan | None, str, int]:
    """The plan for one note, or None and why not; and the windows its occlusion costs."""
    if len(text) > MAX_CHARS:
        return None, f"the note is {len(text):,} characters, over the {MAX_CHARS:,} explained by occlusion", 0
    segments = merge_segments(split_sentences(text), limit)
    if len(segments) < 2:
        return None, "the note is one sentence", 0
    windows = windows_of(text)
    if windows > MAX_WINDOWS:
        return None, f"the note is {windows} model windows, over the {MAX_WINDOWS} explained by occlusion", 0
    cost = windows * len(segments)
    if cost > left:
        return (
            None,
            f"occlusion needs {cost} windows and the input's budget (max_input_windows) has {max(left, 0)} left",
            0,
        )
    return _Plan(text, segments), "", cost


def explain_groups(
    groups: Sequence[ExplainGroup],
    scorer: Scorer,
    windows_of: Callable[[str], int],
    labels: Sequence[str],
    *,
    explain: bool = False,
    segments: int = EVIDENCE_SEGMENTS,
) -> list[list[Prediction]]:
    """Occlusion evidence (and, with ``explain``, per-segment contributions) for text-classification predictions.

    Args:
        groups: per input of the call, its predictions, the model text of each of their sources (by
            ``id(source)``) and the windows that input may still spend.
        scorer: the plugin's scoring of plain texts (one batched pass for every occluded copy of every note).
        windows_of: windows a text gives (for the caps and the budget).
        labels: the plugin's labels, in the column order of ``scorer``'s output.
        explain: cut notes into up to :data:`EXPLAIN_SEGMENTS` segments, not ``segments``, and list
            every segment's contribution in ``details["explanation"]``.
        segments: the most segments for plain evidence (``Plugin.evidence_segments``; default
            :data:`EVIDENCE_SEGMENTS`); below 2 no occlusion runs and the window evidence is kept.

    Returns:
        Per group, its predictions (in order) with the new evidence and details.
    """
    limit = EXPLAIN_SEGMENTS if explain else segments
    if limit < 2:
        return [list(ps) for ps, _, _ in groups]
    column = {label: k for k, label in enumerate(labels)}
    plans: dict[int, _Plan] = {}  # id(source) → plan; a note with several codes is occluded once
    reasons: dict[int, str] = {}
    batch: list[str] = []
    for predictions, texts, left in groups:
        for prediction in predictions:
            key = id(prediction.source)
            if key in plans or key in reasons:
                continue
            plan, reason, cost = _plan(texts[key], limit, windows_of, left)
            if plan is None:
                reasons[key] = reason
                continue
            left -= cost
            plan.first = len(batch)
            batch.extend(occlude(plan.text, span) for span in plan.segments)
            plans[key] = plan
    scores = scorer(batch) if batch else np.empty((0, len(labels)))
    return [
        [_explained(p, plans.get(id(p.source)), reasons.get(id(p.source), ""), scores, column, explain) for p in ps]
        for ps, _, _ in groups
    ]


def _explained(
    prediction: Prediction,
    plan: _Plan | None,
    reason: str,
    scores: np.ndarray,
    column: Mapping[str, int],
    explain: bool,
) -> Prediction:
    details: dict[str, Any] = dict(prediction.details)
    if plan is None:
        return _window(prediction, details, reason, explain)
    without = scores[plan.first : plan.first + len(plan.segments), column[prediction.label]]
    if not np.all(np.isfinite(without)):
        return _window(prediction, details, "the occluded copies of the note could not be scored", explain)
    contributions = prediction.probability - without.astype(np.float64)
    source = prediction.source
    spans = [source.to_original(start, end) for start, end in plan.segments]
    if explain:
        order = sorted(range(len(spans)), key=lambda i: (-contributions[i], spans[i][0]))
        details["explanation"] = [
            {
                "start": spans[i][0],
                "end": spans[i][1],
                "text": source.original[spans[i][0] : spans[i][1]],
                "contribution": float(contributions[i]),
            }
            for i in order
        ]
    best = int(np.argmax(contributions))
    if contributions[best] <= 0:
        return _window(prediction, details, "removing no single sentence lowers this code's probability", False)
    start, end = spans[best]
    details["evidence"] = "occlusion"
    details.pop("evidence_reason", None)
    evidence = Evidence(
        source.reference, source.element, start, end, _snippet(source, start, end), float(contributions[best])
    )
    return replace(prediction, evidence=evidence, details=details)


def _window(prediction: Prediction, details: dict[str, Any], reason: str, explain: bool) -> Prediction:
    """The prediction with its window evidence kept, and why."""
    details["evidence"] = "window"
    details["evidence_reason"] = reason
    if explain:
        details.setdefault("explanation", [])
    return replace(prediction, details=details)
