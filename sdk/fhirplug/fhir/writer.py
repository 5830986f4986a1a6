"""Predictions out as FHIR R4: one resource per prediction, the AI Device (and its model card) that made them and
one Provenance per run, following HL7 AI Transparency on FHIR; as a collection or transaction Bundle or NDJSON.

**What a prediction becomes.** A text-classification prediction becomes the plugin's ``RiskAssessment`` or
``Condition`` (``verificationStatus`` ``provisional``: a model's reading is a hypothesis for a clinician to confirm).
An entity mention (token-classification, ``Prediction.entity`` set) is mapped once, here:

============================  ===========================================================================
assertion of the mention      what is written
============================  ===========================================================================
present (the patient's)       ``Condition``: ``clinicalStatus`` active, ``verificationStatus`` provisional
negated                       ``Condition``: ``verificationStatus`` refuted, no ``clinicalStatus``
possible / uncertain          ``Condition``: ``verificationStatus`` unconfirmed, ``clinicalStatus`` active
historical                    ``Condition``: no ``clinicalStatus`` (never ``resolved``), ``onsetPeriod.end`` =
                              the note's date (else ``onsetString``), ``historical`` in the assertion extension
hypothetical                  nothing ("return if chest pain" states no fact about the patient)
family member's               ``FamilyMemberHistory`` (status partial, relationship as v3 RoleCode; negated or
                              possible said in ``condition.note``)
someone else's, or uncoded    nothing (no patient, or no code, to write)
drug (``MedicationStatement``)  status ``unknown``; ``not-taken`` when negated; historical stays ``unknown``
                              (a past mention does not say the drug was stopped, so not ``completed``)
============================  ===========================================================================

Every Condition has ``category`` ``encounter-diagnosis`` (what one note of one encounter says), which is what
keeps the FHIR invariants true without claiming what the model does not know:

- con-3 (``clinicalStatus`` SHALL be present if ``verificationStatus`` is not entered-in-error and ``category``
  is problem-list-item): never ``problem-list-item``, so a historical or refuted Condition may go without one;
- con-4 (if ``abatement[x]`` is present, ``clinicalStatus`` must be inactive, resolved or remission): no
  ``abatement[x]`` is ever written (a note saying "history of" gives no abatement);
- con-5 (``clinicalStatus`` SHALL NOT be present if ``verificationStatus`` is entered-in-error): never
  entered-in-error;
- ``unconfirmed`` rather than ``provisional`` for "possible": provisional is what every AI suggestion already
  is, so the note's own uncertainty would be lost; unconfirmed ("not sufficient evidence") keeps it visible.

**AI transparency** (``hl7.fhir.uv.aitransparency`` 1.0.0-ballot): every generated resource has the ``AIAST``
security label; the Device is an ``AIDevice`` (type Artificial-Intelligence, ``AIKind`` medical-text and
deep-learning, ``modelCardDescription`` → the card), the plugin's ``README.md`` is an ``AIModelCard``
DocumentReference (markdown, base64 inline: a bundle has no URL of its own), the Provenance is an
``AIProvenance`` (reason ``AIAST``, the Device as author with the Artificial-Intelligence role, sources and card
as entities); each clinical resource carries the calibrated probability in the IG's ``AIconfidence`` extension
(defined in the IG's continuous build; the ballot has no confidence extension). ``meta.profile`` names each
profile with its version.

**Ids and references.** Ids are UUIDv5 of what a resource says (source, element, plugin identity, code, span;
the Device and model card: the manifest hash; the Provenance: plugin identity and its sorted targets), so
re-running the same input yields the same resources; only run timestamps (``recorded``, ``recordedDate`` ...)
differ. Resources reference each other as ``ResourceType/id`` (the NDJSON form); :func:`to_bundle` links a
Bundle's entries by ``urn:uuid:<id>`` fullUrls, which a collection resolves inside itself and a server
resolves in a transaction. No output holds a reference that cannot resolve: a reference to neither an entry of
the Bundle nor a ``Type/id`` is left out (the Reference keeps its display) and a warning issue says so.

**Generated identities are not the input's to take.** Generated resources reference each other only as
``Type/id``, so a ``urn:uuid:`` in a resource that equals a generated entry's fullUrl came from the input (the
Device's is uuid5 of the public manifest hash: anyone can compute it) and is left out with a warning rather than
resolved to the generated entry; an input resource whose fullUrl or ``Type/id`` is a generated one is not
carried into a transaction (an ``error``/``duplicate`` issue): bdl-7 allows one entry per fullUrl, and two
``PUT`` of one ``Type/id`` would overwrite each other.

**Strings copied from the input are FHIR strings.** A note may hold control characters (NUL, ESC, VT) that the
model reads as sent, but a FHIR ``string`` holds none below U+0020 other than tab, LF and CR
(http://hl7.org/fhir/R4/datatypes.html#string; U+007F is allowed): in the evidence snippet and the References
copied from the input (subject, encounter, their displays) each is replaced by a space, which keeps every
offset and length.

**Transactions are idempotent by id.** Every generated entry of a ``transaction`` (predictions, model card,
Device, Provenance) is ``PUT Type/<id>``: posting the output twice, or re-running the same plugin on the same
note and posting again, leaves the same resources (same ids, same count: one Device, one card, one Provenance
per run identity), each with a new version; only the run times in them change. No entry is conditional
(``ifNoneExist``, ``PUT Type?search``): a server must then run the transaction serializably, and Medplum refuses
such a transaction above 8 entries ("Transaction requires strict isolation but has too many entries"; one NER
note gives 18). The identifiers stay on the resources (the prediction identifier, the Device's model hash),
for search. Input resources the outputs reference that come from an unsent input transaction travel with the
output under their input fullUrl: ``PUT Type/<id>`` when the input named them with an id (an EHR export such as
Synthea does), else ``POST`` as the input had it (an ``ifNoneExist`` only when the input's own request had one,
which is the input's choice, and its cost on servers like Medplum).

The price of idempotency: **the AI's resources belong to the AI run.** A re-run writes them again, so an edit
made in place (a clinician setting a suggested Condition to confirmed or refuted) is overwritten by the next run
of that plugin on that note. A clinician who confirms or refutes a suggestion records it as their own resource
(a copy of the Condition with their ``verificationStatus``, ``asserter`` and a Provenance of their own), never by
editing the AI's. The server must allow update-as-create with client-assigned ids: HAPI does for ids that are
not all digits (fhirplug's are UUIDs), Medplum's FhirRouter does (the tests' server), Google Cloud Healthcare
needs ``enableUpdateCreate`` on the FHIR store. An input's own id travels as the input gave it, so a server that
takes only some ids (UUIDs, say) takes that input's resources only if it would have taken the input. Medplum
allows 50 updates per transaction: outputs much larger than one note's (a whole export) go as NDJSON through
bulk ``$import`` rather than as one transaction; :func:`to_bundle` splits nothing.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from fhirplug.fhir.outcome import Issue
from fhirplug.predictions import SNIPPET_CHARS, Evidence, Prediction, TextSource

__all__ = [
    "AI_ASSERTED",
    "AI_CONFIDENCE_URL",
    "AI_DEVICE_PROFILE",
    "AI_KIND_URL",
    "AI_MODEL_CARD_PROFILE",
    "AI_PROVENANCE_PROFILE",
    "ASSERTION_URL",
    "EVIDENCE_SPAN_URL",
    "EXPLAINED_SPANS",
    "MODEL_CARD_URL",
    "PREDICTION_ID_SYSTEM",
    "ModelInfo",
    "build_resources",
    "to_bundle",
    "to_ndjson",
]

#: Extension: the span of the source text that supports a prediction (sub-extensions source, element, start,
#: end, snippet; start/end are character offsets into the decoded original text, end exclusive; contribution,
#: when the span was found by occlusion: how much removing it lowers the code's probability). The first is the
#: prediction's evidence; an explained prediction (``explain=True``) carries up to :data:`EXPLAINED_SPANS`,
#: every one with a positive contribution, highest first.
EVIDENCE_SPAN_URL = "https://fhirplug.dev/fhir/StructureDefinition/evidence-span"
#: Most evidence spans written for one explained text-classification prediction.
EXPLAINED_SPANS = 3
#: Extension on entity resources: the assertion (sub-extensions negated, possible, historical as valueBoolean;
#: subject as valueCode patient|family; coding-method as valueCode; coding-score as valueDecimal).
ASSERTION_URL = "https://fhirplug.dev/fhir/StructureDefinition/assertion"
#: HL7 AI transparency security label, on every generated resource.
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
#: Identifier system of every generated clinical resource: the value is its deterministic id (a UUID).
PREDICTION_ID_SYSTEM = "https://fhirplug.dev/fhir/sid/prediction"
_IG = "http://hl7.org/fhir/uv/aitransparency"
_IG_VERSION = "1.0.0-ballot"
#: AI Transparency on FHIR profiles (pinned to the ballot they follow).
AI_DEVICE_PROFILE = f"{_IG}/StructureDefinition/AI-Device|{_IG_VERSION}"
AI_MODEL_CARD_PROFILE = f"{_IG}/StructureDefinition/AI-ModelCard|{_IG_VERSION}"
AI_PROVENANCE_PROFILE = f"{_IG}/StructureDefinition/AI-Provenance|{_IG_VERSION}"
#: AI Transparency extensions: the kind of AI (on Device), the Device's model card, the AI's confidence.
AI_KIND_URL = f"{_IG}/StructureDefinition/aitransparency.AIKind"
MODEL_CARD_URL = f"{_IG}/StructureDefinition/aitransparency.modelCardDescription"
AI_CONFIDENCE_URL = f"{_IG}/StructureDefinition/AIconfidence"
_AI_DEVICE_TYPE = f"{_IG}/CodeSystem/AIdeviceTypeCS"
_AI_MODEL_CARD_CS = f"{_IG}/CodeSystem/AImodelCardCS"

_URI = "urn:ietf:rfc:3986"
_VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
_UNKNOWN_SUBJECT = {"display": "unknown subject (not given in the source)"}
_VER_DISPLAY = {"refuted": "Refuted", "unconfirmed": "Unconfirmed", "provisional": "Provisional"}
#: Ids are UUIDv5 in this namespace: the same facts give the same id on every run and every machine.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://fhirplug.dev/fhir")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RELATIVE = re.compile(r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?$")
_ABSOLUTE = re.compile(r"^https?://\S+/[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?$")
# Characters a FHIR string cannot hold: below U+0020 except tab, LF, CR.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass(frozen=True)
class ModelInfo:
    """The model that made a run's predictions, as written into the Device, its model card and the Provenance.

    Attributes:
        name, version, manifest_sha256: the plugin's identity (the manifest hash covers every file).
        task: the task (pipeline tag).
        variant, provider: what ran this time (precision, execution provider); recorded per run, not on the
            Device, which every run of the bundle shares.
        output_resource: "RiskAssessment" or "Condition".
        model_card: the plugin's model card (its ``README.md``, markdown), written as an AIModelCard
            DocumentReference that the Device points to; None: no card is written.
    """

    name: str
    version: str
    manifest_sha256: str
    task: str
    variant: str
    provider: str
    output_resource: str
    model_card: str | None = None

    @property
    def identity(self) -> str:
        return f"{self.name}|{self.version}|{self.manifest_sha256}"


def _instant(moment: datetime) -> str:
    # Naive datetimes are taken as UTC: FHIR instants need a zone, and guessing local time would shift them.
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.isoformat(timespec="milliseconds")


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def _clean(text: str) -> str:
    """``text`` with each character a FHIR string cannot hold replaced by a space (lengths and offsets kept)."""
    return _CONTROL.sub(" ", text)


def _cleaned(value: Any) -> Any:
    """A JSON value copied from the input with every string in it :func:`_clean`-ed (keys are FHIR names)."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, Mapping):
        return {k: _cleaned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    return copy.deepcopy(value)


def _meta(profile: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"profile": [profile]} if profile else {}
    meta["security"] = [dict(AI_ASSERTED)]
    return meta


def _own_identifier(rid: str) -> list[dict[str, Any]]:
    # The id as an identifier, so the prediction is found by search on any copy of it (an export, another
    # server that assigned its own id). Not "urn:uuid:<id>": that is the entry's fullUrl, and servers (Medplum)
    # rewrite every string holding a fullUrl into the Type/id, identifiers included.
    return [{"system": PREDICTION_ID_SYSTEM, "value": rid}]


def _evidences(prediction: Prediction) -> list[dict[str, Any]]:
    """The evidence span, then (explained predictions) the next spans that raise the code's probability."""
    spans = [_evidence(prediction)]
    evidence = prediction.evidence
    for part in prediction.details.get("explanation") or ():
        if len(spans) >= EXPLAINED_SPANS or not part["contribution"] > 0:
            break
        if (part["start"], part["end"]) == (evidence.start, evidence.end):
            continue
        text = str(part["text"])
        snippet = text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"
        span = Evidence(evidence.reference, evidence.element, part["start"], part["end"], snippet, part["contribution"])
        spans.append(_evidence(replace(prediction, evidence=span)))
    return spans


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
    snippet = _clean(evidence.snippet)
    if snippet.strip():
        parts.append({"url": "snippet", "valueString": snippet})
    if evidence.contribution is not None:
        parts.append({"url": "contribution", "valueDecimal": round(float(evidence.contribution), 4)})
    return {"url": EVIDENCE_SPAN_URL, "extension": parts}


def _concept(prediction: Prediction) -> dict[str, Any]:
    coding = {"system": prediction.system, "code": prediction.code, "display": prediction.display}
    return {"coding": [coding], "text": prediction.display}


def _probability(prediction: Prediction) -> float:
    return round(float(prediction.probability), 4)


def _confidence(prediction: Prediction) -> dict[str, Any]:
    return {"url": AI_CONFIDENCE_URL, "valueDecimal": _probability(prediction)}


def _prediction_id(p: Prediction, model: ModelInfo, kind: str) -> str:
    # The span is part of a mention's identity (two mentions of one code in a note are two findings); a
    # text-classification code is predicted once per text, so source + element + code identify it.
    span = (p.evidence.start, p.evidence.end) if p.entity is not None else ()
    return _uuid(kind, p.source.reference, p.source.element, model.identity, p.system, p.code, *span)


def _context(resource: dict[str, Any], source: TextSource, canonical: Mapping[str, str]) -> None:
    subject = _cleaned(source.subject) if source.subject else dict(_UNKNOWN_SUBJECT)
    resource["subject"] = _canonical(subject, canonical)
    if source.encounter:
        resource["encounter"] = _canonical(_cleaned(source.encounter), canonical)


def _canonical(reference: dict[str, Any], canonical: Mapping[str, str]) -> dict[str, Any]:
    # A subject known by an input transaction's fullUrl is named Type/id when it has an id (the NDJSON form).
    target = reference.get("reference")
    if isinstance(target, str) and target in canonical:
        reference["reference"] = canonical[target]
    return reference


def _base(p: Prediction, model: ModelInfo, kind: str, extensions: list[dict[str, Any]]) -> dict[str, Any]:
    rid = _prediction_id(p, model, kind)
    return {"resourceType": kind, "id": rid, "meta": _meta(), "extension": extensions}


def _risk_assessment(p: Prediction, model: ModelInfo, device: str, when: str, c: Mapping[str, str]) -> dict[str, Any]:
    resource = _base(p, model, "RiskAssessment", [*_evidences(p), _confidence(p)])
    resource["identifier"] = _own_identifier(resource["id"])
    resource["status"] = "final"
    resource["method"] = {"text": f"fhirplug {model.name} {model.version} ({model.variant}, {model.provider})"}
    _context(resource, p.source, c)
    resource.update(
        {
            "occurrenceDateTime": when,
            "performer": {"reference": device, "display": f"fhirplug {model.name} {model.version}"},
            "basis": [{"reference": p.source.reference}],
            "prediction": [{"outcome": _concept(p), "probabilityDecimal": _probability(p)}],
        }
    )
    return resource


def _status(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


_ENCOUNTER_DIAGNOSIS = [_status(_CONDITION_CATEGORY, "encounter-diagnosis", "Encounter Diagnosis")]


def _condition(p: Prediction, model: ModelInfo, when: str, c: Mapping[str, str]) -> dict[str, Any]:
    resource = _base(p, model, "Condition", [*_evidences(p), _confidence(p)])
    resource["identifier"] = _own_identifier(resource["id"])
    resource["verificationStatus"] = _status(_VER_STATUS, "provisional", "Provisional")
    resource["category"] = copy.deepcopy(_ENCOUNTER_DIAGNOSIS)
    resource["code"] = _concept(p)
    _context(resource, p.source, c)
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
    return [_evidence(p), _confidence(p), _assertion(p)]


def _entity_condition(p: Prediction, model: ModelInfo, when: str, c: Mapping[str, str]) -> dict[str, Any]:
    entity = p.entity
    assert entity is not None
    status = "refuted" if entity.negated else "unconfirmed" if entity.possible else "provisional"
    resource = _base(p, model, "Condition", _entity_extensions(p))
    resource["identifier"] = _own_identifier(resource["id"])
    # "History of X" says X began before the note, not that it ended (diabetes does not resolve): the clinical
    # status is then unknown and left out; a present, non-negated mention is active as the note tells it.
    if not entity.negated and not entity.historical:
        resource["clinicalStatus"] = _status(_CLINICAL_STATUS, "active", "Active")
    resource["verificationStatus"] = _status(_VER_STATUS, status, _VER_DISPLAY[status])
    resource["category"] = copy.deepcopy(_ENCOUNTER_DIAGNOSIS)
    resource["code"] = _concept(p)
    _context(resource, p.source, c)
    if entity.historical and not entity.negated:
        if p.source.date:
            resource["onsetPeriod"] = {"end": p.source.date}
        else:
            resource["onsetString"] = "before the note (stated as history)"
    resource["recordedDate"] = when
    resource["evidence"] = [{"detail": [{"reference": p.source.reference}]}]
    return resource


def _family_member_history(p: Prediction, model: ModelInfo, when: str, c: Mapping[str, str]) -> dict[str, Any]:
    entity = p.entity
    assert entity is not None
    relation = entity.relationship or "FAMMEMB"
    condition: dict[str, Any] = {"code": _concept(p)}
    # R4 FamilyMemberHistory.condition has no negation or certainty element: the note carries it for readers.
    if entity.negated:
        condition["note"] = [{"text": "Stated as absent in the source text (negated)."}]
    elif entity.possible:
        condition["note"] = [{"text": "Stated as possible in the source text (uncertain)."}]
    resource = _base(p, model, "FamilyMemberHistory", _entity_extensions(p))
    patient = _cleaned(p.source.subject) if p.source.subject else dict(_UNKNOWN_SUBJECT)
    resource.update(
        {
            "identifier": _own_identifier(resource["id"]),
            "status": "partial",
            "patient": _canonical(patient, c),
            "date": when,
            "relationship": {"coding": [{"system": _ROLE_CODE, "code": relation}]},
            "condition": [condition],
        }
    )
    return resource


def _medication_statement(p: Prediction, model: ModelInfo, when: str, c: Mapping[str, str]) -> dict[str, Any]:
    entity = p.entity
    assert entity is not None
    # A historical mention ("was on warfarin", "history of aspirin use") does not say the drug was stopped.
    status = "not-taken" if entity.negated else "unknown"
    resource = _base(p, model, "MedicationStatement", _entity_extensions(p))
    resource["identifier"] = _own_identifier(resource["id"])
    resource["status"] = status
    resource["medicationCodeableConcept"] = _concept(p)
    _context(resource, p.source, c)
    if "encounter" in resource:  # MedicationStatement names it context
        resource["context"] = resource.pop("encounter")
    resource["dateAsserted"] = when
    resource["derivedFrom"] = [{"reference": p.source.reference}]
    return resource


def _entity_resource(p: Prediction, model: ModelInfo, when: str, c: Mapping[str, str]) -> dict[str, Any] | None:
    entity = p.entity
    assert entity is not None
    # A hypothetical mention is not asserted at all; FHIR has no "not asserted" status, and any Condition (even
    # refuted or unconfirmed) would surface in problem-list queries, so nothing is written.
    if not entity.coded or not p.code or entity.subject == "other" or entity.hypothetical:
        return None
    if entity.subject == "family":
        return _family_member_history(p, model, when, c)
    if entity.resource == "MedicationStatement":
        return _medication_statement(p, model, when, c)
    return _entity_condition(p, model, when, c)


def _device_id(model: ModelInfo) -> str:
    return _uuid("Device", model.manifest_sha256)


def _model_card(model: ModelInfo, card: str) -> dict[str, Any]:
    data = card.encode("utf-8")
    rid = _uuid("DocumentReference", "model-card", model.manifest_sha256)
    return {
        "resourceType": "DocumentReference",
        "id": rid,
        # The card is the plugin author's document, not something the AI asserted: no AIAST label.
        "meta": {"profile": [AI_MODEL_CARD_PROFILE]},
        "masterIdentifier": {"system": _URI, "value": f"urn:sha256:{hashlib.sha256(data).hexdigest()}"},
        # The manifest hash names the bundle the card describes (the manifest holds the card's own hash).
        "identifier": [{"system": _URI, "value": f"urn:sha256:{model.manifest_sha256}"}],
        "status": "current",
        "type": {"coding": [{"system": _AI_MODEL_CARD_CS, "code": "AIModelCard", "display": "AI Model-Card"}]},
        # The ballot's AIModelCard requires the AIInputPrompt category (slice "AImodelCard", 1..*) next to the
        # format; the IG's continuous build drops it. Both are written so the ballot profile is met.
        "category": [
            {"coding": [{"system": _AI_MODEL_CARD_CS, "code": "AIInputPrompt", "display": "AI Input Prompt"}]},
            {
                "coding": [
                    {"system": _AI_MODEL_CARD_CS, "code": "AImodelCardMarkdownFormat", "display": "Markdown Format"}
                ]
            },
        ],
        "description": f"Model card of fhirplug plugin {model.name} {model.version}",
        "content": [
            {
                "attachment": {
                    "contentType": "text/markdown",
                    "data": base64.b64encode(data).decode("ascii"),
                    "size": len(data),
                    # R4 Attachment.hash is the base64 SHA-1 of the data.
                    "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),
                    "title": "README.md",
                }
            }
        ],
    }


def _device(model: ModelInfo, card_ref: str | None) -> dict[str, Any]:
    extensions: list[dict[str, Any]] = [
        {"url": AI_KIND_URL, "valueCodeableConcept": _status(_AI_DEVICE_TYPE, code, display)}
        for code, display in (
            ("AI-for-Medical-Text-Data", "AI for Medical Text Data"),
            ("Deep-Learning-Models", "Deep Learning Models"),
        )
    ]
    if card_ref:
        extensions.append({"url": MODEL_CARD_URL, "valueReference": {"reference": card_ref}})
    return {
        "resourceType": "Device",
        "id": _device_id(model),
        "meta": _meta(AI_DEVICE_PROFILE),
        "extension": extensions,
        "identifier": [{"system": _URI, "value": f"urn:sha256:{model.manifest_sha256}"}],
        "status": "active",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        # The IG fixes Device.type to exactly this coding (no display, no text), so the task goes to property.
        "type": {"coding": [{"system": _AI_DEVICE_TYPE, "code": "Artificial-Intelligence"}]},
        "version": [{"value": model.version}],
        "property": [{"type": {"text": "fhirplug task"}, "valueCode": [{"text": model.task}]}],
    }


def _provenance(
    outputs: Sequence[dict[str, Any]], used: Sequence[str], model: ModelInfo, when: str, card_ref: str | None
) -> dict[str, Any]:
    targets = [f"{r['resourceType']}/{r['id']}" for r in outputs]
    entities: list[dict[str, Any]] = [{"role": "source", "what": {"reference": ref}} for ref in used]
    if card_ref:
        entities.append({"role": "derivation", "what": {"reference": card_ref}})
    return {
        "resourceType": "Provenance",
        # One Provenance per run identity (this plugin build, these targets): a re-run PUTs the same one again,
        # with its new ``recorded`` and what ran (variant, provider), rather than adding one per run.
        "id": _uuid("Provenance", model.identity, *sorted(targets)),
        "meta": _meta(AI_PROVENANCE_PROFILE),
        "target": [{"reference": t} for t in targets],
        "recorded": when,
        "reason": [{"coding": [dict(AI_ASSERTED)]}],
        "activity": {
            "coding": [{"system": _DATA_OPERATION, "code": "CREATE", "display": "create"}],
            "text": f"fhirplug predict: {model.name} {model.version}, {model.variant} variant on {model.provider}",
        },
        "agent": [
            {
                "type": _status(_PARTICIPANT, "author", "Author"),
                "role": [{"coding": [{"system": _AI_DEVICE_TYPE, "code": "Artificial-Intelligence"}]}],
                "who": {
                    "reference": f"Device/{_device_id(model)}",
                    "display": f"fhirplug {model.name} {model.version}",
                },
            }
        ],
        "entity": entities,
    }


def _canonical_names(inputs: Mapping[str, Mapping[str, Any]] | None) -> dict[str, str]:
    names: dict[str, str] = {}
    for full_url, resource in (inputs or {}).items():
        rid, rt = resource.get("id"), resource.get("resourceType")
        if isinstance(rid, str) and rid and isinstance(rt, str):
            names[full_url] = f"{rt}/{rid}"
    return names


def build_resources(
    predictions: Sequence[Prediction],
    sources: Sequence[TextSource],
    model: ModelInfo,
    *,
    recorded: datetime | None = None,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """FHIR R4 resources for one run's predictions.

    Args:
        predictions: what the model said; one output resource each (entity mentions: see the module table).
        sources: every text the run read; each distinct reference becomes a Provenance entity.
        model: the model, written into the Device (and its model card when ``model.model_card`` is set).
        recorded: when the run happened (default: now, UTC); naive datetimes are taken as UTC.
        inputs: the resources of an unsent input transaction, by fullUrl (see :func:`to_bundle`); a subject or
            encounter named by such a fullUrl is written as ``Type/id`` when that resource has an id.

    Returns:
        The outputs in prediction order, then the model card (if any), the Device and the Provenance; an empty
        list when there are no predictions, or none to write (a Provenance needs a target). Ids are
        deterministic: the same predictions of the same plugin give the same resources, ``recorded`` aside.

    Raises:
        ValueError: ``model.output_resource`` is neither RiskAssessment nor Condition.
    """
    if model.output_resource not in ("RiskAssessment", "Condition"):
        raise ValueError(f"output_resource must be RiskAssessment or Condition, got {model.output_resource!r}")
    if not predictions:
        return []
    when = _instant(recorded or datetime.now(UTC))
    canonical = _canonical_names(inputs)
    device_ref = f"Device/{_device_id(model)}"
    outputs: dict[str, dict[str, Any]] = {}
    for p in predictions:
        if p.entity is not None:
            written = _entity_resource(p, model, when, canonical)
        elif model.output_resource == "RiskAssessment":
            written = _risk_assessment(p, model, device_ref, when, canonical)
        else:
            written = _condition(p, model, when, canonical)
        if written is not None:
            # The same finding twice (same source, code and span) is one resource, not two entries with one id.
            outputs.setdefault(f"{written['resourceType']}/{written['id']}", written)
    if not outputs:  # only uncoded, hypothetical or someone else's mentions: a Provenance needs a target
        return []
    card = _model_card(model, model.model_card) if model.model_card else None
    card_ref = f"DocumentReference/{card['id']}" if card else None
    used = list(dict.fromkeys([s.reference for s in sources] + [p.source.reference for p in predictions]))
    written_outputs = list(outputs.values())
    support = [card] if card else []
    device = _device(model, card_ref)
    provenance = _provenance(written_outputs, [canonical.get(u, u) for u in used], model, when, card_ref)
    return [*written_outputs, *support, device, provenance]


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        target = value.get("reference")
        if isinstance(target, str):
            yield target
        for v in value.values():
            yield from _references(v)
    elif isinstance(value, list):
        for v in value:
            yield from _references(v)


class _Linker:
    """Rewrites references to entry fullUrls and leaves out, with a warning, those that cannot resolve."""

    def __init__(
        self,
        urls: Mapping[str, str],
        full_urls: set[str],
        warnings: list[Issue] | None,
        generated: Mapping[str, str] | None = None,
    ) -> None:
        self.urls = urls
        self.full_urls = full_urls
        self.warnings = warnings
        #: Generated entries' fullUrls → their Type/id: a reference spelling one came from the input.
        self.generated = generated or {}

    def resolves(self, target: str) -> bool:
        # Relative Type/id (and absolute server URLs) name resources a server has; urn: and #contained do not,
        # unless an entry of this Bundle has that fullUrl.
        return target in self.full_urls or bool(_RELATIVE.match(target) or _ABSOLUTE.match(target))

    def _drop(self, out: dict[str, Any], target: str, path: str, why: str) -> None:
        """Leave an unresolvable reference out: a Reference with a display only is valid everywhere a Reference is,
        and says what it was; the warning goes to ``warnings``."""
        del out["reference"]
        out.setdefault("display", _clean(f"not stored here: {target}"))
        if self.warnings is not None:
            self.warnings.append(Issue("warning", "not-found", why, (path,)))

    def link(self, value: Any, path: str) -> Any:
        if isinstance(value, dict):
            out = {k: self.link(v, f"{path}.{k}") for k, v in value.items()}
            target = out.get("reference")
            if isinstance(target, str) and target in self.generated:
                self._drop(
                    out,
                    target,
                    path,
                    f"reference {target!r} comes from the input but is the fullUrl of the generated "
                    f"{self.generated[target]}; it was left out rather than pointed at that (the Reference "
                    "keeps a display). Name input resources by their own ids",
                )
            elif isinstance(target, str):
                target = self.urls.get(target, target)
                if self.resolves(target):
                    out["reference"] = target
                else:
                    self._drop(
                        out,
                        target,
                        path,
                        f"reference {target!r} names no entry of this output and no resource a server "
                        "has; it was left out (the Reference keeps a display). Expected Type/id or an "
                        "entry's fullUrl; to keep it, pass the input transaction's resources as inputs",
                    )
            return out
        if isinstance(value, list):
            return [self.link(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value


def _input_request(resource: Mapping[str, Any], own: Mapping[str, Any] | None) -> dict[str, Any]:
    """How an input resource travels: by its own id when it has one, else created as the input asked."""
    rtype, rid = resource["resourceType"], resource.get("id")
    if isinstance(rid, str) and _ID.fullmatch(rid):
        return {"method": "PUT", "url": f"{rtype}/{rid}"}
    request: dict[str, Any] = {"method": "POST", "url": rtype}
    # A conditional create only when the input asked for one: it is the input's choice (and, on Medplum, its
    # cost: a conditional entry makes the whole transaction serializable, refused above 8 entries).
    query = own.get("ifNoneExist") if own and own.get("method") == "POST" else None
    if isinstance(query, str) and query:
        request["ifNoneExist"] = query
    return request


def _output_request(resource: Mapping[str, Any]) -> dict[str, Any]:
    rid = resource.get("id")
    if isinstance(rid, str) and _ID.fullmatch(rid):
        return {"method": "PUT", "url": f"{resource['resourceType']}/{rid}"}
    # Only a resource from elsewhere can lack a (valid) id; all build_resources writes have one.
    return {"method": "POST", "url": resource["resourceType"]}


def _unique(resources: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    # Runs merged into one Bundle share their Device and card: one entry each (bdl-7: fullUrls are unique).
    seen: dict[str, Mapping[str, Any]] = {}
    out: list[Mapping[str, Any]] = []
    for resource in resources:
        key = f"{resource.get('resourceType')}/{resource.get('id')}" if resource.get("id") else f"#{len(out)}"
        if key not in seen:
            seen[key] = resource
            out.append(resource)
    return out


def _included_inputs(
    resources: Sequence[Mapping[str, Any]], inputs: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], dict[str, str]]:
    """The input fullUrls the outputs need (transitively), and each input's names (fullUrl, Type/id) → fullUrl."""
    names: dict[str, str] = {}
    for full_url, resource in inputs.items():
        names[full_url] = full_url
        rid, rt = resource.get("id"), resource.get("resourceType")
        if isinstance(rid, str) and rid and isinstance(rt, str):
            names.setdefault(f"{rt}/{rid}", full_url)
    needed: dict[str, None] = {}
    pending = [ref for r in resources for ref in _references(r)]
    while pending:
        found = names.get(pending.pop(0))
        if found is not None and found not in needed:
            needed[found] = None
            pending.extend(_references(inputs[found]))
    # In input order: the transaction reads as the input did, notes before what was said about them.
    return [u for u in inputs if u in needed], names


def _clashes(
    full_url: str,
    resource: Mapping[str, Any],
    generated: Mapping[str, str],
    names: Mapping[str, str],
    warnings: list[Issue] | None,
) -> bool:
    """True (with an issue) when an input resource claims a generated entry's fullUrl or ``Type/id``."""
    rid, rt = resource.get("id"), resource.get("resourceType")
    own = f"{rt}/{rid}" if isinstance(rid, str) and rid else None
    if full_url in generated:
        claimed = f"fullUrl {full_url} (the generated {generated[full_url]}'s)"
    elif own is not None and own in names:
        claimed = f"id: {own} is a resource this output generates"
    else:
        return False
    if warnings is not None:
        warnings.append(
            Issue(
                "error",
                "duplicate",
                f"the input resource {own or rt} has the {claimed}; it was left out of the output transaction, "
                "which holds one entry per fullUrl and one PUT per Type/id. Give the input resource its own id and "
                "fullUrl",
                (),
            )
        )
    return True


def to_bundle(
    resources: Sequence[Mapping[str, Any]],
    kind: Literal["collection", "transaction"] = "collection",
    *,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
    input_requests: Mapping[str, Mapping[str, Any]] | None = None,
    warnings: list[Issue] | None = None,
) -> dict[str, Any]:
    """Wrap resources in a Bundle whose entries reference each other by ``urn:uuid:`` fullUrls.

    Args:
        resources: resources with ``resourceType`` and ``id`` (those of :func:`build_resources`); the inputs
            are not changed; a resource given twice (same type and id) is written once.
        kind: ``collection`` (a document of results, with a timestamp) or ``transaction`` (ready to POST to a
            FHIR server: each entry ``PUT Type/<id>``, idempotent; see the module docstring for what that asks
            of the server and what it means for edits made to the AI's resources).
        inputs: for a ``transaction``: the resources of an unsent input transaction (those its entries would
            create), by fullUrl. Those the outputs refer to (by fullUrl or ``Type/id``), and those they refer to
            in turn, are written into the transaction with the same fullUrl, so one POST stores notes and
            predictions together: ``PUT Type/<id>`` when the input resource has an id, else ``POST``.
        input_requests: the input transaction's own ``entry.request`` by fullUrl (optional): an input resource
            without an id that the input created with ``ifNoneExist`` keeps it; without this, none does.
        warnings: issues are appended here for every reference left out because it could not resolve.

    Returns:
        The Bundle JSON: every ``reference`` in it is an entry's fullUrl or a ``Type/id`` (or absolute URL).
    """
    unique = _unique(resources)
    urls: dict[str, str] = {}
    full_urls: list[str] = []
    generated: dict[str, str] = {}
    for resource in unique:
        rid = str(resource.get("id", ""))
        full_url = f"urn:uuid:{rid.lower()}" if _is_uuid(rid) else f"urn:uuid:{_uuid(resource['resourceType'], rid)}"
        full_urls.append(full_url)
        generated[full_url] = f"{resource['resourceType']}/{rid}"
        if rid:
            urls[f"{resource['resourceType']}/{rid}"] = full_url
    included: list[str] = []
    if kind == "transaction" and inputs:
        included, names = _included_inputs(unique, inputs)
        included = [u for u in included if not _clashes(u, inputs[u], generated, urls, warnings)]
        kept = set(included)
        urls.update({name: url for name, url in names.items() if url in kept})
    linker = _Linker(urls, {*full_urls, *included}, warnings, generated)
    entries: list[dict[str, Any]] = []
    for full_url in included:
        resource = inputs[full_url] if inputs else {}
        i = len(entries)
        entries.append(
            {
                "fullUrl": full_url,
                "resource": linker.link(copy.deepcopy(dict(resource)), f"Bundle.entry[{i}].resource"),
                "request": _input_request(resource, (input_requests or {}).get(full_url)),
            }
        )
    for resource, full_url in zip(unique, full_urls, strict=True):
        i = len(entries)
        entry = {"fullUrl": full_url, "resource": linker.link(dict(resource), f"Bundle.entry[{i}].resource")}
        if kind == "transaction":
            entry["request"] = _output_request(resource)
        entries.append(entry)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        # Deterministic too: the same entries make the same Bundle (only its timestamp says when).
        "id": _uuid("Bundle", kind, *(e["fullUrl"] for e in entries)),
        "type": kind,
        "timestamp": _instant(datetime.now(UTC)),
    }
    if entries:  # FHIR forbids empty arrays
        bundle["entry"] = entries
    return bundle


def to_ndjson(resources: Sequence[Mapping[str, Any]], *, warnings: list[Issue] | None = None) -> str:
    """Resources as NDJSON (one compact JSON object a line, UTF-8 text kept as is); "" when there are none.

    In NDJSON ids are the links: a reference that is not ``Type/id`` (or an absolute URL) cannot resolve, so it
    is left out (the Reference keeps a display) and an issue appended to ``warnings``.
    """
    linker = _Linker({}, set(), warnings)
    lines = []
    for i, resource in enumerate(_unique(resources)):
        linked = linker.link(dict(resource), f"{resource.get('resourceType', 'Resource')}[{i}]")
        lines.append(json.dumps(linked, ensure_ascii=False, separators=(",", ":")) + "\n")
    return "".join(lines)
