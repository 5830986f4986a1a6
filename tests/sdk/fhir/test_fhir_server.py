"""fhirplug's transaction output, posted to a real FHIR server (Medplum's FhirRouter on 127.0.0.1), is accepted,
found by search, and every reference in what the server stored resolves there.

The server holds what the notes came from first: each example input stored under its own ids, plus a stand-in
for each resource the input points at but does not carry (its Patient, its Encounter), as an EHR would hold them.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.fhir_tools import fhir_request, references, search

PLUGINS = REPO / "plugins"
FIRST_PARTY = ("medical-abstracts-mesh", "synthea-conditions", "bc5cdr-ner")
EXAMPLES = [(name, path) for name in FIRST_PARTY for path in sorted((PLUGINS / name / "examples").glob("*.json"))]
SUBJECT_PARAM = {"FamilyMemberHistory": "patient"}
PREDICTION_TYPES = ("RiskAssessment", "Condition", "FamilyMemberHistory", "MedicationStatement")


@pytest.fixture(scope="module")
def plugins() -> dict[str, Any]:
    from fhirplug import load_plugin

    return {name: load_plugin(PLUGINS / name / "bundle", allow_unsigned=True) for name in FIRST_PARTY}


def input_resources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The input's resources with their own ids, Bundle-internal urn:uuid references turned into Type/id."""
    if data.get("resourceType") != "Bundle":
        return [data]
    entries = data.get("entry", [])
    urls = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries if "fullUrl" in e}
    text = json.dumps([e["resource"] for e in entries])
    for url, ref in urls.items():
        text = text.replace(json.dumps(url), json.dumps(ref))
    return json.loads(text)


def seed(base: str, data: dict[str, Any]) -> set[str]:
    """Store the input (PUT under its ids) and stand-ins for what it references; returns its Patient refs."""
    stored = input_resources(data)
    have = {f"{r['resourceType']}/{r['id']}" for r in stored}
    wanted = {ref for r in stored for _, ref in references(r) if ref.count("/") == 1 and ref not in have}
    stand_ins = [{"resourceType": ref.split("/")[0], "id": ref.split("/")[1]} for ref in sorted(wanted)]
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in stored + stand_ins
    ]
    status, answer = fhir_request(base, "POST", "", {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert status == 200, answer
    return {ref for ref in have | wanted if ref.startswith("Patient/")}


def post_transaction(base: str, bundle: dict[str, Any]) -> list[str]:
    """POST a transaction; assert the server took every entry; return the stored resources' Type/id."""
    assert bundle["type"] == "transaction"
    status, answer = fhir_request(base, "POST", "", bundle)
    assert status == 200, f"the server rejected the transaction: {json.dumps(answer)[:2000]}"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert all(s.startswith("2") for s in statuses), statuses
    return [e["response"]["location"].split("/_history")[0] for e in answer["entry"]]


def unresolved(base: str, stored: list[dict[str, Any]]) -> list[str]:
    """``Type/id.path -> reference`` for every reference in stored resources that a GET does not find."""
    missing = []
    for resource in stored:
        for path, ref in references(resource):
            if ref.startswith("#"):
                continue  # contained
            status, _ = fhir_request(base, "GET", ref) if ref.count("/") == 1 else (0, {})
            if status != 200:
                missing.append(f"{resource['resourceType']}/{resource['id']}.{path} -> {ref}")
    return missing


def test_server_is_a_real_fhir_server(fhir_base: str) -> None:
    """What the tests below rely on: placeholders resolved, conditional create honoured, all or nothing."""
    device = {"resourceType": "Device", "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:sha256:ab"}]}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:5a0e0b4e-0000-4000-8000-000000000001",
                "resource": device,
                "request": {
                    "method": "POST",
                    "url": "Device",
                    "ifNoneExist": "identifier=urn:ietf:rfc:3986|urn:sha256:ab",
                },
            },
            {
                "fullUrl": "urn:uuid:5a0e0b4e-0000-4000-8000-000000000002",
                "resource": {
                    "resourceType": "Provenance",
                    "target": [{"reference": "urn:uuid:5a0e0b4e-0000-4000-8000-000000000001"}],
                    "recorded": "2024-05-01T12:30:00.000+00:00",
                    "agent": [{"who": {"reference": "urn:uuid:5a0e0b4e-0000-4000-8000-000000000001"}}],
                },
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }
    first = post_transaction(fhir_base, bundle)
    second = post_transaction(fhir_base, bundle)
    assert first[0].startswith("Device/") and second[0] == first[0], "ifNoneExist found the Device made first"
    assert len(search(fhir_base, "Device?identifier=" + urllib.parse.quote("urn:ietf:rfc:3986|urn:sha256:ab"))) == 1
    provenances = search(fhir_base, f"Provenance?target={first[0]}")
    assert len(provenances) == 2, "each post made its own Provenance, both pointing at the one Device"
    assert {p["agent"][0]["who"]["reference"] for p in provenances} == {first[0]}, "urn:uuid became the server's id"
    # A reference to a placeholder the Bundle does not carry is stored as is (Medplum does not reject it):
    # the read-back below is what finds it.
    bundle["entry"][1]["resource"]["entity"] = [
        {"role": "source", "what": {"reference": "urn:uuid:5a0e0b4e-0000-4000-8000-00000000dead"}}
    ]
    third = post_transaction(fhir_base, bundle)
    _, stored = fhir_request(fhir_base, "GET", third[1])
    assert unresolved(fhir_base, [stored]) == [
        f"{third[1]}.entity[0].what -> urn:uuid:5a0e0b4e-0000-4000-8000-00000000dead"
    ]
    # All or nothing: a failing entry leaves no trace of the ones before it.
    failing = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "id": "kept"},
                "request": {"method": "PUT", "url": "Patient/kept"},
            },
            {"resource": {"resourceType": "Patient", "id": "x"}, "request": {"method": "PUT", "url": "Device/x"}},
        ],
    }
    status, _ = fhir_request(fhir_base, "POST", "", failing)
    assert status == 400
    assert fhir_request(fhir_base, "GET", "Patient/kept")[0] == 404


@pytest.mark.parametrize(("plugin", "example"), EXAMPLES, ids=lambda v: getattr(v, "name", v))
def test_transaction_output_stored_and_every_reference_resolves(
    fhir_base: str, plugins: dict[str, Any], plugin: str, example: Path
) -> None:
    data = json.loads(example.read_text())
    patients = seed(fhir_base, data)
    result = plugins[plugin].predict(data, source_name=example.name)
    written = result.resources()
    predictions = [r for r in written if r["resourceType"] in PREDICTION_TYPES]
    assert predictions
    locations = post_transaction(fhir_base, result.to_fhir("transaction"))
    assert len(locations) == len(written)
    stored = [fhir_request(fhir_base, "GET", location)[1] for location in locations]
    assert unresolved(fhir_base, stored) == []

    # Found by search the way a client looks for them: by patient, by target, by the model's identifier.
    found = []
    for kind in sorted({r["resourceType"] for r in predictions}):
        for patient in sorted(patients):
            found += search(fhir_base, f"{kind}?{SUBJECT_PARAM.get(kind, 'subject')}={patient}")
    assert sorted(f"{r['resourceType']}/{r['id']}" for r in found) == sorted(
        loc for loc in locations if loc.split("/")[0] in PREDICTION_TYPES
    ), "every prediction is found by its patient (and nothing else is)"
    provenances = search(fhir_base, f"Provenance?target={locations[0]}")
    assert len(provenances) == 1
    (identifier,) = next(r for r in written if r["resourceType"] == "Device")["identifier"]
    devices = search(
        fhir_base, "Device?identifier=" + urllib.parse.quote(f"{identifier['system']}|{identifier['value']}")
    )
    assert len(devices) == 1


def test_posting_the_same_output_twice_creates_no_duplicates(fhir_base: str, plugins: dict[str, Any]) -> None:
    """Two runs over one input, both posted: one Device, and each prediction stored once (same ids)."""
    example = PLUGINS / "synthea-conditions" / "examples" / "01-encounter-note.json"
    data = json.loads(example.read_text())
    (patient,) = seed(fhir_base, data)
    runs = [plugins["synthea-conditions"].predict(data, source_name=example.name) for _ in range(2)]
    assert len(runs[0].predictions) >= 2
    first, second = (post_transaction(fhir_base, run.to_fhir("transaction")) for run in runs)
    (identifier,) = next(r for r in runs[0].resources() if r["resourceType"] == "Device")["identifier"]
    devices = search(
        fhir_base, "Device?identifier=" + urllib.parse.quote(f"{identifier['system']}|{identifier['value']}")
    )
    assert len(devices) == 1, f"{len(devices)} Devices for one model"
    conditions = search(fhir_base, f"Condition?subject={patient}")
    assert len(conditions) == len(runs[0].predictions), "the second run duplicated the predictions"
    predicted = [loc for loc in first if loc.startswith("Condition/")]
    assert [loc for loc in second if loc.startswith("Condition/")] == predicted
