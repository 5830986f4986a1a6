"""Smoke test of the comparative suite: a tiny random BERT, every section once, sane numbers, a table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.train

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NOTES = [
    ("Type 2 diabetes, elevated HbA1c on metformin. " * 12, 1),
    ("Follow up visit for high blood pressure; hypertension on lisinopril.", 4),
    ("Asthma with wheezing, uses albuterol inhaler. Plan discussed with patient. " * 5, 5),
    ("Colon carcinoma found on biopsy; liver lesions under review.", 1),
    ("Seizure and stroke history, brain imaging ordered. " * 7, 3),
    ("Heart failure with coronary artery disease, fever resolved.", 4),
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory):
    """compare.py's modules, importable the way the script imports them (benchmarks/ on sys.path)."""
    pytest.importorskip("torch")
    pytest.importorskip("optimum.onnxruntime")
    pytest.importorskip("matplotlib")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(BENCHMARKS))
    import compare
    import dev_model
    import report

    yield compare, dev_model, report
    mp.undo()


@pytest.fixture(scope="module")
def results(suite, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    compare, dev_model, _ = suite
    root = tmp_path_factory.mktemp("compare")
    corpus = root / "notes.csv"
    with corpus.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["condition_label", "medical_abstract"])
        writer.writerows([(label, text) for text, label in NOTES])
    checkpoint = dev_model.build_checkpoint(root / "checkpoint", "tiny", [t for t, _ in NOTES])
    bundle = dev_model.build_bundle(
        checkpoint, root / "bundle", window=32, stride=8, labelled=[(t, y - 1) for t, y in NOTES]
    )
    out, png = root / "results.json", root / "results.png"
    # fmt: off
    returned = compare.main([
        "--bundle", str(bundle), "--checkpoint", str(checkpoint), "--corpus", str(corpus), "--notes", "6",
        "--shapes", "1x32,2x16", "--rounds", "1", "--duration", "0.02", "--warmup", "1", "--gemm-duration", "0.01",
        "--e2e-rounds", "1", "--e2e-batch", "4", "--cold-runs", "1", "--out", str(out), "--plot", str(png),
    ])
    # fmt: on
    written = json.loads(out.read_text())
    assert written["targets"] == returned["targets"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return written, out


CPU_ENGINES = ["torch-fp32", "optimum-fp32", "fhirplug-fp32", "fhirplug-int8"]


def test_every_engine_and_shape_measured(results: tuple[dict, Path]) -> None:
    data, _ = results
    engines = {e["id"]: e for e in data["engines"]}
    assert all(engines[e]["status"] == "ok" for e in CPU_ENGINES)
    gpu = [e for e in engines.values() if e["precision"] == "fp16"]
    assert gpu and all(e["status"] == "ok" or e["status"].startswith("skipped: ") for e in gpu)
    rows = {(r["engine"], r["batch"], r["tokens"]): r for r in data["shapes"]}
    assert set(rows) >= {(e, b, t) for e in CPU_ENGINES for b, t in ((1, 32), (2, 16))}
    for (engine, batch, tokens), row in rows.items():
        stats = row["stats"]
        assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
        torch_p50 = rows["torch-fp32", batch, tokens]["stats"]["p50_ms"]
        optimum_p50 = rows["optimum-fp32", batch, tokens]["stats"]["p50_ms"]
        assert row["speedup_vs_torch"] == pytest.approx(torch_p50 / stats["p50_ms"])
        assert row["speedup_vs_optimum"] == pytest.approx(optimum_p50 / stats["p50_ms"])
        assert row["sequences_per_s"] == pytest.approx(batch / stats["p50_ms"] * 1000)
        if engine in CPU_ENGINES:
            assert row["floor_share"] == pytest.approx(row["floor_ms"] / stats["p50_ms"])
    assert rows["torch-fp32", 1, 32]["speedup_vs_torch"] == pytest.approx(1.0)


def test_same_model_same_inputs(results: tuple[dict, Path]) -> None:
    parity = results[0]["parity_max_abs_logit_diff_vs_torch"]
    assert parity["optimum-fp32"] < 1e-4 and parity["fhirplug-fp32"] < 1e-4  # the same fp32 ONNX on the same ids
    assert parity["fhirplug-int8"] < 0.5  # quantized, not unrelated


def test_floor_follows_the_flop_formula(results: tuple[dict, Path]) -> None:
    data = results[0]
    model = data["model"]
    h, f, layers = model["hidden"], model["intermediate"], model["layers"]
    floor = data["floor"]["1x32"]
    t = 32
    assert floor["flops"]["total"] == pytest.approx(layers * (2 * t * (4 * h * h + 2 * h * f) + 2 * 2 * t * t * h))
    assert floor["fp32_ms"] == pytest.approx(floor["flops"]["total"] / (floor["gemm"]["fp32_gflops"] * 1e9) * 1e3)
    assert 0 < floor["int8_ms"] < floor["fp32_ms"] * 10


def test_end_to_end_cold_start_accuracy_targets(results: tuple[dict, Path]) -> None:
    data = results[0]
    e2e = data["e2e"]
    by = {r["engine"]: r for r in e2e["results"]}
    assert set(by) == {"fhirplug-int8", "fhirplug-fp32", "optimum-pipeline", "fhirplug-int8-first-window"}
    assert all(r["notes"] == 6 and r["notes_per_s"] > 0 and r["output_bytes"] > 100 for r in by.values())
    assert by["optimum-pipeline"]["windows"] == 6
    assert by["fhirplug-int8"]["windows"] > 6  # long notes are windowed, not truncated
    assert e2e["ratio_fhirplug_int8_vs_optimum"] == pytest.approx(
        by["fhirplug-int8"]["notes_per_s"] / by["optimum-pipeline"]["notes_per_s"]
    )
    cold = {c["engine"]: c for c in data["cold_start"]}
    assert set(cold) == {"fhirplug-int8", "torch-fp32", "optimum-fp32"}
    assert all(0 < c["load_s"] < c["total_s"] and c["peak_rss_mb"] > 10 for c in cold.values())
    assert cold["torch-fp32"]["import_s"] > cold["fhirplug-int8"]["import_s"]
    acc = data["accuracy"]
    assert set(acc["variants"]) == {"fp32", "int8"} and acc["task_metric"] == "accuracy"
    assert acc["int8_drop_points"]["accuracy"] == pytest.approx(
        (acc["variants"]["fp32"]["accuracy"] - acc["variants"]["int8"]["accuracy"]) * 100
    )
    targets = data["targets"]
    assert len(targets) == 7 and all(t["status"] in ("PASS", "MISS") for t in targets)
    head = next(r for r in data["shapes"] if r["engine"] == "fhirplug-int8" and (r["batch"], r["tokens"]) == (1, 32))
    share = next(t for t in targets if "share of the int8 GEMM floor" in t["target"])
    assert share["measured"] == head["floor_share"] and share["status"] == (
        "PASS" if head["floor_share"] >= 0.4 else "MISS"
    )
    assert e2e["evidence_segments"] == 0 and "window" in e2e["caveat"]
    assert data["command"].startswith("python benchmarks/compare.py --bundle ")
    assert data["machine"]["cores"] >= 1


def test_report_renders_every_engine(suite, results: tuple[dict, Path]) -> None:
    _, _, report = suite
    data, path = results
    text = report.render(data)
    for engine in data["engines"]:
        assert f"| {engine['label']} |" in text
    for target in data["targets"]:
        assert f"| {target['target']} |" in text and f"**{target['status']}**" in text
    assert "| fhirplug-int8-first-window |" in text and "| torch-fp32: import torch" in text
    report.main([str(path)])
