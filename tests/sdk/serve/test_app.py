"""The Starlette + uvicorn server over real HTTP on 127.0.0.1: CDS Hooks 2.0, FHIR $predict, every error status,
authentication on by default, CORS off by default, no PHI in the logs, micro-batching that changes nothing."""

from __future__ import annotations

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from fhirplug import Budget, load_plugin  # noqa: E402
from fhirplug.cli import main  # noqa: E402
from fhirplug.serve import AuthConfig, ServeConfig  # noqa: E402
from fhirplug.serve._cards import WARNING_AT  # noqa: E402
from tests.conftest import FIXTURES, TINY_PLUGIN  # noqa: E402
from tests.sdk.helpers import collection, document_reference  # noqa: E402
from tests.sdk.serve.conftest import ISSUER  # noqa: E402

DIABETES = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."
HYPERTENSION = "Blood pressure 162/98 today; hypertension, start lisinopril."
HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
EHR_TOKEN = "ehr-access-token-0b9f6c2e5d7a4e31"
insecure_ok = pytest.mark.filterwarnings("ignore::fhirplug.serve._auth.InsecureAuthWarning")


def _hook(prefetch: Any = None, hook: str = "patient-view", patient: str = "p1", **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": HOOK_INSTANCE,
        "context": {"userId": "Practitioner/1", "patientId": patient},
        **more,
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


@pytest.fixture
def secured(serve: Any, tiny_plugin: Any, jwks_file: Path) -> Any:
    """The tiny plugin served with JWT authentication (the default posture)."""
    return serve([tiny_plugin], ServeConfig(auth=AuthConfig(jwks=(str(jwks_file),), issuers=(ISSUER,))))


class Client:
    """Signs every call to a protected route, as a CDS client does."""

    def __init__(self, server: Any, sign: Any) -> None:
        self.url = server.url
        self.sign = sign

    def post(self, path: str, body: Any = None, *, token: bool = True, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if token:
            headers.setdefault("Authorization", f"Bearer {self.sign(self.url + path.split('?')[0])}")
        if body is not None:
            kw["json"] = body
        return httpx.post(self.url + path, headers=headers, timeout=30, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)


@pytest.fixture
def client(secured: Any, sign: Any) -> Client:
    return Client(secured, sign)


# --- CDS Hooks ----------------------------------------------------------------------------------------------------


def test_discovery_is_public_and_lists_the_plugin(client: Client, tiny_plugin: Any) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    (service,) = response.json()["services"]
    assert service["id"] == "tiny-notes" and service["hook"] == "patient-view"
    assert service["title"] == f"tiny-notes {tiny_plugin.manifest.version}" and service["description"]
    assert service["prefetch"]["documentReference"] == "DocumentReference?patient=Patient/{{context.patientId}}"
    assert set(service["prefetch"]) == {
        "documentReference",
        "diagnosticReport",
        "observation",
        "condition",
        "procedure",
    }


def test_a_hook_call_with_prefetch_gives_cards_and_an_update_suggestion(client: Client, tiny_plugin: Any) -> None:
    prefetch = {"documentReference": collection(document_reference(DIABETES), kind="searchset")}
    response = client.post("/cds-services/tiny-notes", _hook(prefetch))
    assert response.status_code == 200, response.text
    coded, record = response.json()["cards"]
    expected = tiny_plugin.predict(prefetch["documentReference"]).predictions
    (diabetes,) = [p for p in expected if p.code == "44054006"]
    assert coded["summary"] == f"Diabetes mellitus type 2 (44054006), p = {diabetes.probability:.2f}"
    assert len(coded["summary"]) <= 140 and len(coded["uuid"]) == 36
    assert coded["indicator"] == ("warning" if diabetes.probability >= WARNING_AT else "info")
    assert "DocumentReference/note-1" in coded["detail"] and "HbA1c" in coded["detail"]
    topic = coded["source"]["topic"]
    assert topic["code"] == "tiny-notes" and topic["version"].endswith(tiny_plugin.manifest_sha256)
    (suggestion,) = record["suggestions"]
    assert record["selectionBehavior"] == "at-most-one"
    actions = suggestion["actions"]
    assert [a["type"] for a in actions] == ["update"] * 4
    assert [a["resource"]["resourceType"] for a in actions] == [
        "RiskAssessment",
        "DocumentReference",
        "Device",
        "Provenance",
    ]
    # The same resources (ids and all) the CLI's NDJSON writes, references as Type/id.
    cli = [json.loads(line) for line in tiny_plugin.predict(prefetch["documentReference"]).to_ndjson().splitlines()]
    assert [(r["resourceType"], r["id"]) for r in cli] == [
        (a["resource"]["resourceType"], a["resource"]["id"]) for a in actions
    ]
    provenance = actions[-1]["resource"]
    assert f"RiskAssessment/{actions[0]['resource']['id']}" in json.dumps(provenance["target"])


def _request_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, Any]]:
    """The access-log lines; the server writes one after the response is sent, so wait a little for them."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(r.getMessage()) for r in caplog.records if '"event": "request"' in r.getMessage()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_a_hook_call_fetches_missing_prefetch_from_the_fhir_server(
    client: Client, fhir_base: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.fhir_tools import fhir_request

    seed = json.loads((FIXTURES / "serve" / "patient-with-note.json").read_text())
    for entry in seed["entry"]:
        resource = entry["resource"]
        status, _ = fhir_request(fhir_base, "PUT", f"{resource['resourceType']}/{resource['id']}", resource)
        assert status in (200, 201)
    auth = {"access_token": EHR_TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read"}
    body = _hook(patient="serve-p1", fhirServer=fhir_base, fhirAuthorization=auth)
    with caplog.at_level(logging.INFO, logger="fhirplug.serve"):
        response = client.post("/cds-services/tiny-notes", body)
        lines = _request_lines(caplog, 1)  # inside the block: the line is written after the response
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert "44054006" in cards[0]["summary"] and "DocumentReference/serve-n1" in cards[0]["detail"]
    (line,) = lines
    assert line["fetched_pages"] == 5 and line["texts"] == 1  # one search per prefetch template
    assert EHR_TOKEN not in caplog.text and "serve-p1" not in caplog.text


def test_without_prefetch_or_a_fhir_server_it_is_412(client: Client) -> None:
    response = client.post("/cds-services/tiny-notes", _hook({"documentReference": None}))
    assert response.status_code == 412
    assert "no prefetch" in response.json()["issue"][0]["diagnostics"]


def test_a_plain_http_fhir_server_off_loopback_is_refused_unasked(client: Client) -> None:
    auth = {"access_token": EHR_TOKEN, "token_type": "Bearer"}
    started = time.perf_counter()
    body = _hook(fhirServer="http://10.255.255.1/fhir", fhirAuthorization=auth)
    response = client.post("/cds-services/tiny-notes", body)
    assert response.status_code == 400 and response.json()["issue"][0]["code"] == "security"
    assert time.perf_counter() - started < 5  # no connection was tried (it would hang to the timeout)


def test_feedback_is_counted_and_logged_without_text(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    card = "7d1e1b23-2d0e-4c0e-9c43-2f5c3d1a9b10"
    feedback = {
        "feedback": [
            {"card": card, "outcome": "accepted", "acceptedSuggestions": [{"id": "s1"}]},
            {
                "card": "0d3c7a4e-8a51-4b2e-8e0f-6c1f3a2b9d77",
                "outcome": "overridden",
                "overrideReason": {"userComment": "patient Ada says she never had diabetes"},
            },
        ]
    }
    with caplog.at_level(logging.INFO, logger="fhirplug.serve"):
        response = client.post("/cds-services/tiny-notes/feedback", feedback)
    assert response.status_code == 200
    logged = [json.loads(r.getMessage()) for r in caplog.records if '"event": "feedback"' in r.getMessage()]
    assert [(f["card"], f["outcome"], f["accepted_suggestions"]) for f in logged] == [
        (card, "accepted", 1),
        ("0d3c7a4e-8a51-4b2e-8e0f-6c1f3a2b9d77", "overridden", 0),
    ]
    assert "never had diabetes" not in caplog.text and "Ada" not in caplog.text
    metrics = client.get("/metrics").text
    assert 'fhirplug_feedback_total{outcome="accepted",service="tiny-notes"} 1.0' in metrics
    assert 'fhirplug_feedback_total{outcome="overridden",service="tiny-notes"} 1.0' in metrics
    bad = client.post("/cds-services/tiny-notes/feedback", {"feedback": [{"card": card, "outcome": "maybe"}]})
    assert bad.status_code == 400


# --- FHIR $predict ------------------------------------------------------------------------------------------------


def _codes(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted(
        (e["resource"]["resourceType"], e["resource"].get("id", ""))
        for e in bundle["entry"]
        if e["resource"]["resourceType"] in ("RiskAssessment", "Condition")
    )


def test_predict_takes_a_resource_a_bundle_and_parameters(client: Client, tiny_plugin: Any) -> None:
    note = document_reference(DIABETES)
    response = client.post("/fhir/$predict", note, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    assert bundle["type"] == "collection"
    assert _codes(bundle) == _codes(tiny_plugin.predict(note).to_fhir()) and _codes(bundle)

    two = collection(document_reference(DIABETES, id_="a"), document_reference(HYPERTENSION, id_="b"))
    bundle = client.post("/fhir/$predict", two).json()
    assert _codes(bundle) == _codes(tiny_plugin.predict(two).to_fhir()) and len(_codes(bundle)) >= 2

    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": document_reference(DIABETES, id_="a")},
            {"name": "resource", "resource": document_reference("", id_="empty")},
            {"name": "plugin", "valueString": "tiny-notes"},
            {"name": "format", "valueCode": "transaction"},
        ],
    }
    out = client.post("/fhir/$predict", parameters).json()
    assert out["resourceType"] == "Parameters"
    parts = {p["name"]: p["resource"] for p in out["parameter"]}
    assert parts["return"]["type"] == "transaction"
    assert {e["request"]["method"] for e in parts["return"]["entry"]} == {"PUT"}
    (issue,) = [i for i in parts["outcome"]["issue"] if i["severity"] == "error"]
    assert "Parameters.parameter[1].resource" in json.dumps(issue)


def test_metadata_and_operation_definition_are_public(client: Client) -> None:
    statement = client.get("/fhir/metadata").json()
    assert statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
    (operation,) = statement["rest"][0]["operation"]
    assert operation["name"] == "predict"
    definition = client.get("/fhir/OperationDefinition/predict").json()
    assert definition["resourceType"] == "OperationDefinition" and definition["code"] == "predict"
    assert definition["url"] == operation["definition"]
    assert {p["name"] for p in definition["parameter"]} == {"resource", "plugin", "format", "return", "outcome"}


# --- every error status -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content", "ctype", "status", "says"),
    [
        ("/cds-services/tiny-notes", b"{not json", "application/json", 400, "not JSON"),
        ("/cds-services/tiny-notes", b"[1, 2]", "application/json", 400, "JSON object"),
        (
            "/cds-services/tiny-notes",
            json.dumps(_hook({}, hook="order-sign")).encode(),
            "application/json",
            400,
            "answers hook 'patient-view'",
        ),
        ("/cds-services/no-such", b"{}", "application/json", 404, "no CDS service"),
        (
            "/fhir/$predict?plugin=nope",
            json.dumps(document_reference(DIABETES)).encode(),
            "application/json",
            404,
            "no plugin 'nope'",
        ),
        ("/cds-services/tiny-notes", b"{}", "text/plain", 415, "send application/json"),
        (
            "/cds-services/tiny-notes",
            b"hook=patient-view",
            "application/x-www-form-urlencoded",
            415,
            "not application/x-www",
        ),
        (
            "/fhir/$predict?kind=ndjson",
            json.dumps(document_reference(DIABETES)).encode(),
            "application/json",
            400,
            "collection or transaction",
        ),
    ],
)
def test_bad_requests_get_an_operation_outcome(
    client: Client, path: str, content: bytes, ctype: str, status: int, says: str
) -> None:
    response = client.post(path, content=content, headers={"Content-Type": ctype})
    assert response.status_code == status
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and says in outcome["issue"][0]["diagnostics"]


def test_authentication_is_on_by_default(client: Client, sign: Any) -> None:
    body = _hook({"documentReference": document_reference(DIABETES)})
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": f"Bearer {sign('http://other/x')}"}):
        response = client.post("/cds-services/tiny-notes", body, token=False, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "issue" in response.json() and "diagnostics" not in response.text  # nothing for a prober
        assert (
            client.post("/fhir/$predict", document_reference(DIABETES), token=False, headers=headers).status_code == 401
        )
    # A valid ES384 token for the exact URL passes, and the same token twice is a replay.
    token = sign(client.url + "/cds-services/tiny-notes")
    first = client.post("/cds-services/tiny-notes", body, headers={"Authorization": f"Bearer {token}"})
    assert first.status_code == 200 and first.json()["cards"]
    again = client.post("/cds-services/tiny-notes", body, headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 401


@pytest.fixture
def tight(serve: Any, tiny_bundle: Path, jwks_file: Path, sign: Any) -> Client:
    """A plugin on a small budget: 3,000-byte bodies, 80-character texts."""
    plugin = load_plugin(
        tiny_bundle, allow_unsigned=True, variant="fp32", budget=Budget(max_chars=80, max_request_bytes=3_000)
    )
    server = serve([plugin], ServeConfig(auth=AuthConfig(jwks=(str(jwks_file),), issuers=(ISSUER,)), body_timeout_s=1))
    return Client(server, sign)


def test_bodies_over_the_budget_are_413_declared_or_streamed(tight: Client) -> None:
    big = _hook({"documentReference": document_reference("x" * 4_000)})
    response = tight.post("/cds-services/tiny-notes", big)
    assert response.status_code == 413 and response.json()["issue"][0]["code"] == "too-costly"
    assert "max_request_bytes" in response.json()["issue"][0]["diagnostics"]

    def chunks() -> Any:  # no Content-Length: counted while streaming
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    response = tight.post("/cds-services/tiny-notes", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "more than" in response.json()["issue"][0]["diagnostics"]


def test_a_body_that_does_not_arrive_is_408(tight: Client) -> None:
    host, port = tight.url.removeprefix("http://").split(":")
    token = tight.sign(tight.url + "/cds-services/tiny-notes")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /cds-services/tiny-notes HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"hook": '
        )
        received = b""
        while chunk := sock.recv(65536):  # status line and body may come in several packets: read to the close
            received += chunk
        answer = received.decode()
    assert answer.startswith("HTTP/1.1 408") and "timeout" in answer


def test_a_request_whose_every_text_is_over_budget_is_422(tight: Client) -> None:
    notes = collection(document_reference("diabetes " * 20, id_="a"), document_reference("asthma " * 20, id_="b"))
    response = tight.post("/cds-services/tiny-notes", _hook({"documentReference": notes}))
    assert response.status_code == 422
    issues = response.json()["issue"]
    # Each note: its text refused by the reader (over max_chars), so the resource gave no text.
    assert sorted(i["code"] for i in issues) == ["required", "required", "too-costly", "too-costly"]
    assert tight.post("/fhir/$predict", notes).status_code == 422
    # One text under the budget: 200, the other one a warning card.
    mixed = collection(document_reference(DIABETES, id_="a"), document_reference("asthma " * 20, id_="b"))
    response = tight.post("/cds-services/tiny-notes", _hook({"documentReference": mixed}))
    assert response.status_code == 200
    assert [c["indicator"] for c in response.json()["cards"]][-1] == "warning"


@insecure_ok
def test_a_full_queue_sheds_load_with_503(serve: Any, tiny_bundle: Path) -> None:
    plugin = load_plugin(tiny_bundle, allow_unsigned=True, variant="fp32")
    server = serve([plugin], ServeConfig(auth=AuthConfig(insecure=True), max_batch=1, queue_size=1))
    # Every window of the process held: the model thread blocks on its first request, one more waits, and the
    # queue (size 1) is full for the rest.
    plugin.gate.acquire(plugin.gate.bound)
    held = True
    body = _hook({"documentReference": document_reference(DIABETES)})
    url = f"{server.url}/cds-services/tiny-notes"
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, url, json=body, timeout=30) for _ in range(6)]
            deadline = time.monotonic() + 20
            while sum(f.done() for f in futures) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            shed = [f.result() for f in futures if f.done()]
            assert len(shed) == 4 and all(r.status_code == 503 for r in shed)
            assert shed[0].headers["retry-after"] == "1" and shed[0].json()["issue"][0]["code"] == "transient"
            plugin.gate.release(plugin.gate.bound)  # the two accepted requests now run
            held = False
    finally:
        if held:
            plugin.gate.release(plugin.gate.bound)
    assert sorted(f.result().status_code for f in futures) == [200, 200, 503, 503, 503, 503]
    assert 'fhirplug_shed_total{plugin="tiny-notes"} 4.0' in httpx.get(f"{server.url}/metrics").text


@insecure_ok
def test_an_unexpected_failure_is_a_500_outcome(serve: Any, tiny_plugin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import fhirplug.serve.app as app_module

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"boom while carding {DIABETES}")

    server = serve([tiny_plugin], ServeConfig(auth=AuthConfig(insecure=True)))
    monkeypatch.setattr(app_module, "serve_cards", broken)
    response = httpx.post(
        f"{server.url}/cds-services/tiny-notes", json=_hook({"documentReference": document_reference(DIABETES)})
    )
    assert response.status_code == 500
    issue = response.json()["issue"][0]
    assert issue["code"] == "exception" and "RuntimeError" in issue["diagnostics"]
    assert DIABETES not in response.text  # an exception's text can quote the note: it is not sent
    assert response.headers["x-request-id"] in issue["diagnostics"]


# --- CORS, logs, health -------------------------------------------------------------------------------------------


def test_cors_is_off_by_default(client: Client) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = httpx.options(
        f"{client.url}/cds-services/tiny-notes",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in client.get("/cds-services", headers=origin).headers


@insecure_ok
def test_cors_allows_the_listed_origin_only(serve: Any, tiny_plugin: Any) -> None:
    ehr = "https://ehr.example.org"
    server = serve([tiny_plugin], ServeConfig(auth=AuthConfig(insecure=True), cors_origins=(ehr,)))
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    good = httpx.options(f"{server.url}/cds-services/tiny-notes", headers={"Origin": ehr, **ask})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == ehr
    assert "access-control-allow-credentials" not in good.headers
    bad = httpx.options(f"{server.url}/cds-services/tiny-notes", headers={"Origin": "https://evil.example", **ask})
    assert bad.headers.get("access-control-allow-origin") != "https://evil.example"
    with pytest.raises(Exception, match="exact origins"):
        ServeConfig(cors_origins=("*",))


def test_logs_hold_no_note_text_patient_id_or_token(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    prefetch = {"documentReference": document_reference(DIABETES, patient="Patient/pt-4711-secret")}
    token = client.sign(client.url + "/cds-services/tiny-notes")
    with caplog.at_level(logging.DEBUG):
        ok = client.post(
            "/cds-services/tiny-notes",
            _hook(prefetch, patient="pt-4711-secret"),
            headers={"Authorization": f"Bearer {token}"},
        )
        replayed = client.post(
            "/cds-services/tiny-notes",
            _hook(prefetch, patient="pt-4711-secret"),
            headers={"Authorization": f"Bearer {token}"},
        )
        lines = _request_lines(caplog, 2)  # inside the block: each line is written after its response
    assert (ok.status_code, replayed.status_code) == (200, 401)
    assert [(line["status"], line["service"], line["route"]) for line in lines] == [
        (200, "tiny-notes", "hook"),
        (401, "tiny-notes", "hook"),
    ]
    assert lines[0]["texts"] == 1 and lines[0]["predictions"] >= 1 and lines[0]["ms"] > 0
    for secret in ("HbA1c", "metformin", "pt-4711-secret", token, token.split(".")[2]):
        assert secret not in caplog.text


@insecure_ok
def test_health_readiness_and_metrics(serve: Any, tiny_plugin: Any) -> None:
    server = serve([tiny_plugin], ServeConfig(auth=AuthConfig(insecure=True)))
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "up"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and "AUTHENTICATION IS OFF" in ready["warning"]
    assert ready["plugins"][0]["manifest_sha256"] == tiny_plugin.manifest_sha256
    httpx.post(f"{server.url}/cds-services/tiny-notes", json=_hook({"documentReference": document_reference(DIABETES)}))
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'fhirplug_requests_total{route="hook",status="200"} 1.0' in metrics
    assert 'fhirplug_batch_texts_count{plugin="tiny-notes"} 1.0' in metrics
    assert "fhirplug_request_seconds_bucket" in metrics and "fhirplug_queue_depth" in metrics


# --- micro-batching ---------------------------------------------------------------------------------------------------


@insecure_ok
def test_micro_batched_results_equal_unbatched(serve: Any, tiny_plugin: Any) -> None:
    """fp32: batch-mates change nothing beyond float noise (the int8 variants are dynamically quantized, whose
    activation scales depend on the batch: up to ~0.01 apart until static int8 lands)."""
    server = serve([tiny_plugin], ServeConfig(auth=AuthConfig(insecure=True), max_batch=64, max_wait_ms=200))
    texts = [DIABETES, HYPERTENSION, "Wheezing, asthma exacerbation; albuterol.", DIABETES + " " + HYPERTENSION] * 3
    notes = [document_reference(t, id_=f"n{i}") for i, t in enumerate(texts)]
    with ThreadPoolExecutor(len(notes)) as pool:
        answers = list(pool.map(lambda n: httpx.post(f"{server.url}/fhir/$predict", json=n, timeout=60).json(), notes))
    metrics = httpx.get(f"{server.url}/metrics").text
    runs = float(metrics.split('fhirplug_batch_requests_count{plugin="tiny-notes"} ')[1].split()[0])
    assert runs < len(notes)  # requests did share model runs
    for note, bundle in zip(notes, answers, strict=True):
        alone = tiny_plugin.predict(note)
        got = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
        want = [r for r in alone.resources() if r["resourceType"] == "RiskAssessment"]
        assert [r["id"] for r in got] == [r["id"] for r in want] and got
        for g, w in zip(got, want, strict=True):
            pg = g["prediction"][0]["probabilityDecimal"]
            pw = w["prediction"][0]["probabilityDecimal"]
            assert abs(pg - pw) < 1e-5


# --- the CLI ------------------------------------------------------------------------------------------------------


def test_serve_refuses_to_start_without_authentication_in_one_line() -> None:
    result = CliRunner().invoke(main, ["serve", str(TINY_PLUGIN), "--allow-unsigned"])
    assert result.exit_code == 2
    assert "--jwks" in result.output and "--insecure" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        main, ["serve", str(TINY_PLUGIN), "--allow-unsigned", "--insecure", "--cors-origin", "*"]
    )
    assert result.exit_code == 2 and "not *" in result.output


def test_serve_refuses_a_port_in_use_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["serve", str(TINY_PLUGIN), "--allow-unsigned", "--insecure", "--port", str(port)]
        )
    assert result.exit_code != 0 and "cannot listen on" in result.output and "Traceback" not in result.output


def test_serve_help_names_the_security_and_batching_options() -> None:
    text = CliRunner().invoke(main, ["serve", "--help"]).output
    for flag in (
        "--jwks",
        "--issuer",
        "--jku-allow",
        "--public-url",
        "--bearer-token-file",
        "--insecure",
        "--cors-origin",
        "--max-batch",
        "--max-wait-ms",
        "--queue",
        "--trusted-key",
        "--max-input-windows",
    ):
        assert flag in text
