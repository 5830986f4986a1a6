"""Convert-time abstention: the embedding output, the Gaussian fit, the threshold choice, the OOD sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fhirplug.errors import ConvertError

torch = pytest.importorskip("torch", reason="converter tests need the [train] extra")

from fhirplug_convert.abstention import (  # noqa: E402
    DEFAULT_OOD,
    WithEmbedding,
    choose_threshold,
    distances,
    fit_mahalanobis,
    read_ood,
)


def test_with_embedding_returns_the_masked_mean_of_the_last_hidden_states(tiny_base: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from fhirplug_convert.finetune import LogitsModel

    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3).eval()
    module = LogitsModel(model)
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    args = (ids, mask, torch.zeros_like(ids))
    with torch.no_grad():
        logits, embedding = WithEmbedding(module)(*args)
        hidden = model.bert(input_ids=ids, attention_mask=mask, token_type_ids=args[2]).last_hidden_state
        torch.testing.assert_close(embedding[0], hidden[0].mean(dim=0))
        torch.testing.assert_close(embedding[1], hidden[1, :3].mean(dim=0))  # padding left out
        torch.testing.assert_close(logits, module(*args))
    # The hook lives for one call only: the wrapped module keeps none.
    assert not model.bert.encoder._forward_hooks
    with pytest.raises(ConvertError, match="no transformer encoder"):
        WithEmbedding(torch.nn.Linear(3, 3))


def test_fit_separates_the_training_classes_from_a_far_cloud() -> None:
    rng = np.random.default_rng(1)
    hidden = 16
    centres = rng.normal(scale=4.0, size=(3, hidden))
    labels = rng.integers(0, 3, size=300)
    x = centres[labels] + rng.normal(size=(300, hidden))
    truth = np.eye(3, dtype=np.int64)[labels]
    arrays = fit_mahalanobis(x[:200], truth[:200])
    assert arrays["whitening"].shape == (hidden, hidden) and arrays["means"].shape == (3, hidden)
    inside = distances(arrays, x[200:])
    outside = distances(arrays, rng.normal(scale=4.0, size=(100, hidden)) + 12.0)
    # A unit Gaussian in 16 dims sits at distance ~4 from its mean.
    assert np.median(inside) < 5.5 < np.min(outside)
    threshold, facts = choose_threshold(inside, outside, max_in_domain_rate=0.01)
    assert (inside > threshold).mean() <= 0.01 and (outside > threshold).mean() == 1.0
    assert facts["in_domain_calibration_texts"] == 100
    # A text without windows (NaN embedding) has a NaN distance, never a code by accident.
    assert np.isnan(distances(arrays, np.full((1, hidden), np.nan))[0])


def test_threshold_keeps_the_in_domain_bound_even_when_ood_overlaps() -> None:
    inside = np.linspace(1.0, 10.0, 100)
    outside = np.linspace(5.0, 20.0, 100)  # half of it overlaps the in-domain range
    threshold, _ = choose_threshold(inside, outside, max_in_domain_rate=0.05)
    assert (inside > threshold).mean() <= 0.05
    threshold_no_ood, facts = choose_threshold(inside, np.empty(0), max_in_domain_rate=0.05)
    assert (inside > threshold_no_ood).mean() <= 0.05 and facts["out_of_domain_calibration_abstained"] is None
    with pytest.raises(ConvertError, match="no in-domain"):
        choose_threshold(np.array([np.nan]), outside)


def test_ood_sets_split_half_and_half_deterministically(tmp_path: Path) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(10)), encoding="utf-8")
    first = read_ood([path], seed=3, default=False)
    again = read_ood([path], seed=3, default=False)
    assert first == again
    (only,) = first
    assert len(only.calibration) == 5 and sorted(only.calibration + only.evaluation) == sorted(
        f"text {i}" for i in range(10)
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n', encoding="utf-8")
    with pytest.raises(ConvertError, match=r"bad.jsonl:1"):
        read_ood([bad], seed=0, default=False)


def test_the_generic_english_sets_are_read() -> None:
    assert all(path.is_file() for path in DEFAULT_OOD)
    (generic,) = read_ood([], seed=0)
    assert generic.calibration and generic.evaluation
    assert not set(generic.calibration) & set(generic.evaluation)


def test_the_discriminator_refuses_a_cloud_between_the_classes_and_keeps_the_in_domain_bound() -> None:
    from fhirplug._abstain import Abstainer
    from fhirplug_convert.abstention import choose_discriminator_threshold, fit_discriminator

    rng = np.random.default_rng(3)
    hidden = 128  # in many dimensions a shift along one of them hardly moves the distance
    centres = np.zeros((2, hidden))
    centres[0, 0], centres[1, 0] = -6.0, 6.0
    labels = rng.integers(0, 2, size=400)
    x = centres[labels] + rng.normal(size=(400, hidden))
    truth = np.eye(2, dtype=np.int64)[labels]
    arrays = fit_mahalanobis(x[:300], truth[:300])
    # Out of domain: between the two classes and off along axis 1, as near to a class mean as in-domain texts are.
    between = rng.normal(size=(200, hidden))
    between[:, 0] = rng.choice([-4.0, 4.0], size=200)
    between[:, 1] += 4.5
    calibration, held_out = between[:100], between[100:]
    inside = distances(arrays, x[300:])
    threshold, _ = choose_threshold(inside, distances(arrays, calibration), max_in_domain_rate=0.02)
    assert (distances(arrays, held_out) > threshold).mean() < 0.5  # the distance alone lets most through
    arrays.update(fit_discriminator(arrays, x[:300], calibration))
    bias = float(arrays["discriminator_bias"][0])
    probe = Abstainer(arrays["whitening"], arrays["means"], threshold, (arrays["discriminator"], bias, 0.5))
    p_threshold = choose_discriminator_threshold(
        probe.ood_probability(x[300:]), ~(inside <= threshold), max_in_domain_rate=0.02
    )
    assert 0.5 <= p_threshold < 1
    final = Abstainer(arrays["whitening"], arrays["means"], threshold, (arrays["discriminator"], bias, p_threshold))
    refused_inside = np.mean([why is not None for why in final.judge(x[300:])[1]])
    refused_held_out = np.mean([why is not None for why in final.judge(held_out)[1]])
    assert refused_inside <= 0.02 and refused_held_out >= 0.95
    # The in-domain budget is shared: texts already refused by distance leave less room for the discriminator.
    p = np.linspace(0.0, 0.99, 100)
    # 5 of 100 may abstain: the threshold sits in the gap between the 6th and 5th highest.
    chosen = choose_discriminator_threshold(p, np.zeros(100, dtype=bool), max_in_domain_rate=0.05)
    assert chosen == pytest.approx((p[-6] + p[-5]) / 2)
    # All 5 already abstain by distance: the highest in-domain probability must be kept.
    chosen = choose_discriminator_threshold(p, np.arange(100) < 5, max_in_domain_rate=0.05)
    assert chosen == pytest.approx((p[-1] + 1.0) / 2)
    assert choose_discriminator_threshold(np.full(10, 0.1), np.zeros(10, dtype=bool), max_in_domain_rate=0.0) == 0.5
