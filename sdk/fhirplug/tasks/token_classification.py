"""``token-classification``: a note → coded entity mentions with exact spans and their assertion.

The steps, all in numpy:

1. **Tags per token.** The model gives ``[tokens, tags]`` logits per window; tags are BIO over the plugin's entity
   types (``O``, then ``B-``/``I-`` for each label in ``outputs.labels`` order). A long note is read in
   overlapping windows; a token seen by several windows takes its probabilities from the window where it is
   farthest from the window's edge (most context on both sides).
2. **Spans.** BIO decoding over the note's tokens in order: ``B-X`` opens an ``X`` span, ``I-X`` continues an
   open ``X`` span (or opens one after ``O``/another type, as conlleval reads it), anything else closes it.
   A span whose edge falls inside a word (a sub-word token) is widened to the whole word, so a span never cuts
   a word. Spans are character offsets into ``TextSource.text``, never duplicated. A span that is nothing but an
   assertion cue of the lexicon ("No") is dropped.
3. **Coding** against the plugin's terminology (:mod:`fhirplug._coding`): exact → normalized → abbreviation (a
   short form defined in the same note, "Parkinson's disease (PD)", coded as its long form; see
   :mod:`fhirplug._abbrev`) → nearest neighbour over character n-gram vectors, abstaining below
   ``entities.coding_threshold``. Set ``plugin.task.resolve_abbreviations = False`` to code mentions alone.
4. **Assertion** (:mod:`fhirplug._assertion`): negated, possible, historical, hypothetical, family/other subject,
   with the lexicon shipped in the bundle. Replace it with ``plugin.task.lexicon = Lexicon.load(path)``.

Every mention is a :class:`~fhirplug.predictions.Prediction` with ``entity`` set; an uncoded mention has
``code == ""`` and is kept in the predictions but not written as FHIR (there is no code to write).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fhirplug._abbrev import abbreviations
from fhirplug._assertion import Lexicon, assert_spans
from fhirplug._coding import ConceptIndex
from fhirplug.errors import TaskError
from fhirplug.manifest import EntitiesSpec, Manifest
from fhirplug.predictions import SNIPPET_CHARS, Entity, Evidence, Prediction, TextSource
from fhirplug.session import Window
from fhirplug.tasks.base import Task

if TYPE_CHECKING:
    from fhirplug.bundle import VerifiedBundle

__all__ = ["Span", "TokenClassification", "decode_spans", "drop_cues", "merge_windows", "tag_names"]


def tag_names(types: Sequence[str]) -> list[str]:
    """The BIO tags in model-output order: ``O``, then ``B-t``, ``I-t`` for each type."""
    return ["O", *(f"{p}-{t}" for t in types for p in ("B", "I"))]


@dataclass(frozen=True)
class Span:
    """A decoded mention: ``[start, end)`` in the text, its type and mean tag probability."""

    start: int
    end: int
    type: str
    score: float


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    result: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return result


def merge_windows(
    n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray], temperature: float = 1.0
) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
    """Per text: its tokens' character offsets in order and their ``[tokens, tags]`` probabilities.

    ``outputs[i]`` may be padded past the window's tokens (batches are padded); only ``len(window.ids)`` rows are
    read. Special tokens and zero-width tokens are skipped. A token in several windows is taken from the window
    where it is farthest from the edge.
    """
    best: list[dict[tuple[int, int], tuple[int, np.ndarray]]] = [{} for _ in range(n_texts)]
    for window, logits in zip(windows, outputs, strict=True):
        probs = _softmax(np.asarray(logits)[: len(window.ids)], temperature)
        # Streamed windows hold offsets as an [n, 2] array, made windows as tuples: one list of pairs for both.
        offsets = np.asarray(window.offsets, dtype=np.int64).reshape(-1, 2).tolist()
        content = [j for j, (s, e) in enumerate(offsets) if e > s and j < len(probs)]
        seen = best[window.text_index]
        for rank, j in enumerate(content):
            distance = min(rank, len(content) - 1 - rank)
            key = (offsets[j][0], offsets[j][1])
            kept = seen.get(key)
            if kept is None or distance > kept[0]:
                seen[key] = (distance, probs[j])
    out = []
    for seen in best:
        keys = sorted(seen)
        matrix = np.stack([seen[k][1] for k in keys]) if keys else np.zeros((0, 0))
        out.append((keys, matrix))
    return out


def _wordish(ch: str) -> bool:
    # Combining marks belong to their letter: "e\u0301" is one visible character, never cut in two.
    return ch.isalnum() or unicodedata.category(ch).startswith("M")


def _widen(text: str, start: int, end: int) -> tuple[int, int]:
    start, end = max(0, min(start, len(text))), max(0, min(end, len(text)))
    while 0 < start < len(text) and _wordish(text[start - 1]) and _wordish(text[start]):
        start -= 1
    while 0 < end < len(text) and _wordish(text[end - 1]) and _wordish(text[end]):
        end += 1
    return start, end


def decode_spans(text: str, offsets: Sequence[tuple[int, int]], probs: np.ndarray, types: Sequence[str]) -> list[Span]:
    """BIO-decode one text's tokens (in order) into mention spans (character offsets into ``text``)."""
    if len(offsets) == 0:
        return []
    tags = np.argmax(probs, axis=-1)
    raw: list[tuple[int, int, str, list[float]]] = []
    current: tuple[int, int, str, list[float]] | None = None
    for (s, e), tag, row in zip(offsets, tags, probs, strict=True):
        tag = int(tag)
        if tag == 0 or tag > 2 * len(types):
            if current is not None:
                raw.append(current)
            current = None
            continue
        kind = types[(tag - 1) // 2]
        inside = (tag - 1) % 2 == 1
        if inside and current is not None and current[2] == kind:
            current = (current[0], e, kind, [*current[3], float(row[tag])])
            continue
        if current is not None:
            raw.append(current)
        current = (s, e, kind, [float(row[tag])])
    if current is not None:
        raw.append(current)
    spans: list[Span] = []
    for s, e, kind, scores in raw:
        s, e = _widen(text, s, e)
        if e <= s:
            continue
        score = float(np.mean(scores))
        if spans and s < spans[-1].end:  # widening made it touch the previous span: one mention, not two
            last = spans[-1]
            spans[-1] = Span(last.start, max(last.end, e), last.type, max(last.score, score))
            continue
        spans.append(Span(s, e, kind, score))
    return spans


def drop_cues(text: str, spans: Sequence[Span], lexicon: Lexicon) -> list[Span]:
    """Spans that are not just an assertion cue: a span whose whole text is a trigger, pseudo-trigger or
    terminator of the lexicon ("No" tagged as a disease before "fever") is no mention, and keeping it would also
    hide the cue from the assertion step."""
    cues = lexicon.cues
    return [s for s in spans if " ".join(text[s.start : s.end].casefold().split()) not in cues]


def _snippet(source: TextSource, start: int, end: int) -> str:
    text = source.original[start:end]
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"


class TokenClassification(Task):
    name = "token-classification"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        if manifest.entities is None:
            raise TaskError(
                "token-classification needs an `entities` section in the manifest (entity resources, "
                "terminology files, assertion lexicon); rebuild the plugin with fhirplug convert"
            )
        self.entities: EntitiesSpec = manifest.entities
        self.types = [spec.label for spec in manifest.outputs.labels]
        self.tags = tag_names(self.types)
        self.temperature = manifest.calibration.temperature
        self.index: ConceptIndex | None = None
        #: The assertion lexicon in use; replace it to change the triggers.
        self.lexicon: Lexicon = Lexicon.default()
        #: Code a short form defined in its note ("Parkinson's disease (PD)" … "PD") as its long form.
        self.resolve_abbreviations: bool = True

    def load_files(self, bundle: VerifiedBundle) -> None:
        entities = self.entities
        path = bundle.path
        try:
            self.index = ConceptIndex.from_bytes(
                bundle.read(entities.concepts),
                bundle.read(entities.vectors),
                entities.coding_threshold,
                concepts_source=str(path / entities.concepts),
                vectors_source=str(path / entities.vectors),
            )
        except (OSError, ValueError, KeyError) as exc:
            raise TaskError(f"{path}: the terminology files cannot be read ({exc})") from exc
        try:
            self.lexicon = Lexicon.from_bytes(
                bundle.read(entities.assertion_lexicon), str(path / entities.assertion_lexicon)
            )
        except (OSError, ValueError) as exc:
            raise TaskError(f"{path / entities.assertion_lexicon}: not a usable assertion lexicon ({exc})") from exc

    def check_model(self, output_shape: Sequence[int | str | None]) -> None:
        width = output_shape[-1] if output_shape else None
        if len(output_shape) != 3 or (isinstance(width, int) and width != len(self.tags)):
            raise TaskError(
                f"token-classification expects logits of shape [batch, sequence, {len(self.tags)}] (BIO tags "
                f"{self.tags}); the model outputs {list(output_shape)}"
            )

    def spans(self, texts: Sequence[str], windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> list[list[Span]]:
        """Decoded mention spans of each text (before coding and assertion)."""
        merged = merge_windows(len(texts), windows, outputs, self.temperature)
        out = []
        for text, (offsets, probs) in zip(texts, merged, strict=True):
            spans = drop_cues(text, decode_spans(text, offsets, probs, self.types), self.lexicon)
            out.append([s for s in spans if s.score >= self.entities.min_confidence])
        return out

    def scores(self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> np.ndarray:
        """Per text, its tokens' ``[tokens, tags]`` probabilities (an object array: token counts differ)."""
        result = np.empty(n_texts, dtype=object)
        for i, (_, probs) in enumerate(merge_windows(n_texts, windows, outputs, self.temperature)):
            result[i] = probs
        return result

    def interpret(
        self, sources: Sequence[TextSource], windows: Sequence[Window], outputs: Sequence[np.ndarray]
    ) -> list[Prediction]:
        texts = [s.text for s in sources]
        predictions = []
        for source, spans in zip(sources, self.spans(texts, windows, outputs), strict=True):
            assertions = assert_spans(source.text, [(s.start, s.end) for s in spans], self.lexicon)
            defined = abbreviations(source.text) if spans and self.resolve_abbreviations else None
            for span, assertion in zip(spans, assertions, strict=True):
                mention = source.text[span.start : span.end]
                coding = self.index.code(mention, span.type, defined) if self.index is not None else None
                coded = coding is not None and coding.code is not None
                start, end = source.to_original(span.start, span.end)
                entity = Entity(
                    type=span.type,
                    text=mention,
                    start=span.start,
                    end=span.end,
                    resource=self.entities.resources.get(span.type, "Condition"),
                    coded=coded,
                    coding_method=coding.method if coding is not None else "none",
                    coding_score=coding.score if coding is not None else 0.0,
                    negated=assertion.negated,
                    possible=assertion.possible,
                    historical=assertion.historical,
                    subject=assertion.subject,
                    relationship=assertion.relationship,
                    hypothetical=assertion.hypothetical,
                )
                predictions.append(
                    Prediction(
                        source=source,
                        label=span.type,
                        system=self.entities.system,
                        code=(coding.code or "") if coding is not None else "",
                        display=(coding.display or mention) if coding is not None and coded else mention,
                        probability=span.score,
                        evidence=Evidence(source.reference, source.element, start, end, _snippet(source, start, end)),
                        details={
                            "matched": coding.matched if coding is not None else None,
                            **({"long_form": coding.long_form} if coding is not None and coding.long_form else {}),
                            "triggers": list(assertion.triggers),
                        },
                        entity=entity,
                    )
                )
        return predictions
