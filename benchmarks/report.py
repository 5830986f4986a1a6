"""Render a ``benchmarks/compare.py`` results file as the Markdown tables the README shows.

python benchmarks/report.py benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: A 1-minute load average above this before the run gets a warning in the report.
BUSY_LOAD = 0.5


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:,.{digits}f}{suffix}"


def _load(m: dict[str, Any]) -> str:
    start, end = m.get("load_average_start"), m.get("load_average_end")
    return "–" if start is None else f"{start[0]:.1f} at start, {end[0]:.1f} at end"


def _header(results: dict[str, Any]) -> list[str]:
    m, model, s = results["machine"], results["model"], results["settings"]
    params = f"{model['parameters'] / 1e6:.1f}M parameters, " if model.get("parameters") else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    lines = [
        f"**{model['name']} {model['version']}** ({params}{model['layers']} layers, hidden {model['hidden']}, "
        f"window {model['window']} tokens) on {m['cpu']} ({m['usable_cores']} usable cores{gpu}), "
        f"{s['threads']} threads, {s['rounds']} interleaved rounds × {s['duration']} s per engine and shape; "
        f"1-minute load average {_load(m)}.",
        "",
    ]
    start = m.get("load_average_start")
    if start and start[0] > BUSY_LOAD:
        lines += [
            f"> **Busy machine**: the load average was {start[0]:.1f} before the run. Other work slows every engine "
            "and PyTorch's OpenMP threads far more than onnxruntime's (their barriers stall when a thread is "
            "descheduled), which inflates speedups vs PyTorch. Rerun on an idle machine before publishing.",
            "",
        ]
    return lines


def _shapes(results: dict[str, Any]) -> list[str]:
    labels = {e["id"]: e["label"] for e in results["engines"]}
    lines = [
        "| engine | batch × tokens | p50 ms | p95 ms | p99 ms | seq/s | vs PyTorch | vs Optimum | share of floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["shapes"]:
        st = r["stats"]
        lines.append(
            f"| {labels.get(r['engine'], r['engine'])} | {r['batch']} × {r['tokens']} | {_num(st['p50_ms'])} | "
            f"{_num(st['p95_ms'])} | {_num(st['p99_ms'])} | {_num(r['sequences_per_s'], 1)} | "
            f"{_num(r['speedup_vs_torch'], 2, '×')} | {_num(r['speedup_vs_optimum'], 2, '×')} | "
            f"{_num(r['floor_share'] * 100 if r['floor_share'] else None, 0, ' %')} |"
        )
    skipped = [e for e in results["engines"] if e["status"] != "ok"]
    for e in skipped:
        lines.append(f"| {e['label']} | – | {e['status']} | | | | | | |")
    lines += [
        "",
        "Speedup = PyTorch p50 / engine p50. Share of floor = floor / p50, where the floor is the encoder's "
        "GEMM FLOPs over this machine's GEMM rate at that size and thread count (fp32: MatMul; int8: the "
        "weight GEMMs at the best int8 rate, attention at the fp32 rate):",
        "",
    ]
    for key, f in results.get("floor", {}).items():
        g = f["gemm"]
        lines.append(
            f"- {key.replace('x', ' × ')}: {f['flops']['total'] / 1e9:.2f} GFLOP; fp32 "
            f"{g['fp32_gflops']:.0f} GFLOP/s → {f['fp32_ms']:.2f} ms; int8 {g['int8_gflops']:.0f} GFLOP/s "
            f"→ {f['int8_ms']:.2f} ms"
        )
    return lines


def _e2e(results: dict[str, Any]) -> list[str]:
    e2e = results.get("e2e") or {}
    if not e2e:
        return ["(no end-to-end run: pass --corpus)"]
    first = e2e["results"][0]
    lines = [
        f"{first['notes']} notes ({Path(e2e['corpus']).name}, column `{e2e['column']}`, seed {e2e['seed']}; "
        f"{e2e['notes_longer_than_window']} longer than one {e2e['window']}-token window), one FHIR Bundle of "
        "DocumentReferences (base64 text/plain) in → coded collection Bundle JSON out, batch "
        f"{e2e['batch']}, median of {first['passes']} interleaved passes:",
        "",
        "| path | notes/s | windows/pass | tokens/pass | tokens/s | read / model / write ms | reads |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in e2e["results"]:
        ph = r["phase_seconds"]
        phases = " / ".join(f"{ph[k] * 1000:,.0f}" for k in ("read_s", "model_s", "write_s"))
        lines.append(
            f"| {r['engine']} | {_num(r['notes_per_s'], 1)} | {r['windows']:,} | {r['tokens']:,} | "
            f"{_num(r['tokens_per_s'], 0)} | {phases} | {r['reads']} |"
        )
    lines += [
        "",
        f"fhirplug int8 / Optimum pipeline: **{e2e['ratio_fhirplug_int8_vs_optimum']:.2f}×** notes/s as run "
        f"(unequal work), {e2e['ratio_same_work_fhirplug_int8_vs_optimum']:.2f}× with fhirplug given only each "
        f"note's first window, {e2e['ratio_per_token_fhirplug_int8_vs_optimum']:.2f}× per token of model input. "
        f"Same codes on {e2e['same_codes_fhirplug_int8_vs_optimum'] * 100:.0f} % of notes. {e2e['caveat']}",
    ]
    return lines


def _cold(results: dict[str, Any]) -> list[str]:
    cold = results.get("cold_start") or []
    if not cold:
        return ["(no cold start: --cold-runs 0)"]
    lines = [
        "| cold process | import s | load s | first prediction s | total s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in cold:
        lines.append(
            f"| {c['engine']}: {c['what']} | {_num(c['import_s'])} | {_num(c['load_s'])} | "
            f"{_num(c['first_prediction_s'])} | {_num(c['total_s'])} | {_num(c['peak_rss_mb'], 0)} |"
        )
    lines.append(f"\nMedian of {cold[0]['runs']} fresh processes each.")
    fh = next((c for c in cold if c.get("bundle")), None)
    if fh:
        lines.append(f"fhirplug loads `{fh['bundle']}` ({fh['bundle_mb']} MB, every file's sha256 verified).")
    return lines


def _accuracy(results: dict[str, Any]) -> list[str]:
    acc = results.get("accuracy") or {}
    variants = acc.get("variants") or {}
    if not variants:
        return ["(the manifest stores no per-variant test metrics)"]
    keys = [k for k in next(iter(variants.values())) if k != "n"]
    names = list(variants)
    lines = ["| test metric | " + " | ".join(names) + " | int8 drop (points) |", "|---|" + "---:|" * (len(names) + 1)]
    for k in keys:
        drop = acc.get("int8_drop_points", {}).get(k)
        lines.append(f"| {k} | " + " | ".join(_num(variants[v].get(k), 4) for v in names) + f" | {_num(drop)} |")
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    lines = ["| target | goal | measured | status |", "|---|---|---:|---|"]
    for t in results.get("targets", []):
        unit = t["unit"]
        if unit == "share":
            value = "–" if t["measured"] is None else f"{t['measured']:.0%}"
        else:
            value = _num(t["measured"], 2, unit if unit == "×" else f" {unit}")
        lines.append(f"| {t['target']} | {t['goal']} | {value} | **{t['status']}** |")
    return lines


def render(results: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    sections = [
        _header(results),
        ["### Latency at fixed shapes", "", *_shapes(results)],
        ["### End to end (FHIR)", "", *_e2e(results)],
        ["### Cold start and memory", "", *_cold(results)],
        ["### int8 accuracy (from the bundle's manifest)", "", *_accuracy(results)],
        ["### Targets", "", *_targets(results)],
        [f"\nProduced by `{results['command']}`."],
    ]
    return "\n".join("\n".join(s) + "\n" for s in sections)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a JSON file written by benchmarks/compare.py")
    args = parser.parse_args(argv)
    print(render(json.loads(args.results.read_text())))


if __name__ == "__main__":
    main()
