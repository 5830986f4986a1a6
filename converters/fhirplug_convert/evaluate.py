"""Metrics, window aggregation, calibration and the decision policy of a text-classification plugin.

Metrics come from scikit-learn and the temperature fit from scipy; ECE is a short numpy function because
scikit-learn has none (``sklearn.calibration.calibration_curve`` bins one binary label, not the top-label
confidence this reports).

The one rule that turns per-window logits into per-note probabilities is :func:`aggregate_windows`; the runtime
(``fhirplug.tasks.text_classification``) applies the same rule, so a model card's metrics are what the runtime
will produce.

Multi-class targets are ``[n]`` class indices or ``[n, labels]`` 0/1 (a text that the corpus files under several
labels carries all of them); a multi-class prediction is right when it is **any** of the note's gold labels.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from fhirplug.tasks.text_classification import aggregate, window_probabilities

__all__ = [
    "aggregate_windows",
    "auroc",
    "classification_metrics",
    "decide",
    "decision_policy",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "reliable_labels",
    "split_for_calibration",
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
    return aggregate(window_probabilities(np.asarray(window_logits), temperature, multi_label), multi_label)


def _aggregate_all(notes: Sequence[np.ndarray], temperature: float, multi_label: bool) -> np.ndarray:
    """:func:`aggregate_windows` for many notes at once (vectorised: the temperature search calls it often)."""
    counts = np.array([len(w) for w in notes])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    probs = window_probabilities(np.concatenate(list(notes)), temperature, multi_label)
    if multi_label:
        return np.maximum.reduceat(probs, starts, axis=0)
    return np.add.reduceat(probs, starts, axis=0) / counts[:, None]


def decide(probs: np.ndarray, multi_label: bool, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Decisions as the runtime makes them: argmax for multi-class, ``probs ≥ threshold`` for multi-label."""
    if not multi_label:
        return probs.argmax(axis=1)
    limit = thresholds if thresholds is not None else np.full(probs.shape[1], 0.5)
    return (probs >= limit[None, :]).astype(np.int64)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None without both a positive and a negative."""
    positives = np.asarray(positives).astype(bool)
    if positives.all() or not positives.any():
        return None
    return float(roc_auc_score(positives, scores))


def _truth_matrix(targets: np.ndarray, n_labels: int) -> np.ndarray:
    """``[n, labels]`` 0/1 from class indices or a 0/1 matrix."""
    targets = np.asarray(targets)
    if targets.ndim == 2:
        if targets.shape[1] != n_labels:
            raise ValueError(f"targets have {targets.shape[1]} label columns, expected {n_labels}")
        return (targets != 0).astype(np.int64)
    out = np.zeros((len(targets), n_labels), dtype=np.int64)
    out[np.arange(len(targets)), targets.astype(np.int64)] = 1
    return out


def _top1(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-class: (gold matrix, top class per note, whether the top class is one of the note's gold labels)."""
    truth = _truth_matrix(targets, probs.shape[1])
    if len(truth) and not truth.any(axis=1).all():
        row = int(np.flatnonzero(~truth.any(axis=1))[0])
        raise ValueError(f"multi-class targets need at least one gold label per note; note {row} has none")
    top = probs.argmax(axis=1)
    return truth, top, truth[np.arange(len(top)), top].astype(bool)


def classification_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    *,
    multi_label: bool,
    thresholds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, macro/micro F1 and per-label precision/recall/F1/support/AUROC (scikit-learn).

    Multi-class with several gold labels per note (``targets`` ``[n, labels]``), the counting rule is:

    - the top class is right if it is **any** of the note's gold labels (``accuracy`` = ``top1_accuracy``);
    - a prediction ``k`` is a true positive of ``k`` when ``k`` is among the gold labels, else a false positive;
    - a gold label that was not predicted is a false negative **only when no gold label was predicted** (a note
      filed under A and B and predicted A is fully right; predicted C, it is a miss of both A and B).

    With plain class indices this is the usual single-label counting. ``support`` is the number of notes that
    carry the label; AUROC is one-vs-rest on the label's probability (None without both a positive and a
    negative note).

    Args:
        probs: ``[n, labels]`` probabilities.
        targets: ``[n]`` class indices (multi-class) or ``[n, labels]`` 0/1 (multi-label, or multi-class with
            several gold labels).
        labels: label names, in output order.
        multi_label: decisions by threshold instead of argmax.
        thresholds: per-label decision thresholds (multi-label; default 0.5).

    Returns:
        ``n``, ``accuracy`` (multi-label: exact-match ratio; multi-class: top-1, any gold label),
        ``top1_accuracy`` (multi-class), ``macro_f1``, ``micro_f1``, ``macro_auroc`` (mean over the labels where
        it is measurable, or None) and ``per_label``.
    """
    n_labels = len(labels)
    if probs.ndim != 2 or probs.shape[1] != n_labels or len(probs) == 0:
        raise ValueError(f"probabilities have shape {probs.shape}, expected [n > 0, {n_labels}]")
    if multi_label:
        truth = _truth_matrix(targets, n_labels)
        scored_truth = truth
        predicted = decide(probs, True, thresholds)
    else:
        truth, top, hit = _top1(probs, targets)
        predicted = np.zeros_like(truth)
        predicted[np.arange(len(top)), top] = 1
        # A right note counts only its predicted gold label: the others are neither hits nor misses.
        scored_truth = np.where(hit[:, None], predicted, truth)
    precision, recall, f1, _ = precision_recall_fscore_support(
        scored_truth, predicted, labels=list(range(n_labels)), average=None, zero_division=0
    )
    micro = precision_recall_fscore_support(scored_truth, predicted, average="micro", zero_division=0)[2]
    # Subset accuracy of the scored matrices = exact match (multi-label) = top-1 with any gold label (multi-class).
    accuracy = float(accuracy_score(scored_truth, predicted))
    per_label: dict[str, dict[str, Any]] = {}
    areas = []
    for k, name in enumerate(labels):
        area = auroc(probs[:, k], truth[:, k])
        if area is not None:
            areas.append(area)
        per_label[name] = {
            "precision": round(float(precision[k]), 4),
            "recall": round(float(recall[k]), 4),
            "f1": round(float(f1[k]), 4),
            "support": int(truth[:, k].sum()),
            "auroc": None if area is None else round(area, 4),
        }
    out: dict[str, Any] = {
        "n": len(truth),
        "accuracy": round(accuracy, 4),
        "macro_f1": round(float(np.mean(f1)), 4),
        "micro_f1": round(float(micro), 4),
        "macro_auroc": round(float(np.mean(areas)), 4) if areas else None,
        "per_label": per_label,
    }
    if not multi_label:
        out["top1_accuracy"] = out["accuracy"]
    return out


def task_metric(metrics: dict[str, Any], multi_label: bool) -> tuple[str, float]:
    """The metric the parity gate and early stopping watch: accuracy, or micro-F1 for multi-label."""
    name = "micro_f1" if multi_label else "accuracy"
    return name, float(metrics[name])


def negative_log_likelihood(probs: np.ndarray, truth: np.ndarray, multi_label: bool) -> float:
    """Mean NLL: per entry of a 0/1 matrix (multi-label); of the gold class (multi-class), where a note with
    several gold labels scores the probability that the prediction is any of them (their sum)."""
    if multi_label:
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        return float(-(truth * np.log(p) + (1 - truth) * np.log(1 - p)).mean())
    gold = (_truth_matrix(truth, probs.shape[1]) * probs).sum(axis=1)
    return float(-np.log(np.clip(gold, 1e-12, 1.0)).mean())


def fit_temperature(notes: Sequence[np.ndarray] | np.ndarray, targets: np.ndarray, *, multi_label: bool) -> float:
    """Temperature scaling: the T > 0 that minimises the NLL of the aggregated validation probabilities.

    The NLL is taken on what the runtime outputs (windows aggregated by :func:`aggregate_windows`), so T
    calibrates the runtime's probabilities, not single windows'. A coarse grid on log T in [0.01, 100] brackets
    the minimum (the NLL is unimodal in T for one window, not always for several), then scipy's bounded
    ``minimize_scalar`` refines it inside the bracket.

    Args:
        notes: one ``[windows, labels]`` logit array per note, or a ``[n, labels]`` matrix (one window each).
        targets: ``[n]`` class indices or ``[n, labels]`` 0/1.
    """
    windows = [np.atleast_2d(w) for w in notes]
    truth = np.asarray(targets).astype(np.int64)

    def loss(log_t: float) -> float:
        return negative_log_likelihood(_aggregate_all(windows, math.exp(log_t), multi_label), truth, multi_label)

    grid = np.linspace(math.log(0.01), math.log(100.0), 31)
    best = int(np.argmin([loss(g) for g in grid]))
    bracket = (float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)]))
    result = minimize_scalar(loss, bounds=bracket, method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, *, multi_label: bool, bins: int = 15) -> float:
    """ECE with equal-width bins: multi-class on the top-label confidence (right = any gold label), multi-label on
    every (note, label) probability against its 0/1 truth. numpy, because scikit-learn has no ECE."""
    if multi_label:
        confidence = probs.ravel()
        correct = np.asarray(targets, dtype=np.float64).ravel()
    else:
        confidence = probs.max(axis=1)
        correct = _top1(probs, targets)[2].astype(np.float64)
    index = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in np.unique(index):
        members = index == b
        total += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(total)


def _f1_at(scores: np.ndarray, positives: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """F1 of ``scores ≥ c`` for every candidate ``c`` (vectorised)."""
    predicted = scores[None, :] >= candidates[:, None]
    tp = (predicted & positives[None, :]).sum(axis=1)
    denominator = predicted.sum(axis=1) + positives.sum()
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def _candidates(scores: np.ndarray, default: float) -> np.ndarray:
    """``default``, the midpoints between consecutive distinct scores and half the lowest score."""
    values = np.unique(scores)
    return np.concatenate([[default], (values[:-1] + values[1:]) / 2, values[:1] / 2])


def _best(candidates: np.ndarray, f1: np.ndarray, default: float) -> float:
    """The candidate with the best F1; ties go to the one nearest ``default``."""
    order = np.lexsort((np.abs(candidates - default), -f1))
    return float(candidates[order[0]])


def tune_thresholds(
    probs: np.ndarray, truth: np.ndarray, labels: Sequence[str], default: float = 0.5
) -> dict[str, float]:
    """Per-label thresholds (multi-label) that maximise each label's F1 on validation — unguarded: prefer
    :func:`decision_policy`, which refuses the degenerate solutions this can return.

    Candidates are the midpoints between consecutive distinct probabilities (and ``default``); ties go to the
    candidate nearest ``default``. A label without a positive in validation keeps the default (not listed).
    """
    out: dict[str, float] = {}
    for k, name in enumerate(labels):
        positives = truth[:, k].astype(bool)
        if positives.any():
            candidates = _candidates(probs[:, k], default)
            chosen = _best(candidates, _f1_at(probs[:, k], positives, candidates), default)
            out[name] = round(min(max(chosen, 0.0), 1.0), 6)
    return out


def positive_rate_cap(prevalence: float, *, ceiling: float = 0.8, margin: float = 0.2, factor: float = 1.5) -> float:
    """The largest share of notes a code may be predicted for: ``max(prevalence + margin, prevalence × factor)``,
    but never above ``max(ceiling, prevalence)`` — a code is not predicted for (almost) every note unless it is
    present in (almost) every note."""
    return min(max(prevalence + margin, prevalence * factor), max(ceiling, prevalence))


def decision_policy(
    probs_val: np.ndarray,
    truth_val: np.ndarray,
    labels: Sequence[str],
    *,
    multi_label: bool,
    min_support: int = 5,
    min_auroc: float = 0.6,
    max_positive_rate: float = 0.8,
    rate_margin: float = 0.2,
    rate_factor: float = 1.5,
    floor: float = 0.2,
    default: float = 0.5,
    min_coverage: float = 0.98,
    max_class_floor: float = 0.5,
) -> dict[str, Any]:
    """Decision thresholds chosen on calibrated validation probabilities, with guards; every label's record says
    why it got its threshold, for the model card.

    Multi-label, per label (``reason`` is the first that applies, then the guards that changed the threshold):

    - ``default: low support`` — fewer than ``min_support`` positive validation notes: nothing is tuned, the
      conservative ``default`` (0.5) applies;
    - ``flagged: low AUROC`` / ``flagged: AUROC not measurable`` — the validation AUROC is below ``min_auroc`` (or
      there is no negative note): the probability does not rank the code's notes first, so an F1-tuned threshold
      would be noise; the ``default`` applies and ``reliable`` is False;
    - ``tuned`` — the F1-best threshold among the midpoints between validation probabilities, never below the
      probability ``floor`` (0.2);
    - guard ``capped: always-positive guard`` — whatever the reason, the threshold is raised until the code is
      predicted for at most :func:`positive_rate_cap` of the validation notes (prevalence + ``rate_margin`` or
      prevalence × ``rate_factor``, whichever is larger, at most ``max(max_positive_rate, prevalence)``);
    - guard ``floored: probability floor`` — the F1-best threshold was below ``floor``.

    Multi-class: the top class is always the decision; the policy gives a probability ``floor`` on it below which
    the runtime abstains — the largest value keeping ``min_coverage`` (98%) of validation notes answered, bounded to
    ``[1/K, max_class_floor]`` (1/K abstains on nothing: the top of K probabilities is never below 1/K). Labels
    with low validation AUROC (one-vs-rest) are flagged the same way.

    Args:
        probs_val: ``[n, labels]`` calibrated validation probabilities (what the runtime will output).
        truth_val: ``[n, labels]`` 0/1, or ``[n]`` class indices (multi-class).
        labels: label names, in column order.
        multi_label: per-label thresholds instead of a top-class floor.

    Returns:
        ``multi_label``, ``labels`` (per label: ``threshold`` (multi-label), ``reason``, ``reliable``, ``support``,
        ``prevalence``, ``auroc``, ``predicted_rate`` and ``f1`` on validation (multi-label)), ``thresholds``
        (multi-label: every label) or ``floor`` and ``coverage`` (multi-class), ``flagged`` and ``rule``.
    """
    probs_val = np.asarray(probs_val, dtype=np.float64)
    if probs_val.ndim != 2 or probs_val.shape[1] != len(labels) or len(probs_val) == 0:
        raise ValueError(f"validation probabilities have shape {probs_val.shape}, expected [n > 0, {len(labels)}]")
    truth = _truth_matrix(truth_val, len(labels))
    n = len(truth)
    records: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(labels):
        scores, positives = probs_val[:, k], truth[:, k].astype(bool)
        support = int(positives.sum())
        area = auroc(scores, positives)
        record: dict[str, Any] = {
            "support": support,
            "prevalence": round(support / n, 4),
            "auroc": None if area is None else round(area, 4),
            "reliable": True,
        }
        if support < min_support:
            reasons = ["default: low support"]
        elif area is None or area < min_auroc:
            reasons = ["flagged: AUROC not measurable" if area is None else "flagged: low AUROC"]
            record["reliable"] = False
        else:
            reasons = ["tuned"]
        if multi_label:
            record["threshold"], guards = _guarded_threshold(
                scores,
                positives,
                tuned=reasons == ["tuned"],
                cap=positive_rate_cap(support / n, ceiling=max_positive_rate, margin=rate_margin, factor=rate_factor),
                floor=floor,
                default=default,
            )
            reasons += guards
            predicted = scores >= record["threshold"]
            record["predicted_rate"] = round(float(predicted.mean()), 4)
            record["f1"] = round(float(_f1_at(scores, positives, np.array([record["threshold"]]))[0]), 4)
        else:
            record["predicted_rate"] = round(float((probs_val.argmax(axis=1) == k).mean()), 4)
        record["reason"] = "; ".join(reasons)
        records[name] = record
    out: dict[str, Any] = {
        "multi_label": multi_label,
        "labels": records,
        "flagged": [name for name, r in records.items() if not r["reliable"]],
    }
    if multi_label:
        out["thresholds"] = {name: r["threshold"] for name, r in records.items()}
        out["rule"] = (
            f"per-label F1-best threshold on validation, at least {floor}; default {default} below {min_support} "
            f"validation positives or below validation AUROC {min_auroc}; predicted for at most "
            f"max(prevalence + {rate_margin}, prevalence × {rate_factor}) of notes, capped at "
            f"max({max_positive_rate}, prevalence)"
        )
    else:
        top = np.sort(probs_val.max(axis=1))
        allowed = n - math.ceil(min_coverage * n - 1e-9)  # notes that may fall below the floor
        chosen = float(np.clip(top[allowed], 1 / len(labels), max_class_floor))
        out["floor"] = math.floor(chosen * 1e6) / 1e6  # rounded down: never abstains on a note the rule keeps
        out["coverage"] = round(float((probs_val.max(axis=1) >= out["floor"]).mean()), 4)
        out["rule"] = (
            f"abstain when the top probability is below the largest floor keeping {min_coverage:.0%} of validation "
            f"notes answered, bounded to [1/K, {max_class_floor}]"
        )
    return out


def _guarded_threshold(
    scores: np.ndarray, positives: np.ndarray, *, tuned: bool, cap: float, floor: float, default: float
) -> tuple[float, list[str]]:
    """One multi-label threshold: F1-best above the floor (or the default), raised to meet the positive-rate cap."""
    guards = []
    if tuned:
        candidates = _candidates(scores, default)
        allowed = np.append(candidates[candidates >= floor], floor)
        floored = _best(candidates, _f1_at(scores, positives, candidates), default) < floor
        # Floored, ties go to the threshold nearest the floor (nearest the F1-best), else nearest the default.
        chosen = _best(allowed, _f1_at(scores, positives, allowed), floor if floored else default)
        if floored:
            guards.append("floored: probability floor")
    else:
        chosen = default
    most = math.floor(cap * len(scores) + 1e-9)  # notes the code may be predicted for
    if (scores >= chosen).sum() > most:
        ranked = np.sort(scores)[::-1]
        # The lowest threshold that predicts at most `most` notes: above the (most+1)-th highest score.
        above = ranked[most]
        higher = ranked[ranked > above]
        raised = (above + higher.min()) / 2 if higher.size else float(np.nextafter(above, np.inf))
        if tuned:  # the best F1 among the thresholds the cap allows
            candidates = _candidates(scores, default)
            allowed = np.append(candidates[candidates >= raised], raised)
            raised = _best(allowed, _f1_at(scores, positives, allowed), default)
        chosen = max(chosen, raised)
        guards.append("capped: always-positive guard")
    chosen = min(chosen, 1.0)
    neat = round(chosen, 6)  # a readable number for the card, unless rounding would change a decision
    return (neat if np.array_equal(scores >= neat, scores >= chosen) else chosen), guards


def reliable_labels(
    test_metrics: Mapping[str, Any], *, min_auroc: float = 0.7, min_support: int = 5
) -> tuple[list[str], dict[str, str]]:
    """Which codes a plugin may ship: those whose test AUROC (one-vs-rest) reaches ``min_auroc``.

    A code is dropped, with the reason for the model card, when its test AUROC is below the bar, cannot be
    measured (no positive or no negative test note), or rests on fewer than ``min_support`` positive test notes.

    Args:
        test_metrics: :func:`classification_metrics` on the test split (or its ``per_label`` mapping).

    Returns:
        ``(kept, dropped)``: kept label names in order, and ``{label: reason}`` for the dropped ones.
    """
    per_label = test_metrics.get("per_label", test_metrics)
    if not isinstance(per_label, Mapping) or not all(isinstance(v, Mapping) for v in per_label.values()):
        raise ValueError("test_metrics must be classification_metrics(...) output or its per_label mapping")
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for name, entry in per_label.items():
        area, support = entry.get("auroc"), int(entry.get("support", 0))
        if area is None:
            dropped[name] = "test AUROC cannot be measured (no positive or no negative test note)"
        elif support < min_support:
            dropped[name] = f"only {support} positive test note(s), fewer than {min_support}: AUROC {area:.3f} unsure"
        elif area < min_auroc:
            dropped[name] = f"test AUROC {area:.3f} below the reliability bar {min_auroc}"
        else:
            kept.append(name)
    return kept, dropped


def split_for_calibration(
    n: int, seed: int, fraction: float = 0.5, strata: Sequence[Hashable] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` validation notes into (selection, calibration) index arrays, deterministically.

    Selection picks the best epoch / stops early; calibration fits the temperature, thresholds and abstention on
    notes model selection never saw. With ``strata`` (a label per note, or ``[n, labels]`` rows), notes are
    ordered by stratum then by a seeded shuffle and every ``1/fraction``-th goes to calibration, so each stratum is
    split in proportion (±1 note) and even a one-note stratum is dealt out.

    Returns:
        Sorted ``int64`` index arrays (selection, calibration); together they cover ``range(n)`` once.
    """
    if n < 2:
        raise ValueError(f"splitting for calibration needs at least 2 notes, got {n}")
    if not 0 < fraction < 1:
        raise ValueError(f"the calibration fraction must be between 0 and 1, got {fraction}")
    shuffle = np.random.default_rng(seed).permutation(n)
    if strata is None:
        order = shuffle
    else:
        keys = [repr(tuple(s)) if np.ndim(s) else repr(s) for s in (np.asarray(strata).tolist())]
        if len(keys) != n:
            raise ValueError(f"strata has {len(keys)} entries for {n} notes")
        codes = {key: i for i, key in enumerate(sorted(set(keys)))}
        stratum = np.array([codes[key] for key in keys])
        order = shuffle[np.argsort(stratum[shuffle], kind="stable")]
    position = np.arange(n)
    to_calibration = np.floor((position + 1) * fraction) > np.floor(position * fraction)
    return np.sort(order[~to_calibration]).astype(np.int64), np.sort(order[to_calibration]).astype(np.int64)
