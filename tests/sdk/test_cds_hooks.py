"""The framework-free CDS Hooks parts (``fhirplug.cds_hooks`` → ``fhirplug.serve._cards``): discovery entries,
request checks, prefetch templates and cards. The HTTP service is tested in tests/sdk/serve/test_app.py."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from fhirplug.cds_hooks import CdsService, serve_cards
from fhirplug.serve._cards import HookProblem, indicator
from tests.sdk.helpers import collection, document_reference

DIABETES = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."


def _request(**more: Any) -> dict[str, Any]:
    return {"hook": "patient-view", "hookInstance": "h-1", "context": {"patientId": "p 1/x"}, **more}


def test_the_old_module_needs_no_web_framework() -> None:
    code = (
        "import sys, fhirplug.cds_hooks; "
        "print(sorted(m for m in ('starlette', 'uvicorn', 'jwt', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_without_the_serve_extra_the_package_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "for name in ('starlette', 'uvicorn', 'jwt', 'httpx', 'prometheus_client'): sys.modules[name] = None\n"
        "import fhirplug, fhirplug.serve\n"
        "from fhirplug.errors import MissingExtraError\n"
        "try:\n    fhirplug.serve.create_app\nexcept MissingExtraError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fhirplug serve needs the [serve] extra" in out and "pip install" in out


def test_a_bad_prefetch_entry_is_a_warning_card_and_the_good_one_still_counts(tiny_plugin: Any) -> None:
    result = tiny_plugin.predict(collection(document_reference(DIABETES), document_reference(""), kind="searchset"))
    body = serve_cards(tiny_plugin, result)
    indicators = [c["indicator"] for c in body["cards"]]
    assert "44054006" in body["cards"][0]["summary"] and indicators[-1] == "warning"
    outcome = body["extension"]["fhirplug-outcome"]
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["expression"]


def test_min_probability_filters_the_cards_and_the_suggestion_alike(tiny_plugin: Any) -> None:
    result = tiny_plugin.predict(document_reference(DIABETES))
    everything = serve_cards(tiny_plugin, result)["cards"]
    p = float(everything[0]["summary"].rsplit("p = ", 1)[1])
    assert serve_cards(tiny_plugin, result, min_probability=min(1.0, p + 0.01))["cards"] == []


def test_indicators_never_say_critical() -> None:
    assert [indicator(p) for p in (0.0, 0.69, 0.7, 1.0)] == ["info", "info", "warning", "warning"]


def test_missing_prefetch_is_rendered_from_the_context(tiny_plugin: Any) -> None:
    service = CdsService(tiny_plugin)
    missing = service.missing(_request(prefetch={"documentReference": None}))
    assert "documentReference" not in missing  # null means "no data", not "please fetch"
    assert missing["observation"] == "Observation?patient=Patient/p%201%2Fx"  # the id is URL-encoded
    assert service.missing({"hook": "patient-view", "context": {}}) == {}  # nothing to fill the template with


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (_request(hook="order-sign"), "answers hook 'patient-view'"),
        ({"hook": "patient-view"}, "hookInstance is missing"),
        (_request(prefetch=[1]), "prefetch must be a JSON object"),
        (_request(fhirAuthorization={"token": "x"}), "access_token"),
    ],
)
def test_requests_breaking_cds_hooks_are_400(tiny_plugin: Any, request_: dict[str, Any], says: str) -> None:
    with pytest.raises(HookProblem, match=says) as caught:
        CdsService(tiny_plugin).check(request_)
    assert caught.value.status == 400
