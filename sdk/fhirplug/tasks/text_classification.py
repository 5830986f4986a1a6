"""``text-classification``: one note → codes, multi-class (softmax) or multi-label (sigmoid).

Long notes are scored in overlapping windows and the window results aggregated — the converter evaluates with
this same rule, so the metrics in a model card are the runtime's metrics:

- multi-class: the mean over windows of softmax(logits / T); the top class is predicted. A per-label
  threshold, when the manifest gives one, makes the plugin abstain below it (``default_threshold`` is not
  used: with k classes the top probability can be under 0.5 and still be the answer).
- multi-label: the max over windows of sigmoid(logits / T) (a code is present if any part of the note says
  so); every label at or above its threshold (per-label, else ``default_threshold``) is predicted.

The evidence of a prediction is the window that gave that label its highest probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fhirplug.errors import TaskError
from fhirplug.manifest import Manifest
from fhirplug.predictions import SNIPPET_CHARS, Evidence, Prediction, TextSource
from fhirplug.session import Window
from fhirplug.tasks.base import Task

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


class TextClassification(Task):
    name = "text-classification"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.labels = manifest.outputs.labels
        self.multi_label = manifest.outputs.multi_label
        self.calibration = manifest.calibration

    def check_model(self, output_shape: Sequence[int | str | None]) -> None:
        width = output_shape[-1] if output_shape else None
        if len(output_shape) != 2 or (isinstance(width, int) and width != len(self.labels)):
            raise TaskError(
                f"text-classification expects logits of shape [batch, {len(self.labels)}] (one per label in "
                f"the manifest); the model outputs {list(output_shape)}"
            )

    def _per_text(
        self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
        """For each text: aggregated probabilities, the per-window matrix and the window indices."""
        groups: list[list[int]] = [[] for _ in range(n_texts)]
        for i, window in enumerate(windows):
            groups[window.text_index].append(i)
        out = []
        for members in groups:
            if not members:
                empty = np.full(len(self.labels), np.nan)
                out.append((empty, empty[None, :], members))
                continue
            matrix = window_probabilities(
                np.stack([outputs[i] for i in members]), self.calibration.temperature, self.multi_label
            )
            agg = aggregate(matrix, self.multi_label)
            out.append((agg, matrix, members))
        return out

    def scores(self, n_texts: int, windows: Sequence[Window], outputs: Sequence[np.ndarray]) -> np.ndarray:
        """``[n_texts, n_labels]`` aggregated probabilities; a text without windows (not run) is a row of NaN."""
        if n_texts == 0:
            return np.empty((0, len(self.labels)))
        return np.stack([agg for agg, _, _ in self._per_text(n_texts, windows, outputs)])

    def _chosen(self, probs: np.ndarray) -> list[int]:
        thresholds = self.calibration.thresholds
        if self.multi_label:
            default = self.calibration.default_threshold
            return [k for k, spec in enumerate(self.labels) if probs[k] >= thresholds.get(spec.label, default)]
        top = int(np.argmax(probs))
        limit = thresholds.get(self.labels[top].label)
        return [] if limit is not None and probs[top] < limit else [top]

    def interpret(
        self, sources: Sequence[TextSource], windows: Sequence[Window], outputs: Sequence[np.ndarray]
    ) -> list[Prediction]:
        predictions = []
        for source, (probs, matrix, members) in zip(
            sources, self._per_text(len(sources), windows, outputs), strict=True
        ):
            if not members:
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
                        },
                    )
                )
        return predictions
