"""Occlusion evidence and ``explain=True``: what they cost, and whether the explained span is what drives the code.

    python benchmarks/explain.py --out benchmarks/results/explain.json     # Markdown on stdout, progress on stderr

For each plugin (default: the two first-party text classifiers) it takes notes — the plugin's own
``examples/*.json`` and a seeded sample of its corpus (medical-abstracts-mesh: the committed
``data/demo-sample.csv``; synthea-conditions: the notes of ``../shared/data/synthea-r4/bundles`` when present) —
and predicts each note, as one plain-text DocumentReference, three ways in one run, interleaved note by note
(the order rotating, so machine load falls on all three alike):

- ``window``: the evidence fhirplug gave before occlusion (the window with the code's highest probability):
  the same ``Plugin`` pipeline with the occlusion step left out;
- ``evidence``: ``plugin.predict(doc)`` — occlusion evidence, at most 8 segments per note;
- ``explain``: ``plugin.predict(doc, explain=True)`` — up to 32 segments, every contribution listed.

Cost: per-note latency (median of ``--repeats``) of each mode, and the ratio to ``window``. Agreement: for each
prediction whose evidence was found by occlusion, the span is cut out of the note and the note re-scored on its
own (``plugin.predict_texts``): the fraction of predictions whose probability drops (positive by construction,
up to batching noise) and the mean drop; and how much of the note the evidence covers, before and after.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fhirplug import load_plugin
from fhirplug.fhir.reader import read_fhir
from fhirplug.plugin import Plugin, PredictionResult
from fhirplug.predictions import Prediction

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
SHARED = REPO.parent / "shared" / "data"
DEFAULT_PLUGINS = ["medical-abstracts-mesh", "synthea-conditions"]
MODES = ["window", "evidence", "explain"]


class WindowEvidence(Plugin):
    """The plugin as it was before occlusion: the task's window evidence, nothing re-scored."""

    def _explained(self, groups: Any, explain: bool) -> list[list[Prediction]]:
        return [list(predictions) for predictions, _, _ in groups]


def _document(text: str, i: int) -> dict[str, Any]:
    data = base64.b64encode(text.encode("utf-8")).decode()
    return {
        "resourceType": "DocumentReference",
        "id": f"note-{i}",
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "data": data}}],
    }


def _texts_of(path: Path, resource_types: Sequence[str]) -> list[str]:
    result = read_fhir(path.read_bytes(), resource_types=resource_types, source_name=path.name)
    return [s.text for s in result.sources]


def _corpus(name: str, resource_types: Sequence[str], notes: int, seed: int) -> tuple[list[str], str]:
    """The plugin's example notes, then a seeded sample of its corpus (deduplicated); and where they came from."""
    examples = sorted((PLUGINS / name / "examples").glob("*.json"))
    texts = [t for path in examples for t in _texts_of(path, resource_types)]
    where = [f"plugins/{name}/examples ({len(texts)} notes)"]
    pool: list[str] = []
    sample = PLUGINS / name / "data" / "demo-sample.csv"
    bundles = SHARED / "synthea-r4" / "bundles"
    if sample.is_file():
        with sample.open(encoding="utf-8", newline="") as f:
            pool = [row["medical_abstract"] for row in csv.DictReader(f)]
        where.append(f"plugins/{name}/data/demo-sample.csv")
    elif name == "synthea-conditions" and bundles.is_dir():
        pool = [t for path in sorted(bundles.glob("*.json")) for t in _texts_of(path, resource_types)]
        where.append("../shared/data/synthea-r4/bundles")
    pool = sorted(set(pool) - set(texts))
    random.Random(seed).shuffle(pool)
    return texts + pool[: max(0, notes - len(texts))], " + ".join(where)


def _timed(run: Any) -> tuple[float, PredictionResult]:
    began = time.perf_counter()
    result = run()
    return time.perf_counter() - began, result


def _summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


def measure(name: str, notes: int, repeats: int, seed: int, threads: int | None) -> dict[str, Any]:
    bundle = PLUGINS / name / "bundle"
    plugin = load_plugin(bundle, threads=threads)
    window = WindowEvidence(_verified(bundle), threads=threads)
    texts, where = _corpus(name, plugin.manifest.inputs.resource_types, notes, seed)
    runs = {
        "window": lambda doc: window.predict(doc),
        "evidence": lambda doc: plugin.predict(doc),
        "explain": lambda doc: plugin.predict(doc, explain=True),
    }
    for mode in MODES:  # warm up every path once
        runs[mode](_document(texts[0], 0))
    latency: dict[str, list[float]] = {m: [] for m in MODES}
    results: dict[str, list[PredictionResult]] = {m: [] for m in MODES}
    for i, text in enumerate(texts):
        doc = _document(text, i)
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(repeats):
            for k in range(len(MODES)):
                mode = MODES[(i + r + k) % len(MODES)]
                took, result = _timed(lambda mode=mode, doc=doc: runs[mode](doc))
                seconds[mode].append(took)
                if r == 0:
                    results[mode].append(result)
        for mode in MODES:
            latency[mode].append(statistics.median(seconds[mode]))
        if (i + 1) % 10 == 0:
            print(f"{name}: {i + 1}/{len(texts)} notes", file=sys.stderr)
    report: dict[str, Any] = {
        "plugin": name,
        "variant": plugin.variant,
        "provider": plugin.provider,
        "notes": len(texts),
        "corpus": where,
        "note_chars_mean": statistics.fmean(len(t) for t in texts),
        "note_windows_mean": statistics.fmean(plugin.session.count_windows(t) for t in texts),
        "repeats": repeats,
        "latency_s": {mode: _summary(latency[mode]) for mode in MODES},
    }
    base = report["latency_s"]["window"]["mean"]
    report["cost_vs_window"] = {m: report["latency_s"][m]["mean"] / base for m in MODES}
    for mode in ("evidence", "explain"):
        report[mode] = _agreement(plugin, texts, results[mode], results["window"])
    return report


def _verified(bundle: Path) -> Any:
    from fhirplug.bundle import verify_bundle

    return verify_bundle(bundle)


def _agreement(
    plugin: Plugin, texts: list[str], results: list[PredictionResult], windows: list[PredictionResult]
) -> dict[str, Any]:
    """Cut each occlusion span out of its note, re-score the note alone, and see the code's probability drop."""
    column = {spec.label: k for k, spec in enumerate(plugin.manifest.outputs.labels)}
    how: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    drops: list[float] = []
    covered: list[float] = []
    edited: list[str] = []
    kept: list[Prediction] = []
    for text, result in zip(texts, results, strict=True):
        for p in result.predictions:
            how[p.details["evidence"]] += 1
            if p.details["evidence"] != "occlusion":
                reasons[_kind(p.details["evidence_reason"])] += 1
                continue
            edited.append(text[: p.evidence.start] + text[p.evidence.end :])  # plain text: original == model text
            kept.append(p)
            covered.append((p.evidence.end - p.evidence.start) / max(1, len(text)))
    for p, note in zip(kept, edited, strict=True):  # one note per call: no batch-mate changes its padding
        drops.append(p.probability - float(plugin.predict_texts([note])[0, column[p.label]]))
    window_cover = [
        (p.evidence.end - p.evidence.start) / max(1, len(text))
        for text, result in zip(texts, windows, strict=True)
        for p in result.predictions
    ]
    predictions = sum(how.values())
    return {
        "predictions": predictions,
        "evidence_by": dict(how),
        "window_reasons": dict(reasons),
        "occlusion_share": how["occlusion"] / predictions if predictions else 0.0,
        "checked": len(drops),
        "drop_fraction": sum(d > 0 for d in drops) / len(drops) if drops else None,
        "drop_mean": statistics.fmean(drops) if drops else None,
        "drop_min": min(drops) if drops else None,
        "span_share_of_note_mean": statistics.fmean(covered) if covered else None,
        "window_span_share_of_note_mean": statistics.fmean(window_cover) if window_cover else None,
    }


def _kind(reason: str) -> str:
    for key in ("one sentence", "model windows", "characters", "max_input_windows", "removing no single"):
        if key in reason:
            return key
    return reason


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = [
        "| plugin | notes (mean chars / windows) | window evidence | occlusion evidence (8) | explain=True (32) |",
        "|---|---|---|---|---|",
    ]
    for r in reports:
        lat = r["latency_s"]
        cells = [
            f"{lat[m]['mean'] * 1000:.0f} ms (p95 {lat[m]['p95'] * 1000:.0f}; ×{r['cost_vs_window'][m]:.1f})"
            for m in MODES
        ]
        lines.append(
            f"| {r['plugin']} ({r['variant']}, {r['provider'].removesuffix('ExecutionProvider')}) | {r['notes']} "
            f"({r['note_chars_mean']:.0f} / {r['note_windows_mean']:.1f}) | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "| plugin | mode | predictions | evidence by occlusion | removing the span lowers p | mean drop (min) "
        "| span / note (window evidence) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for mode in ("evidence", "explain"):
            a = r[mode]
            if not a["checked"]:
                lines.append(f"| {r['plugin']} | {mode} | {a['predictions']} | 0 | – | – | – |")
                continue
            lines.append(
                f"| {r['plugin']} | {mode} | {a['predictions']} | {a['checked']} ({a['occlusion_share']:.0%}) | "
                f"{a['drop_fraction']:.1%} | {a['drop_mean']:.3f} ({a['drop_min']:.3f}) | "
                f"{a['span_share_of_note_mean']:.0%} ({a['window_span_share_of_note_mean']:.0%}) |"
            )
    reasons = {
        f"{r['plugin']} {m}": r[m]["window_reasons"]
        for r in reports
        for m in ("evidence", "explain")
        if r[m]["window_reasons"]
    }
    if reasons:
        lines += ["", "Window evidence kept because: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", action="append", help="first-party plugin name (repeatable)")
    parser.add_argument("--notes", type=int, default=40, help="notes per plugin (examples first)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per note and mode (median kept)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    reports = [measure(n, args.notes, args.repeats, args.seed, args.threads) for n in args.plugin or DEFAULT_PLUGINS]
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "plugins": reports}, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    print(markdown(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
