"""The ASGI app: CDS Hooks 2.0 services and the FHIR ``$predict`` operation over loaded plugins.

Routes (the first four need a token: see :mod:`fhirplug.serve._auth`; the rest are public):

- ``POST /cds-services/{id}``: one hook call → cards (see :mod:`fhirplug.serve._cards`);
- ``POST /cds-services/{id}/feedback``: card outcomes, counted and logged (card uuid, outcome, counts — no text);
- ``POST /fhir/$predict``: a resource, a Bundle, or a ``Parameters`` → the Bundle ``fhirplug predict`` writes;
- ``GET /cds-services`` (discovery), ``GET /fhir/metadata``, ``GET /fhir/OperationDefinition/predict``,
  ``/healthz``, ``/readyz``, ``/metrics``.

Statuses: 400 unreadable or malformed, 401 no valid token, 403 ``fhirServer`` not allowed, 404 unknown service or
plugin, 408 body not received in time, 412 no prefetch and nothing to fetch it with, 413 body over
``max_request_bytes`` (refused from ``Content-Length`` before reading, else while counting), 415 not JSON,
422 a readable request none of whose texts could be predicted (all over the budget, or no usable resource),
503 + ``Retry-After`` model queue full, 500 an unexpected failure — each with an OperationOutcome, never a dropped
connection. The access log is one JSON line per request on the ``fhirplug.serve`` logger: request id, route,
service, status, counts and latency — never note text, identifiers from the payload, or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhirplug import __version__
from fhirplug.errors import UsageError
from fhirplug.fhir.outcome import Issue, operation_outcome
from fhirplug.plugin import Plugin, PredictionResult
from fhirplug.predictions import TextSource
from fhirplug.serve._auth import AuthConfig, Authenticator, AuthError, endpoint_url
from fhirplug.serve._batcher import MicroBatcher, QueueFull
from fhirplug.serve._cards import CdsService, HookProblem, problem, serve_cards
from fhirplug.serve._fetch import check_server, fetch_prefetch
from fhirplug.serve._metrics import Metrics

__all__ = ["ServeConfig", "create_app"]

log = logging.getLogger("fhirplug.serve")

_JSON = ("application/json",)
_FHIR_JSON = ("application/json", "application/fhir+json")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Seconds a client is told to wait after a 503 (queue full): about one batch of work.
RETRY_AFTER_S = 1
INSECURE_WARNING = (
    "AUTHENTICATION IS OFF (--insecure): anyone who can reach this port can send notes and read predictions. "
    "Local development only."
)


@dataclass(frozen=True)
class ServeConfig:
    """How the app serves (the CLI's flags; defaults are safe: auth on, CORS off).

    Attributes:
        auth: who may call (see :class:`~fhirplug.serve._auth.AuthConfig`).
        hook: the CDS Hooks hook every service answers.
        min_probability: predictions below it are left off cards and suggestions.
        cors_origins: exact origins allowed to call from a browser; empty: no CORS headers at all.
        max_batch: most texts per model run (1: no micro-batching).
        max_wait_ms: how long a request waits for batch-mates.
        queue_size: requests waiting per plugin at most; beyond it, 503 + Retry-After.
        body_timeout_s: the whole request body must arrive within this (else 408).
        fetch_timeout_s: per request to a CDS client's ``fhirServer``.
        fhir_server_allow: URL prefixes a ``fhirServer`` must start with (empty: https anywhere, http on loopback).
        replay_db: the SQLite replay cache that worker processes serving together share
            (:class:`~fhirplug.serve._auth.SharedReplayCache`; ``fhirplug serve --workers N`` sets it); None
            keeps the replay cache in this process's memory.
    """

    auth: AuthConfig = field(default_factory=AuthConfig)
    hook: str = "patient-view"
    min_probability: float = 0.0
    cors_origins: tuple[str, ...] = ()
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 64
    body_timeout_s: float = 30.0
    fetch_timeout_s: float = 10.0
    fhir_server_allow: tuple[str, ...] = ()
    replay_db: str | None = None

    def __post_init__(self) -> None:
        if "*" in self.cors_origins:
            raise UsageError("cors_origins must list exact origins (https://ehr.example.org), not *")
        for name in ("max_batch", "queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"ServeConfig.{name} must be an integer ≥ 1, got {value!r}")
        if self.max_wait_ms < 0 or self.body_timeout_s <= 0 or self.fetch_timeout_s <= 0:
            raise UsageError("max_wait_ms must be ≥ 0 and the timeouts > 0")


class _State:
    """What every handler shares: the services, their batchers, metrics, the authenticator."""

    def __init__(self, plugins: Sequence[Plugin], config: ServeConfig, http: httpx.AsyncClient | None) -> None:
        if not plugins:
            raise UsageError("create_app needs at least one plugin")
        self.config = config
        self.services = {p.name: CdsService(p, config.hook, config.min_probability) for p in plugins}
        if len(self.services) != len(plugins):
            raise UsageError("two plugins have the same name; serve each name once")
        self.metrics = Metrics()
        self.batchers = {
            name: MicroBatcher(
                s.plugin,
                max_batch=config.max_batch,
                max_wait_ms=config.max_wait_ms,
                queue_size=config.queue_size,
                observe=self._observer(name),
            )
            for name, s in self.services.items()
        }
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(config.fetch_timeout_s),
            follow_redirects=False,  # a redirect must not carry the EHR's token elsewhere
            limits=httpx.Limits(max_connections=32),
            trust_env=False,  # no proxy from the environment sees the token
        )
        self.authenticator = Authenticator(config.auth, http=self.http, replay_db=config.replay_db)
        self.ready = False
        self.max_request_bytes = max(s.plugin.budget.max_request_bytes for s in self.services.values())

    def _observer(self, name: str) -> Callable[[int, int], None]:
        def observe(texts: int, requests: int) -> None:
            self.metrics.batch_texts.labels(name).observe(texts)
            self.metrics.batch_requests.labels(name).observe(requests)

        return observe

    async def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for batcher in self.batchers.values():
            await asyncio.to_thread(batcher.stop)
        await self.authenticator.aclose()
        if self._own_http:
            await self.http.aclose()


# --- responses -------------------------------------------------------------------------------------------------


def _outcome(status: int, issues: Sequence[Issue], headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse(operation_outcome(issues), status, headers=dict(headers or {}), media_type=_fhir_json())


def _fhir_json() -> str:
    return "application/fhir+json"


def _unauthorized() -> Response:
    # A bare outcome: why a token failed is for the service's log, not for whoever sent it.
    body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}
    return JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"}, media_type=_fhir_json())


def _note(request: Request, **counts: Any) -> None:
    """Add fields to this request's access-log line (counts and names only)."""
    request.scope.setdefault("fhirplug.log", {}).update(counts)


Handler = Callable[[Request, _State], Awaitable[Response]]


def _endpoint(handler: Handler, route: str) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: the problems it raises become their statuses (500s are the guard's)."""

    async def endpoint(request: Request) -> Response:
        state: _State = request.app.state.fhirplug
        _note(request, route=route)
        try:
            return await handler(request, state)
        except HookProblem as exc:
            headers = {"Connection": "close"} if exc.status in (408, 413) else None
            return _outcome(exc.status, [exc.issue], headers)
        except AuthError as exc:
            _note(request, auth=str(exc)[:200])
            return _unauthorized()
        except QueueFull as exc:
            _note(request, shed=True)
            name = request.scope.get("fhirplug.log", {}).get("service", "")
            state.metrics.shed.labels(name).inc()
            issue = Issue("error", "transient", f"{exc}; retry after {RETRY_AFTER_S} s")
            return _outcome(503, [issue], {"Retry-After": str(RETRY_AFTER_S)})

    return endpoint


async def _authenticate(request: Request, state: _State) -> None:
    url = request.url
    audience = endpoint_url(state.config.auth.public_url, url.scheme, url.netloc, url.path)
    principal = await state.authenticator.authenticate(request.headers.get("authorization"), audience)
    _note(request, principal=principal.kind, client=principal.client)


async def _read_json(request: Request, limit: int, media: tuple[str, ...], timeout: float) -> Any:
    """The request's JSON body: 415 for another media type, 413 over ``limit``, 408 late, 400 unreadable."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in media:
        raise problem(415, "not-supported", f"send {' or '.join(media)}, not {media_type or 'no Content-Type'}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise problem(400, "structure", "the Content-Length header is not a number")
        if int(declared) > limit:
            raise problem(413, "too-costly", _too_big(int(declared), limit))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # chunked (no Content-Length) or a lying header: stop reading now
                    raise problem(413, "too-costly", _too_big(size, limit, at_least=True))
                chunks.append(chunk)
    except TimeoutError:
        raise problem(408, "timeout", f"the request body did not arrive within {timeout:g} s") from None
    _note(request, bytes=size)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, bad JSON, an int past 4,300 digits
        raise problem(400, "structure", f"the request is not JSON: {exc}"[:300]) from None


def _too_big(size: int, limit: int, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return (
        f"the request body is {more}{size:,} bytes, over the budget of {limit:,} (max_request_bytes); send fewer "
        "resources per request, or raise it: fhirplug serve --max-request-bytes N"
    )


# --- prediction shared by hooks and $predict ---------------------------------------------------------------------


@dataclass
class _Read:
    sources: list[TextSource] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    unsent: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read_inputs(plugin: Plugin, inputs: list[tuple[str, Any]]) -> _Read:
    """Read FHIR inputs as ``Plugin.predict_many`` does (problems are issues), without predicting."""
    read: list[tuple[TextSource, str | None]] = []
    out = _Read()
    for name, data in inputs:
        plugin._read(data, name, read, out.issues, out.unsent, out.requests)
    out.sources = [s for s, _ in read]
    out.names = [n for _, n in read]
    return out


async def _predict(
    request: Request, state: _State, service: CdsService, inputs: list[tuple[str, Any]]
) -> tuple[PredictionResult, bool]:
    """Read and predict one request; also whether any text was predicted (else, with errors, 422)."""
    plugin = service.plugin
    started = time.perf_counter()
    read = await asyncio.to_thread(_read_inputs, plugin, inputs)  # parsing a big Bundle is CPU: off the loop
    read_done = time.perf_counter()
    batcher = state.batchers[service.id]
    state.metrics.queue_depth.labels(service.id).set(batcher.depth)
    predictions, found = await batcher.submit(read.sources, read.names)
    state.metrics.queue_depth.labels(service.id).set(batcher.depth)
    done = time.perf_counter()
    issues = read.issues + found
    for issue in issues:
        state.metrics.issues.labels(issue.severity, issue.code).inc()
    state.metrics.predictions.labels(service.id).inc(len(predictions))
    _note(request, texts=len(read.sources), predictions=len(predictions), issues=len(issues))
    # The model-side issues are one per refused text: every text refused means nothing was predicted.
    refused = sum(1 for i in found if i.is_error and i.code in ("too-costly", "exception"))
    predicted_any = len(read.sources) > refused
    result = PredictionResult(
        predictions=predictions,
        sources=read.sources,
        issues=issues,
        model=plugin.model_info,
        recorded=datetime.now(UTC).replace(microsecond=0),
        timings={"read_s": read_done - started, "predict_s": done - read_done, "total_s": done - started},
        inputs=read.unsent,
        input_requests=read.requests,
    )
    return result, predicted_any


def _nothing_predicted(result: PredictionResult, predicted_any: bool) -> bool:
    """A readable request none of whose texts could be predicted: every text refused, or none usable (→ 422)."""
    return result.has_errors and not predicted_any


# --- CDS Hooks ---------------------------------------------------------------------------------------------------


async def _discovery(request: Request, state: _State) -> Response:
    return JSONResponse({"services": [s.discovery() for s in state.services.values()]})


def _service(request: Request, state: _State) -> CdsService:
    name = request.path_params["service"]
    service = state.services.get(name)
    _note(request, service=name if service is not None else "?")
    if service is None:
        raise problem(404, "not-found", f"no CDS service {name!r} here; GET /cds-services lists them")
    return service


async def _hook(request: Request, state: _State) -> Response:
    service = _service(request, state)
    await _authenticate(request, state)
    body = await _read_json(request, service.plugin.budget.max_request_bytes, _JSON, state.config.body_timeout_s)
    if not isinstance(body, dict):
        raise problem(400, "structure", "the request must be a JSON object")
    service.check(body)
    prefetch = body.get("prefetch") or {}
    inputs: list[tuple[str, Any]] = [(f"prefetch.{key}", value) for key, value in prefetch.items() if value]
    missing = service.missing(body)
    auth = body.get("fhirAuthorization")
    server = body.get("fhirServer")
    fetched = 0
    if missing and server and auth:
        check_server(server, state.config.fhir_server_allow)
        pages = await fetch_prefetch(
            state.http,
            server,
            auth["access_token"],
            missing,
            limit_bytes=service.plugin.budget.max_request_bytes,
        )
        for key, got in pages.items():
            # An empty searchset is "nothing of that type": not an input with errors.
            inputs.extend((f"prefetch.{key}", page) for page in got if page.get("entry"))
            fetched += len(got)
    _note(request, fetched_pages=fetched)
    if not inputs:
        raise problem(
            412,
            "required",
            f"no prefetch: send one or more of {sorted(service.prefetch)}, or fhirServer with fhirAuthorization "
            "so this service can fetch them",
            "prefetch",
        )
    result, predicted_any = await _predict(request, state, service, inputs)
    if _nothing_predicted(result, predicted_any):
        return _outcome(422, result.issues)
    return JSONResponse(serve_cards(service.plugin, result, service.min_probability))


async def _feedback(request: Request, state: _State) -> Response:
    service = _service(request, state)
    await _authenticate(request, state)
    body = await _read_json(request, 1024 * 1024, _JSON, state.config.body_timeout_s)
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise problem(400, "structure", 'send {"feedback": [{"card": uuid, "outcome": ...}, ...]}', "feedback")
    for i, item in enumerate(items):
        ok = isinstance(item, dict) and isinstance(item.get("card"), str)
        if not ok or item.get("outcome") not in ("accepted", "overridden"):
            raise problem(
                400,
                "value",
                "each feedback needs card (the card uuid) and outcome accepted|overridden",
                f"feedback[{i}]",
            )
    for item in items:
        state.metrics.feedback.labels(service.id, item["outcome"]).inc()
        # The card uuid, outcome and counts: no override comment (free text may hold PHI).
        log.info(
            json.dumps(
                {
                    "event": "feedback",
                    "service": service.id,
                    "card": item["card"][:64],
                    "outcome": item["outcome"],
                    "accepted_suggestions": len(item.get("acceptedSuggestions") or []),
                    "override_reason": bool(item.get("overrideReason")),
                }
            )
        )
    _note(request, feedback=len(items))
    return Response(status_code=200)


# --- FHIR $predict -------------------------------------------------------------------------------------------------


def _value(part: Mapping[str, Any]) -> str | None:
    for key in ("valueString", "valueCode", "valueId", "valueUri"):
        if isinstance(part.get(key), str):
            return str(part[key])
    return None


async def _operation(request: Request, state: _State) -> Response:
    await _authenticate(request, state)
    body = await _read_json(request, state.max_request_bytes, _FHIR_JSON, state.config.body_timeout_s)
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise problem(400, "structure", "send a FHIR resource, a Bundle or a Parameters resource")
    plugin_name = request.query_params.get("plugin")
    kind = request.query_params.get("kind", "collection")
    as_parameters = body["resourceType"] == "Parameters"
    inputs: list[tuple[str, Any]] = []
    if as_parameters:
        parts = body.get("parameter")
        if not isinstance(parts, list):
            raise problem(400, "structure", "Parameters.parameter must be a list", "Parameters.parameter")
        for i, part in enumerate(parts):
            where = f"Parameters.parameter[{i}]"
            name = part.get("name") if isinstance(part, dict) else None
            if name == "resource" and isinstance(part.get("resource"), dict):
                inputs.append((f"{where}.resource", part["resource"]))
            elif name == "plugin" and _value(part):
                plugin_name = _value(part)
            elif name in ("format", "kind") and _value(part):
                kind = _value(part) or kind
            else:
                raise problem(400, "invalid", f"unknown or empty parameter {name!r} (resource, plugin, format)", where)
        if not inputs:
            raise problem(400, "required", "a resource parameter is required", "Parameters.parameter")
    else:
        inputs.append(("request", body))
    if kind not in ("collection", "transaction"):
        raise problem(400, "value", f"format must be collection or transaction, not {kind!r}", "format")
    if plugin_name is None:
        if len(state.services) > 1:
            raise problem(400, "required", f"name the plugin (one of {sorted(state.services)})", "plugin")
        plugin_name = next(iter(state.services))
    service = state.services.get(plugin_name)
    _note(request, service=plugin_name if service is not None else "?")
    if service is None:
        raise problem(404, "not-found", f"no plugin {plugin_name!r} here (serving {sorted(state.services)})", "plugin")
    result, predicted_any = await _predict(request, state, service, inputs)
    if _nothing_predicted(result, predicted_any):
        return _outcome(422, result.issues)
    bundle = result.to_fhir("transaction" if kind == "transaction" else "collection")
    headers = {"X-Fhirplug-Issues": str(len(result.issues))}
    if as_parameters:
        out: dict[str, Any] = {"resourceType": "Parameters", "parameter": [{"name": "return", "resource": bundle}]}
        if result.issues:
            out["parameter"].append({"name": "outcome", "resource": result.outcome()})
        return JSONResponse(out, headers=headers, media_type=_fhir_json())
    return JSONResponse(bundle, headers=headers, media_type=_fhir_json())


def _base(request: Request, state: _State) -> str:
    public = state.config.auth.public_url
    return f"{public.rstrip('/')}/fhir" if public else f"{request.url.scheme}://{request.url.netloc}/fhir"


async def _metadata(request: Request, state: _State) -> Response:
    base = _base(request, state)
    statement = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "fhirplug", "version": __version__},
        "implementation": {"description": "fhirplug: clinical NLP plugins, FHIR R4 in, coded FHIR out", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "security": {"description": "Bearer token (JWT from a trusted issuer, or a static token)"},
                "operation": [{"name": "predict", "definition": f"{base}/OperationDefinition/predict"}],
            }
        ],
    }
    return JSONResponse(statement, media_type=_fhir_json())


async def _operation_definition(request: Request, state: _State) -> Response:
    base = _base(request, state)

    def param(name: str, use: str, low: int, high: str, type_: str, doc: str) -> dict[str, Any]:
        return {"name": name, "use": use, "min": low, "max": high, "type": type_, "documentation": doc}

    definition = {
        "resourceType": "OperationDefinition",
        "id": "predict",
        "url": f"{base}/OperationDefinition/predict",
        "name": "Predict",
        "title": "Code clinical text with a fhirplug plugin",
        "status": "active",
        "kind": "operation",
        "code": "predict",
        "system": True,
        "type": False,
        "instance": False,
        "affectsState": False,
        "description": (
            "POST a resource or Bundle (the response is the output Bundle), or a Parameters (the response is a "
            "Parameters with return and, when there were issues, outcome)."
        ),
        "parameter": [
            param("resource", "in", 0, "*", "Resource", "A resource or Bundle to read text from."),
            param("plugin", "in", 0, "1", "string", "The plugin name (required when several are served)."),
            param("format", "in", 0, "1", "code", "collection (default) or transaction."),
            param("return", "out", 1, "1", "Bundle", "The generated resources, as fhirplug predict writes them."),
            param("outcome", "out", 0, "1", "OperationOutcome", "Issues met reading and predicting."),
        ],
    }
    return JSONResponse(definition, media_type=_fhir_json())


# --- operations endpoints --------------------------------------------------------------------------------------------


async def _healthz(request: Request, state: _State) -> Response:
    return JSONResponse({"status": "up"})


async def _readyz(request: Request, state: _State) -> Response:
    body: dict[str, Any] = {
        "status": "ready" if state.ready else "starting",
        "plugins": [
            {
                "name": s.id,
                "version": s.plugin.manifest.version,
                "variant": s.plugin.variant,
                "provider": s.plugin.provider,
                "manifest_sha256": s.plugin.manifest_sha256,
                "trusted_by": s.plugin.trusted_by,
            }
            for s in state.services.values()
        ],
        "auth": "off" if state.config.auth.insecure else "on",
    }
    if state.config.auth.insecure:
        body["warning"] = INSECURE_WARNING
    return JSONResponse(body, 200 if state.ready else 503)


async def _metrics(request: Request, state: _State) -> Response:
    for name, batcher in state.batchers.items():
        state.metrics.queue_depth.labels(name).set(batcher.depth)
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")


# --- the guard: access log, 500s ---------------------------------------------------------------------------------


class _Guard:
    """Outermost: one JSON access-log line per request, and a 500 OperationOutcome for any failure."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else str(uuid.uuid4())
        fields: dict[str, Any] = scope.setdefault("fhirplug.log", {})
        status = 500
        sent = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # the connection always gets an answer
            fields["error"] = type(exc).__name__
            if not sent:
                # The type, not the message: an exception's text can quote the input.
                issue = Issue(
                    "error",
                    "exception",
                    f"the service failed on this request ({type(exc).__name__}); request id {request_id}",
                )
                response = _outcome(500, [issue])
                await response(scope, receive, tracking_send)
        finally:
            elapsed = time.perf_counter() - started
            route = fields.get("route", "other")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            record = {
                "event": "request",
                "id": request_id,
                "method": scope["method"],
                "status": status,
                "ms": round(elapsed * 1000, 1),
                "pid": os.getpid(),  # which worker of fhirplug serve --workers N answered
                **fields,
            }
            log.info(json.dumps(record, default=str))


def create_app(
    plugins: Sequence[Plugin], config: ServeConfig | None = None, *, http: httpx.AsyncClient | None = None
) -> Starlette:
    """The ASGI app serving ``plugins`` (each verified and loaded already: ``load_plugin``).

    Args:
        plugins: the plugins, one CDS service each (the id is the plugin name).
        config: how to serve; the default has authentication on and no trusted key, so it refuses every token:
            pass ``ServeConfig(auth=AuthConfig(...))``.
        http: the client used to fetch JWKS and prefetch (default: one the app owns, with timeouts).

    Raises:
        UsageError: no plugins, two with one name, or a bad config.
    """
    config = config or ServeConfig()
    state = _State(plugins, config, http)
    if config.auth.insecure:
        print(f"WARNING: {INSECURE_WARNING}", file=sys.stderr)
        log.warning(json.dumps({"event": "insecure", "warning": INSECURE_WARNING}))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    def route(path: str, handler: Handler, name: str, methods: list[str]) -> Route:
        return Route(path, _endpoint(handler, name), methods=methods)

    routes = [
        route("/cds-services", _discovery, "discovery", ["GET"]),
        route("/cds-services/{service}", _hook, "hook", ["POST"]),
        route("/cds-services/{service}/feedback", _feedback, "feedback", ["POST"]),
        route("/fhir/$predict", _operation, "predict", ["POST"]),
        route("/fhir/metadata", _metadata, "metadata", ["GET"]),
        route("/fhir/OperationDefinition/predict", _operation_definition, "operation-definition", ["GET"]),
        route("/healthz", _healthz, "healthz", ["GET"]),
        route("/readyz", _readyz, "readyz", ["GET"]),
        route("/metrics", _metrics, "metrics", ["GET"]),
    ]
    middleware = [Middleware(_Guard, metrics=state.metrics)]
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                allow_credentials=False,  # bearer tokens travel in a header, never cookies
                max_age=600,
            )
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        _note(request, route="other")
        status = getattr(exc, "status_code", 404)
        return _outcome(
            status,
            [
                Issue(
                    "error",
                    "not-found" if status == 404 else "not-supported",
                    f"no such endpoint: {request.method} {request.url.path}",
                )
            ],
        )

    app = Starlette(
        routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found}
    )
    app.state.fhirplug = state
    return app
