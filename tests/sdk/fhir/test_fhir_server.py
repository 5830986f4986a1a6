"""fhirplug's transaction output, posted to a real FHIR server (Medplum's FhirRouter on 127.0.0.1), is accepted,
found by search, every reference in what the server stored resolves there, and posting it again (or re-running
the plugin and posting) stores nothing twice.

Two kinds of input. An unsent transaction (the mesh example 03, ``transaction-mixed.json``): the output carries
the input resources its predictions reference, so it is posted alone to an empty server. Plain resources with ids
(the DocumentReference and DiagnosticReport examples): the server first holds what the notes came from, each
example stored under its own ids plus a stand-in for each resource it points at (its Patient, its Encounter), as
an EHR would hold them.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, REPO, TINY_PLUGIN
from tests.fhir_tools import fhir_request, references, search

PLUGINS = REPO / "plugins"
FIRST_PARTY = ("medical-abstracts-mesh", "synthea-conditions", "bc5cdr-ner")
ALL_EXAMPLES = [(name, path) for name in FIRST_PARTY for path in sorted((PLUGINS / name / "examples").glob("*.json"))]
UNSENT = [
    ("medical-abstracts-mesh", PLUGINS / "medical-abstracts-mesh" / "examples" / "03-bundle-gastro-cardio.json"),
    # Short clinical notes: the abstract classifier abstains on them (out of domain), so the tiny test plugin,
    # which has no abstention, writes the predictions this transaction's references are checked on.
    ("tiny-notes", FIXTURES / "fhir" / "transaction-mixed.json"),
]
PLAIN = [e for e in ALL_EXAMPLES if e not in UNSENT]
SUBJECT_PARAM = {"FamilyMemberHistory": "patient"}
PREDICTION_TYPES = ("RiskAssessment", "Condition", "FamilyMemberHistory", "MedicationStatement")
ids = lambda v: getattr(v, "name", v)  # noqa: E731


@pytest.fixture(scope="module")
def plugins() -> dict[str, Any]:
    from fhirplug import load_plugin

    loaded = {name: load_plugin(PLUGINS / name / "bundle", allow_unsigned=True) for name in FIRST_PARTY}
    return {**loaded, "tiny-notes": load_plugin(TINY_PLUGIN, allow_unsigned=True)}


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


def seed(base: str, data: dict[str, Any]) -> tuple[set[str], Counter[str]]:
    """Store the input (PUT under its ids) and stand-ins for what it references; its Patients and type counts."""
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
    patients = {ref for ref in have | wanted if ref.startswith("Patient/")}
    return patients, Counter(r["resourceType"] for r in stored + stand_ins)


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


def counts(base: str, kinds: set[str]) -> Counter[str]:
    """How many resources of each type the server holds (every page of a search)."""
    return Counter({kind: len(search(base, kind)) for kind in sorted(kinds)})


def output_counts(bundle: dict[str, Any], posts: int = 1) -> Counter[str]:
    """What ``posts`` posts of a transaction leave on an empty server: a PUT entry one resource however often it
    is posted, a POST entry one per post."""
    found: Counter[str] = Counter()
    for entry in bundle["entry"]:
        found[entry["resource"]["resourceType"]] += 1 if entry["request"]["method"] == "PUT" else posts
    return found


def transaction(result: Any) -> dict[str, Any]:
    """The transaction output, with the shape the writer promises: generated entries PUT by id, nothing
    conditional (a conditional entry would make Medplum refuse any transaction above 8 entries)."""
    bundle = result.to_fhir("transaction")
    generated = {f"{r['resourceType']}/{r['id']}" for r in result.resources()}
    for entry in bundle["entry"]:
        request, resource = entry["request"], entry["resource"]
        assert "ifNoneExist" not in request and "?" not in request["url"], request
        if f"{resource['resourceType']}/{resource.get('id')}" in generated:
            assert request == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    return bundle


def test_server_is_a_real_fhir_server(fhir_base: str) -> None:
    """What the tests below rely on, and why the writer PUTs by id: update-as-create with client ids, urn:uuid
    fullUrls of PUT entries resolved to that id, a re-post a new version of the same resource, POST ids assigned
    by the server, conditional entries capped at 8 per transaction, updates at 50, all or nothing."""
    device_url, provenance_url = (f"urn:uuid:5a0e0b4e-0000-4000-8000-00000000000{i}" for i in (1, 2))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": device_url,
                "resource": {"resourceType": "Device", "id": "5a0e0b4e-0000-4000-8000-000000000001"},
                "request": {"method": "PUT", "url": "Device/5a0e0b4e-0000-4000-8000-000000000001"},
            },
            {
                "fullUrl": provenance_url,
                "resource": {
                    "resourceType": "Provenance",
                    "target": [{"reference": device_url}],
                    "recorded": "2024-05-01T12:30:00.000+00:00",
                    "agent": [{"who": {"reference": device_url}}],
                },
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }
    first = post_transaction(fhir_base, bundle)
    second = post_transaction(fhir_base, bundle)
    device = "Device/5a0e0b4e-0000-4000-8000-000000000001"
    assert first[0] == second[0] == device, "PUT created, then updated, the Device under the client's id"
    assert len(search(fhir_base, "Device")) == 1
    _, history = fhir_request(fhir_base, "GET", f"{device}/_history")
    assert len(history["entry"]) == 2
    assert first[1] != second[1], "a POST is a new resource with a server-assigned id on every post"
    provenances = search(fhir_base, f"Provenance?target={device}")
    assert len(provenances) == 2
    assert {p["agent"][0]["who"]["reference"] for p in provenances} == {device}, "the PUT's fullUrl became its id"
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

    def patients(n: int, conditional: bool = False) -> dict[str, Any]:
        entries = [
            {
                "resource": {"resourceType": "Patient", "id": f"p{i}"},
                "request": {"method": "PUT", "url": f"Patient/p{i}"},
            }
            for i in range(n)
        ]
        if conditional:
            entries[0]["request"] = {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:x|1"}
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    # One conditional entry in nine: refused (strict isolation); eighteen PUTs (a bc5cdr-ner output): taken.
    status, answer = fhir_request(fhir_base, "POST", "", patients(9, conditional=True))
    assert status == 400 and "strict isolation" in json.dumps(answer), answer
    assert len(post_transaction(fhir_base, patients(18))) == 18
    assert len(post_transaction(fhir_base, patients(50))) == 50
    status, answer = fhir_request(fhir_base, "POST", "", patients(51))
    assert status == 400 and "more update operations than allowed" in json.dumps(answer), answer
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


def carried_by_id(bundle: dict[str, Any]) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"] if "id" in e["resource"]}


def not_carried(data: dict[str, Any], bundle: dict[str, Any]) -> list[str]:
    """References of the output to resources of the input transaction that the output does not carry."""
    resources = [e["resource"] for e in data["entry"] if "resource" in e]
    named = {f"{r.get('resourceType')}/{r['id']}" for r in resources if "id" in r}
    return sorted(
        {
            ref
            for e in bundle["entry"]
            for _, ref in references(e["resource"])
            if ref in named and ref not in carried_by_id(bundle)
        }
    )


@pytest.mark.parametrize(("plugin", "example"), UNSENT, ids=ids)
def test_an_unsent_transaction_output_stores_alone(
    fhir_base: str, plugins: dict[str, Any], plugin: str, example: Path
) -> None:
    data = json.loads(example.read_text())
    result = plugins[plugin].predict(data, source_name=example.name)
    assert len(result.predictions) >= 2
    bundle = transaction(result)
    locations = post_transaction(fhir_base, bundle)
    assert len(locations) == len(bundle["entry"])
    stored = [fhir_request(fhir_base, "GET", location)[1] for location in locations]
    # Everything the output carries resolves; what it does not carry is only what the input had no fullUrl for
    # (test_an_unsent_transaction_output_carries_every_input_it_references).
    missing = not_carried(data, bundle)
    assert [m.split(" -> ")[1] for m in unresolved(fhir_base, stored)] == [
        ref for r in stored for _, ref in references(r) if ref in missing
    ]
    # Exactly what was posted, once: each prediction, the notes and patient they came from, card, Device, Provenance.
    have = counts(fhir_base, {e["resource"]["resourceType"] for e in bundle["entry"]})
    assert have == output_counts(bundle)
    assert have["RiskAssessment"] == len({(p.source.reference, p.code) for p in result.predictions})
    assert have["Device"] == have["Provenance"] == 1
    # Found the way a client looks: by the Patient's id on this server (the input named it), by Provenance target.
    (patient,) = [loc for loc in locations if loc.startswith("Patient/")]
    patient_id = next(e["resource"]["id"] for e in data["entry"] if e.get("request", {}).get("url") == "Patient")
    assert patient == f"Patient/{patient_id}"
    risks = search(fhir_base, f"RiskAssessment?subject={patient}")
    assert sorted(f"RiskAssessment/{r['id']}" for r in risks) == sorted(
        loc for loc in locations if loc.startswith("RiskAssessment/")
    )
    targets = {loc for loc in locations if loc.startswith("RiskAssessment/")}
    (provenance,) = search(fhir_base, f"Provenance?target={min(targets)}")
    assert f"Provenance/{provenance['id']}" == locations[-1]
    assert {t["reference"] for t in provenance["target"]} == targets


def test_an_unsent_transaction_output_carries_every_input_it_references(plugins: dict[str, Any]) -> None:
    example = FIXTURES / "fhir" / "transaction-mixed.json"
    data = json.loads(example.read_text())
    bundle = plugins["tiny-notes"].predict(data, source_name=example.name).to_fhir("transaction")
    assert not_carried(data, bundle) == []


@pytest.mark.parametrize(("plugin", "example"), PLAIN, ids=ids)
def test_transaction_output_stored_and_every_reference_resolves(
    fhir_base: str, plugins: dict[str, Any], plugin: str, example: Path
) -> None:
    data = json.loads(example.read_text())
    patients, seeded = seed(fhir_base, data)
    result = plugins[plugin].predict(data, source_name=example.name)
    written = result.resources()
    predictions = [r for r in written if r["resourceType"] in PREDICTION_TYPES]
    assert predictions
    bundle = transaction(result)
    locations = post_transaction(fhir_base, bundle)
    assert locations == [f"{r['resourceType']}/{r['id']}" for r in written], "stored under fhirplug's own ids"
    stored = [fhir_request(fhir_base, "GET", location)[1] for location in locations]
    assert unresolved(fhir_base, stored) == []
    assert counts(fhir_base, set(seeded) | set(output_counts(bundle))) == seeded + output_counts(bundle)

    # Found by search the way a client looks for them: by patient, by target, by the model's identifier.
    found = []
    for kind in sorted({r["resourceType"] for r in predictions}):
        for patient in sorted(patients):
            found += search(fhir_base, f"{kind}?{SUBJECT_PARAM.get(kind, 'subject')}={patient}")
    assert sorted(f"{r['resourceType']}/{r['id']}" for r in found) == sorted(
        loc for loc in locations if loc.split("/")[0] in PREDICTION_TYPES
    ), "every prediction is found by its patient (and nothing else is)"
    provenances = search(fhir_base, f"Provenance?target={locations[0]}")
    assert [f"Provenance/{p['id']}" for p in provenances] == [locations[-1]]
    (identifier,) = next(r for r in written if r["resourceType"] == "Device")["identifier"]
    devices = search(
        fhir_base, "Device?identifier=" + urllib.parse.quote(f"{identifier['system']}|{identifier['value']}")
    )
    assert [f"Device/{d['id']}" for d in devices] == [locations[-2]]


@pytest.mark.parametrize(("plugin", "example"), ALL_EXAMPLES + UNSENT[1:], ids=ids)
def test_posting_again_and_rerunning_store_nothing_twice(
    fhir_base: str, plugins: dict[str, Any], plugin: str, example: Path
) -> None:
    """The output posted twice, then the plugin run again and its output posted: the same resources (same ids,
    same count), one Device, one card, one Provenance; only what the input created without an id is new."""
    data = json.loads(example.read_text())
    unsent = (plugin, example) in UNSENT
    seeded = Counter() if unsent else seed(fhir_base, data)[1]
    result = plugins[plugin].predict(data, source_name=example.name)
    bundle = transaction(result)
    kinds = set(seeded) | set(output_counts(bundle))
    first = post_transaction(fhir_base, bundle)
    second = post_transaction(fhir_base, bundle)
    rerun = transaction(plugins[plugin].predict(data, source_name=example.name))
    third = post_transaction(fhir_base, rerun)
    have = counts(fhir_base, kinds)
    assert have == seeded + output_counts(bundle, posts=3)
    assert have["Device"] == have["Provenance"] == 1
    # What is new on each post: only what the input itself created without an id (its note, in transaction-mixed).
    posted = [e["resource"] for e in bundle["entry"] if e["request"]["method"] == "POST"]
    assert all("id" not in r for r in posted) and len(posted) == (example.name == "transaction-mixed.json")
    generated = [f"{r['resourceType']}/{r['id']}" for r in result.resources()]
    for locations in (first, second, third):
        assert locations[-len(generated) :] == generated, "every post stored fhirplug's resources under their ids"
    assert [e["request"] for e in rerun["entry"]] == [e["request"] for e in bundle["entry"]]
    if example.name == "discharge-note.json":
        assert len(bundle["entry"]) >= 18, "an NER note's output: above Medplum's 8 for conditional entries"
