"""Run predict over data nobody on the team wrote: the official HL7 R4 examples and Synthea bundles.

Skipped where ../shared/data is absent (a user's clone); CI has it beside the checkout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fhirplug.cli import main
from tests.conftest import SHARED_DATA, TINY_PLUGIN

EXAMPLES = sorted((SHARED_DATA / "fhir-r4-examples").rglob("*.json"))
SYNTHEA = sorted((SHARED_DATA / "synthea-r4" / "bundles").glob("*.json"))
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_hl7_examples_predict_or_report(tiny_plugin, path: Path) -> None:
    result = tiny_plugin.predict_files([path])
    # Either text was read (and scored: no code above threshold is an answer too) or the reason is reported.
    assert result.sources or result.issues, path
    if not result.sources:
        assert any(i.severity in ("error", "information", "warning") for i in result.issues)
    for issue in result.issues:
        assert issue.code and issue.diagnostics
    if result.predictions:
        assert result.to_fhir("transaction")["entry"]


def test_synthea_bundles_predict(tiny_plugin) -> None:
    assert len(SYNTHEA) == 20
    for path in SYNTHEA:
        result = tiny_plugin.predict_files([path])
        assert not result.has_errors, [i.diagnostics for i in result.issues if i.is_error]
        assert len(result.sources) >= 10
        assert result.predictions
        referenced = {p.evidence.reference.split("/")[0] for p in result.predictions}
        assert referenced <= {"DocumentReference", "DiagnosticReport", "Observation"}
        assert {"DocumentReference", "DiagnosticReport"} <= {s.resource_type for s in result.sources}


def test_cli_over_every_example_file() -> None:
    runner = CliRunner()
    for path in EXAMPLES:
        result = runner.invoke(main, ["predict", str(TINY_PLUGIN), str(path), "--allow-unsigned"])
        assert result.exit_code in (0, 4), (path, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (path, result.exception)
        assert "Traceback" not in result.output
