from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fhirplug._bench import summarize
from fhirplug.cli import main
from tests.conftest import TINY_PLUGIN

TINY = str(TINY_PLUGIN)


def test_summarize_percentiles() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    stats = summarize(samples)
    assert stats["calls"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p95_ms"] == pytest.approx(95.05)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["min_ms"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


def test_bench_shapes_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            TINY,
            "--variant",
            "all",
            "--batch",
            "1,4",
            "--tokens",
            "8,32",
            "--warmup",
            "1",
            "--duration",
            "0.05",
            "--no-cold-start",
            "--json",
            str(out),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    shapes = {(s["variant"], s["batch"], s["tokens"]) for s in report["shapes"]}
    assert shapes == {(v, b, t) for v in ("fp32", "int8") for b in (1, 4) for t in (8, 32)}
    for s in report["shapes"]:
        assert 0 < s["stats"]["p50_ms"] <= s["stats"]["p95_ms"] <= s["stats"]["p99_ms"]
        assert s["sequences_per_s"] == pytest.approx(s["batch"] / s["stats"]["mean_ms"] * 1000)
    assert "CPUExecutionProvider" in report["machine"]["providers_available"]
    assert "batch   4 ×   32 tokens" in result.stderr


def test_bench_corpus_and_cold_start(tmp_path: Path) -> None:
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n".join(["type 2 diabetes on metformin", "asthma with wheezing. " * 12] * 5))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            TINY,
            "--variant",
            "int8",
            "--batch",
            "4",
            "--corpus",
            str(corpus),
            "--warmup",
            "1",
            "--duration",
            "0.05",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (corpus_result,) = report["corpus"]
    assert corpus_result["notes"] >= 10 and corpus_result["notes_per_s"] > 0
    assert corpus_result["sequences_per_s"] > corpus_result["notes_per_s"]  # long notes span several windows
    (cold,) = report["cold_start"]
    assert 0 < cold["import_s"] < cold["total_s"]
    assert cold["peak_rss_mb"] > 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--provider", "cuda"], "CUDAExecutionProvider is not available"),
        (["--provider", "tensorrt"], "TensorrtExecutionProvider is not available"),
        (["--variant", "fp16"], "no 'fp16' variant"),
        (["--batch", "0"], "sizes must be positive"),
        (["--batch", "-2,4"], "sizes must be positive"),
        (["--tokens", "abc"], "comma-separated integers"),
        (["--tokens", "512"], "exceed the plugin's window of 32 tokens"),
        (["--corpus", "/no/such/corpus.txt"], "does not exist"),
        (["--provider", "rocm"], "Invalid value for '--provider'"),
    ],
)
def test_bench_bad_options(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["bench", TINY, "--no-cold-start", "--duration", "0.01", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_bench_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            TINY,
            "--batch",
            "1",
            "--tokens",
            "16",
            "--warmup",
            "0",
            "--duration",
            "0.02",
            "--no-cold-start",
            "--plot",
            str(png),
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_fails_before_measuring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    import fhirplug._bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))

    def measured(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured before checking the plot dependency")

    monkeypatch.setattr(fhirplug._bench, "run_bench", measured)
    result = CliRunner().invoke(main, ["bench", TINY, "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 6 and "needs the [bench] extra" in result.output
