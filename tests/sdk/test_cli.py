from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fhirplug.cli import main
from tests.conftest import TINY_PLUGIN
from tests.sdk.helpers import collection, document_reference

TINY = str(TINY_PLUGIN)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_subcommand_has_help(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_inspect(runner: CliRunner) -> None:
    result = runner.invoke(main, ["inspect", TINY])
    assert result.exit_code == 0, result.output
    assert "tiny-notes 0.1.0" in result.output
    assert "http://snomed.info/sct 195967001  Asthma  (threshold 0.40)" in result.output
    as_json = json.loads(runner.invoke(main, ["inspect", TINY, "--json"]).output)
    assert as_json["manifest"]["name"] == "tiny-notes"
    assert as_json["variant_bytes"]["model.int8.onnx"] > 0


def test_verify_ok_and_unsigned_refused(runner: CliRunner) -> None:
    refused = runner.invoke(main, ["verify", TINY])
    assert refused.exit_code == 3
    assert "unsigned" in refused.output and "Traceback" not in refused.output
    ok = runner.invoke(main, ["verify", TINY, "--allow-unsigned"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("OK tiny-notes 0.1.0: 5 files match their sha256")


def test_verify_names_a_tampered_file(runner: CliRunner, tiny_bundle: Path) -> None:
    model = tiny_bundle / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[5000] ^= 0xFF
    model.write_bytes(bytes(data))
    result = runner.invoke(main, ["verify", str(tiny_bundle), "--allow-unsigned"])
    assert result.exit_code == 3
    assert "model.int8.onnx: sha256 is" in result.output
    assert "Traceback" not in result.output


def test_keygen_sign_and_verify(runner: CliRunner, tmp_path: Path, tiny_bundle: Path) -> None:
    from tests.sdk.test_bundle import _resign

    assert runner.invoke(main, ["keygen", "--out", str(tmp_path), "--name", "pub"]).exit_code == 0
    _resign(tiny_bundle, tmp_path / "pub.key")
    ok = runner.invoke(main, ["verify", str(tiny_bundle), "--trusted-key", str(tmp_path / "pub.pub")])
    assert ok.exit_code == 0, ok.output
    assert "signed by key" in ok.output
    again = runner.invoke(main, ["keygen", "--out", str(tmp_path), "--name", "pub"])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output


def test_predict_bundle_to_file(runner: CliRunner, tmp_path: Path) -> None:
    source = tmp_path / "in.json"
    source.write_text(json.dumps(document_reference("type 2 diabetes, elevated hba1c on metformin")))
    out = tmp_path / "out.json"
    result = runner.invoke(main, ["predict", TINY, str(source), "--allow-unsigned", "-o", str(out)])
    assert result.exit_code == 0, result.output
    bundle = json.loads(out.read_text())
    assert bundle["type"] == "collection"
    codes = [
        c["code"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "RiskAssessment"
        for c in e["resource"]["prediction"][0]["outcome"]["coding"]
    ]
    assert codes == ["44054006"]


def test_predict_stdin_ndjson_format(runner: CliRunner) -> None:
    stdin = json.dumps(document_reference("asthma with wheezing, uses albuterol inhaler"))
    result = runner.invoke(main, ["predict", TINY, "-", "--allow-unsigned", "--format", "ndjson"], input=stdin)
    assert result.exit_code == 0, result.output
    kinds = [json.loads(line)["resourceType"] for line in result.stdout.splitlines()]
    assert "RiskAssessment" in kinds and kinds[-1] == "Provenance"


def test_predict_transaction(runner: CliRunner, tmp_path: Path) -> None:
    source = tmp_path / "b.json"
    source.write_text(json.dumps(collection(document_reference("high blood pressure"))))
    result = runner.invoke(main, ["predict", TINY, str(source), "--allow-unsigned", "--format", "transaction"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["type"] == "transaction"


def test_predict_partial_failure_exit_4(runner: CliRunner, tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(document_reference("type 2 diabetes")))
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not json")
    outcome = tmp_path / "outcome.json"
    result = runner.invoke(main, ["predict", TINY, str(good), str(bad), "--allow-unsigned", "--outcome", str(outcome)])
    assert result.exit_code == 4
    assert "Traceback" not in result.output
    assert "bad.json" in result.stderr
    assert json.loads(result.stdout)["entry"]  # the good file was still predicted
    issues = json.loads(outcome.read_text())["issue"]
    assert any(i["severity"] == "error" and "bad.json" in i["diagnostics"] for i in issues)


def test_predict_missing_file(runner: CliRunner) -> None:
    result = runner.invoke(main, ["predict", TINY, "/no/such/file.json", "--allow-unsigned"])
    assert result.exit_code == 4
    assert "/no/such/file.json: cannot read the file (No such file or directory)" in result.output


def test_predict_unavailable_provider(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["predict", TINY, "-", "--allow-unsigned", "--provider", "tensorrt"], input="{}")
    assert result.exit_code == 5
    assert "TensorrtExecutionProvider is not available" in result.output


def test_plugins_lists_a_plugin_path(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRPLUG_PLUGIN_PATH", str(TINY_PLUGIN.parent))
    result = runner.invoke(main, ["plugins"])
    assert result.exit_code == 0
    assert "tiny-notes" in result.output
    inspected = runner.invoke(main, ["inspect", "tiny-notes"])
    assert inspected.exit_code == 0 and str(TINY_PLUGIN) in inspected.output


def test_unknown_plugin_is_one_line(runner: CliRunner) -> None:
    result = runner.invoke(main, ["inspect", "nope-not-here"])
    assert result.exit_code == 3
    assert result.output.count("\n") == 1


def test_predict_max_chars(runner: CliRunner, tmp_path: Path) -> None:
    source = tmp_path / "long.json"
    source.write_text(json.dumps(document_reference("type 2 diabetes on metformin. " * 10)))
    result = runner.invoke(main, ["predict", TINY, str(source), "--allow-unsigned", "--max-chars", "50"])
    assert result.exit_code == 4
    assert "too-costly" in result.stderr and "limit of 50 characters" in result.stderr
    ok = runner.invoke(main, ["predict", TINY, str(source), "--allow-unsigned", "--max-chars", "5000"])
    assert ok.exit_code == 0, ok.output
