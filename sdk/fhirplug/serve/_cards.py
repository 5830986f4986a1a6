"""CDS Hooks 2.0 JSON (https://cds-hooks.hl7.org/2.0/): discovery, request checks, cards — no web framework.

Card choices, for the EHR's integrator:

- ``indicator``: ``info`` below a calibrated probability of :data:`WARNING_AT` (0.7), ``warning`` from it up.
  Never ``critical``: a model's guess is not an emergency, and an alert a clinician learns to dismiss is worse
  than none. Input problems (a note not read, a text over the budget) are ``warning`` cards.
- ``source``: ``label`` names the plugin, its version and variant; ``topic`` is a Coding of the plugin
  (``urn:fhirplug:plugin|<name>``, version ``<version>+sha256.<manifest hash>``) so feedback and analytics can
  tell model builds apart.
- the "record" card's suggestion writes the same resources ``fhirplug predict --format transaction`` PUTs,
  as CDS Hooks ``update`` actions: each generated resource carries its deterministic id (uuid5), which the
  others reference (``Provenance.target``, ``Device``), and FHIR's update-as-create keeps those references
  whole and makes accepting the same card twice write once. A ``create`` would let the EHR assign new ids
  and leave the Provenance pointing nowhere.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from fhirplug.fhir.outcome import Issue
from fhirplug.fhir.writer import AI_MODEL_CARD_PROFILE
from fhirplug.plugin import Plugin, PredictionResult

__all__ = ["WARNING_AT", "CdsService", "HookProblem", "indicator", "serve_cards"]

#: From this calibrated probability up a coded card is a ``warning``; below, ``info``. Never ``critical``.
WARNING_AT = 0.7
_TEMPLATE = re.compile(r"\{\{\s*context\.([A-Za-z][A-Za-z0-9]*)\s*\}\}")


class HookProblem(Exception):
    """A hook request that cannot be answered: the HTTP status and the issue that says why (internal)."""

    def __init__(self, status: int, issue: Issue) -> None:
        super().__init__(issue.diagnostics)
        self.status = status
        self.issue = issue


def problem(status: int, code: str, message: str, expression: str = "") -> HookProblem:
    return HookProblem(status, Issue("error", code, message, (expression,) if expression else ()))


def indicator(probability: float) -> str:
    """The card indicator for a calibrated probability (see the module docstring)."""
    return "warning" if probability >= WARNING_AT else "info"


class CdsService:
    """One plugin as a CDS Hooks service: its discovery entry, its prefetch templates, its request checks."""

    def __init__(self, plugin: Plugin, hook: str = "patient-view", min_probability: float = 0.0) -> None:
        self.plugin = plugin
        self.hook = hook
        self.min_probability = min_probability
        self.id = plugin.manifest.name
        #: One template per resource type the plugin reads: ``documentReference`` →
        #: ``DocumentReference?patient=Patient/{{context.patientId}}`` (type/id: servers such as Medplum match a
        #: reference search parameter only so; every FHIR server takes it).
        self.prefetch = {
            t[0].lower() + t[1:]: f"{t}?patient=Patient/{{{{context.patientId}}}}"
            for t in plugin.manifest.inputs.resource_types
        }

    def discovery(self) -> dict[str, Any]:
        """This service's entry of ``GET /cds-services``."""
        manifest = self.plugin.manifest
        return {
            "hook": self.hook,
            "title": f"{manifest.name} {manifest.version}",
            "description": manifest.description or manifest.intended_use,
            "id": self.id,
            "prefetch": self.prefetch,
            "usageRequirements": (
                "Send the prefetch, or fhirServer with fhirAuthorization (a bearer token that can read the "
                "prefetch queries) so the service fetches it. AI-generated codings: a clinician reviews them."
            ),
        }

    def check(self, request: Mapping[str, Any]) -> None:
        """Raise :class:`HookProblem` (400) for a request that breaks CDS Hooks 2.0's required fields."""
        hook = request.get("hook")
        if hook != self.hook:
            raise problem(400, "invalid", f"service {self.id} answers hook {self.hook!r}, not {hook!r}", "hook")
        if not isinstance(request.get("hookInstance"), str) or not request["hookInstance"]:
            raise problem(400, "required", "hookInstance is missing (a UUID string per hook call)", "hookInstance")
        if "context" in request and not isinstance(request["context"], Mapping):
            raise problem(400, "structure", "context must be a JSON object", "context")
        if "prefetch" in request and request["prefetch"] is not None and not isinstance(request["prefetch"], Mapping):
            raise problem(400, "structure", "prefetch must be a JSON object of key → resource", "prefetch")
        server = request.get("fhirServer")
        if server is not None and not isinstance(server, str):
            raise problem(400, "structure", "fhirServer must be a URL string", "fhirServer")
        auth = request.get("fhirAuthorization")
        if auth is not None and not (isinstance(auth, Mapping) and isinstance(auth.get("access_token"), str)):
            raise problem(
                400, "structure", "fhirAuthorization must be an object with access_token", "fhirAuthorization"
            )

    def missing(self, request: Mapping[str, Any]) -> dict[str, str]:
        """Prefetch key → the rendered query (``DocumentReference?patient=p1``) for every key the request lacks.

        A key present with ``null`` counts as sent ("no data", CDS Hooks 2.0 §prefetch). A template whose
        context field is absent is left out: nothing can be asked for it.
        """
        prefetch = request.get("prefetch") or {}
        context = request.get("context") or {}
        out: dict[str, str] = {}
        for key, template in self.prefetch.items():
            if key in prefetch:
                continue
            values = [context.get(name) for name in _TEMPLATE.findall(template)]
            if all(isinstance(v, str) and v for v in values):
                out[key] = _TEMPLATE.sub(lambda m: quote(str(context[m.group(1)]), safe=""), template)
        return out


def serve_cards(plugin: Plugin, result: PredictionResult, min_probability: float = 0.0) -> dict[str, Any]:
    """The CDS Hooks response for one run (``min_probability`` filters cards and suggestion alike)."""
    manifest = plugin.manifest
    source = {
        "label": f"fhirplug {manifest.name} {manifest.version} ({plugin.variant}, AI-generated)",
        "topic": {
            "system": "urn:fhirplug:plugin",
            "code": manifest.name,
            "version": f"{manifest.version}+sha256.{plugin.manifest_sha256}",
            "display": f"{manifest.name} {manifest.version}",
        },
    }
    cards: list[dict[str, Any]] = []
    shown = [p for p in result.predictions if p.probability >= min_probability]
    for p in (p for p in shown if p.code):  # uncoded mentions get no card (and no resource, below)
        snippet = " ".join(p.evidence.snippet.split())
        cards.append(
            {
                "uuid": str(uuid.uuid4()),
                "summary": f"{p.display} ({p.code}), p = {p.probability:.2f}"[:140],
                "indicator": indicator(p.probability),
                "detail": (
                    f"**{p.display}** — `{p.system}|{p.code}`, calibrated probability {p.probability:.3f} "
                    f"(AI-generated; model {manifest.name} {manifest.version}, sha256 "
                    f"{plugin.manifest_sha256[:16]}…).\n\n"
                    f"Evidence in {p.evidence.reference} ({p.evidence.element}, characters "
                    f"{p.evidence.start}–{p.evidence.end}): “{snippet}”"
                ),
                "source": source,
            }
        )
    # The suggestion records what the cards show: the CLI's resources, references as Type/id (no urn:uuid:
    # outside a transaction), each written by id.
    shown_result = replace(result, predictions=shown, issues=list(result.issues))
    resources = [json.loads(line) for line in shown_result.to_ndjson().splitlines() if line.strip()]
    if resources:
        codings = [
            r
            for r in resources
            if r["resourceType"] not in ("Device", "Provenance")
            and AI_MODEL_CARD_PROFILE not in r.get("meta", {}).get("profile", [])
        ]
        cards.append(
            {
                "uuid": str(uuid.uuid4()),
                "summary": f"Record {len(codings)} AI-generated coding(s) from {manifest.name}"[:140],
                "indicator": "info",
                "source": source,
                "selectionBehavior": "at-most-one",
                "suggestions": [
                    {
                        "label": "Record as provisional, AI-labelled resources with Provenance",
                        "uuid": str(uuid.uuid4()),
                        "actions": [
                            {
                                "type": "update",
                                "description": f"Write {r['resourceType']}/{r['id']}",
                                "resource": r,
                            }
                            for r in resources
                        ],
                    }
                ],
            }
        )
    issues = shown_result.issues
    for issue in issues:
        if issue.severity == "information":
            continue
        cards.append(
            {
                "uuid": str(uuid.uuid4()),
                "summary": f"Input not used: {issue.diagnostics}"[:140],
                "indicator": "warning",
                "detail": f"{issue.severity} ({issue.code}) at `{', '.join(issue.expression)}`: {issue.diagnostics}",
                "source": source,
            }
        )
    body: dict[str, Any] = {"cards": cards}
    if issues:
        body["extension"] = {"fhirplug-outcome": shown_result.outcome()}
    return body
