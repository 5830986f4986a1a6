"""The parity gate: every packaged variant behaves like the model that was trained.

On the validation split, every variant scored by the runtime's own session (:mod:`fhirplug_convert._core`):

- fp32 ONNX against torch, on the same windows and padded batches: max |Δlogit| ≤ ``max_abs_logit_diff`` (1e-3).
- int8 and fp16 against fp32 ONNX, both calibrated: the task metric (accuracy; micro-F1 for multi-label) drops
  by at most ``max_metric_drop`` points (1.0), and at least ``min_agreement`` (98%) of decisions agree (argmax;
  multi-label: every note × label decision).

An fp16 model that no available provider can run is ``unverified`` and is not packaged (a GPU can verify it
later). A variant that fails is not packaged. What :func:`gate` does then:

- fp32 failed (the export disagrees with torch), or a variant in ``parity.require`` failed (or is unverified):
  :class:`ParityError`, nothing is written.
- the variant is in ``export.allow_drop``: status ``dropped``, the bundle is written without it (expected).
- otherwise: status stays ``failed``, the bundle is written without it and the report's ``failed`` lists it (the
  CLI exits 8, so a bundle that lacks a variant the recipe asked for is never mistaken for a complete one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fhirplug.errors import ConvertError
from fhirplug_convert.evaluate import aggregate_windows, classification_metrics, decide, task_metric

__all__ = ["Calibrated", "ParityError", "compare_variant", "gate", "torch_vs_onnx"]


class ParityError(ConvertError):
    """A variant failed the parity gate and the recipe does not allow dropping it. ``report`` has the details."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Calibrated:
    """How raw per-window logits become decisions: the plugin's calibration."""

    labels: Sequence[str]
    multi_label: bool
    temperature: float = 1.0
    #: Per-label thresholds in label order (multi-label), else None.
    thresholds: np.ndarray | None = None

    def probabilities(self, notes: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([aggregate_windows(w, self.temperature, self.multi_label) for w in notes])

    def metrics(self, notes: Sequence[np.ndarray], targets: np.ndarray) -> dict[str, Any]:
        return classification_metrics(
            self.probabilities(notes), targets, self.labels, multi_label=self.multi_label, thresholds=self.thresholds
        )


def torch_vs_onnx(torch_notes: Sequence[np.ndarray], onnx_notes: Sequence[np.ndarray]) -> float:
    """Largest |Δlogit| over every window (both scored on the same padded batches)."""
    return float(max(np.abs(a - b).max() for a, b in zip(torch_notes, onnx_notes, strict=True)))


def compare_variant(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    targets: np.ndarray,
    calibration: Calibrated,
    tolerance: dict[str, float],
) -> dict[str, Any]:
    """Judge a reduced-precision variant against fp32 ONNX on the same notes.

    Returns:
        A report entry: ``status`` passed|failed, the metric both ways, ``metric_drop_points``,
        ``agreement``, ``max_abs_logit_diff`` (for information) and ``reasons`` when it failed.
    """
    ref_metrics = calibration.metrics(reference, targets)
    cand_metrics = calibration.metrics(candidate, targets)
    name, ref_value = task_metric(ref_metrics, calibration.multi_label)
    _, cand_value = task_metric(cand_metrics, calibration.multi_label)
    ref_decisions = decide(calibration.probabilities(reference), calibration.multi_label, calibration.thresholds)
    cand_decisions = decide(calibration.probabilities(candidate), calibration.multi_label, calibration.thresholds)
    agreement = float((ref_decisions == cand_decisions).mean())
    drop = round((ref_value - cand_value) * 100, 4)
    reasons = []
    if drop > tolerance["max_metric_drop"]:
        reasons.append(f"{name} drops {drop:.2f} points (allowed {tolerance['max_metric_drop']})")
    if agreement < tolerance["min_agreement"]:
        reasons.append(f"decision agreement {agreement:.2%} (needs {tolerance['min_agreement']:.0%})")
    entry: dict[str, Any] = {
        "status": "failed" if reasons else "passed",
        "metric": name,
        "fp32": ref_value,
        "value": cand_value,
        "metric_drop_points": drop,
        "agreement": round(agreement, 6),
        "max_abs_logit_diff": round(torch_vs_onnx(reference, candidate), 6),
    }
    if reasons:
        entry["reasons"] = reasons
    return entry


def gate(report: dict[str, Any], allow_drop: Sequence[str], require: Sequence[str] = ()) -> list[str]:
    """Apply the verdicts: decide, for each variant that did not pass, whether the run stops or goes on without it.

    Args:
        report: the parity report; ``report["variants"][precision]["status"]`` is read and updated, and
            ``packaged``, ``dropped`` (every variant left out) and ``failed`` (left out although the recipe did not
            allow it) are set.
        allow_drop: variants the recipe lets go when they fail (``dropped``).
        require: variants that must pass (fp32 always must).

    Returns:
        The precisions to package (passed ones), in report order.

    Raises:
        ParityError: fp32 or a required variant failed (or, required, could not be verified).
    """
    keep, fatal, left_out = [], [], []
    for precision, entry in report["variants"].items():
        status = entry["status"]
        if status == "passed":
            keep.append(precision)
            continue
        why = "; ".join(entry.get("reasons", [entry.get("reason", status)]))
        if precision == "fp32" or precision in require:
            fatal.append(f"{precision}: {why}")
        elif status == "failed" and precision in allow_drop:
            entry["status"] = "dropped"
            entry["note"] = "failed the parity gate; left out as export.allow_drop permits"
        elif status == "failed":
            left_out.append(precision)
            entry["note"] = (
                "failed the parity gate; left out, the bundle was written with the variants that passed (list it "
                "in export.allow_drop to accept this, or in parity.require to make it stop the build)"
            )
    report["packaged"] = keep
    report["dropped"] = [p for p, e in report["variants"].items() if e["status"] != "passed"]
    report["failed"] = left_out
    if fatal:
        fix = (
            "fp32 is the reference and must match torch: check the export (opset, optimize = false) or loosen "
            "parity.max_abs_logit_diff"
            if "fp32" in [f.split(":", 1)[0] for f in fatal]
            else "fix the variant, loosen [parity] in the recipe, or take it out of parity.require"
        )
        raise ParityError("parity gate failed — " + " | ".join(fatal) + f"; nothing was written. {fix}", report)
    return keep
