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
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from fhirplug._coding import MAX_VECTORS_BYTES, _load_npz
from fhirplug.errors import TaskError

__all__ = ["Abstainer"]


def _check_declared(data: bytes, source: str) -> None:
    """Refuse an archive whose ``.npy`` headers declare more than :data:`MAX_VECTORS_BYTES` of arrays, before
    numpy allocates them (``np.load`` sizes the array from the header, whatever bytes follow it)."""
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    version = npy_format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = npy_format.read_array_header_1_0(member)
                    else:
                        shape, _, dtype = npy_format.read_array_header_2_0(member)
                total += int(np.prod(shape, dtype=object)) * dtype.itemsize
                if total > MAX_VECTORS_BYTES:
                    raise TaskError(
                        f"{source}: not a usable abstention file (its arrays declare more than the "
                        f"{MAX_VECTORS_BYTES:,} bytes allowed)"
                    )
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, TypeError) as exc:
        raise TaskError(f"{source}: not a usable abstention file (not an .npz archive of plain arrays: {exc})") from exc


class Abstainer:
    """Mahalanobis distance to the nearest class mean, and the threshold above which a text abstains."""

    def __init__(self, whitening: np.ndarray, means: np.ndarray, threshold: float) -> None:
        self.whitening = np.asarray(whitening, dtype=np.float64)
        self.means = np.asarray(means, dtype=np.float64)
        self.threshold = float(threshold)
        self.hidden = self.whitening.shape[1]

    @classmethod
    def from_bytes(cls, data: bytes, source: str, threshold: float) -> Abstainer:
        """Read ``abstention.npz`` (a verified bundle's bytes).

        Raises:
            TaskError: not an .npz of the two float arrays, or their shapes do not fit together.
        """
        _check_declared(data, source)
        try:
            arrays = _load_npz(data, source)
        except TaskError as exc:
            raise TaskError(f"{source}: not a usable abstention file ({exc})") from exc
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
        return cls(whitening, means, threshold)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """``[n]`` distances of ``[n, H]`` text embeddings to the nearest class mean."""
        z = np.asarray(embeddings, dtype=np.float64) @ self.whitening.T
        squared = (z * z).sum(axis=1)[:, None] - 2.0 * z @ self.means.T + (self.means * self.means).sum(axis=1)[None]
        result: np.ndarray = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
        return result
