"""FHIR out: every generated resource validates, carries the AI label, evidence and links that resolve."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirplug.fhir.reader import read_fhir
from fhirplug.fhir.writer import (
    AI_ASSERTED,
    EVIDENCE_SPAN_URL,
    PROBABILITY_URL,
    ModelInfo,
    build_resources,
    to_bundle,
    to_ndjson,
)
from fhirplug.predictions import Evidence, Prediction, TextSource

FIXTURES = Path(__file__).parents[2] / "fixtures" / "fhir"
RECORDED = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def model(output: str = "RiskAssessment") -> ModelInfo:
    return ModelInfo("notes-cardio", "1.4.0", "ab" * 32, "text-classification", "int8", "CPUExecutionProvider", output)


def sources() -> list[TextSource]:
    result = read_fhir(
        [json.loads((FIXTURES / name).read_text()) for name in ("documentreference-plain.json", "observation.json")],
        resource_types=("DocumentReference", "Observation"),
    )
    return result.sources


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
    assert condition["verificationStatus"]["coding"][0]["system"] == (
        "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    )
    assert condition["code"]["coding"][0]["code"] == "4557003"
    assert condition["subject"] == {"display": "unknown subject (not given in the source)"}
    assert "encounter" not in condition
    assert condition["evidence"] == [{"detail": [{"reference": "Observation/o1"}]}]
    assert condition["recordedDate"] == "2024-05-01T12:30:00.000+00:00"
    (probability,) = [e for e in condition["extension"] if e["url"] == PROBABILITY_URL]
    assert probability["valueDecimal"] == 0.1235 and type(probability["valueDecimal"]) is float
    assert (evidence_of(condition)["start"], evidence_of(condition)["end"]) == (7, 13)
    json.dumps(condition)  # numpy scalars would not serialise


def test_device_and_provenance() -> None:
    texts = sources()
    # Two predictions from one note and none from the Observation's note: every text read is an entity, once.
    predictions = [predict(texts[0], "chest tightness"), predict(texts[0], "stable angina")]
    *outputs, device, provenance = build_resources(predictions, texts, model(), recorded=RECORDED)
    assert device["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": "urn:sha256:" + "ab" * 32}]
    assert device["deviceName"] == [{"name": "notes-cardio", "type": "model-name"}]
    assert device["version"] == [{"value": "1.4.0"}]
    assert device["type"] == {"text": "fhirplug plugin (text-classification)"}
    assert {p["valueCode"][0]["text"] for p in device["property"]} == {"int8", "CPUExecutionProvider"}
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
    assert [e["request"] for e in entries] == [
        {"method": "POST", "url": "RiskAssessment"},
        {"method": "POST", "url": "Device"},
        {"method": "POST", "url": "Provenance"},
    ]
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
