"""Metrics, window aggregation and calibration, in numpy alone (no scikit-learn).

The one rule that turns per-window logits into per-note probabilities is :func:`aggregate_windows`; the runtime
(``fhirplug.tasks.text_classification``) applies the same rule, so a model card's metrics are what the runtime
will produce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fhirplug.tasks.text_classification import aggregate, window_probabilities

__all__ = [
    "aggregate_windows",
    "auroc",
    "classification_metrics",
    "decide",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "task_metric",
    "tune_thresholds",
]


def aggregate_windows(window_logits: np.ndarray, temperature: float, multi_label: bool) -> np.ndarray:
    """One note's calibrated probabilities from its windows' logits — the runtime's rule, exactly.

    Each window's logits are divided by the temperature, then

    - multi-class: softmax per window, then the **mean** over windows;
    - multi-label: sigmoid per window, then the **max** over windows (a code is present if any part of the
      note says so).

    Args:
        window_logits: ``[windows, labels]`` logits of one note, in window order.
        temperature: the calibration temperature (> 0).
        multi_label: sigmoid/max instead of softmax/mean.

    Returns:
        ``[labels]`` float64 probabilities.
    """
    return aggregate(_probabilities(np.asarray(window_logits), temperature, multi_label), multi_label)


def _probabilities(logits: np.ndarray, temperature: float, multi_label: bool) -> np.ndarray:
    # The runtime's own function, so the numbers are the runtime's.
    return window_probabilities(logits, temperature, multi_label)


def _aggregate_all(notes: Sequence[np.ndarray], temperature: float, multi_label: bool) -> np.ndarray:
    """:func:`aggregate_windows` for many notes at once (vectorised: the temperature search calls it often)."""
    counts = np.array([len(w) for w in notes])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    probs = _probabilities(np.concatenate(list(notes)), temperature, multi_label)
    if multi_label:
        return np.maximum.reduceat(probs, starts, axis=0)
    return np.add.reduceat(probs, starts, axis=0) / counts[:, None]


def decide(probs: np.ndarray, multi_label: bool, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Decisions as the runtime makes them: argmax for multi-class, ``probs ≥ threshold`` for multi-label."""
    if not multi_label:
        return probs.argmax(axis=1)
    limit = thresholds if thresholds is not None else np.full(probs.shape[1], 0.5)
    return (probs >= limit[None, :]).astype(np.int64)


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); None with a single class."""
    positives = positives.astype(bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # ties share the mean of their 1-based ranks
        i = j + 1
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _one_hot(targets: np.ndarray, n_labels: int) -> np.ndarray:
    if targets.ndim == 2:
        return targets.astype(np.int64)
    out = np.zeros((len(targets), n_labels), dtype=np.int64)
    out[np.arange(len(targets)), targets] = 1
    return out


def classification_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    *,
    multi_label: bool,
    thresholds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, macro/micro F1 and per-label precision/recall/F1/support (+ AUROC for multi-label).

    Args:
        probs: ``[n, labels]`` probabilities.
        targets: ``[n]`` class indices (multi-class) or ``[n, labels]`` 0/1 (multi-label).
        labels: label names, in output order.
        multi_label: decisions by threshold instead of argmax.
        thresholds: per-label decision thresholds (multi-label; default 0.5).

    Returns:
        ``accuracy`` (multi-label: exact-match ratio), ``macro_f1``, ``micro_f1``, ``per_label`` and ``n``.
    """
    decisions = decide(probs, multi_label, thresholds)
    predicted = _one_hot(decisions, len(labels))
    truth = _one_hot(targets, len(labels))
    per_label: dict[str, dict[str, Any]] = {}
    f1s = []
    for k, name in enumerate(labels):
        tp = float((predicted[:, k] & truth[:, k]).sum())
        fp = float((predicted[:, k] & (1 - truth[:, k])).sum())
        fn = float(((1 - predicted[:, k]) & truth[:, k]).sum())
        precision, recall, f1 = _prf(tp, fp, fn)
        f1s.append(f1)
        entry: dict[str, Any] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": int(truth[:, k].sum()),
        }
        if multi_label:
            area = auroc(probs[:, k], truth[:, k])
            entry["auroc"] = None if area is None else round(area, 4)
        per_label[name] = entry
    tp = float((predicted & truth).sum())
    fp = float((predicted & (1 - truth)).sum())
    fn = float(((1 - predicted) & truth).sum())
    accuracy = float((predicted == truth).all(axis=1).mean()) if len(truth) else 0.0
    return {
        "n": len(truth),
        "accuracy": round(accuracy, 4),
        "macro_f1": round(float(np.mean(f1s)), 4),
        "micro_f1": round(_prf(tp, fp, fn)[2], 4),
        "per_label": per_label,
    }


def task_metric(metrics: dict[str, Any], multi_label: bool) -> tuple[str, float]:
    """The metric the parity gate and early stopping watch: accuracy, or micro-F1 for multi-label."""
    name = "micro_f1" if multi_label else "accuracy"
    return name, float(metrics[name])


def negative_log_likelihood(probs: np.ndarray, truth: np.ndarray, multi_label: bool) -> float:
    """Mean NLL of class indices (multi-class) or 0/1 matrices (multi-label, per entry)."""
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    if multi_label:
        return float(-(truth * np.log(p) + (1 - truth) * np.log(1 - p)).mean())
    return float(-np.log(p[np.arange(len(truth)), truth]).mean())


def fit_temperature(notes: Sequence[np.ndarray] | np.ndarray, targets: np.ndarray, *, multi_label: bool) -> float:
    """Temperature scaling: the T > 0 that minimises the NLL of the aggregated validation probabilities.

    The NLL is taken on what the runtime outputs (windows aggregated by :func:`aggregate_windows`), so T
    calibrates the runtime's probabilities, not single windows'. A 1-D golden-section search on log T in
    [0.01, 100] (the NLL is unimodal in T for one window; a coarse grid first guards the multi-window case).

    Args:
        notes: one ``[windows, labels]`` logit array per note, or a ``[n, labels]`` matrix (one window each).
        targets: ``[n]`` class indices or ``[n, labels]`` 0/1.
    """
    windows = [np.atleast_2d(w) for w in notes]
    truth = targets.astype(np.int64)

    def loss(log_t: float) -> float:
        return negative_log_likelihood(_aggregate_all(windows, math.exp(log_t), multi_label), truth, multi_label)

    grid = np.linspace(math.log(0.01), math.log(100.0), 31)
    best = int(np.argmin([loss(g) for g in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, *, multi_label: bool, bins: int = 15) -> float:
    """ECE with equal-width bins: multi-class on the top-label confidence, multi-label on every
    (note, label) probability against its 0/1 truth."""
    if multi_label:
        confidence = probs.ravel()
        correct = targets.astype(np.float64).ravel()
    else:
        confidence = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(total)


def tune_thresholds(
    probs: np.ndarray, truth: np.ndarray, labels: Sequence[str], default: float = 0.5
) -> dict[str, float]:
    """Per-label thresholds (multi-label) that maximise each label's F1 on validation.

    Candidates are the midpoints between consecutive distinct probabilities (and ``default``); ties go to the
    candidate nearest ``default``. A label without a positive in validation keeps the default (not listed).
    """
    out: dict[str, float] = {}
    for k, name in enumerate(labels):
        positives = truth[:, k].astype(bool)
        if not positives.any():
            continue
        values = np.unique(probs[:, k])
        candidates = np.concatenate([[default], (values[:-1] + values[1:]) / 2, values[:1] / 2])
        best: tuple[float, float, float] | None = None
        for c in candidates:
            predicted = probs[:, k] >= c
            tp = float((predicted & positives).sum())
            fp = float((predicted & ~positives).sum())
            fn = float((~predicted & positives).sum())
            f1 = _prf(tp, fp, fn)[2]
            key = (f1, -abs(c - default), float(c))
            if best is None or key[:2] > best[:2]:
                best = key
        assert best is not None
        out[name] = round(min(max(best[2], 0.0), 1.0), 6)
    return out
