"""FHIR out: every generated resource validates, carries the AI label, evidence and links that resolve."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirplug.fhir.writer import (
    AI_ASSERTED,
    AI_CONFIDENCE_URL,
    EVIDENCE_SPAN_URL,
    PREDICTION_ID_SYSTEM,
    ModelInfo,
    build_resources,
    to_bundle,
    to_ndjson,
)
from fhirplug.predictions import Entity, Evidence, Prediction, TextSource

FIXTURES = Path(__file__).parents[2] / "fixtures" / "fhir"
RECORDED = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def model(output: str = "RiskAssessment") -> ModelInfo:
    return ModelInfo("notes-cardio", "1.4.0", "ab" * 32, "text-classification", "int8", "CPUExecutionProvider", output)


def sources() -> list[TextSource]:
    # Built from the fixtures directly (as the reader would): the writer is tested on its own.
    note = json.loads((FIXTURES / "documentreference-plain.json").read_text())
    text = base64.b64decode(note["content"][0]["attachment"]["data"]).decode()
    obs = json.loads((FIXTURES / "observation.json").read_text())
    return [
        TextSource(
            "DocumentReference/note-plain",
            "DocumentReference",
            "DocumentReference.content[0].attachment",
            text,
            text,
            subject=note["subject"],
            encounter=note["context"]["encounter"][0],
            date=note["date"],
        ),
        TextSource(
            "Observation/obs-smoking",
            "Observation",
            "Observation.valueString",
            obs["valueString"],
            obs["valueString"],
            subject=obs["subject"],
        ),
    ]


def predict(source: TextSource, words: str, probability: float = 0.876543) -> Prediction:
    start = source.text.index(words)
    begin, end = source.to_original(start, start + len(words))
    evidence = Evidence(source.reference, source.element, begin, end, source.original[begin:end])
    return Prediction(
        source, "angina", "http://snomed.info/sct", "4557003", "Preinfarction syndrome", probability, evidence
    )


def validate(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def by_type(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["resourceType"] == kind]


def evidence_of(resource: dict[str, Any]) -> dict[str, Any]:
    (ext,) = [e for e in resource["extension"] if e["url"] == EVIDENCE_SPAN_URL]
    return {part["url"]: next(v for k, v in part.items() if k.startswith("value")) for part in ext["extension"]}


@pytest.mark.parametrize("output", ["RiskAssessment", "Condition"])
def test_every_resource_and_bundle_validates(output: str) -> None:
    texts = sources()
    predictions = [predict(texts[0], "chest tightness"), predict(texts[1], "quit 2015", 0.5)]
    resources = build_resources(predictions, texts, model(output), recorded=RECORDED)
    assert [r["resourceType"] for r in resources] == [output, output, "Device", "Provenance"]
    for resource in resources:
        validate(resource)
        assert resource["meta"]["security"] == [AI_ASSERTED]
    for kind in ("collection", "transaction"):
        validate(to_bundle(resources, kind))  # type: ignore[arg-type]


def test_risk_assessment_fields() -> None:
    plain = sources()[0]
    resources = build_resources([predict(plain, "chest tightness")], [plain], model(), recorded=RECORDED)
    risk, device, _ = resources
    assert risk["status"] == "final"
    assert risk["subject"] == {"reference": "Patient/p-100", "display": "Ada Example"}
    assert risk["encounter"] == {"reference": "Encounter/enc-7"}
    assert risk["occurrenceDateTime"] == "2024-05-01T12:30:00.000+00:00"
    assert risk["basis"] == [{"reference": "DocumentReference/note-plain"}]
    assert risk["performer"]["reference"] == f"Device/{device['id']}"
    assert risk["method"] == {"text": "fhirplug notes-cardio 1.4.0 (int8, CPUExecutionProvider)"}
    (prediction,) = risk["prediction"]
    assert prediction["probabilityDecimal"] == 0.8765
    assert prediction["outcome"] == {
        "coding": [{"system": "http://snomed.info/sct", "code": "4557003", "display": "Preinfarction syndrome"}],
        "text": "Preinfarction syndrome",
    }
    span = evidence_of(risk)
    assert span["source"] == {"reference": "DocumentReference/note-plain"}
    assert span["element"] == "DocumentReference.content[0].attachment"
    assert plain.original[span["start"] : span["end"]] == span["snippet"] == "chest tightness"


def test_condition_fields_and_missing_subject() -> None:
    orphan = TextSource(
        "Observation/o1", "Observation", "Observation.valueString", "Café 😀 angina.", "Café 😀 angina."
    )
    (condition, _, _) = build_resources(
        [predict(orphan, "angina", np.float32(0.123456))],  # type: ignore[arg-type]
        [orphan],
        model("Condition"),
        recorded=RECORDED,
    )
    validate(condition)
    assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"
    assert condition["category"][0]["coding"][0]["code"] == "encounter-diagnosis"
    assert condition["identifier"] == [{"system": PREDICTION_ID_SYSTEM, "value": condition["id"]}]
    assert condition["verificationStatus"]["coding"][0]["system"] == (
        "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    )
    assert condition["code"]["coding"][0]["code"] == "4557003"
    assert condition["subject"] == {"display": "unknown subject (not given in the source)"}
    assert "encounter" not in condition
    assert condition["evidence"] == [{"detail": [{"reference": "Observation/o1"}]}]
    assert condition["recordedDate"] == "2024-05-01T12:30:00.000+00:00"
    (probability,) = [e for e in condition["extension"] if e["url"] == AI_CONFIDENCE_URL]
    assert probability["valueDecimal"] == 0.1235 and type(probability["valueDecimal"]) is float
    assert (evidence_of(condition)["start"], evidence_of(condition)["end"]) == (7, 13)
    json.dumps(condition)  # numpy scalars would not serialise


def test_device_and_provenance() -> None:
    texts = sources()
    # Two predictions from one note and none from the Observation's note: every text read is an entity, once.
    predictions = [predict(texts[0], "chest tightness"), replace(predict(texts[0], "stable angina"), code="194828000")]
    *outputs, device, provenance = build_resources(predictions, texts, model(), recorded=RECORDED)
    assert device["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": "urn:sha256:" + "ab" * 32}]
    assert device["deviceName"] == [{"name": "notes-cardio", "type": "model-name"}]
    assert device["version"] == [{"value": "1.4.0"}]
    assert device["type"] == {
        "coding": [
            {
                "system": "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS",
                "code": "Artificial-Intelligence",
            }
        ]
    }
    assert [p["valueCode"][0]["text"] for p in device["property"]] == ["text-classification"]
    # What ran this time is the run's, not the shared Device's: it is in the Provenance.
    assert "int8 variant on CPUExecutionProvider" in provenance["activity"]["text"]
    assert provenance["target"] == [{"reference": f"RiskAssessment/{r['id']}"} for r in outputs]
    assert provenance["recorded"] == "2024-05-01T12:30:00.000+00:00"
    (agent,) = provenance["agent"]
    assert agent["who"]["reference"] == f"Device/{device['id']}"
    assert agent["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
        "code": "author",
        "display": "Author",
    }
    assert provenance["entity"] == [
        {"role": "source", "what": {"reference": "DocumentReference/note-plain"}},
        {"role": "source", "what": {"reference": "Observation/obs-smoking"}},
    ]
    assert len({r["id"] for r in [*outputs, device, provenance]}) == 4


def test_transaction_bundle_links_by_urn_uuid_and_leaves_inputs_alone() -> None:
    plain = sources()[0]
    resources = build_resources([predict(plain, "chest tightness")], [plain], model(), recorded=RECORDED)
    before = json.dumps(resources)
    bundle = to_bundle(resources, "transaction")
    assert json.dumps(resources) == before
    assert bundle["type"] == "transaction"
    entries = bundle["entry"]
    # Idempotent by id, nothing conditional: a re-post replaces what the last one stored (no ifNoneExist, which
    # would make the server run the transaction serializably; Medplum refuses that above 8 entries).
    assert [e["request"] for e in entries] == [
        {"method": "PUT", "url": f"RiskAssessment/{resources[0]['id']}"},
        {"method": "PUT", "url": f"Device/{resources[1]['id']}"},
        {"method": "PUT", "url": f"Provenance/{resources[2]['id']}"},
    ]
    # The identifier stays on the prediction: what a search finds it by in a copy with other ids.
    assert entries[0]["resource"]["identifier"] == [{"system": PREDICTION_ID_SYSTEM, "value": resources[0]["id"]}]
    full_urls = [e["fullUrl"] for e in entries]
    assert full_urls == [f"urn:uuid:{r['id']}" for r in resources]
    risk, _, provenance = (e["resource"] for e in entries)
    assert risk["performer"]["reference"] == full_urls[1]
    assert provenance["agent"][0]["who"]["reference"] == full_urls[1]
    assert provenance["target"] == [{"reference": full_urls[0]}]
    # The source is not in the Bundle, so it keeps its own reference.
    assert risk["basis"] == [{"reference": "DocumentReference/note-plain"}]


def test_collection_bundle_and_empty_runs() -> None:
    plain = sources()[0]
    resources = build_resources([predict(plain, "chest tightness")], [plain], model(), recorded=RECORDED)
    bundle = to_bundle(resources)
    assert bundle["type"] == "collection" and "timestamp" in bundle
    assert all("request" not in e for e in bundle["entry"])
    assert build_resources([], [plain], model()) == []
    empty = to_bundle([])
    validate(empty)
    assert "entry" not in empty


def test_ndjson_one_resource_a_line_with_text_kept() -> None:
    plain = sources()[0]
    resources = build_resources([predict(plain, "café visit 😀")], [plain], model(), recorded=RECORDED)
    text = to_ndjson(resources)
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 3
    assert [json.loads(line) for line in lines] == resources
    assert "café visit 😀" in lines[0]
    assert to_ndjson([]) == ""


def test_naive_recorded_is_utc_and_default_is_now() -> None:
    plain = sources()[0]
    (risk, *_) = build_resources([predict(plain, "chest")], [plain], model(), recorded=datetime(2024, 1, 2, 3, 4, 5))
    assert risk["occurrenceDateTime"] == "2024-01-02T03:04:05.000+00:00"
    (risk, *_) = build_resources([predict(plain, "chest")], [plain], model())
    assert risk["occurrenceDateTime"][:4] == str(datetime.now(UTC).year)


def test_unknown_output_resource_is_a_programming_error() -> None:
    plain = sources()[0]
    with pytest.raises(ValueError, match="Observation"):
        build_resources([predict(plain, "chest")], [plain], model("Observation"))


# ---- references that resolve, re-runs that repeat, assertions that mean what they say -------------------------

EXAMPLE = Path(__file__).parents[3] / "plugins/medical-abstracts-mesh/examples/03-bundle-gastro-cardio.json"
MESH = "https://www.nlm.nih.gov/mesh"


def unsent(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the reader hands the writer for an input transaction: its POST entries' resources, by fullUrl."""
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"] if e.get("request", {}).get("method") == "POST"}


def example_sources() -> tuple[dict[str, dict[str, Any]], list[TextSource]]:
    inputs = unsent(json.loads(EXAMPLE.read_text()))
    crohn = inputs["urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0002"]
    report = inputs["urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0003"]
    text = base64.b64decode(crohn["content"][0]["attachment"]["data"]).decode()
    element = "DocumentReference.content[0].attachment"
    return inputs, [
        TextSource(
            "DocumentReference/abstract-crohn", "DocumentReference", element, text, text, subject=crohn["subject"]
        ),
        TextSource(
            "DiagnosticReport/report-infarction",
            "DiagnosticReport",
            "DiagnosticReport.conclusion",
            report["conclusion"],
            report["conclusion"],
            subject=report["subject"],
        ),
    ]


def mesh(source: TextSource, words: str, code: str, entity: Entity | None = None) -> Prediction:
    start = source.text.index(words)
    evidence = Evidence(source.reference, source.element, start, start + len(words), words)
    return Prediction(source, code, MESH, code, words, 0.8125, evidence, entity=entity)


def unresolved(bundle: dict[str, Any]) -> list[str]:
    full_urls = {e["fullUrl"] for e in bundle.get("entry", [])}
    found = []
    for i, entry in enumerate(bundle.get("entry", [])):
        for path, ref in _refs(entry["resource"], f"entry[{i}]"):
            if ref not in full_urls and not re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", ref):
                found.append(f"{path}: {ref}")
            # A Type/id of a resource the Bundle itself creates would miss it: the server gives it a new id.
            if ref.split("/")[-1] in {e["resource"].get("id") for e in bundle["entry"]} and ref not in full_urls:
                found.append(f"{path}: {ref} (an entry of this Bundle, named by its old id)")
    return found


def _refs(value: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        own = [(path, value["reference"])] if isinstance(value.get("reference"), str) else []
        return own + [r for k, v in value.items() for r in _refs(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in _refs(v, f"{path}[{i}]")]
    return []


def test_the_shipped_transaction_example_has_no_unresolved_reference() -> None:
    inputs, texts = example_sources()
    predictions = [mesh(texts[0], "Crohn's disease", "D003424"), mesh(texts[1], "myocardial infarction", "D009203")]
    info = model("Condition")
    resources = build_resources(predictions, texts, info, recorded=RECORDED, inputs=inputs)
    # Without the input transaction's resources the Patient (urn:uuid:...0001) is nowhere: left out, with a warning.
    warned: list[Any] = []
    alone = to_bundle(build_resources(predictions, texts, info, recorded=RECORDED), "transaction", warnings=warned)
    assert unresolved(alone) == []
    assert alone["entry"][0]["resource"]["subject"] == {
        "display": "not stored here: urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0001"
    }
    assert [(w.severity, w.code, w.expression) for w in warned] == [
        ("warning", "not-found", ("Bundle.entry[0].resource.subject",)),
        ("warning", "not-found", ("Bundle.entry[1].resource.subject",)),
    ]
    # With them, one POST stores the notes, their patient and what was said about them.
    warnings: list[Any] = []
    bundle = to_bundle(resources, "transaction", inputs=inputs, warnings=warnings)
    validate(bundle)
    assert warnings == []
    assert unresolved(bundle) == []
    entries = bundle["entry"]
    patient_url = "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0001"
    assert [e["fullUrl"] for e in entries[:3]] == [
        patient_url,
        *(f"urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e000{i}" for i in (2, 3)),
    ]
    # The unread PDF DocumentReference (entry 4 of the input) is not needed, so it is not sent.
    assert "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0004" not in {e["fullUrl"] for e in entries}
    # The input named its resources (demo-3, abstract-crohn, report-infarction): they travel under those ids.
    assert [e["request"] for e in entries[:3]] == [
        {"method": "PUT", "url": "Patient/demo-3"},
        {"method": "PUT", "url": "DocumentReference/abstract-crohn"},
        {"method": "PUT", "url": "DiagnosticReport/report-infarction"},
    ]
    assert [e["request"] for e in entries[3:]] == [
        {"method": "PUT", "url": f"{e['resource']['resourceType']}/{e['resource']['id']}"} for e in entries[3:]
    ]
    crohn, infarction = (e["resource"] for e in entries[3:5])
    assert crohn["subject"] == infarction["subject"] == {"reference": patient_url}
    assert crohn["evidence"] == [{"detail": [{"reference": "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0002"}]}]
    provenance = entries[-1]["resource"]
    assert {e["what"]["reference"] for e in provenance["entity"]} == {
        "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0002",
        "urn:uuid:6f1c2a52-2b1e-4c3e-9a51-0c6a1d1e0003",
    }
    # In NDJSON the same resources link by Type/id: the patient the source names has an id.
    assert crohn["code"]["coding"][0]["code"] == "D003424"
    (first, *_) = [json.loads(line) for line in to_ndjson(resources).splitlines()]
    assert first["subject"] == {"reference": "Patient/demo-3"}


def test_a_reference_that_cannot_resolve_is_left_out_with_a_warning() -> None:
    orphan = TextSource(
        "urn:uuid:0b8c4d7e-0000-4000-8000-000000000001",
        "Observation",
        "Observation.valueString",
        "angina",
        "angina",
        subject={"reference": "#patient-contained", "display": "Bo"},
    )
    resources = build_resources([predict(orphan, "angina")], [orphan], model("Condition"), recorded=RECORDED)
    warnings: list[Any] = []
    line = json.loads(to_ndjson(resources, warnings=warnings).splitlines()[0])
    assert line["subject"] == {"display": "Bo"}
    assert line["evidence"] == [
        {"detail": [{"display": "not stored here: urn:uuid:0b8c4d7e-0000-4000-8000-000000000001"}]}
    ]
    assert {w.expression[0] for w in warnings} >= {"Condition[0].subject", "Condition[0].evidence[0].detail[0]"}
    assert all(w.severity == "warning" and w.code == "not-found" for w in warnings)
    bundle = to_bundle(resources, "transaction", warnings=[])
    validate(bundle)
    assert unresolved(bundle) == []


def without_run_times(value: Any) -> Any:
    if isinstance(value, dict):
        times = {"recorded", "recordedDate", "occurrenceDateTime", "date", "dateAsserted", "timestamp"}
        return {k: without_run_times(v) for k, v in value.items() if k not in times}
    if isinstance(value, list):
        return [without_run_times(v) for v in value]
    return value


def test_a_second_identical_run_writes_the_same_resources() -> None:
    texts = sources()
    predictions = [predict(texts[0], "chest tightness"), replace(predict(texts[1], "quit 2015"), code="8517006")]
    first = build_resources(predictions, texts, model(), recorded=RECORDED)
    again = build_resources(predictions, texts, model(), recorded=datetime(2025, 2, 3, 4, 5, 6, tzinfo=UTC))
    assert first != again  # the run time differs ...
    assert json.dumps(without_run_times(first)) == json.dumps(without_run_times(again))  # ... and nothing else
    b1, b2 = (to_bundle(r, "transaction") for r in (first, again))
    assert json.dumps(without_run_times(b1)) == json.dumps(without_run_times(b2))
    # The same requests too: every entry (Provenance included) is PUT to the id of the first run.
    assert [e["request"] for e in b1["entry"]] == [e["request"] for e in b2["entry"]]
    assert [e["request"]["url"] for e in b1["entry"]] == [f"{r['resourceType']}/{r['id']}" for r in first]
    # Another run of the same build on another device or precision is the same run identity: same Provenance.
    faster = replace(model(), variant="fp16", provider="CUDAExecutionProvider")
    assert build_resources(predictions, texts, faster, recorded=RECORDED)[-1]["id"] == first[-1]["id"]
    # Other targets are another run: another Provenance, the same Device.
    subset = build_resources(predictions[:1], texts, model(), recorded=RECORDED)
    assert subset[-1]["id"] != first[-1]["id"] and subset[-2]["id"] == first[-2]["id"]
    # Another plugin build (version, so manifest hash) is another Device and other resources.
    rebuilt = replace(model(), version="1.5.0", manifest_sha256="cd" * 32)
    other = build_resources(predictions, texts, rebuilt, recorded=RECORDED)
    assert not {r["id"] for r in first} & {r["id"] for r in other}
    # Two runs merged into one Bundle share the Device: it is written once.
    merged = to_bundle([*first, *build_resources(predictions[:1], texts, model(), recorded=RECORDED)])
    assert [e["resource"]["resourceType"] for e in merged["entry"]].count("Device") == 1
    assert len({e["fullUrl"] for e in merged["entry"]}) == len(merged["entry"])


def mention(source: TextSource, words: str, code: str, **assertion: Any) -> Prediction:
    start = source.text.index(words)
    resource = assertion.pop("resource", "Condition")
    entity = Entity("Disease", words, start, start + len(words), resource, True, "exact", 1.0, **assertion)
    return mesh(source, words, code, entity)


NOTE = (
    "Past medical history: type 2 diabetes and hypertension. No chest pain. Possible pneumonia. "
    "Mother has breast cancer. Return if fever develops. Was on warfarin. No aspirin."
)


def note_source() -> TextSource:
    return TextSource(
        "DocumentReference/n1",
        "DocumentReference",
        "DocumentReference.content[0].attachment",
        NOTE,
        NOTE,
        subject={"reference": "Patient/p1"},
        date="2024-03-05",
    )


def entity_resources() -> dict[str, dict[str, Any]]:
    note = note_source()
    predictions = [
        mention(note, "type 2 diabetes", "D003924", historical=True),
        mention(note, "hypertension", "D006973", historical=True),
        mention(note, "chest pain", "D002637", negated=True),
        mention(note, "pneumonia", "D011014", possible=True),
        mention(note, "breast cancer", "D001943", subject="family", relationship="MTH"),
        mention(note, "fever", "D005334", hypothetical=True),
        mention(note, "warfarin", "D014859", historical=True, resource="MedicationStatement"),
        mention(note, "aspirin", "D001241", negated=True, resource="MedicationStatement"),
    ]
    resources = build_resources(predictions, [note], model("Condition"), recorded=RECORDED)
    for resource in resources:
        validate(resource)
    return (
        {r["code"]["coding"][0]["code"]: r for r in resources if r["resourceType"] == "Condition"}
        | {
            r["medicationCodeableConcept"]["coding"][0]["code"]: r
            for r in resources
            if r["resourceType"] == "MedicationStatement"
        }
        | {"family": next(r for r in resources if r["resourceType"] == "FamilyMemberHistory")}
        | {"provenance": resources[-1]}
    )


def code_of(concept: dict[str, Any] | None) -> str | None:
    return concept["coding"][0]["code"] if concept else None


def test_history_is_never_resolved_and_hypothetical_is_not_asserted() -> None:
    got = entity_resources()
    for code in ("D003924", "D006973"):  # "Past medical history: type 2 diabetes and hypertension"
        history = got[code]
        assert code_of(history.get("clinicalStatus")) != "resolved"
        assert "clinicalStatus" not in history and "abatementDateTime" not in history
        assert code_of(history["verificationStatus"]) == "provisional"
        assert history["onsetPeriod"] == {"end": "2024-03-05"}  # began before the note
    assert "D005334" not in got  # "return if fever develops": no resource at all
    assert len(got["provenance"]["target"]) == 7
    assert code_of(got["D002637"]["verificationStatus"]) == "refuted" and "clinicalStatus" not in got["D002637"]
    assert code_of(got["D011014"]["verificationStatus"]) == "unconfirmed"
    assert code_of(got["D011014"]["clinicalStatus"]) == "active"
    family = got["family"]
    assert family["relationship"]["coding"][0]["code"] == "MTH" and family["patient"] == {"reference": "Patient/p1"}
    assert got["D014859"]["status"] == "unknown"  # "was on warfarin" does not say it was stopped
    assert got["D001241"]["status"] == "not-taken"


def test_conditions_keep_the_r4_invariants() -> None:
    for resource in entity_resources().values():
        if resource["resourceType"] != "Condition":
            continue
        ver = code_of(resource.get("verificationStatus"))
        categories = {c["coding"][0]["code"] for c in resource.get("category", [])}
        assert categories == {"encounter-diagnosis"}
        # con-3: problem-list-item (never written) would need clinicalStatus
        assert "problem-list-item" not in categories or "clinicalStatus" in resource
        # con-4: abatement only with an inactive clinical status (no abatement is written)
        assert not any(k.startswith("abatement") for k in resource)
        # con-5: no clinicalStatus when entered-in-error (never written)
        assert ver != "entered-in-error"


# ---- transactions: idempotent by id, inputs as the input had them ----------------------------------------------

PATIENT_URL = "urn:uuid:2c4f7e90-0000-4000-8000-000000000001"
NOTE_URL = "urn:uuid:2c4f7e90-0000-4000-8000-000000000002"


def unsent_note(patient_id: str | None) -> tuple[dict[str, dict[str, Any]], TextSource]:
    """An unsent input transaction's Patient (with the given id, or none) and its note (no id), as the reader
    hands them over, and the note as a source (known only by its fullUrl: it has no id)."""
    patient: dict[str, Any] = {"resourceType": "Patient"} | ({"id": patient_id} if patient_id else {})
    text = "Seen for stable angina."
    note = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": PATIENT_URL},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
    }
    source = TextSource(NOTE_URL, "DocumentReference", "DocumentReference.content[0].attachment", text, text)
    return {PATIENT_URL: patient, NOTE_URL: note}, replace(source, subject={"reference": PATIENT_URL})


def test_input_resources_travel_by_their_id_else_as_the_input_created_them() -> None:
    inputs, source = unsent_note("p-9")
    resources = build_resources([predict(source, "angina")], [source], model(), recorded=RECORDED, inputs=inputs)
    own = {NOTE_URL: {"method": "POST", "url": "DocumentReference", "ifNoneExist": "identifier=urn:x|n-1"}}
    plain, asked = (to_bundle(resources, "transaction", inputs=inputs, input_requests=r) for r in (None, own))
    for bundle in (plain, asked):
        validate(bundle)
        assert unresolved(bundle) == []
        assert [e["fullUrl"] for e in bundle["entry"][:2]] == [PATIENT_URL, NOTE_URL]
        assert bundle["entry"][0]["request"] == {"method": "PUT", "url": "Patient/p-9"}
        risk = bundle["entry"][2]["resource"]
        assert risk["subject"] == {"reference": PATIENT_URL} and risk["basis"] == [{"reference": NOTE_URL}]
        assert bundle["entry"][1]["resource"]["subject"] == {"reference": PATIENT_URL}
    # The note has no id: created, plain unless the input itself made it conditional (its choice, kept).
    assert plain["entry"][1]["request"] == {"method": "POST", "url": "DocumentReference"}
    assert asked["entry"][1]["request"] == own[NOTE_URL]
    # What fhirplug writes is never conditional, whatever the input did.
    for entry in asked["entry"][2:]:
        assert entry["request"] == {
            "method": "PUT",
            "url": f"{entry['resource']['resourceType']}/{entry['resource']['id']}",
        }
    # An input's conditional update (no id) is not copied: only a POST's ifNoneExist is the input's create.
    update = {NOTE_URL: {"method": "PUT", "url": "DocumentReference?identifier=urn:x|n-1"}}
    again = to_bundle(resources, "transaction", inputs=inputs, input_requests=update)
    assert again["entry"][1]["request"] == {"method": "POST", "url": "DocumentReference"}


def test_an_input_without_a_usable_id_is_posted() -> None:
    for patient_id in (None, "not an id!", "x" * 65):
        inputs, source = unsent_note(patient_id)
        resources = build_resources([predict(source, "angina")], [source], model(), recorded=RECORDED, inputs=inputs)
        bundle = to_bundle(resources, "transaction", inputs=inputs)
        assert bundle["entry"][0]["request"] == {"method": "POST", "url": "Patient"}, patient_id
        # Without a usable id the subject is known only by the fullUrl, which the server resolves.
        assert bundle["entry"][2]["resource"]["subject"] == {"reference": PATIENT_URL}
        assert unresolved(bundle) == []


def test_the_collection_form_resolves_its_own_references_inside_itself() -> None:
    inputs, texts = example_sources()
    predictions = [mesh(texts[0], "Crohn's disease", "D003424"), mesh(texts[1], "myocardial infarction", "D009203")]
    info = replace(model("Condition"), model_card="# notes-cardio\n")
    resources = build_resources(predictions, texts, info, recorded=RECORDED, inputs=inputs)
    bundle = to_bundle(resources, "collection", inputs=inputs)
    validate(bundle)
    assert all("request" not in e for e in bundle["entry"])
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    refs = [ref for e in bundle["entry"] for _, ref in _refs(e["resource"], "")]
    internal = [ref for ref in refs if ref.startswith("urn:uuid:")]
    # Device → card, Provenance → 2 targets, its Device and card: every link between outputs is an entry here ...
    assert len(internal) == 1 + 2 + 1 + 1 and set(internal) <= full_urls
    # ... and no output is named by Type/id inside it (that would not resolve against a urn:uuid fullUrl).
    assert not {ref for ref in refs if not ref.startswith("urn:uuid:")} & {
        f"{r['resourceType']}/{r['id']}" for r in resources
    }
    # The inputs are not copied into a collection: the notes and the patient are named by their own Type/id.
    assert {ref for ref in refs if not ref.startswith("urn:uuid:")} == {
        "Patient/demo-3",
        "DocumentReference/abstract-crohn",
        "DiagnosticReport/report-infarction",
    }
