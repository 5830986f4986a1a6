from __future__ import annotations

import json

import pytest

from fhirplug.errors import ManifestError
from fhirplug.manifest import parse_manifest
from tests.conftest import TINY_PLUGIN


def _raw() -> dict:
    return json.loads((TINY_PLUGIN / "manifest.json").read_text())


def test_parses_the_fixture_manifest() -> None:
    manifest = parse_manifest(_raw())
    assert manifest.name == "tiny-notes"
    assert manifest.outputs.multi_label is True
    assert [spec.code for spec in manifest.outputs.labels] == ["44054006", "38341003", "195967001"]
    assert manifest.variant("int8").file == "model.int8.onnx"
    assert manifest.calibration.thresholds == {"asthma": 0.4}


def test_manifest_is_frozen() -> None:
    manifest = parse_manifest(_raw())
    with pytest.raises(Exception, match="frozen"):
        manifest.name = "other"  # type: ignore[misc]


def test_unknown_key_is_named() -> None:
    raw = _raw()
    raw["outputs"]["lables"] = []
    with pytest.raises(ManifestError, match=r"unknown key 'outputs\.lables'"):
        parse_manifest(raw)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version(version: object) -> None:
    raw = _raw()
    raw["schema_version"] = version
    with pytest.raises(ManifestError, match="schema_version"):
        parse_manifest(raw)


def test_missing_key_is_named() -> None:
    raw = _raw()
    del raw["intended_use"]
    with pytest.raises(ManifestError, match="missing key 'intended_use'"):
        parse_manifest(raw)


def test_code_system_must_be_a_uri() -> None:
    raw = _raw()
    raw["outputs"]["labels"][0]["system"] = "SNOMED"
    with pytest.raises(ManifestError, match="canonical URI"):
        parse_manifest(raw)


def test_threshold_for_unknown_label() -> None:
    raw = _raw()
    raw["calibration"]["thresholds"]["flu"] = 0.3
    with pytest.raises(ManifestError, match="flu"):
        parse_manifest(raw)


def test_stride_must_leave_room() -> None:
    raw = _raw()
    raw["tokenizer"]["stride"] = raw["tokenizer"]["max_tokens"]
    with pytest.raises(ManifestError, match="stride"):
        parse_manifest(raw)


def test_not_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{nope")


def test_canonical_json_round_trip() -> None:
    manifest = parse_manifest(_raw())
    assert parse_manifest(manifest.to_json()) == manifest
