"""Abstention: a text outside a plugin's domain gets no code.

A softmax answers every text — "The weather is nice today." came out as Chicken pox at p = 0.999 — because a
probability says which known code fits best, not whether any does. The distance of the text's representation
to what the model was trained on does say it (Lee et al. 2018, *A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks*): the pooled embedding the classifier reads (the model's
``embedding`` output), averaged over a text's windows, is compared with each class mean of the training split
under one shared covariance (Ledoit–Wolf shrunk, fitted at convert time). The score is the Mahalanobis distance
to the nearest class mean:

    d(x) = min_k ‖W x − m_k‖,  W = Σ^(-1/2) (whitening),  m_k = W μ_k

``abstention.npz`` holds ``whitening`` [H, H] and ``means`` [K, H] (already whitened), float32. The threshold
(manifest ``calibration.abstention.threshold``) is chosen at convert time on in-domain validation texts and
out-of-domain calibration texts; the model card reports the abstention rate on in-domain test texts and on
held-out out-of-domain sets.

A distance to class means misses out-of-domain text that lies *between* the classes: clinical encounter notes
about diseases sat inside the Medical Abstracts classes (0% refused). With out-of-domain calibration texts the
converter also fits a discriminator (method ``mahalanobis+discriminator``, outlier exposure: Hendrycks et al.
2019, *Deep Anomaly Detection with Outlier Exposure*): a logistic regression on the whitened embedding, training
texts against the out-of-domain calibration texts, whose probability above ``discriminator_threshold`` (set on
in-domain calibration texts only) abstains too. ``abstention.npz`` then also holds ``discriminator`` [H] and
``discriminator_bias`` [1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fhirplug._coding import _load_npz
from fhirplug.errors import TaskError

__all__ = ["Abstainer", "mean_embeddings"]


def mean_embeddings(text_indices: Sequence[int], rows: Sequence[np.ndarray], n_logits: int, n_texts: int) -> np.ndarray:
    """``[n_texts, H]`` float64: each text's mean window embedding — the values after the ``n_logits`` logits of
    each of its windows' rows (``ModelSession.run`` joins logits and embedding) — NaN for a text without windows.

    The one definition of "a text's embedding": the runtime abstains on it and the converter fits and calibrates
    the Mahalanobis model on it, so the threshold is chosen on exactly what the runtime computes.
    """
    width = rows[0].shape[-1] - n_logits if len(rows) else 0
    sums = np.zeros((n_texts, max(width, 0)), dtype=np.float64)
    counts = np.zeros(n_texts, dtype=np.int64)
    for index, row in zip(text_indices, rows, strict=True):
        sums[index] += row[n_logits:]
        counts[index] += 1
    out: np.ndarray = np.full_like(sums, np.nan)
    seen = counts > 0
    out[seen] = sums[seen] / counts[seen, None]
    return out


class Abstainer:
    """Mahalanobis distance to the nearest class mean, and the threshold above which a text abstains."""

    def __init__(
        self,
        whitening: np.ndarray,
        means: np.ndarray,
        threshold: float,
        discriminator: tuple[np.ndarray, float, float] | None = None,
    ) -> None:
        self.whitening = np.asarray(whitening, dtype=np.float64)
        self.means = np.asarray(means, dtype=np.float64)
        self.threshold = float(threshold)
        self.hidden = self.whitening.shape[1]
        #: (weights [H] on the whitened embedding, bias, probability threshold), or None.
        self.discriminator = (
            None
            if discriminator is None
            else (np.asarray(discriminator[0], dtype=np.float64), float(discriminator[1]), float(discriminator[2]))
        )

    @classmethod
    def from_bytes(
        cls, data: bytes, source: str, threshold: float, discriminator_threshold: float | None = None
    ) -> Abstainer:
        """Read ``abstention.npz`` (a verified bundle's bytes).

        Args:
            discriminator_threshold: the manifest's; when given the file must hold the discriminator arrays.

        Raises:
            TaskError: not an .npz of the float arrays, or their shapes do not fit together.
        """
        arrays = _load_npz(data, source, "not a usable abstention file")
        missing = sorted({"whitening", "means"} - set(arrays))
        if missing:
            raise TaskError(f"{source}: the abstention file lacks array(s) {missing}")
        whitening, means = arrays["whitening"], arrays["means"]
        if whitening.dtype.kind != "f" or means.dtype.kind != "f":
            raise TaskError(f"{source}: whitening and means must be float arrays")
        if whitening.ndim != 2 or whitening.shape[0] != whitening.shape[1] or whitening.shape[0] == 0:
            raise TaskError(f"{source}: whitening must be a square [H, H] matrix, got {list(whitening.shape)}")
        if means.ndim != 2 or means.shape[1] != whitening.shape[0] or means.shape[0] == 0:
            raise TaskError(
                f"{source}: means must be [classes, {whitening.shape[0]}] to match whitening, got {list(means.shape)}"
            )
        if not (np.isfinite(whitening).all() and np.isfinite(means).all()):
            raise TaskError(f"{source}: the abstention arrays hold NaN or infinity")
        if discriminator_threshold is None:
            return cls(whitening, means, threshold)
        missing = sorted({"discriminator", "discriminator_bias"} - set(arrays))
        if missing:
            raise TaskError(f"{source}: the manifest names a discriminator; the abstention file lacks {missing}")
        weights, bias = arrays["discriminator"], arrays["discriminator_bias"]
        if weights.dtype.kind != "f" or bias.dtype.kind != "f":
            raise TaskError(f"{source}: discriminator and discriminator_bias must be float arrays")
        if weights.shape != (whitening.shape[0],) or bias.shape != (1,):
            raise TaskError(
                f"{source}: discriminator must be [{whitening.shape[0]}] and discriminator_bias [1], got "
                f"{list(weights.shape)} and {list(bias.shape)}"
            )
        if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
            raise TaskError(f"{source}: the discriminator arrays hold NaN or infinity")
        return cls(whitening, means, threshold, (weights, float(bias[0]), discriminator_threshold))

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """``[n]`` distances of ``[n, H]`` text embeddings to the nearest class mean."""
        return self._distances(self._whiten(embeddings))

    def ood_probability(self, embeddings: np.ndarray) -> np.ndarray:
        """``[n]`` the discriminator's probability that each text is out of domain (NaN without one)."""
        return self._probability(self._whiten(embeddings))

    def judge(self, embeddings: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """``[n]`` distances of ``[n, H]`` text embeddings, and per text why it abstains (None: it is in the
        domain). A NaN embedding (a text without windows) abstains."""
        z = self._whiten(embeddings)
        distances, probabilities = self._distances(z), self._probability(z)
        reasons: list[str | None] = []
        for distance, p in zip(distances.tolist(), probabilities.tolist(), strict=True):
            if not distance <= self.threshold:
                reasons.append(
                    f"the text is outside this plugin's domain: Mahalanobis distance {distance:.2f} of its embedding "
                    f"to the nearest class of the training data is above the calibrated {self.threshold:.2f}"
                )
            elif self.discriminator is not None and not p <= self.discriminator[2]:
                reasons.append(
                    f"the text is outside this plugin's domain: its embedding resembles the out-of-domain texts "
                    f"the plugin was calibrated against (probability {p:.3f} above the calibrated "
                    f"{self.discriminator[2]:.3f})"
                )
            else:
                reasons.append(None)
        return distances, reasons

    def _whiten(self, embeddings: np.ndarray) -> np.ndarray:
        result: np.ndarray = np.asarray(embeddings, dtype=np.float64) @ self.whitening.T
        return result

    def _distances(self, z: np.ndarray) -> np.ndarray:
        squared = (z * z).sum(axis=1)[:, None] - 2.0 * z @ self.means.T + (self.means * self.means).sum(axis=1)[None]
        result: np.ndarray = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
        return result

    def _probability(self, z: np.ndarray) -> np.ndarray:
        if self.discriminator is None:
            return np.full(len(z), np.nan)
        weights, bias, _ = self.discriminator
        result: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z @ weights + bias, -60.0, 60.0)))
        return result
