"""HL7 AI Transparency on FHIR (hl7.fhir.uv.aitransparency 1.0.0-ballot) and fhirplug's own extensions, checked."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirplug.fhir.writer import (
    AI_ASSERTED,
    AI_CONFIDENCE_URL,
    AI_DEVICE_PROFILE,
    AI_KIND_URL,
    AI_MODEL_CARD_PROFILE,
    AI_PROVENANCE_PROFILE,
    ASSERTION_URL,
    EVIDENCE_SPAN_URL,
    MODEL_CARD_URL,
    ModelInfo,
    build_resources,
    to_bundle,
)
from fhirplug.predictions import Entity, Evidence, Prediction, TextSource

ROOT = Path(__file__).parents[3]
CARD = (ROOT / "plugins/medical-abstracts-mesh/bundle/README.md").read_text(encoding="utf-8")
DATA = ROOT / "sdk/fhirplug/data"
IG = "http://hl7.org/fhir/uv/aitransparency"
AI_TYPE = {"system": f"{IG}/CodeSystem/AIdeviceTypeCS", "code": "Artificial-Intelligence"}
NOTE = "Seen for stable angina. No chest pain today."


def run(card: str | None = CARD, reference: str = "DocumentReference/n1") -> list[dict[str, Any]]:
    source = TextSource(
        reference,
        "DocumentReference",
        "DocumentReference.content[0].attachment",
        NOTE,
        NOTE,
        subject={"reference": "Patient/p1"},
    )
    start = NOTE.index("stable angina")
    entity = Entity(
        "Disease",
        "chest pain",
        NOTE.index("chest pain"),
        NOTE.index("chest pain") + 10,
        "Condition",
        True,
        "exact",
        1.0,
        negated=True,
    )
    predictions = [
        Prediction(
            source,
            "angina",
            "http://snomed.info/sct",
            "4557003",
            "Preinfarction syndrome",
            0.876543,
            Evidence(source.reference, source.element, start, start + 13, "stable angina"),
        ),
        Prediction(
            source,
            "D002637",
            "https://www.nlm.nih.gov/mesh",
            "D002637",
            "Chest Pain",
            0.61,
            Evidence(source.reference, source.element, entity.start, entity.end, "chest pain"),
            entity=entity,
        ),
    ]
    info = ModelInfo(
        "medical-abstracts-mesh",
        "0.1.0",
        "ef" * 32,
        "token-classification",
        "int8",
        "CPUExecutionProvider",
        "Condition",
        model_card=card,
    )
    return build_resources(predictions, [source], info)


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["resourceType"] == kind]
    return found


def test_profile_canonicals_are_the_ballot_ones() -> None:
    assert AI_DEVICE_PROFILE == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Device|1.0.0-ballot"
    assert (
        AI_MODEL_CARD_PROFILE == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-ModelCard|1.0.0-ballot"
    )
    assert (
        AI_PROVENANCE_PROFILE == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Provenance|1.0.0-ballot"
    )
    assert AI_KIND_URL == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/aitransparency.AIKind"
    assert (
        MODEL_CARD_URL
        == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/aitransparency.modelCardDescription"
    )
    assert AI_CONFIDENCE_URL == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence"


def test_device_is_an_ai_device_pointing_at_its_model_card() -> None:
    resources = run()
    device, card = one(resources, "Device"), one(resources, "DocumentReference")
    get_fhir_model_class("Device").model_validate(device)
    assert device["meta"]["profile"] == [AI_DEVICE_PROFILE]
    assert device["type"] == {"coding": [AI_TYPE]}  # fixed by the profile: exactly this coding
    kinds = [e["valueCodeableConcept"]["coding"][0]["code"] for e in device["extension"] if e["url"] == AI_KIND_URL]
    assert kinds == ["AI-for-Medical-Text-Data", "Deep-Learning-Models"]
    (card_link,) = [e for e in device["extension"] if e["url"] == MODEL_CARD_URL]
    assert card_link == {"url": MODEL_CARD_URL, "valueReference": {"reference": f"DocumentReference/{card['id']}"}}
    assert device["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": "urn:sha256:" + "ef" * 32}]
    assert device["deviceName"] == [{"name": "medical-abstracts-mesh", "type": "model-name"}]
    assert device["version"] == [{"value": "0.1.0"}]


def test_model_card_is_the_plugin_readme_as_an_ai_model_card() -> None:
    card = one(run(), "DocumentReference")
    get_fhir_model_class("DocumentReference").model_validate(card)
    assert card["meta"] == {"profile": [AI_MODEL_CARD_PROFILE]}  # the author's text: not AI-asserted
    cs = f"{IG}/CodeSystem/AImodelCardCS"
    assert card["type"]["coding"] == [{"system": cs, "code": "AIModelCard", "display": "AI Model-Card"}]
    assert [c["coding"][0]["code"] for c in card["category"]] == ["AIInputPrompt", "AImodelCardMarkdownFormat"]
    assert {c["coding"][0]["system"] for c in card["category"]} == {cs}
    assert card["status"] == "current"
    (content,) = card["content"]
    attachment = content["attachment"]
    data = base64.b64decode(attachment["data"])
    assert attachment["contentType"] == "text/markdown"
    assert data.decode("utf-8") == CARD and attachment["size"] == len(data)
    assert base64.b64decode(attachment["hash"]) == hashlib.sha1(data).digest()
    assert card["masterIdentifier"]["value"] == f"urn:sha256:{hashlib.sha256(data).hexdigest()}"
    assert card["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": "urn:sha256:" + "ef" * 32}]
    (entry,) = [
        e for e in to_bundle(run(), "transaction")["entry"] if e["resource"]["resourceType"] == "DocumentReference"
    ]
    # Stored by its id, a hash of the bundle's manifest: every run of this build PUTs the one card again.
    assert entry["request"] == {"method": "PUT", "url": f"DocumentReference/{card['id']}"}
    assert card["id"] == one(run(card="another text"), "DocumentReference")["id"]
    assert not [r for r in run(card=None) if r["resourceType"] == "DocumentReference"]


def test_provenance_is_an_ai_provenance() -> None:
    resources = run()
    provenance, device, card = (one(resources, k) for k in ("Provenance", "Device", "DocumentReference"))
    get_fhir_model_class("Provenance").model_validate(provenance)
    assert provenance["meta"]["profile"] == [AI_PROVENANCE_PROFILE]
    outputs = [r for r in resources if r["resourceType"] == "Condition"]
    assert provenance["target"] == [{"reference": f"Condition/{r['id']}"} for r in outputs] and len(outputs) == 2
    assert provenance["reason"] == [{"coding": [AI_ASSERTED]}]
    (agent,) = provenance["agent"]
    assert agent["who"]["reference"] == f"Device/{device['id']}"
    assert agent["type"]["coding"][0]["code"] == "author"
    assert agent["role"] == [{"coding": [AI_TYPE]}]
    assert provenance["entity"] == [
        {"role": "source", "what": {"reference": "DocumentReference/n1"}},
        {"role": "derivation", "what": {"reference": f"DocumentReference/{card['id']}"}},
    ]


def test_every_clinical_resource_carries_its_confidence_and_the_label() -> None:
    resources = run()
    confidence = {}
    for resource in resources:
        if resource["resourceType"] == "DocumentReference":
            continue
        assert resource["meta"]["security"] == [AI_ASSERTED]
        if resource["resourceType"] == "Condition":
            (ext,) = [e for e in resource["extension"] if e["url"] == AI_CONFIDENCE_URL]
            confidence[resource["code"]["coding"][0]["code"]] = ext["valueDecimal"]
    assert confidence == {"4557003": 0.8765, "D002637": 0.61}


# ---- fhirplug's own extensions: shipped as StructureDefinitions, and instances conform ---------------------------


def shipped() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(DATA.glob("StructureDefinition-*.json")):
        sd = json.loads(path.read_text(encoding="utf-8"))
        found[sd["url"]] = sd
    return found


def extensions(value: Any, owner: str) -> list[tuple[str, dict[str, Any]]]:
    """Every top-level extension instance with the resource type it sits in."""
    if isinstance(value, dict):
        own = [(owner, e) for e in value.get("extension", []) if isinstance(e, dict)]
        return own + [x for k, v in value.items() if k != "extension" for x in extensions(v, owner)]
    if isinstance(value, list):
        return [x for v in value for x in extensions(v, owner)]
    return []


def test_shipped_structure_definitions_are_r4_extensions() -> None:
    definitions = shipped()
    assert set(definitions) == {EVIDENCE_SPAN_URL, ASSERTION_URL}
    for url, sd in definitions.items():
        get_fhir_model_class("StructureDefinition").model_validate(sd)
        assert (sd["kind"], sd["type"], sd["derivation"], sd["fhirVersion"]) == (
            "complex-type",
            "Extension",
            "constraint",
            "4.0.1",
        )
        assert sd["baseDefinition"] == "http://hl7.org/fhir/StructureDefinition/Extension"
        elements = {e["id"]: e for e in sd["differential"]["element"]}
        assert elements["Extension.url"]["fixedUri"] == url
        assert elements["Extension.value[x]"]["max"] == "0"
        assert {e["id"] for e in sd["snapshot"]["element"]} >= set(elements)


def test_every_extension_the_writer_emits_is_defined_and_conforms() -> None:
    definitions = shipped()
    ig = {AI_KIND_URL, MODEL_CARD_URL, AI_CONFIDENCE_URL}
    seen = set()
    for resource in run():
        for owner_type, ext in extensions(resource, resource["resourceType"]):
            url = ext["url"]
            seen.add(url)
            if url in ig:
                continue
            assert url in definitions, f"{url} has no shipped StructureDefinition"
            sd = definitions[url]
            assert owner_type in {c["expression"] for c in sd["context"]}
            elements = {e["id"]: e for e in sd["differential"]["element"]}
            slices = {e["sliceName"]: e for e in elements.values() if "sliceName" in e}
            parts = {p["url"]: p for p in ext["extension"]}
            assert len(parts) == len(ext["extension"]) and set(parts) <= set(slices)
            assert {n for n, s in slices.items() if s["min"] >= 1} <= set(parts)
            for name, part in parts.items():
                (expected,) = elements[f"Extension.extension:{name}.value[x]"]["type"]
                (value_key,) = [k for k in part if k.startswith("value")]
                assert value_key == "value" + expected["code"][0].upper() + expected["code"][1:], (url, name)
    assert seen >= {EVIDENCE_SPAN_URL, ASSERTION_URL, AI_CONFIDENCE_URL, AI_KIND_URL, MODEL_CARD_URL}


def test_medplum_validates_the_output_against_r4_and_the_shipped_definitions() -> None:
    fhir_tools = pytest.importorskip("tests.fhir_tools")
    resources = run()
    bundle = to_bundle(resources, "transaction")
    sds = sorted(DATA.glob("StructureDefinition-*.json"))
    items = [*(json.loads(p.read_text()) for p in sds), *resources, bundle]
    for item, issues in zip(items, fhir_tools.validate_resources(items, sds), strict=True):
        assert fhir_tools.errors(issues) == [], item["resourceType"]


def test_a_fhir_server_stores_a_rerun_once() -> None:
    fhir_tools = pytest.importorskip("tests.fhir_tools")
    server = fhir_tools.FhirServer()
    try:
        base = server.new_base()
        bundle = to_bundle(run(), "transaction")
        for _ in range(2):
            status, answer = fhir_tools.fhir_request(base, "POST", "", bundle)
            assert status == 200, json.dumps(answer)[:1000]
        kinds = ("Condition", "Device", "DocumentReference", "Provenance")

        def counts() -> dict[str, int]:
            return {kind: len(fhir_tools.search(base, kind)) for kind in kinds}

        # PUT by id: the second post replaced what the first stored; one Provenance for the one run identity.
        assert counts() == {"Condition": 2, "Device": 1, "DocumentReference": 1, "Provenance": 1}
        (device,) = fhir_tools.search(base, "Device")
        (card,) = fhir_tools.search(base, "DocumentReference")
        (provenance,) = fhir_tools.search(base, "Provenance")
        written = {r["resourceType"]: r["id"] for r in run()}
        assert (device["id"], card["id"], provenance["id"]) == (
            written["Device"],
            written["DocumentReference"],
            written["Provenance"],
        )
        _, history = fhir_tools.fhir_request(base, "GET", f"Device/{device['id']}/_history")
        assert len(history["entry"]) == 2, "the second post made a second version of the one Device"
        (link,) = [e for e in device["extension"] if e["url"] == MODEL_CARD_URL]
        assert link["valueReference"]["reference"] == f"DocumentReference/{card['id']}"
        # Another note is another run identity: its own Provenance and Condition, the same Device and card.
        other = to_bundle(run(reference="DocumentReference/n2"), "transaction")
        assert fhir_tools.fhir_request(base, "POST", "", other)[0] == 200
        assert counts() == {"Condition": 4, "Device": 1, "DocumentReference": 1, "Provenance": 2}
    finally:
        server.stop()
