"""Human and JSON descriptions of bundles, for ``fhirplug inspect`` and ``fhirplug plugins``."""

from __future__ import annotations

import json
from typing import Any

from fhirplug.bundle import SIGNATURE_FILE, read_manifest
from fhirplug.registry import discover_plugins, resolve_plugin


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def describe_bundle(name_or_path: str, *, as_json: bool = False) -> str:
    path = resolve_plugin(name_or_path)
    manifest, _ = read_manifest(path)
    signed = (path / SIGNATURE_FILE).exists()
    sizes = {v.file: (path / v.file).stat().st_size if (path / v.file).exists() else None for v in manifest.variants}
    if as_json:
        facts: dict[str, Any] = {
            "path": str(path),
            "signed": signed,
            "variant_bytes": sizes,
            "manifest": manifest.model_dump(mode="json"),
        }
        return json.dumps(facts, indent=2)
    m = manifest
    lines = [
        f"{m.name} {m.version}  ({m.task}, {'multi-label' if m.outputs.multi_label else 'multi-class'})",
        f"  path:         {path}",
        f"  license:      {m.license}",
        f"  signature:    {'present (verify with --trusted-key)' if signed else 'none (unsigned)'}",
        f"  intended use: {m.intended_use}",
        f"  reads:        {', '.join(m.inputs.resource_types)}",
        f"  writes:       {m.outputs.resource} per predicted code",
        f"  tokenizer:    {m.tokenizer.file}, windows of {m.tokenizer.max_tokens} tokens, stride {m.tokenizer.stride}",
        f"  calibration:  temperature {m.calibration.temperature:.3f}, "
        + (
            f"{len(m.calibration.thresholds)} per-code threshold(s), default {m.calibration.default_threshold}"
            if m.outputs.multi_label
            else f"top code, floor {m.calibration.min_probability:.3f}"
        ),
    ]
    if m.task == "text-classification":
        abstention = m.calibration.abstention
        if abstention is None:
            lines.append("  abstention:   none (the plugin answers every text)")
        else:
            lines.append(
                f"  abstention:   mahalanobis distance of the pooled embedding > {abstention.threshold:.2f}"
                + (
                    f" or out-of-domain discriminator probability > {abstention.discriminator_threshold:.3f}"
                    if abstention.discriminator_threshold is not None
                    else ""
                )
                + " → no code"
            )
    if m.training:
        params = ""
        if m.training.trainable_parameters and m.training.total_parameters:
            params = f", {m.training.trainable_parameters:,} of {m.training.total_parameters:,} parameters trained"
        lines.append(f"  training:     {m.training.method} on {m.training.base_model}{params}")
    lines.append("  variants:")
    for v in m.variants:
        size = sizes[v.file]
        lines.append(
            f"    {v.precision:<5} {v.file:<20} {_size(size) if size is not None else 'MISSING':>9}  "
            f"opset {v.opset}  {', '.join(p.removesuffix('ExecutionProvider') for p in v.providers)}"
        )
    lines.append("  codes:")
    for spec in m.outputs.labels:
        threshold = m.calibration.thresholds.get(spec.label)
        extra = f"  (threshold {threshold:.2f})" if threshold is not None else ""
        if spec.label in m.calibration.withheld:
            extra = f"  (withheld: {m.calibration.withheld[spec.label]})"
        lines.append(f"    {spec.label:<24} {spec.system} {spec.code}  {spec.display}{extra}")
    headline = {k: v for k, v in m.metrics.items() if isinstance(v, int | float)}
    if headline:
        lines.append("  metrics:      " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(headline.items())))
    test = m.metrics.get("test")
    if isinstance(test, dict):  # converter bundles: held-out test metrics per variant
        for precision, values in test.items():
            if not isinstance(values, dict):
                continue
            flat = {k: v for k, v in values.items() if isinstance(v, int | float) and k not in ("n", "n_texts")}
            for level in ("mentions", "concepts"):  # token-classification: F1 per entity type
                for kind, scores in (values.get(level) or {}).items():
                    if isinstance(scores, dict) and isinstance(scores.get("f1"), int | float):
                        flat[f"{level[:-1]} F1 {kind}"] = scores["f1"]
            if flat:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in flat.items())
                n = values.get("n", values.get("n_texts"))
                lines.append(f"  test {precision:<8} {shown}" + (f" (n={n})" if n is not None else ""))
    return "\n".join(lines)


def list_plugins(*, as_json: bool = False) -> str:
    found = discover_plugins()
    if as_json:
        return json.dumps({name: str(path) for name, path in sorted(found.items())}, indent=2)
    if not found:
        return "no plugins discovered (give a bundle path, or set FHIRPLUG_PLUGIN_PATH)"
    rows = []
    for name, path in sorted(found.items()):
        try:
            manifest, _ = read_manifest(path)
            what = f"{manifest.version:<8} {manifest.task:<22} {manifest.outputs.resource}"
        except Exception as exc:  # a broken bundle is listed with its problem, not hidden
            what = f"unreadable: {exc}"
        rows.append(f"{name:<28} {what}  {path}")
    return "\n".join(rows)
