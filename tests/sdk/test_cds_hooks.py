"""The CDS Hooks service: discovery, cards from prefetch, and clear errors — over real HTTP on localhost."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from fhirplug.cds_hooks import CdsService, make_server, serve_in_thread
from fhirplug.cli import main
from tests.sdk.helpers import collection, document_reference

DIABETES = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."


@pytest.fixture
def base_url(tiny_plugin: Any) -> Iterator[str]:
    server = make_server([CdsService(tiny_plugin)], port=0)
    serve_in_thread(server)
    try:
        yield "http://{}:{}/cds-services".format(*server.server_address[:2])
    finally:
        server.shutdown()
        server.server_close()


def _call(url: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _hook(prefetch: Any, hook: str = "patient-view") -> bytes:
    return json.dumps(
        {
            "hook": hook,
            "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/1", "patientId": "p1"},
            "prefetch": prefetch,
        }
    ).encode()


def test_discovery_lists_the_plugin_with_prefetch_templates(base_url: str, tiny_plugin: Any) -> None:
    status, body = _call(base_url)
    assert status == 200
    (service,) = body["services"]
    assert service["id"] == tiny_plugin.manifest.name and service["hook"] == "patient-view"
    assert service["prefetch"]["documentReference"] == "DocumentReference?patient={{context.patientId}}"


def test_prefetch_bundle_gives_a_card_per_code_and_a_record_suggestion(base_url: str, tiny_plugin: Any) -> None:
    searchset = collection(document_reference(DIABETES), kind="searchset")
    status, body = _call(f"{base_url}/{tiny_plugin.manifest.name}", _hook({"documentReference": searchset}))
    assert status == 200
    coded, record = body["cards"]
    assert coded["summary"].startswith("Diabetes") and "44054006" in coded["summary"]
    assert coded["indicator"] == "info" and "DocumentReference/note-1" in coded["detail"]
    assert "AI-generated" in coded["source"]["label"]
    (suggestion,) = record["suggestions"]
    created = [a["resource"]["resourceType"] for a in suggestion["actions"]]
    # The coding, then the model's AIModelCard DocumentReference, its AIDevice and the run's AIProvenance.
    assert created == ["RiskAssessment", "DocumentReference", "Device", "Provenance"]
    assert record["summary"].startswith("Record 1 AI-generated coding(s)")
    risk = suggestion["actions"][0]["resource"]
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"} in [
        {k: c[k] for k in ("system", "code")} for c in risk["meta"]["security"]
    ]


def test_a_bad_prefetch_entry_is_a_warning_card_and_the_good_one_still_counts(base_url: str, tiny_plugin: Any) -> None:
    bad = document_reference("")  # an empty note
    prefetch = {"documentReference": collection(document_reference(DIABETES), bad, kind="searchset")}
    status, body = _call(f"{base_url}/{tiny_plugin.manifest.name}", _hook(prefetch))
    assert status == 200
    indicators = [c["indicator"] for c in body["cards"]]
    assert indicators.count("warning") >= 1 and "44054006" in body["cards"][0]["summary"]
    outcome = body["extension"]["fhirplug-outcome"]
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["expression"]


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/tiny-notes", b"{not json", 400, "not JSON"),
        ("/tiny-notes", b"[1, 2]", 400, "JSON object"),
        ("/tiny-notes", _hook({"documentReference": None}), 412, "no prefetch"),
        ("/tiny-notes", _hook({}, hook="order-sign"), 400, "answers hook 'patient-view'"),
        ("/no-such-service", _hook({}), 404, "no CDS service"),
    ],
)
def test_bad_requests_get_an_operation_outcome(base_url: str, path: str, body: bytes, status: int, says: str) -> None:
    got, outcome = _call(base_url + path, body)
    assert got == status
    assert outcome["resourceType"] == "OperationOutcome" and says in outcome["issue"][0]["diagnostics"]


def test_serve_refuses_a_port_in_use_in_one_line(tiny_plugin: Any) -> None:
    server = make_server([CdsService(tiny_plugin)], port=0)
    try:
        port = server.server_address[1]
        from tests.conftest import TINY_PLUGIN

        result = CliRunner().invoke(main, ["serve", str(TINY_PLUGIN), "--allow-unsigned", "--port", str(port)])
        assert result.exit_code != 0 and "cannot listen on" in result.output
        assert "Traceback" not in result.output
    finally:
        server.server_close()


def test_min_probability_filters_the_cards_and_the_suggestion_alike(tiny_plugin: Any) -> None:
    request = json.loads(_hook({"documentReference": document_reference(DIABETES)}))
    everything = CdsService(tiny_plugin).respond(request)[1]["cards"]
    p = float(everything[0]["summary"].rsplit("p = ", 1)[1])
    status, body = CdsService(tiny_plugin, min_probability=min(1.0, p + 0.01)).respond(request)
    assert status == 200 and body["cards"] == []  # nothing shown, nothing recorded
