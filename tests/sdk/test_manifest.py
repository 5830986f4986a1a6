from __future__ import annotations

import json

import pytest

from fhirplug.errors import ManifestError, ProviderError
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


def test_a_missing_variant_is_a_provider_error() -> None:
    manifest = parse_manifest(_raw())
    with pytest.raises(ProviderError, match=r"no fp16 variant; this plugin offers \['fp32', 'int8'\]"):
        manifest.variant("fp16")


@pytest.mark.parametrize("name", ["../labels.json", "/etc/passwd", "a//b", "./x", "a\\b", "manifest.sig", "x\n"])
def test_file_names_stay_inside_the_bundle(name: str) -> None:
    raw = _raw()
    raw["files"][name] = "0" * 64
    with pytest.raises(ManifestError, match=r"inside the bundle|the manifest or its signature"):
        parse_manifest(raw)
    raw = _raw()
    raw["variants"][0]["file"] = name
    with pytest.raises(ManifestError, match=r"inside the bundle|the manifest or its signature"):
        parse_manifest(raw)


@pytest.mark.parametrize("version", [True, 1.0, 10**5000], ids=["true", "float", "5000-digits"])
def test_schema_version_is_exactly_the_integer_one(version: object) -> None:
    raw = _raw()
    raw["schema_version"] = version
    with pytest.raises(ManifestError, match=r"schema_version is (True|1\.0|an integer of about 5000 digits)"):
        parse_manifest(raw)


def test_json_limits_name_the_file() -> None:
    text = (TINY_PLUGIN / "manifest.json").read_text()
    with pytest.raises(ManifestError, match=r"m\.json: JSON nested 65 levels deep; at most 64"):
        parse_manifest('{"metrics": ' + "[" * 64 + "]" * 64 + "}", "m.json")
    with pytest.raises(ManifestError, match=r"m\.json: an integer of 21 digits"):
        parse_manifest(text.replace('"opset": 17', '"opset": ' + "1" * 21, 1), "m.json")
    with pytest.raises(ManifestError, match=r"m\.json: duplicate key 'name'"):
        parse_manifest(text.replace('"name": "tiny-notes"', '"name": "tiny-notes", "name": "evil"', 1), "m.json")
    assert parse_manifest(text).name == "tiny-notes"
