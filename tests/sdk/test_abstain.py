"""Runtime abstention: the Mahalanobis score, its file, and what the text-classification task does with it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from fhirplug._abstain import Abstainer
from fhirplug.errors import ManifestError, TaskError
from fhirplug.manifest import parse_manifest
from fhirplug.predictions import TextSource
from fhirplug.session import Window
from fhirplug.tasks.text_classification import TextClassification

TINY = Path(__file__).parents[1] / "fixtures" / "plugins" / "tiny-notes" / "manifest.json"
HIDDEN = 4


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_distance_is_mahalanobis_to_the_nearest_class() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(HIDDEN, HIDDEN))
    covariance = a @ a.T + np.eye(HIDDEN)
    values, vectors = np.linalg.eigh(covariance)
    whitening = (vectors / np.sqrt(values)) @ vectors.T
    mu = rng.normal(size=(3, HIDDEN))
    x = rng.normal(size=(5, HIDDEN))
    abstainer = Abstainer(whitening, mu @ whitening.T, threshold=2.0)
    precision = np.linalg.inv(covariance)
    expected = np.sqrt([min((xi - m) @ precision @ (xi - m) for m in mu) for xi in x])
    np.testing.assert_allclose(abstainer.distances(x), expected, rtol=1e-9)
    # A class mean itself is at distance 0.
    assert abstainer.distances(mu[1:2])[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"whitening": np.eye(3)}, "lacks array"),
        ({"whitening": np.eye(3), "means": np.zeros((2, 4))}, "means must be"),
        ({"whitening": np.zeros((2, 3)), "means": np.zeros((2, 3))}, "square"),
        ({"whitening": np.eye(3), "means": np.full((1, 3), np.nan)}, "NaN"),
        ({"whitening": np.eye(3).astype(np.int64), "means": np.zeros((1, 3))}, "float"),
    ],
)
def test_bad_abstention_files_are_refused(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(TaskError, match=message):
        Abstainer.from_bytes(_npz(**arrays), "abstention.npz", 1.0)
    with pytest.raises(TaskError, match="not a usable abstention file"):
        Abstainer.from_bytes(b"not a zip", "abstention.npz", 1.0)


def _task(multi_label: bool, min_probability: float = 0.0) -> TextClassification:
    raw = json.loads(TINY.read_text())
    raw["outputs"]["multi_label"] = multi_label
    raw["calibration"] = {"temperature": 1.0, "min_probability": min_probability}
    if not multi_label:
        raw["calibration"]["thresholds"] = {}
    task = TextClassification(parse_manifest(raw))
    # One class at the origin, one at (4, 0, 0, 0); identity covariance; abstain beyond distance 2.
    task.abstainer = Abstainer(np.eye(HIDDEN), np.array([[0.0] * HIDDEN, [4.0, 0, 0, 0]]), threshold=2.0)
    return task


def _source(i: int) -> TextSource:
    return TextSource(f"DocumentReference/n{i}", "DocumentReference", "content[0].attachment", "t", "t")


def _window(i: int) -> Window:
    return Window(i, [101, 5, 102], [0, 0, 0], [(0, 0), (0, 1), (0, 0)], 0, 1)


def test_a_far_text_abstains_with_an_informational_issue_and_a_near_one_is_answered() -> None:
    task = _task(multi_label=False)
    logits = np.array([6.0, 0.0, 0.0])
    near = np.concatenate([logits, [0.5, 0.0, 0.0, 0.0]])  # distance 0.5 to the first class
    far = np.concatenate([logits, [2.0, 9.0, 0.0, 0.0]])  # sqrt(4 + 81) > 2 from both classes
    sources = [_source(0), _source(1)]
    windows = [_window(0), _window(1)]
    outputs = [near.astype(np.float32), far.astype(np.float32)]
    predictions = task.interpret(sources, windows, outputs)
    assert [(p.source.reference, p.label) for p in predictions] == [("DocumentReference/n0", "diabetes")]
    assert predictions[0].details["ood_distance"] == pytest.approx(0.5, abs=1e-4)
    notices = task.notices(sources, windows, outputs)
    assert len(notices) == 1
    source, issue = notices[0]
    assert source is sources[1]
    assert (issue.severity, issue.code) == ("information", "informational")
    assert "abstained" in issue.diagnostics and "9.22" in issue.diagnostics
    np.testing.assert_array_equal(task.abstains(2, windows, outputs), [False, True])
    # Probabilities are not changed by abstention (evaluation reads them).
    assert task.scores(2, windows, outputs)[1].argmax() == 0


def test_the_mean_of_a_texts_window_embeddings_is_scored() -> None:
    task = _task(multi_label=True)
    logits = [3.0, -3.0, -3.0]
    # Two windows of one text, each 3 from the first class, averaging onto it.
    rows = [np.array([*logits, 3.0, 0, 0, 0]), np.array([*logits, -3.0, 0, 0, 0])]
    windows = [_window(0), _window(0)]
    assert task.distances(1, windows, rows)[0] == pytest.approx(0.0, abs=1e-6)
    assert [p.label for p in task.interpret([_source(0)], windows, rows)] == ["diabetes"]


def test_the_multi_class_floor_abstains_below_it() -> None:
    task = _task(multi_label=False, min_probability=0.6)
    task.abstainer = None
    sure = np.array([4.0, 0.0, 0.0], dtype=np.float32)
    unsure = np.array([0.2, 0.1, 0.0], dtype=np.float32)
    sources, windows = [_source(0), _source(1)], [_window(0), _window(1)]
    assert [p.source.reference for p in task.interpret(sources, windows, [sure, unsure])] == ["DocumentReference/n0"]
    ((_, issue),) = task.notices(sources, windows, [sure, unsure])
    assert "below the plugin's floor 0.600" in issue.diagnostics


def test_a_model_whose_output_does_not_fit_the_abstention_file_is_an_error() -> None:
    task = _task(multi_label=False)
    with pytest.raises(TaskError, match="embedding values were expected"):
        task.interpret([_source(0)], [_window(0)], [np.zeros(3 + HIDDEN + 1, dtype=np.float32)])


def test_min_probability_is_refused_on_a_multi_label_plugin() -> None:
    with pytest.raises(TaskError, match="multi-class floor"):
        _task(multi_label=True, min_probability=0.3)


def test_a_withheld_label_is_never_predicted() -> None:
    raw = json.loads(TINY.read_text())
    raw["calibration"] = {"temperature": 1.0, "withheld": {"asthma": "test AUROC 0.55 is under the bar 0.70"}}
    task = TextClassification(parse_manifest(raw))
    sure = np.array([4.0, -4.0, 4.0], dtype=np.float32)  # diabetes and asthma both far above threshold
    assert [p.label for p in task.interpret([_source(0)], [_window(0)], [sure])] == ["diabetes"]
    raw["calibration"]["withheld"] = {"nothing": "x"}
    with pytest.raises(ManifestError, match=r"withheld names labels not in outputs\.labels"):
        parse_manifest(raw)


def test_the_discriminator_abstains_between_the_classes_where_the_distance_does_not() -> None:
    task = _task(multi_label=False)
    assert task.abstainer is not None
    # Out of domain along the second axis: logit = 4 * z[1] - 2, probability > 0.9 from z[1] ≈ 1.05.
    task.abstainer = Abstainer(
        task.abstainer.whitening,
        task.abstainer.means,
        threshold=2.0,
        discriminator=(np.array([0.0, 4.0, 0.0, 0.0]), -2.0, 0.9),
    )
    logits = np.array([6.0, 0.0, 0.0])
    inside = np.concatenate([logits, [0.3, 0.0, 0.0, 0.0]])  # distance 0.3, p = sigmoid(-2)
    between = np.concatenate([logits, [0.0, 1.5, 0.0, 0.0]])  # distance 1.5 (within 2), p = sigmoid(4) = 0.982
    sources, windows = [_source(0), _source(1)], [_window(0), _window(1)]
    outputs = [inside.astype(np.float32), between.astype(np.float32)]
    assert task.distances(2, windows, outputs) == pytest.approx([0.3, 1.5], abs=1e-5)
    np.testing.assert_array_equal(task.abstains(2, windows, outputs), [False, True])
    ((source, issue),) = task.notices(sources, windows, outputs)
    assert source is sources[1]
    assert "resembles the out-of-domain texts" in issue.diagnostics and "0.982 above the calibrated 0.900" in (
        issue.diagnostics
    )
    np.testing.assert_allclose(
        task.abstainer.ood_probability(np.array([[0.3, 0.0, 0.0, 0.0], [0.0, 1.5, 0.0, 0.0]])),
        1 / (1 + np.exp(-np.array([-2.0, 4.0]))),
    )


def test_the_discriminator_arrays_and_manifest_must_agree() -> None:
    base = {"whitening": np.eye(3), "means": np.zeros((1, 3))}
    with pytest.raises(TaskError, match="lacks"):
        Abstainer.from_bytes(_npz(**base), "abstention.npz", 1.0, 0.9)
    with pytest.raises(TaskError, match=r"discriminator must be \[3\]"):
        Abstainer.from_bytes(
            _npz(**base, discriminator=np.zeros(4), discriminator_bias=np.zeros(1)), "abstention.npz", 1.0, 0.9
        )
    with pytest.raises(TaskError, match="NaN"):
        Abstainer.from_bytes(
            _npz(**base, discriminator=np.full(3, np.nan), discriminator_bias=np.zeros(1)), "abstention.npz", 1.0, 0.9
        )
    loaded = Abstainer.from_bytes(
        _npz(**base, discriminator=np.ones(3), discriminator_bias=np.array([0.5])), "abstention.npz", 1.0, 0.9
    )
    assert loaded.discriminator is not None and loaded.discriminator[1:] == (0.5, 0.9)
    # Without the manifest's threshold the arrays are ignored (an older runtime's reading of the same file).
    assert Abstainer.from_bytes(_npz(**base), "abstention.npz", 1.0).discriminator is None
    raw = json.loads(TINY.read_text())
    raw["calibration"] = {"abstention": {"method": "mahalanobis+discriminator", "threshold": 3.0}}
    with pytest.raises(ManifestError, match="needs discriminator_threshold"):
        parse_manifest(raw)
    raw["calibration"] = {"abstention": {"method": "mahalanobis", "threshold": 3.0, "discriminator_threshold": 0.9}}
    with pytest.raises(ManifestError, match="needs discriminator_threshold"):
        parse_manifest(raw)
