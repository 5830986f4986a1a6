"""A CDS Hooks service (https://cds-hooks.hl7.org/2.0/) over loaded plugins — standard library only.

``GET /cds-services`` is the discovery document: one service per plugin (its id is the plugin name), on the
``patient-view`` hook by default, with a prefetch template per FHIR resource type the plugin reads
(``DocumentReference?patient={{context.patientId}}`` …). ``POST /cds-services/{id}`` runs the plugin over the
request's ``prefetch`` (resources or searchset Bundles) and answers with cards: one per coded prediction (summary,
probability, evidence snippet, the plugin as source) and one "record" card whose suggestion creates the generated
FHIR resources (the AIAST-labelled RiskAssessment/Condition resources, the model's Device and the Provenance).
Input problems come back as an ``OperationOutcome`` in the card-less response's extension and as warning cards;
a request that cannot be read gets HTTP 400 with an OperationOutcome. The service never fetches from a FHIR
server: a request without prefetch for the plugin is answered 412 with what it needs.

Each request is held to the plugin's :class:`~fhirplug.Budget`: a body over ``max_request_bytes`` is answered
413 without being read; texts over the request's character or window budget become too-costly warning cards
while the texts before them are predicted. A failure inside the service is answered 500 with an
OperationOutcome, never a dropped connection.

Run it with ``fhirplug serve PLUGIN...``; embed it with :func:`make_server`.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhirplug._budget import DEFAULT_BUDGET
from fhirplug.fhir.outcome import Issue, operation_outcome
from fhirplug.fhir.writer import AI_MODEL_CARD_PROFILE, build_resources
from fhirplug.plugin import Plugin, PredictionResult

__all__ = ["CdsService", "make_server", "serve_cards", "serve_in_thread"]

#: The largest request body accepted by default (bytes; ``Budget.max_request_bytes``); bigger requests get 413.
MAX_BODY = DEFAULT_BUDGET.max_request_bytes


class CdsService:
    """One plugin as a CDS Hooks service."""

    def __init__(self, plugin: Plugin, hook: str = "patient-view", min_probability: float = 0.0) -> None:
        self.plugin = plugin
        self.hook = hook
        self.min_probability = min_probability
        manifest = plugin.manifest
        self.id = manifest.name
        self.prefetch = {
            t[0].lower() + t[1:]: f"{t}?patient={{{{context.patientId}}}}" for t in manifest.inputs.resource_types
        }

    def discovery(self) -> dict[str, Any]:
        manifest = self.plugin.manifest
        return {
            "hook": self.hook,
            "id": self.id,
            "title": f"{manifest.name} {manifest.version}",
            "description": manifest.description or manifest.intended_use,
            "prefetch": self.prefetch,
            "usageRequirements": "Send the prefetch (this service does not query a FHIR server).",
        }

    def respond(self, request: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON body for one hook request."""
        hook = request.get("hook")
        if hook != self.hook:
            message = f"service {self.id} answers hook {self.hook!r}, not {hook!r}"
            return _error(HTTPStatus.BAD_REQUEST, "invalid", message, "hook")
        if not isinstance(request.get("hookInstance"), str):
            return _error(HTTPStatus.BAD_REQUEST, "required", "hookInstance is missing", "hookInstance")
        prefetch = request.get("prefetch")
        if not isinstance(prefetch, Mapping) or not any(v for v in prefetch.values()):
            return _error(
                HTTPStatus.PRECONDITION_FAILED,
                "required",
                f"no prefetch: send one or more of {sorted(self.prefetch)} (this service does not query FHIR servers)",
                "prefetch",
            )
        # One run over every prefetched text: one Device and one Provenance for the whole response.
        # A null prefetch value means "nothing found": not an error.
        result = self.plugin.predict_many((f"prefetch.{key}", value) for key, value in prefetch.items() if value)
        return HTTPStatus.OK, serve_cards(self.plugin, result, self.min_probability)


def serve_cards(plugin: Plugin, result: PredictionResult, min_probability: float = 0.0) -> dict[str, Any]:
    """CDS Hooks cards for the predictions of one run (``min_probability`` filters cards and suggestion alike)."""
    manifest = plugin.manifest
    source = {"label": f"fhirplug {manifest.name} {manifest.version} ({plugin.variant}, AI-generated)"}
    cards: list[dict[str, Any]] = []
    shown = [p for p in result.predictions if p.probability >= min_probability]
    for p in (p for p in shown if p.code):  # uncoded mentions get no card (and no resource, below)
        snippet = " ".join(p.evidence.snippet.split())
        cards.append(
            {
                "uuid": str(uuid.uuid4()),
                "summary": f"{p.display} ({p.code}), p = {p.probability:.2f}"[:140],
                "indicator": "info",
                "detail": (
                    f"**{p.display}** — `{p.system}|{p.code}`, calibrated probability {p.probability:.3f}.\n\n"
                    f"Evidence in {p.evidence.reference} ({p.evidence.element}, characters "
                    f"{p.evidence.start}–{p.evidence.end}): “{snippet}”"
                ),
                "source": source,
            }
        )
    # The suggestion records what the cards show.
    resources = build_resources(shown, result.sources, result.model, recorded=result.recorded, inputs=result.inputs)
    if resources:
        # The codings: not the Device, its model card (an AIModelCard DocumentReference) or the Provenance.
        outputs = [
            r
            for r in resources
            if r["resourceType"] not in ("Device", "Provenance")
            and AI_MODEL_CARD_PROFILE not in r.get("meta", {}).get("profile", [])
        ]
        cards.append(
            {
                "uuid": str(uuid.uuid4()),
                "summary": f"Record {len(outputs)} AI-generated coding(s) from {manifest.name}"[:140],
                "indicator": "info",
                "source": source,
                "selectionBehavior": "at-most-one",
                "suggestions": [
                    {
                        "label": "Record as provisional, AI-labelled resources with Provenance",
                        "uuid": str(uuid.uuid4()),
                        "actions": [
                            {"type": "create", "description": f"Create {r['resourceType']}", "resource": r}
                            for r in resources
                        ],
                    }
                ],
            }
        )
    for issue in result.issues:
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
    if result.issues:
        body["extension"] = {"fhirplug-outcome": result.outcome()}
    return body


def _error(status: int, code: str, message: str, expression: str = "") -> tuple[int, dict[str, Any]]:
    issue = Issue(severity="error", code=code, diagnostics=message, expression=(expression,) if expression else ())
    return status, operation_outcome([issue])


def make_server(services: Sequence[CdsService], host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A threaded HTTP server for ``services`` (``port=0`` picks a free port: ``server.server_address``)."""
    by_id = {s.id: s for s in services}

    class Handler(BaseHTTPRequestHandler):
        server_version = "fhirplug-cds-hooks"

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet by default; the CLI prints one line per request itself

        def _send(self, status: int, body: Mapping[str, Any] | bytes) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(data)

        def do_OPTIONS(self) -> None:
            self.send_response(HTTPStatus.NO_CONTENT)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
            self.end_headers()

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/cds-services":
                self._send(HTTPStatus.OK, {"services": [s.discovery() for s in services]})
            else:
                self._send(*_error(HTTPStatus.NOT_FOUND, "not-found", f"no such path {self.path}"))

        def do_POST(self) -> None:
            prefix = "/cds-services/"
            service = by_id.get(self.path[len(prefix) :].rstrip("/")) if self.path.startswith(prefix) else None
            if service is None:
                self._send(*_error(HTTPStatus.NOT_FOUND, "not-found", f"no CDS service at {self.path}"))
                return
            limit = service.plugin.budget.max_request_bytes
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > limit:
                # Answered before reading: the unread body must not be taken for the next request.
                self.close_connection = True
                message = (
                    f"the request body is {length:,} bytes, over the budget of {limit:,} (max_request_bytes); "
                    "send fewer resources per request, or raise it: fhirplug serve --max-request-bytes N"
                )
                if length < 0:
                    message = "the Content-Length header is not a number"
                self._send(*_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too-costly", message))
                return
            try:
                request = json.loads(self.rfile.read(length) or b"null")
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                self._send(*_error(HTTPStatus.BAD_REQUEST, "structure", f"the request is not JSON: {exc}"))
                return
            if not isinstance(request, dict):
                self._send(*_error(HTTPStatus.BAD_REQUEST, "structure", "the request must be a JSON object"))
                return
            try:
                status, body = service.respond(request)
                data = json.dumps(body).encode("utf-8")  # a body that cannot be sent fails here, inside
            except Exception as exc:  # the connection always gets an answer
                message = f"the service failed on this request ({type(exc).__name__}: {exc})"[:500]
                self._send(*_error(HTTPStatus.INTERNAL_SERVER_ERROR, "exception", message))
                return
            self._send(status, data)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server`` in a daemon thread (tests, notebooks); stop it with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="fhirplug-cds-hooks", daemon=True)
    thread.start()
    return thread
