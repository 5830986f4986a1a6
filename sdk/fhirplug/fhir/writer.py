"""Predictions out as FHIR R4: one RiskAssessment or Condition per prediction, the Device that made them and
one Provenance per run, labelled as AI-asserted, as a collection or transaction Bundle or as NDJSON.

Entity mentions (token-classification, ``Prediction.entity`` set) become, when coded:

- a mention of the patient's condition → ``Condition``: ``verificationStatus`` ``refuted`` when negated,
  ``unconfirmed`` when possible, ``provisional`` otherwise; historical → ``clinicalStatus`` ``resolved``;
- a relative's condition → ``FamilyMemberHistory`` (status ``partial``, the relationship as an HL7 v3 RoleCode; a
  negated one says so in ``condition.note``);
- a chemical/drug (the plugin's choice, ``MedicationStatement``) → ``MedicationStatement``, status ``unknown``
  (``not-taken`` when negated, ``completed`` when historical), ``derivedFrom`` → the source;
- someone else's (``subject`` other) or an uncoded mention → nothing (there is no patient or no code to write).

Each carries the evidence-span extension, the probability (the span's mean token probability) and an assertion
extension (negated, possible, historical, subject, coding method and score).

Resources reference each other as ``ResourceType/id`` (right for NDJSON, where ids are the link); inside a
Bundle, :func:`to_bundle` rewrites those references to the entries' ``urn:uuid:`` fullUrls, the form servers
resolve in a transaction and readers resolve in a collection.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fhirplug.predictions import Prediction, TextSource

__all__ = [
    "AI_ASSERTED",
    "ASSERTION_URL",
    "EVIDENCE_SPAN_URL",
    "PROBABILITY_URL",
    "ModelInfo",
    "build_resources",
    "to_bundle",
    "to_ndjson",
]

#: Extension: the span of the source text that supports a prediction (sub-extensions source, element, start,
#: end, snippet; start/end are character offsets into the decoded original text, end exclusive).
EVIDENCE_SPAN_URL = "https://fhirplug.dev/fhir/StructureDefinition/evidence-span"
#: Extension on Condition: the calibrated probability (Condition has no element for it).
PROBABILITY_URL = "https://fhirplug.dev/fhir/StructureDefinition/probability"
#: Extension on entity resources: the assertion (sub-extensions negated, possible, historical as valueBoolean;
#: subject as valueCode patient|family|other; coding-method as valueCode; coding-score as valueDecimal).
ASSERTION_URL = "https://fhirplug.dev/fhir/StructureDefinition/assertion"
#: HL7 AI transparency security label, on every generated resource.
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_UNKNOWN_SUBJECT = {"display": "unknown subject (not given in the source)"}
_CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
_VER_DISPLAY = {"refuted": "Refuted", "unconfirmed": "Unconfirmed", "provisional": "Provisional"}


@dataclass(frozen=True)
class ModelInfo:
    """The model that made a run's predictions, as written into the Device and each resource's method."""

    name: str
    version: str
    manifest_sha256: str
    task: str
    variant: str
    provider: str
    #: "RiskAssessment" or "Condition".
    output_resource: str


def _instant(moment: datetime) -> str:
    # Naive datetimes are taken as UTC: FHIR instants need a zone, and guessing local time would shift them.
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.isoformat(timespec="milliseconds")


def _meta() -> dict[str, Any]:
    return {"security": [dict(AI_ASSERTED)]}


def _evidence(prediction: Prediction) -> dict[str, Any]:
    evidence = prediction.evidence
    parts: list[dict[str, Any]] = [{"url": "source", "valueReference": {"reference": evidence.reference}}]
    # FHIR strings may not be empty: an element or snippet that is "" is left out, not written blank.
    if evidence.element:
        parts.append({"url": "element", "valueString": evidence.element})
    # int()/float() because tasks may hand over numpy scalars, which json cannot write.
    parts += [
        {"url": "start", "valueInteger": int(evidence.start)},
        {"url": "end", "valueInteger": int(evidence.end)},
    ]
    if evidence.snippet.strip():
        parts.append({"url": "snippet", "valueString": evidence.snippet})
    return {"url": EVIDENCE_SPAN_URL, "extension": parts}


def _concept(prediction: Prediction) -> dict[str, Any]:
    coding = {"system": prediction.system, "code": prediction.code, "display": prediction.display}
    return {"coding": [coding], "text": prediction.display}


def _probability(prediction: Prediction) -> float:
    return round(float(prediction.probability), 4)


def _context(resource: dict[str, Any], source: TextSource) -> None:
    resource["subject"] = copy.deepcopy(source.subject) if source.subject else dict(_UNKNOWN_SUBJECT)
    if source.encounter:
        resource["encounter"] = copy.deepcopy(source.encounter)


def _risk_assessment(p: Prediction, model: ModelInfo, device: str, when: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": str(uuid.uuid4()),
        "meta": _meta(),
        "extension": [_evidence(p)],
        "status": "final",
        "method": {"text": f"fhirplug {model.name} {model.version} ({model.variant}, {model.provider})"},
    }
    _context(resource, p.source)
    resource.update(
        {
            "occurrenceDateTime": when,
            "performer": {"reference": device, "display": f"fhirplug {model.name} {model.version}"},
            "basis": [{"reference": p.source.reference}],
            "prediction": [{"outcome": _concept(p), "probabilityDecimal": _probability(p)}],
        }
    )
    return resource


def _condition(p: Prediction, when: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": str(uuid.uuid4()),
        "meta": _meta(),
        "extension": [_evidence(p), {"url": PROBABILITY_URL, "valueDecimal": _probability(p)}],
        # A model's reading of a note is a hypothesis for a clinician to confirm, never a confirmed diagnosis.
        "verificationStatus": {"coding": [{"system": _VER_STATUS, "code": "provisional", "display": "Provisional"}]},
        "code": _concept(p),
    }
    _context(resource, p.source)
    resource["recordedDate"] = when
    resource["evidence"] = [{"detail": [{"reference": p.source.reference}]}]
    return resource


def _assertion(p: Prediction) -> dict[str, Any]:
    entity = p.entity
    assert entity is not None
    return {
        "url": ASSERTION_URL,
        "extension": [
            {"url": "negated", "valueBoolean": entity.negated},
            {"url": "possible", "valueBoolean": entity.possible},
            {"url": "historical", "valueBoolean": entity.historical},
            {"url": "subject", "valueCode": entity.subject},
            {"url": "coding-method", "valueCode": entity.coding_method},
            {"url": "coding-score", "valueDecimal": round(float(entity.coding_score), 4)},
        ],
    }


def _entity_extensions(p: Prediction) -> list[dict[str, Any]]:
    return [_evidence(p), {"url": PROBABILITY_URL, "valueDecimal": _probability(p)}, _assertion(p)]


def _entity_condition(p: Prediction, when: str) -> dict[str, Any]:
    entity = p.entity
    assert entity is not None
    status = "refuted" if entity.negated else "unconfirmed" if entity.possible else "provisional"
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": str(uuid.uuid4()),
        "meta": _meta(),
        "extension": _entity_extensions(p),
    }
    if entity.historical and not entity.negated:
        resource["clinicalStatus"] = {
            "coding": [{"system": _CLINICAL_STATUS, "code": "resolved", "display": "Resolved"}]
        }
    resource["verificationStatus"] = {
        "coding": [{"system": _VER_STATUS, "code": status, "display": _VER_DISPLAY[status]}]
    }
    resource["code"] = _concept(p)
    _context(resource, p.source)
    resource["recordedDate"] = when
    resource["evidence"] = [{"detail": [{"reference": p.source.reference}]}]
    return resource


def _family_member_history(p: Prediction, when: str) -> dict[str, Any]:
    entity = p.entity
    assert entity is not None
    relation = entity.relationship or "FAMMEMB"
    condition: dict[str, Any] = {"code": _concept(p)}
    if entity.negated:
        condition["note"] = [{"text": "Stated as absent in the source text (negated)."}]
    return {
        "resourceType": "FamilyMemberHistory",
        "id": str(uuid.uuid4()),
        "meta": _meta(),
        "extension": _entity_extensions(p),
        "status": "partial",
        "patient": copy.deepcopy(p.source.subject) if p.source.subject else dict(_UNKNOWN_SUBJECT),
        "date": when,
        "relationship": {"coding": [{"system": _ROLE_CODE, "code": relation}]},
        "condition": [condition],
    }


def _medication_statement(p: Prediction, when: str) -> dict[str, Any]:
    entity = p.entity
    assert entity is not None
    status = "not-taken" if entity.negated else "completed" if entity.historical else "unknown"
    resource: dict[str, Any] = {
        "resourceType": "MedicationStatement",
        "id": str(uuid.uuid4()),
        "meta": _meta(),
        "extension": _entity_extensions(p),
        "status": status,
        "medicationCodeableConcept": _concept(p),
    }
    _context(resource, p.source)
    if "encounter" in resource:  # MedicationStatement names it context
        resource["context"] = resource.pop("encounter")
    resource["dateAsserted"] = when
    resource["derivedFrom"] = [{"reference": p.source.reference}]
    return resource


def _entity_resource(p: Prediction, when: str) -> dict[str, Any] | None:
    entity = p.entity
    assert entity is not None
    if not entity.coded or not p.code or entity.subject == "other":
        return None
    if entity.subject == "family":
        return _family_member_history(p, when)
    if entity.resource == "MedicationStatement":
        return _medication_statement(p, when)
    return _entity_condition(p, when)


def _device(model: ModelInfo) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": str(uuid.uuid4()),
        "meta": _meta(),
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:sha256:{model.manifest_sha256}"}],
        "status": "active",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": f"fhirplug plugin ({model.task})"},
        "version": [{"value": model.version}],
        "property": [
            {"type": {"text": "model variant"}, "valueCode": [{"text": model.variant}]},
            {"type": {"text": "execution provider"}, "valueCode": [{"text": model.provider}]},
        ],
    }


def build_resources(
    predictions: Sequence[Prediction],
    sources: Sequence[TextSource],
    model: ModelInfo,
    *,
    recorded: datetime | None = None,
) -> list[dict[str, Any]]:
    """FHIR R4 resources for one run's predictions.

    Args:
        predictions: what the model said; one output resource each.
        sources: every text the run read; each distinct reference becomes a Provenance entity.
        model: the model, written into the Device.
        recorded: when the run happened (default: now, UTC); naive datetimes are taken as UTC.

    Returns:
        The ``model.output_resource`` resources in prediction order, then the Device, then the Provenance;
        an empty list when there are no predictions, or none to write (a Provenance needs a target).

    Raises:
        ValueError: ``model.output_resource`` is neither RiskAssessment nor Condition.
    """
    if model.output_resource not in ("RiskAssessment", "Condition"):
        raise ValueError(f"output_resource must be RiskAssessment or Condition, got {model.output_resource!r}")
    if not predictions:
        return []
    when = _instant(recorded or datetime.now(UTC))
    device = _device(model)
    device_ref = f"Device/{device['id']}"
    outputs = []
    for p in predictions:
        if p.entity is not None:
            written = _entity_resource(p, when)
            if written is not None:
                outputs.append(written)
        elif model.output_resource == "RiskAssessment":
            outputs.append(_risk_assessment(p, model, device_ref, when))
        else:
            outputs.append(_condition(p, when))
    if not outputs:  # only uncoded or someone else's mentions: nothing to write, and a Provenance needs a target
        return []
    used = list(dict.fromkeys([s.reference for s in sources] + [p.source.reference for p in predictions]))
    provenance = {
        "resourceType": "Provenance",
        "id": str(uuid.uuid4()),
        "meta": _meta(),
        "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in outputs],
        "recorded": when,
        "activity": {"coding": [{"system": _DATA_OPERATION, "code": "CREATE", "display": "create"}]},
        "agent": [
            {
                "type": {"coding": [{"system": _PARTICIPANT, "code": "author", "display": "Author"}]},
                "who": {"reference": device_ref, "display": f"fhirplug {model.name} {model.version}"},
            }
        ],
        "entity": [{"role": "source", "what": {"reference": ref}} for ref in used],
    }
    return [*outputs, device, provenance]


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _relink(value: Any, urls: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _relink(v, urls) for k, v in value.items()}
        target = out.get("reference")
        if isinstance(target, str) and target in urls:
            out["reference"] = urls[target]
        return out
    if isinstance(value, list):
        return [_relink(v, urls) for v in value]
    return value


def to_bundle(
    resources: Sequence[Mapping[str, Any]], kind: Literal["collection", "transaction"] = "collection"
) -> dict[str, Any]:
    """Wrap resources in a Bundle whose entries reference each other by ``urn:uuid:`` fullUrls.

    Args:
        resources: resources with ``resourceType`` and ``id`` (those of :func:`build_resources`); the inputs
            are not changed.
        kind: ``collection`` (a document of results, with a timestamp) or ``transaction`` (each entry a
            ``POST``, ready to send to a FHIR server, which assigns its own ids).

    Returns:
        The Bundle JSON.
    """
    urls: dict[str, str] = {}
    full_urls: list[str] = []
    for resource in resources:
        rid = str(resource.get("id", ""))
        full_url = f"urn:uuid:{rid.lower()}" if _is_uuid(rid) else f"urn:uuid:{uuid.uuid4()}"
        full_urls.append(full_url)
        if rid:
            urls[f"{resource['resourceType']}/{rid}"] = full_url
    entries = []
    for resource, full_url in zip(resources, full_urls, strict=True):
        entry: dict[str, Any] = {"fullUrl": full_url, "resource": _relink(dict(resource), urls)}
        if kind == "transaction":
            entry["request"] = {"method": "POST", "url": resource["resourceType"]}
        entries.append(entry)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": kind,
        "timestamp": _instant(datetime.now(UTC)),
    }
    if entries:  # FHIR forbids empty arrays
        bundle["entry"] = entries
    return bundle


def to_ndjson(resources: Sequence[Mapping[str, Any]]) -> str:
    """Resources as NDJSON (one compact JSON object a line, UTF-8 text kept as is); "" when there are none."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in resources)
