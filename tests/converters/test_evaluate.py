"""Metrics, aggregation and calibration on small arrays whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fhirplug_convert.evaluate import (
    _aggregate_all,
    aggregate_windows,
    auroc,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    tune_thresholds,
)
from fhirplug_convert.validate import Calibrated, ParityError, compare_variant, gate

TOL = {"max_abs_logit_diff": 1e-3, "max_metric_drop": 1.0, "min_agreement": 0.98}


def test_multiclass_metrics() -> None:
    targets = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    m = classification_metrics(probs, targets, ["a", "b", "c"], multi_label=False)
    # a: tp 1 fp 1 fn 1 → F1 .5; b: tp 2 fp 1 fn 0 → P 2/3 R 1 F1 .8; c: tp 1 fp 0 fn 1 → F1 2/3
    assert m["per_label"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_label"]["b"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert m["per_label"]["c"]["f1"] == 0.6667
    assert m["macro_f1"] == round((0.5 + 0.8 + 2 / 3) / 3, 4)
    assert m["micro_f1"] == m["accuracy"] == 0.6667
    assert "auroc" not in m["per_label"]["a"]


def test_multilabel_metrics_use_thresholds() -> None:
    probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1], [0.1, 0.45]])
    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    m = classification_metrics(probs, truth, ["x", "y"], multi_label=True)
    # at 0.5: x predicted rows 0,2 (tp 1, fp 1, fn 1); y predicted row 1 (tp 1, fn 1)
    assert m["per_label"]["x"]["f1"] == 0.5
    assert m["per_label"]["y"]["precision"] == 1.0 and m["per_label"]["y"]["recall"] == 0.5
    assert m["micro_f1"] == round(2 * 2 / (2 * 2 + 1 + 2), 4)
    assert m["accuracy"] == 0.25  # only row 0 is right on both labels
    assert m["per_label"]["x"]["auroc"] == 0.75
    tuned = classification_metrics(probs, truth, ["x", "y"], multi_label=True, thresholds=np.array([0.35, 0.4]))
    assert tuned["per_label"]["y"]["f1"] == 1.0
    assert tuned["accuracy"] == 0.75  # row 2 (x at 0.6) is still wrong


def test_auroc_by_hand() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # ties count half: (0.5 vs 0.5) twice → 0.5 + 0.5, 0.9 beats both negatives → 2; 3 of 4 pairs
    assert auroc(np.array([0.5, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == 0.75
    assert auroc(np.array([0.3, 0.3]), np.array([0, 1])) == 0.5
    assert auroc(np.array([0.3, 0.4]), np.array([1, 1])) is None


def test_aggregation_is_the_runtime_rule() -> None:
    windows = np.array([[2.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(aggregate_windows(windows, 1.0, multi_label=False), [0.5, 0.5])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    np.testing.assert_allclose(aggregate_windows(np.array([[2.0, -2.0], [-2.0, 0.0]]), 1.0, True), [sig(2), 0.5])
    np.testing.assert_allclose(aggregate_windows(np.array([[2.0, -2.0], [-2.0, 0.0]]), 2.0, True), [sig(1), 0.5])
    one = aggregate_windows(np.array([[1.0, 0.0, -1.0]]), 0.5, False)
    expected = np.exp([2.0, 0.0, -2.0]) / np.exp([2.0, 0.0, -2.0]).sum()
    np.testing.assert_allclose(one, expected)
    # the vectorised form the temperature search uses gives the same numbers
    notes = [np.random.default_rng(i).normal(size=(1 + i % 3, 4)) for i in range(7)]
    for multi_label in (False, True):
        np.testing.assert_allclose(
            _aggregate_all(notes, 1.3, multi_label), [aggregate_windows(w, 1.3, multi_label) for w in notes]
        )


@pytest.mark.parametrize(("true_t", "multi_label"), [(2.0, False), (0.5, False), (1.7, True)])
def test_temperature_fit_recovers_a_known_temperature(true_t: float, multi_label: bool) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 3))
    if multi_label:
        targets = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits / true_t))).astype(np.int64)
    else:
        p = np.exp(logits / true_t)
        p /= p.sum(axis=1, keepdims=True)
        targets = np.array([rng.choice(3, p=row) for row in p])
    fitted = fit_temperature(logits, targets, multi_label=multi_label)
    assert fitted == pytest.approx(true_t, rel=0.08)


def test_ece_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    # confidence .9 right (|.9 - 1| = .1), confidence .6 wrong (.6): half the notes each
    assert expected_calibration_error(probs, np.array([0, 1]), multi_label=False) == pytest.approx(0.35)
    assert expected_calibration_error(np.array([[1.0], [0.0]]), np.array([[1], [0]]), multi_label=True) == 0.0


def test_thresholds_maximise_f1() -> None:
    probs = np.array([[0.1, 0.9], [0.3, 0.8], [0.6, 0.2], [0.7, 0.7], [0.2, 0.1]])
    truth = np.array([[0, 1], [1, 1], [1, 0], [1, 1], [0, 0]])
    thresholds = tune_thresholds(probs, truth, ["a", "b"])
    assert 0.2 < thresholds["a"] <= 0.3
    assert 0.2 < thresholds["b"] <= 0.7
    # no positive in validation: the default stays in force (not listed)
    assert tune_thresholds(probs, np.zeros_like(truth), ["a", "b"]) == {}


def test_compare_variant_catches_flipped_decisions() -> None:
    rng = np.random.default_rng(1)
    reference = [rng.normal(0, 2, size=(1 + i % 2, 3)) for i in range(50)]
    targets = np.array([int(aggregate_windows(w, 1.0, False).argmax()) for w in reference])
    calibration = Calibrated(["a", "b", "c"], multi_label=False)
    same = compare_variant(reference, [w + 1e-4 for w in reference], targets, calibration, TOL)
    assert same["status"] == "passed" and same["agreement"] == 1.0 and same["metric_drop_points"] == 0.0
    flipped = [-w if i < 5 else w for i, w in enumerate(reference)]
    bad = compare_variant(reference, flipped, targets, calibration, TOL)
    assert bad["status"] == "failed"
    assert bad["agreement"] == pytest.approx(0.9)
    assert bad["metric_drop_points"] == pytest.approx(10.0)
    assert bad["reasons"] == [
        "accuracy drops 10.00 points (allowed 1.0)",
        "decision agreement 90.00% (needs 98%)",
    ]


def test_gate_drops_only_what_the_recipe_allows() -> None:
    def report() -> dict:
        return {
            "variants": {
                "fp32": {"status": "passed"},
                "int8": {"status": "failed", "reasons": ["accuracy drops 5.00 points"]},
                "fp16": {"status": "unverified"},
            }
        }

    # Required: the failure stops the build.
    with pytest.raises(ParityError, match=r"parity gate failed — int8: accuracy drops 5\.00 points") as caught:
        gate(report(), allow_drop=(), require=("int8",))
    assert caught.value.report["variants"]["int8"]["status"] == "failed"
    assert caught.value.exit_code == 7
    # Neither required nor allowed to drop: left out, and named in "failed" (the CLI exits 8 on it).
    left = report()
    assert gate(left, allow_drop=()) == ["fp32"]
    assert left["variants"]["int8"]["status"] == "failed" and left["failed"] == ["int8"]
    allowed = report()
    assert gate(allowed, allow_drop=("int8",)) == ["fp32"]
    assert allowed["variants"]["int8"]["status"] == "dropped"
    assert allowed["packaged"] == ["fp32"] and allowed["dropped"] == ["int8", "fp16"]
