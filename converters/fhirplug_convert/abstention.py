"""Abstention at convert time: the embedding output, the Mahalanobis model and its threshold.

The runtime side (:mod:`fhirplug._abstain`, ``TextClassification``) reads what this writes: the model's second
output ``embedding`` (the masked mean of the encoder's last hidden states, one row per window), ``abstention.npz``
(whitening and whitened class means) and ``calibration.abstention.threshold``.

- **Fit** on the training split: per class the mean of its texts' embeddings (a multi-label text counts for each
  of its classes), one covariance of the residuals shrunk by Ledoit–Wolf (scikit-learn; 384 dimensions from a few
  hundred texts would be singular without shrinkage), whitening ``W = Σ^(-1/2)``.
- **Threshold** on texts the fit never saw: the in-domain calibration split and out-of-domain calibration texts.
  The highest allowed share of in-domain texts abstaining (``max_in_domain_rate``, default 1%) bounds it from below;
  above that bound the threshold maximises in-domain kept + out-of-domain abstained, and sits in the middle of the
  gap to the next observed distance.
- **Discriminator** (when there are out-of-domain calibration texts; outlier exposure): a logistic regression
  (scikit-learn, L2, balanced classes) on the whitened embedding, training texts against the out-of-domain
  calibration texts. Its probability threshold is set on the in-domain calibration texts only: at least 0.5, and
  high enough that the texts abstaining by distance or by discriminator together stay within
  ``max_in_domain_rate``. It catches what lies between the classes: held-out Synthea encounter notes were refused
  0% by the distance alone and 100% with the discriminator (the medical-abstracts-mesh card at commit 43c6e3b and
  now), at 0.7% of in-domain test abstracts.
- **Report** on held-out texts: the in-domain test split and each out-of-domain evaluation set (the other half of
  each recipe set, and fhirplug's separate generic English evaluation file), scored through the runtime's own
  ``Abstainer``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fhirplug._abstain import Abstainer, mean_embeddings
from fhirplug.errors import ConvertError
from fhirplug.session import ModelSession

__all__ = [
    "DEFAULT_OOD",
    "OodSet",
    "WithEmbedding",
    "choose_threshold",
    "fit_discriminator",
    "fit_mahalanobis",
    "read_ood",
    "text_embeddings",
]

_DATA = Path(__file__).parent / "data"
#: The project's own generic English texts (calibration, and a different held-out set for evaluation).
DEFAULT_OOD = (_DATA / "ood_english_calibration.jsonl", _DATA / "ood_english_eval.jsonl")


class WithEmbedding(nn.Module):
    """``module`` with a second output: the text embedding, the attention-masked mean of the encoder's last hidden
    states (how all-MiniLM-L6-v2 and sentence-transformers embed a text).

    Measured on the synthea-conditions splits (``python benchmarks/abstention_embeddings.py``): the mean-pooled
    last hidden state separates in-domain notes from PubMed abstracts at AUROC 0.999-1.0 (98-100% of abstracts
    refused at 99% of in-domain kept), where the classification head's input (the BERT pooler output) reached only
    0.93-0.96 (51-76% refused): the pooler is trained for the labels, not to place unlike texts apart.

    The encoder is the submodule named ``…encoder`` with ``layer`` children (BERT-family); a forward hook captures
    its output for this call only, so the wrapped module is exported as it is (LoRA, BitFit, prompt tuning: its
    virtual tokens, inserted after the first token, count as attended positions).
    """

    def __init__(self, module: nn.Module, n_labels: int | None = None) -> None:
        super().__init__()
        self.module = module
        encoders = [m for name, m in module.named_modules() if name.endswith("encoder") and hasattr(m, "layer")]
        if not encoders:
            raise ConvertError("no transformer encoder (a submodule named …encoder with layers) found in the model")
        self._encoders = [encoders[-1]]  # a list, so the encoder is not registered twice as a submodule

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        # Registered for this call only: the wrapped module, trained or exported elsewhere, keeps no hook.
        handle = self._encoders[0].register_forward_hook(keep)
        try:
            logits = self.module(input_ids, attention_mask, token_type_ids)
        finally:
            handle.remove()
        if not captured:
            raise ConvertError("the encoder was not called: the embedding output cannot be traced")
        hidden = captured[-1]
        mask = attention_mask.to(hidden.dtype)
        extra = hidden.shape[1] - mask.shape[1]
        if extra > 0:  # prompt tuning: virtual tokens after the first one, always attended
            mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]).expand(-1, extra), mask[:, 1:]], dim=1)
        weights = mask.unsqueeze(-1)
        return logits, (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def text_embeddings(session: ModelSession, texts: Sequence[str], n_labels: int) -> np.ndarray:
    """``[n, H]``: each text's mean window embedding, as the runtime computes it (texts without windows: NaN)."""
    windows = list(session.iter_windows(texts))
    rows = session.run(windows)
    if rows and rows[0].shape[-1] <= n_labels:
        raise ConvertError("the model has no embedding output: export it with WithEmbedding")
    return mean_embeddings([w.text_index for w in windows], rows, n_labels, len(texts))


def fit_mahalanobis(embeddings: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """``{"whitening": [H, H], "means": [K', H]}`` (float32) from training embeddings and 0/1 ``[n, K]`` labels.

    Classes without a training text are left out (they have no mean).

    Raises:
        ConvertError: fewer than two usable texts.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(embeddings, dtype=np.float64)
    keep = np.isfinite(x).all(axis=1)
    x, truth = x[keep], np.asarray(truth)[keep]
    if len(x) < 2:
        raise ConvertError(f"abstention needs at least 2 training texts with windows, got {len(x)}")
    means, residuals = [], []
    for k in range(truth.shape[1]):
        members = truth[:, k].astype(bool)
        if members.any():
            mu = x[members].mean(axis=0)
            means.append(mu)
            residuals.append(x[members] - mu)
    covariance = LedoitWolf().fit(np.concatenate(residuals)).covariance_
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, values.max() * 1e-9)
    whitening = (vectors / np.sqrt(values)) @ vectors.T
    return {
        "whitening": whitening.astype(np.float32),
        "means": (np.stack(means) @ whitening.T).astype(np.float32),
    }


def distances(arrays: dict[str, np.ndarray], embeddings: np.ndarray) -> np.ndarray:
    """The runtime's distances (:class:`fhirplug._abstain.Abstainer`), NaN for a text without windows."""
    abstainer = Abstainer(arrays["whitening"], arrays["means"], 1.0)
    out = np.full(len(embeddings), np.nan)
    seen = np.isfinite(embeddings).all(axis=1)
    if seen.any():
        out[seen] = abstainer.distances(embeddings[seen])
    return out


#: L2 strength of the discriminator (scikit-learn's C, on whitened embeddings): a weak fit, not tuned per plugin.
DISCRIMINATOR_C = 0.1


def fit_discriminator(arrays: dict[str, np.ndarray], inside: np.ndarray, outside: np.ndarray) -> dict[str, np.ndarray]:
    """``{"discriminator": [H], "discriminator_bias": [1]}`` (float32): a logistic regression on the whitened
    embedding, in-domain training texts (0) against out-of-domain calibration texts (1), classes balanced.

    Raises:
        ConvertError: no usable text on one side.
    """
    from sklearn.linear_model import LogisticRegression

    inside = np.asarray(inside, dtype=np.float64)
    outside = np.asarray(outside, dtype=np.float64)
    inside = inside[np.isfinite(inside).all(axis=1)]
    outside = outside[np.isfinite(outside).all(axis=1)]
    if not len(inside) or not len(outside):
        raise ConvertError("abstention: the discriminator needs in-domain and out-of-domain texts with windows")
    whitening = arrays["whitening"].astype(np.float64)
    x = np.concatenate([inside, outside]) @ whitening.T
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    model = LogisticRegression(C=DISCRIMINATOR_C, class_weight="balanced", max_iter=5000).fit(x, y)
    return {
        "discriminator": model.coef_[0].astype(np.float32),
        "discriminator_bias": np.asarray(model.intercept_, dtype=np.float32).reshape(1),
    }


def choose_discriminator_threshold(
    probability: np.ndarray, by_distance: np.ndarray, *, max_in_domain_rate: float
) -> float:
    """The probability above which a text abstains: ≥ 0.5, and such that the in-domain calibration texts
    abstaining by distance (``by_distance``) or by probability stay within ``max_in_domain_rate`` (a text whose
    probability rounds to 1 cannot be kept)."""
    p = np.asarray(probability, dtype=np.float64)
    allowed = int(np.floor(max_in_domain_rate * len(p)))
    budget = max(allowed - int(np.count_nonzero(by_distance)), 0)
    rest = np.sort(p[~np.asarray(by_distance, dtype=bool) & np.isfinite(p)])[::-1]
    if budget >= len(rest):
        return 0.5
    # In the gap above the last kept text (at most 0.02 above it), not on it: another variant's embedding of the
    # same text, or another summation order, moves its probability a little.
    kept = float(rest[budget])
    above = float(rest[budget - 1]) if budget > 0 else 1.0
    threshold = max(0.5, min(kept + (above - kept) / 2, kept + 0.02))
    return float(min(threshold, 1.0 - 1e-6))


def _abstain(abstainer: Abstainer, embeddings: np.ndarray) -> np.ndarray:
    """The runtime's decision per text (NaN embeddings abstain, as a text without windows does)."""
    return np.array([why is not None for why in abstainer.judge(embeddings)[1]], dtype=bool)


def choose_threshold(
    in_domain: np.ndarray, out_of_domain: np.ndarray, *, max_in_domain_rate: float = 0.01
) -> tuple[float, dict[str, Any]]:
    """The distance above which a text abstains, and the facts behind the choice (for the model card).

    Args:
        in_domain: distances of in-domain calibration texts (never used to fit the Gaussian model).
        out_of_domain: distances of out-of-domain calibration texts (may be empty).
        max_in_domain_rate: the largest share of ``in_domain`` allowed to abstain.
    """
    inside = np.sort(np.asarray(in_domain, dtype=np.float64)[np.isfinite(in_domain)])
    outside = np.asarray(out_of_domain, dtype=np.float64)[np.isfinite(out_of_domain)]
    if not len(inside):
        raise ConvertError("abstention: no in-domain calibration text to set the threshold on")
    allowed = int(np.floor(max_in_domain_rate * len(inside)))
    floor = float(inside[len(inside) - 1 - allowed])
    candidates = np.unique(np.concatenate([[floor], inside[inside >= floor], outside[outside >= floor]]))

    def objective(t: float) -> float:
        kept = float((inside <= t).mean())
        refused = float((outside > t).mean()) if len(outside) else 0.0
        return kept + refused

    values = np.array([objective(float(c)) for c in candidates])
    best = int(np.argmax(values))
    chosen = float(candidates[best])
    above = candidates[candidates > chosen]
    threshold = (chosen + float(above[0])) / 2 if len(above) else chosen * 1.05
    facts = {
        "threshold": round(threshold, 4),
        "max_in_domain_rate": max_in_domain_rate,
        "in_domain_calibration_texts": len(inside),
        "in_domain_calibration_abstained": round(float((inside > threshold).mean()), 4),
        "out_of_domain_calibration_texts": len(outside),
        "out_of_domain_calibration_abstained": round(float((outside > threshold).mean()), 4) if len(outside) else None,
    }
    return threshold, facts


@dataclass(frozen=True)
class OodSet:
    """Out-of-domain texts read from one JSON Lines file, split in a calibration and an evaluation half."""

    name: str
    calibration: list[str]
    evaluation: list[str]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"abstention.ood {path}: cannot read ({exc})") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConvertError(f'{path}:{number}: not a JSON object with a "text" string ({exc})') from exc
        if not isinstance(text, str) or not text.strip():
            raise ConvertError(f'{path}:{number}: "text" must be a non-empty string')
        texts.append(text)
    if not texts:
        raise ConvertError(f"abstention.ood {path}: no text")
    return texts


def read_ood(paths: Sequence[Path], *, seed: int, default: bool = True) -> list[OodSet]:
    """The recipe's out-of-domain sets (each split half/half, seeded) and, with ``default``, the project's
    generic English (its own calibration and evaluation files)."""
    sets = []
    if default:
        sets.append(OodSet("generic English (fhirplug)", _read_jsonl(DEFAULT_OOD[0]), _read_jsonl(DEFAULT_OOD[1])))
    for path in paths:
        texts = _read_jsonl(path)
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        half = len(order) // 2
        sets.append(OodSet(path.stem, [texts[i] for i in order[:half]], [texts[i] for i in order[half:]]))
    return sets


@dataclass
class AbstentionResult:
    """What the pipeline ships and reports."""

    #: ``abstention.npz`` in the work folder.
    file: Path
    #: The manifest's ``calibration.abstention`` entry.
    manifest_entry: dict[str, Any]
    #: For the model card: fit, threshold choice, rates per variant and per set.
    facts: dict[str, Any]
    #: Per shipped variant: which test texts abstain (to report the metric on the texts it answers).
    test_abstains: dict[str, np.ndarray]


def build_abstention(
    spec: Any,
    sessions: dict[str, ModelSession],
    n_labels: int,
    train: tuple[Sequence[str], np.ndarray],
    calibration: Sequence[str],
    test: Sequence[str],
    work: Path,
    *,
    seed: int,
) -> AbstentionResult:
    """Fit on the training split (fp32), set the threshold on the calibration texts and the out-of-domain
    calibration halves, and measure every variant on the test split and the out-of-domain evaluation halves.

    Args:
        spec: the recipe's ``[abstention]`` table.
        sessions: runtime sessions by precision (``fp32`` required), each with the ``embedding`` output.
        n_labels: the model's label count.
        train: the training texts and their ``[n, labels]`` 0/1 truth.
        calibration: in-domain texts the fit never saw (the calibration part of the validation split).
        test: the test split's texts.
    """
    ood = read_ood(list(spec.ood), seed=seed, default=spec.generic_english)
    reference = sessions["fp32"]
    train_embeddings = text_embeddings(reference, list(train[0]), n_labels)
    arrays = fit_mahalanobis(train_embeddings, train[1])
    calibration_embeddings = text_embeddings(reference, list(calibration), n_labels)
    inside = distances(arrays, calibration_embeddings)
    hidden = arrays["whitening"].shape[0]
    out_embeddings = np.concatenate(
        [text_embeddings(reference, s.calibration, n_labels) for s in ood] or [np.empty((0, hidden))]
    )
    outside = distances(arrays, out_embeddings)
    threshold, choice = choose_threshold(inside, outside, max_in_domain_rate=spec.max_in_domain_rate)
    discriminator: dict[str, Any] | None = None
    discriminator_model: tuple[np.ndarray, float, float] | None = None
    if len(outside):
        arrays.update(fit_discriminator(arrays, train_embeddings, out_embeddings))
        bias = float(arrays["discriminator_bias"][0])
        probe = Abstainer(arrays["whitening"], arrays["means"], threshold, (arrays["discriminator"], bias, 0.5))
        p_inside = probe.ood_probability(np.nan_to_num(calibration_embeddings))
        p_threshold = choose_discriminator_threshold(
            p_inside, ~(inside <= threshold), max_in_domain_rate=spec.max_in_domain_rate
        )
        p_outside = probe.ood_probability(np.nan_to_num(out_embeddings))
        discriminator = {
            "model": f"logistic regression on the whitened embedding, L2 C={DISCRIMINATOR_C}, balanced classes",
            "texts": {"in_domain": len(train[0]), "out_of_domain": len(out_embeddings)},
            "threshold": round(p_threshold, 4),
            "in_domain_calibration_abstained": round(
                float((~(inside <= threshold) | (p_inside > p_threshold)).mean()), 4
            ),
            "out_of_domain_calibration_abstained": round(
                float((~(outside <= threshold) | (p_outside > p_threshold)).mean()), 4
            ),
        }
        discriminator_model = (arrays["discriminator"], bias, p_threshold)
    abstainer = Abstainer(arrays["whitening"], arrays["means"], threshold, discriminator_model)
    path = work / "abstention.npz"
    np.savez_compressed(path, **arrays)
    rates: dict[str, dict[str, Any]] = {}
    test_abstains: dict[str, np.ndarray] = {}
    for precision, session in sessions.items():
        test_abstains[precision] = _abstain(abstainer, text_embeddings(session, list(test), n_labels))
        per_set = {"in-domain test": _share(test_abstains[precision])}
        for s in ood:
            per_set[f"{s.name} (held out)"] = _share(
                _abstain(abstainer, text_embeddings(session, s.evaluation, n_labels))
            )
        rates[precision] = per_set
    method = "mahalanobis" if discriminator is None else "mahalanobis+discriminator"
    facts = {
        "method": method,
        "fit": {
            "texts": len(train[0]),
            "classes": int(arrays["means"].shape[0]),
            "hidden": int(arrays["whitening"].shape[0]),
            "covariance": "Ledoit-Wolf shrunk, shared by the classes",
        },
        "threshold_choice": choice,
        "discriminator": discriminator,
        "out_of_domain_sets": [
            {"name": s.name, "calibration_texts": len(s.calibration), "evaluation_texts": len(s.evaluation)}
            for s in ood
        ],
        "rates": rates,
    }
    entry: dict[str, Any] = {"method": method, "file": path.name, "output": "embedding", "threshold": threshold}
    if discriminator_model is not None:
        entry["discriminator_threshold"] = discriminator_model[2]
    return AbstentionResult(path, entry, facts, test_abstains)


def _share(abstained: np.ndarray) -> dict[str, Any]:
    return {"texts": len(abstained), "abstained": round(float(abstained.mean()), 4) if len(abstained) else None}
