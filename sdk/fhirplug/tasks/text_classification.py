"""``text-classification``: one note → codes, multi-class (softmax) or multi-label (sigmoid).

Long notes are scored in overlapping windows and the window results aggregated — the converter evaluates with
this same rule, so the metrics in a model card are the runtime's metrics:

- multi-class: the mean over windows of softmax(logits / T); the top class is predicted. A per-label
  threshold, when the manifest gives one, makes the plugin abstain below it (``default_threshold`` is not
  used: with k classes the top probability can be under 0.5 and still be the answer).
- multi-label: the max over windows of sigmoid(logits / T) (a code is present if any part of the note says
  so); every label at or above its threshold (per-label, else ``default_threshold``) is predicted.
- a label in ``calibration.withheld`` (one the converter found unreliable) is never predicted; a multi-class
  text whose top label is withheld gets no code.

The evidence of a prediction is the window that gave that label its highest probability.

Abstention (when the manifest's ``calibration`` says so): a text whose pooled embedding is farther than the
calibrated Mahalanobis threshold from every class of the training data (:mod:`fhirplug._abstain`), or, for
multi-class, whose top probability is below ``calibration.min_probability``, gets no code and an informational
issue (:meth:`TextClassification.notices`) saying why, with the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fhirplug._abstain import Abstainer, mean_embeddings
from fhirplug.errors import TaskError
from fhirplug.fhir.outcome import Issue
from fhirplug.manifest import Manifest
from fhirplug.predictions import SNIPPET_CHARS, Evidence, Prediction, TextSource
from fhirplug.session import Window
from fhirplug.tasks.base import Task

if TYPE_CHECKING:
    from fhirplug.bundle import VerifiedBundle

__all__ = ["TextClassification", "aggregate", "window_probabilities"]


def window_probabilities(logits: np.ndarray, temperature: float, multi_label: bool) -> np.ndarray:
    """Calibrated probabilities for a [windows, labels] logit matrix."""
    z: np.ndarray = logits.astype(np.float64) / temperature
    if multi_label:
        # sigmoid(z) = (1 + tanh(z/2)) / 2: no exp() to overflow for very negative logits / small T.
        sigmoid: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))
        return sigmoid
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    softmax: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return softmax


def aggregate(window_probs: np.ndarray, multi_label: bool) -> np.ndarray:
    """One text's probabilities from its [windows, labels] matrix: max (multi-label) or mean (multi-class)."""
    result: np.ndarray = window_probs.max(axis=0) if multi_label else window_probs.mean(axis=0)
    return result


def _snippet(source: TextSource, start: int, end: int) -> str:
    text = source.original[start:end]
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"


@dataclass(frozen=True)
class _Text:
    """One text's aggregated probabilities, per-window matrix, window indices and abstention."""

    probs: np.ndarray
    matrix: np.ndarray
    members: list[int]
    #: Mahalanobis distance of the text's mean window embedding (NaN: no abstention model).
    distance: float = float("nan")
    #: Why the plugin gives this text no code; None: it answers.
    abstained: str | None = None


class TextClassification(Task):
    name = "text-classification"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.labels = manifest.outputs.labels
        self.multi_label = manifest.outputs.multi_label
        self.calibration = manifest.calibration
        self.abstainer: Abstainer | None = None
        if self.multi_label and self.calibration.min_probability > 0:
            raise TaskError("calibration.min_probability is a multi-class floor; a multi-label plugin uses thresholds")

    def load_files(self, bundle: VerifiedBundle) -> None:
        spec = self.calibration.abstention
        if spec is None:
            return
        if spec.file not in bundle.manifest.files:
            raise TaskError(f"{bundle.path}: calibration.abstention names {spec.file}, which manifest.files lacks")
        lacking = [v.file for v in bundle.manifest.variants if spec.output not in v.output_names]
        if lacking:
            raise TaskError(
                f"{bundle.path}: calibration.abstention reads the model output {spec.output!r}, which variant(s) "
                f"{lacking} do not name in output_names"
            )
        self.abstainer = Abstainer.from_bytes(
            bundle.read(spec.file), str(bundle.path / spec.file), spec.threshold, spec.discriminator_threshold
        )

    def check_model(self, output_shape: Sequence[int | str | None]) -> None:
        width = output_shape[-1] if output_shape else None
        if len(output_shape) != 2 or (isinstance(width, int) and width != len(self.labels)):
            raise TaskError(
                f"text-classification expects logits of shape [batch, {len(self.labels)}] (one per label in "
                f"the manifest); the model outputs {list(output_shape)}"
            )

    def _logits(self, row: np.ndarray) -> np.ndarray:
        """A window's logits (``ModelSession.run`` joins them with the abstention model's embedding, if any)."""
        k = len(self.labels)
        if self.abstainer is not None and row.shape[-1] != k + self.abstainer.hidden:
            raise TaskError(
                f"the model gives {row.shape[-1]} values per window; {k} logits + {self.abstainer.hidden} "
                "embedding values were expected (abstention.npz does not match the model)"
            )
        return row[:k]

    def _texts(self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> list[_Text]:
        """Per text: probabilities, the window matrix, the window indices, and whether the plugin abstains."""
        groups: list[list[int]] = [[] for _ in range(n_texts)]
        for i, window in enumerate(windows):
            groups[window.text_index].append(i)
        logits = [self._logits(row) for row in outputs]
        distances: np.ndarray = np.full(n_texts, np.nan)
        reasons: list[str | None] = [None] * n_texts
        if self.abstainer is not None:
            embeddings = mean_embeddings([w.text_index for w in windows], outputs, len(self.labels), n_texts)
            distances, reasons = self.abstainer.judge(embeddings)
        out = []
        for t, members in enumerate(groups):
            if not members:
                empty = np.full(len(self.labels), np.nan)
                out.append(_Text(empty, empty[None, :], members))
                continue
            matrix = window_probabilities(
                np.stack([logits[i] for i in members]), self.calibration.temperature, self.multi_label
            )
            probs = aggregate(matrix, self.multi_label)
            distance, why = float(distances[t]), reasons[t]
            floor = self.calibration.min_probability
            if why is None and not self.multi_label and floor > 0 and float(probs.max()) < floor:
                top = self.labels[int(np.argmax(probs))].label
                why = (
                    f"no code is likely enough: the top probability ({top}, {float(probs.max()):.3f}) is below "
                    f"the plugin's floor {floor:.3f}"
                )
            out.append(_Text(probs, matrix, members, distance, why))
        return out

    def scores(self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> np.ndarray:
        """``[n_texts, n_labels]`` aggregated probabilities; a text without windows (not run) is a row of NaN.

        Abstention does not change them (see :meth:`distances` and :meth:`abstains`)."""
        if n_texts == 0:
            return np.empty((0, len(self.labels)))
        return np.stack([t.probs for t in self._texts(n_texts, windows, outputs)])

    def distances(self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> np.ndarray:
        """``[n_texts]`` out-of-domain distances (NaN: no abstention model, or a text without windows)."""
        return np.array([t.distance for t in self._texts(n_texts, windows, outputs)], dtype=np.float64)

    def abstains(self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> np.ndarray:
        """``[n_texts]`` booleans: the plugin gives this text no code (out of domain, or under the floor)."""
        return np.array([t.abstained is not None for t in self._texts(n_texts, windows, outputs)], dtype=bool)

    def notices(
        self, sources: Sequence[TextSource], windows: Sequence[Window], outputs: Sequence[np.ndarray]
    ) -> list[tuple[TextSource, Issue]]:
        found = []
        for source, text in zip(sources, self._texts(len(sources), windows, outputs), strict=True):
            if text.members and text.abstained is not None:
                issue = Issue(
                    "information",
                    "informational",
                    f"{source.reference} {source.element}: no code predicted, the plugin abstained: {text.abstained}",
                    (source.location or source.element,),
                )
                found.append((source, issue))
        return found

    def _chosen(self, probs: np.ndarray) -> list[int]:
        thresholds, withheld = self.calibration.thresholds, self.calibration.withheld
        if self.multi_label:
            default = self.calibration.default_threshold
            return [
                k
                for k, spec in enumerate(self.labels)
                if spec.label not in withheld and probs[k] >= thresholds.get(spec.label, default)
            ]
        top = int(np.argmax(probs))
        limit = thresholds.get(self.labels[top].label)
        if self.labels[top].label in withheld or (limit is not None and probs[top] < limit):
            return []
        return [top]

    def interpret(
        self, sources: Sequence[TextSource], windows: Sequence[Window], outputs: Sequence[np.ndarray]
    ) -> list[Prediction]:
        predictions = []
        for source, text in zip(sources, self._texts(len(sources), windows, outputs), strict=True):
            probs, matrix, members = text.probs, text.matrix, text.members
            if not members or text.abstained is not None:
                continue
            for k in self._chosen(probs):
                best = windows[members[int(np.argmax(matrix[:, k]))]]
                start, end = source.to_original(best.start, best.end)
                spec = self.labels[k]
                predictions.append(
                    Prediction(
                        source=source,
                        label=spec.label,
                        system=spec.system,
                        code=spec.code,
                        display=spec.display,
                        probability=float(probs[k]),
                        evidence=Evidence(source.reference, source.element, start, end, _snippet(source, start, end)),
                        details={
                            "threshold": self.calibration.thresholds.get(
                                spec.label, self.calibration.default_threshold if self.multi_label else None
                            ),
                            "windows": len(members),
                            **({} if np.isnan(text.distance) else {"ood_distance": round(text.distance, 4)}),
                        },
                    )
                )
        return predictions
