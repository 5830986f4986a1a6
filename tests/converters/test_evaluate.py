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
    decision_policy,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    positive_rate_cap,
    reliable_labels,
    split_for_calibration,
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
    # a's one-vs-rest AUROC: its positives score .87 and .07 against negatives .07 ×3 and .87 → (3.5 + 1.5) / 8
    assert m["per_label"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "auroc": 0.625}
    assert m["per_label"]["b"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2, "auroc": 0.875}
    assert m["per_label"]["c"]["f1"] == 0.6667
    assert m["macro_f1"] == round((0.5 + 0.8 + 2 / 3) / 3, 4)
    assert m["micro_f1"] == m["accuracy"] == m["top1_accuracy"] == 0.6667
    # the same targets as a one-hot matrix are the same metrics
    assert classification_metrics(probs, np.eye(3)[targets], ["a", "b", "c"], multi_label=False) == m


def test_multiclass_with_several_gold_labels_counts_any_gold_label_as_right() -> None:
    gold = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])  # notes 0 and 1 are filed under a and b
    predicted = np.array([0, 2, 1, 2])  # right (a), wrong (c), right, right
    probs = np.eye(3)[predicted] * 0.7 + 0.1
    m = classification_metrics(probs, gold, ["a", "b", "c"], multi_label=False)
    assert m["accuracy"] == m["top1_accuracy"] == 0.75
    # note 0: TP a, and b is not missed; note 1: FP c, FN a and FN b; note 2: TP b; note 3: TP c
    # a's positives (notes 0, 1) score .8 and .1 against .1, .1 → (2 + 1) / 4
    assert m["per_label"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2, "auroc": 0.75}
    b = m["per_label"]["b"]
    assert (b["precision"], b["recall"], b["support"]) == (1.0, 0.5, 3)  # recall 1 of TP 1 + FN 1 (note 1)
    assert (m["per_label"]["c"]["precision"], m["per_label"]["c"]["recall"]) == (0.5, 1.0)
    assert m["micro_f1"] == round(2 * 3 / (2 * 3 + 1 + 2), 4)  # TP 3, FP 1, FN 2
    assert m["macro_f1"] == 0.6667
    # b's positives (notes 0, 1, 2) score .1, .1, .8 against note 3's .1 → (.5 + .5 + 1) / 3
    assert m["per_label"]["b"]["auroc"] == 0.6667
    with pytest.raises(ValueError, match="note 1 has none"):
        classification_metrics(probs, np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]), "abc", multi_label=False)


def test_likelihood_and_ece_use_any_gold_label() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    both = np.array([[1, 1, 0], [1, 0, 0]])
    assert negative_log_likelihood(probs, both, False) == pytest.approx(-(math.log(0.9) + math.log(0.2)) / 2)
    assert negative_log_likelihood(probs, np.array([0, 0]), False) == pytest.approx(
        -(math.log(0.6) + math.log(0.2)) / 2
    )
    # confidences .6 (right: a is gold) and .6 (wrong) share a bin: |.6 - .5|
    assert expected_calibration_error(probs, both, multi_label=False) == pytest.approx(0.1)


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
    if not multi_label:  # one-hot gold matrices are the same likelihood
        assert fit_temperature(logits, np.eye(3)[targets], multi_label=False) == pytest.approx(fitted, rel=1e-4)


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


def _chronic_sinusitis_shape() -> tuple[np.ndarray, np.ndarray]:
    """The shipped synthea plugin's finding, rebuilt: 57 validation notes, the code in 17 (30%), and the model
    scores its notes LOWER than the others (AUROC ≈ 0.1), all probabilities between 0.057 and 0.14."""
    rng = np.random.default_rng(136)
    truth = np.zeros(57, dtype=np.int64)
    truth[:17] = 1
    scores = np.where(truth == 1, rng.normal(0.072, 0.01, 57), rng.normal(0.088, 0.01, 57)).clip(0.057, 0.14)
    return scores, truth


def test_policy_refuses_the_always_positive_threshold_of_a_code_the_model_cannot_rank() -> None:
    scores, truth = _chronic_sinusitis_shape()
    area = auroc(scores, truth)
    assert area is not None and area < 0.2
    # The unguarded F1 tuning reproduces the shipped plugin: a threshold below every score, the code for every note.
    unguarded = tune_thresholds(scores[:, None], truth[:, None], ["sinusitis"])["sinusitis"]
    assert unguarded < scores.min() and (scores >= unguarded).mean() == 1.0
    # A second, well-ranked code so the policy sees a real multi-label matrix.
    good = np.where(truth[::-1] == 1, 0.8, 0.3)
    probs = np.stack([scores, good], axis=1)
    policy = decision_policy(probs, np.stack([truth, truth[::-1]], axis=1), ["sinusitis", "other"], multi_label=True)
    record = policy["labels"]["sinusitis"]
    assert record["reason"] == "flagged: low AUROC" and record["reliable"] is False
    assert policy["flagged"] == ["sinusitis"]
    assert record["threshold"] >= 0.2 and record["predicted_rate"] <= positive_rate_cap(17 / 57)
    assert record["predicted_rate"] == 0.0  # every score is below the conservative default
    assert record["auroc"] == round(area, 4) and record["support"] == 17 and record["prevalence"] == 0.2982
    assert policy["labels"]["other"]["reason"] == "tuned" and policy["labels"]["other"]["f1"] == 1.0
    assert 0.3 < policy["thresholds"]["other"] <= 0.8


def test_policy_caps_a_well_ranked_code_that_f1_would_predict_for_almost_every_note() -> None:
    scores = np.array([0.58, 0.39, 0.64, 0.34, 0.47, 0.68, 0.58, 0.34, 0.69, 0.42])
    scores = np.concatenate([scores, [0.48, 0.51, 0.43, 0.68, 0.74, 0.53, 0.33, 0.37, 0.77, 0.42]])
    truth = np.array([1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1])
    cap = positive_rate_cap(truth.mean())  # prevalence .55 → max(.75, .825), at most .8
    assert cap == 0.8
    unguarded = tune_thresholds(scores[:, None], truth[:, None], ["x"])["x"]
    assert (scores >= unguarded).mean() > cap
    record = decision_policy(scores[:, None], truth[:, None], ["x"], multi_label=True)["labels"]["x"]
    assert record["reason"] == "tuned; capped: always-positive guard" and record["reliable"] is True
    assert record["predicted_rate"] <= cap

    # and it is the best F1 among every cut-off the cap allows
    def f1(t: float) -> float:
        predicted = scores >= t
        return 2 * (predicted & (truth == 1)).sum() / (predicted.sum() + truth.sum())

    allowed = [t for t in np.unique(scores) if (scores >= t).mean() <= cap]
    assert record["f1"] == round(max(f1(t) for t in allowed), 4) == round(f1(record["threshold"]), 4)


def test_policy_low_support_default_floor_and_a_flagged_code_that_is_always_likely() -> None:
    n = 40
    rare = np.zeros(n, dtype=np.int64)
    rare[:3] = 1  # 3 positives < min_support 5
    low = np.zeros(n, dtype=np.int64)
    low[:10] = 1
    low_scores = np.where(low == 1, 0.17, 0.02)  # perfectly ranked, F1-best threshold ~0.1 < the 0.2 floor
    inverted = np.zeros(n, dtype=np.int64)
    inverted[20:28] = 1
    inverted_scores = np.linspace(0.95, 0.6, n)  # every note above 0.5, positives in the lower half
    probs = np.stack([np.where(rare == 1, 0.9, 0.1), low_scores, inverted_scores], axis=1)
    truth = np.stack([rare, low, inverted], axis=1)
    policy = decision_policy(probs, truth, ["rare", "low", "inverted"], multi_label=True)
    rare_record, low_record, inverted_record = (policy["labels"][k] for k in ("rare", "low", "inverted"))
    assert rare_record["reason"] == "default: low support" and rare_record["threshold"] == 0.5
    assert rare_record["reliable"] is True and rare_record["support"] == 3
    assert low_record["reason"] == "tuned; floored: probability floor" and low_record["threshold"] == 0.2
    assert low_record["auroc"] == 1.0 and low_record["predicted_rate"] == 0.0
    # the default 0.5 would predict it for every note: flagged, and capped at max(.2 + .2, .2 × 1.5) = 40%
    assert inverted_record["reason"] == "flagged: low AUROC; capped: always-positive guard"
    assert inverted_record["predicted_rate"] == 0.4 and policy["flagged"] == ["inverted"]
    assert policy["thresholds"] == {k: policy["labels"][k]["threshold"] for k in ("rare", "low", "inverted")}


def test_multiclass_policy_floor_keeps_98_percent_of_validation_answered() -> None:
    k = 4
    top = np.linspace(0.26, 0.45, 100)  # the top probability of each note, all below the 0.5 bound
    probs = np.column_stack([top, *(np.tile((1 - top) / (k - 1), (k - 1, 1)))])
    truth = np.zeros(100, dtype=np.int64)
    policy = decision_policy(probs, truth, list("abcd"), multi_label=False)
    assert policy["floor"] == pytest.approx(top[2], abs=1e-6)  # 2 of 100 notes may abstain
    assert policy["coverage"] == 0.98 and "thresholds" not in policy
    confident = np.eye(k)[np.arange(100) % k] * 0.9 + 0.025
    assert decision_policy(confident, np.arange(100) % k, list("abcd"), multi_label=False)["floor"] == 0.5
    uniform = np.full((100, k), 0.25)
    bounded = decision_policy(uniform, np.arange(100) % k, list("abcd"), multi_label=False)
    assert bounded["floor"] == 0.25 and bounded["coverage"] == 1.0  # 1/K: abstains on nothing
    assert bounded["flagged"] == list("abcd")  # ties everywhere: AUROC 0.5 for every label
    with pytest.raises(ValueError, match="expected"):
        decision_policy(uniform[:, :3], truth, list("abcd"), multi_label=False)


def test_reliable_labels_drops_codes_below_the_bar_with_the_reason() -> None:
    truth = np.array([[1, 0, 0, 1]] * 6 + [[0, 1, 0, 1]] * 6)
    probs = np.zeros((12, 4))
    probs[:, 0] = truth[:, 0] * 0.8 + 0.1  # perfect
    probs[:, 1] = np.linspace(0.9, 0.1, 12)  # positives (rows 6-11) score low → AUROC 0
    probs[:, 3] = 0.5  # never negative: not measurable
    probs[:3, 2], truth[:3, 2] = 0.9, 1  # 3 positives, well ranked
    metrics = classification_metrics(probs, truth, ["good", "bad", "rare", "always"], multi_label=True)
    kept, dropped = reliable_labels(metrics)
    assert kept == ["good"]
    assert dropped == {
        "bad": "test AUROC 0.000 below the reliability bar 0.7",
        "rare": "only 3 positive test note(s), fewer than 5: AUROC 1.000 unsure",
        "always": "test AUROC cannot be measured (no positive or no negative test note)",
    }
    assert reliable_labels(metrics["per_label"], min_support=3)[0] == ["good", "rare"]
    with pytest.raises(ValueError, match="classification_metrics"):
        reliable_labels({"per_label": [1, 2]})


def test_split_for_calibration_is_deterministic_disjoint_and_stratified() -> None:
    strata = ["a"] * 10 + ["b"] * 6 + ["c"]
    selection, calibration = split_for_calibration(17, seed=3, strata=strata)
    assert sorted([*selection, *calibration]) == list(range(17))
    again = split_for_calibration(17, seed=3, strata=strata)
    assert np.array_equal(again[0], selection) and np.array_equal(again[1], calibration)
    assert not np.array_equal(split_for_calibration(17, seed=4, strata=strata)[1], calibration)
    picked = [strata[i] for i in calibration]
    assert picked.count("a") == 5 and picked.count("b") == 3
    rows = np.array([[1, 0]] * 8 + [[0, 1]] * 4)
    _, cal = split_for_calibration(12, seed=0, fraction=0.25, strata=rows)
    assert len(cal) == 3 and rows[cal, 0].sum() == 2
    plain = split_for_calibration(10, seed=1, fraction=0.3)
    assert len(plain[1]) == 3 and len(plain[0]) == 7
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_for_calibration(10, seed=1, fraction=1.0)
    with pytest.raises(ValueError, match="2 entries for 10"):
        split_for_calibration(10, seed=1, strata=["a", "b"])


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
