"""Budgets checked before the work, streamed windows equal to one-shot ones, and one exception boundary."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fhirplug import load_plugin
from fhirplug.cli import main
from fhirplug.errors import FhirplugError, UsageError
from fhirplug.plugin import Budget, Plugin
from fhirplug.predictions import TextSource
from fhirplug.session import ModelSession, Window
from fhirplug.tasks.text_classification import window_probabilities
from tests.conftest import REPO, TINY_PLUGIN
from tests.sdk.helpers import collection, document_reference

DEFAULT_PLUGIN = REPO / "plugins" / "medical-abstracts-mesh" / "bundle"
PROSE = (
    "Follow up visit.  Type 2 diabetes, elevated HbA1c on metformin;\n\nhypertension (BP 150/95) on lisinopril. "
    "Asthma with wheezing, uses an albuterol inhaler. Café naïve, no fever. "
)
DIABETES = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."


def _note(chars: int) -> str:
    return (PROSE * (chars // len(PROSE) + 1))[:chars]


def _same(a: Sequence[Window], b: Sequence[Window]) -> bool:
    return len(a) == len(b) and all(
        (x.text_index, x.start, x.end) == (y.text_index, y.start, y.end)
        and list(x.ids) == list(y.ids)
        and list(x.type_ids) == list(y.type_ids)
        and [tuple(o) for o in x.offsets] == [tuple(o) for o in y.offsets]
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def default_plugin() -> Plugin:
    # batch_size=1: int8 dynamic quantization scales activations per batch, so which windows share a batch moves
    # probabilities by ~0.01 (streamed or not); one window per run makes the comparison exact.
    return load_plugin(DEFAULT_PLUGIN, allow_unsigned=True, variant="int8", provider="cpu", batch_size=1)


def _source(text: str, id_: str = "x") -> TextSource:
    return TextSource(f"DocumentReference/{id_}", "DocumentReference", "DocumentReference.description", text, text)


# --- streaming ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_streamed_windows_equal_the_tokenizers_overflowing_windows(
    which: str, tiny_plugin: Plugin, default_plugin: Plugin
) -> None:
    session: ModelSession = (tiny_plugin if which == "tiny" else default_plugin).session
    texts = [_note(9_000), "", "short note", _note(2_345)]
    one_shot = session.windows(texts)
    assert len([w for w in one_shot if w.text_index == 0]) > 5  # a multi-window note
    saved = session.segment_chars
    try:
        for segment in (57, 1_000, saved):  # many segment cuts, a few, none
            session.segment_chars = segment
            assert _same(list(session.iter_windows(texts)), one_shot), segment
            assert [session.count_windows(t) for t in texts] == [
                sum(w.text_index == i for w in one_shot) for i in range(len(texts))
            ]
    finally:
        session.segment_chars = saved


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_streamed_scores_equal_one_shot_scores(which: str, tiny_plugin: Plugin, default_plugin: Plugin) -> None:
    plugin = tiny_plugin if which == "tiny" else default_plugin
    texts = [_note(3_000), DIABETES, _note(9_000)]
    windows = plugin.session.windows(texts)
    one_shot = plugin.task.scores(len(texts), windows, plugin.session.run(windows))
    np.testing.assert_allclose(plugin.predict_texts(texts), one_shot, atol=1e-5)
    # The same codes, and the evidence of a multi-window note is the window the one-shot run picks.
    result = plugin.predict(document_reference(texts[2]))
    assert result.predictions and not result.issues
    assert {p.label for p in result.predictions} == {
        spec.label for k, spec in enumerate(plugin.manifest.outputs.labels) if k in plugin.task._chosen(one_shot[2])
    }
    mine = [w for w in windows if w.text_index == 2]
    calibration = plugin.manifest.calibration
    per_window = window_probabilities(
        np.stack(plugin.session.run(mine)), calibration.temperature, plugin.manifest.outputs.multi_label
    )
    labels = [spec.label for spec in plugin.manifest.outputs.labels]
    for p in result.predictions:
        best = mine[int(np.argmax(per_window[:, labels.index(p.label)]))]
        assert (p.evidence.start, p.evidence.end) == (best.start, best.end)
        assert p.details["windows"] == len(mine)


def test_a_streamed_window_is_compact(default_plugin: Plugin) -> None:
    window = next(default_plugin.session.iter_windows([_note(5_000)]))
    held = sum(np.asarray(a).nbytes for a in (window.ids, window.type_ids, window.offsets))
    assert len(window.ids) == default_plugin.session.max_tokens and held <= 16 * 256  # int32, not Python objects


# --- budgets --------------------------------------------------------------------------------------------------


def test_budget_rejects_nonsense_and_keeps_max_chars_working() -> None:
    with pytest.raises(UsageError, match="max_input_chars must be an integer ≥ 1"):
        Budget(max_input_chars=0)
    assert Budget().max_chars == 1_000_000
    plugin = load_plugin(TINY_PLUGIN, allow_unsigned=True, max_chars=50, budget=Budget(max_input_chars=99))
    assert (plugin.max_chars, plugin.budget.max_input_chars) == (50, 99)
    with pytest.raises(UsageError, match="batch_size"):
        load_plugin(TINY_PLUGIN, allow_unsigned=True, batch_size=0)


def test_input_characters_past_the_budget_are_reported_and_the_rest_predicted(tiny_bundle: Path) -> None:
    plugin = load_plugin(tiny_bundle, allow_unsigned=True, budget=Budget(max_input_chars=2 * len(DIABETES)))
    notes = [document_reference(DIABETES, id_=i) for i in ("a", "b", "c", "d")]
    result = plugin.predict(collection(*notes))
    assert [p.evidence.reference for p in result.predictions] == ["DocumentReference/a", "DocumentReference/b"]
    refused = [i for i in result.issues if i.code == "too-costly"]
    assert [i.expression for i in refused] == [
        ("Bundle.entry[2].resource.content[0].attachment",),
        ("Bundle.entry[3].resource.content[0].attachment",),
    ]
    assert "DocumentReference/c" in refused[0].diagnostics and "DocumentReference/d" in refused[1].diagnostics
    for issue in refused:
        assert issue.severity == "error" and issue.source == "input"
        assert "max_input_chars" in issue.diagnostics and "--max-input-chars" in issue.diagnostics
        assert f"{2 * len(DIABETES):,}" in issue.diagnostics


def test_input_windows_past_the_budget_are_refused_before_any_model_run(tiny_plugin: Plugin) -> None:
    plugin = load_plugin(TINY_PLUGIN, allow_unsigned=True, variant="fp32", budget=Budget(max_input_windows=100))
    long_text = _note(1_000_000)  # ≈ 20,000 tiny windows: minutes to run, under a second to count
    started = time.perf_counter()
    issues: list[Any] = []
    got = plugin.predict_sources(
        [_source(DIABETES, "a"), _source(long_text, "b"), _source(DIABETES, "c")], issues=issues
    )
    assert time.perf_counter() - started < 5
    assert [p.source.reference for p in got] == ["DocumentReference/a"]
    assert [i.code for i in issues] == ["too-costly", "too-costly"]
    assert "max_input_windows" in issues[0].diagnostics and "--max-input-windows" in issues[0].diagnostics
    assert "budget was spent" in issues[1].diagnostics and "DocumentReference/c" in issues[1].diagnostics
    assert plugin.gate.peak <= plugin.budget.chunk  # only the first note's windows were ever tokenized for a run


def test_element_limit_applies_to_sources_given_directly(tiny_bundle: Path) -> None:
    plugin = load_plugin(tiny_bundle, allow_unsigned=True, max_chars=20)
    issues: list[Any] = []
    assert plugin.predict_sources([_source(DIABETES)], issues=issues) == []
    (issue,) = issues
    assert issue.code == "too-costly" and "max_chars" in issue.diagnostics and "--max-chars" in issue.diagnostics
    scores = plugin.predict_texts([DIABETES, "asthma"])
    assert np.isnan(scores[0]).all() and not np.isnan(scores[1]).any()


def test_concurrent_calls_share_the_process_bound_and_get_serial_answers(tiny_bundle: Path) -> None:
    budget = Budget(max_windows_in_flight=8, chunk_windows=8)
    plugin = load_plugin(tiny_bundle, allow_unsigned=True, variant="fp32", budget=budget)
    texts = [_note(900 + 150 * i) for i in range(8)]  # several windows each
    serial = plugin.predict_texts(texts)
    got: list[Any] = [None] * len(texts)

    def work(i: int) -> None:
        got[i] = plugin.predict_texts([texts[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.stack(got), serial, atol=1e-5)
    assert plugin.gate.peak <= 8 and plugin.gate.held == 0


# --- one exception boundary ------------------------------------------------------------------------------------


def test_empty_calls_give_empty_results(tiny_plugin: Plugin) -> None:
    assert tiny_plugin.predict_texts([]).shape == (0, 3)
    assert tiny_plugin.predict_sources([]) == []
    assert tiny_plugin.predict_many([]).predictions == []
    assert tiny_plugin.predict_files([]).issues == []


def test_a_text_the_tokenizer_refuses_is_one_issue_and_the_others_are_predicted(tiny_plugin: Plugin) -> None:
    issues: list[Any] = []
    odd = _source("asthma \udc80 wheezing", "odd")  # a lone surrogate: tokenizers raises TypeError
    got = tiny_plugin.predict_sources([_source(DIABETES, "a"), odd, _source(DIABETES, "b")], issues=issues)
    assert [p.source.reference for p in got] == ["DocumentReference/a", "DocumentReference/b"]
    (issue,) = issues
    assert (issue.severity, issue.code) == ("error", "exception") and "DocumentReference/odd" in issue.diagnostics
    scores = tiny_plugin.predict_texts([DIABETES, "asthma \udc80"])
    assert not np.isnan(scores[0]).any() and np.isnan(scores[1]).all()


@pytest.mark.parametrize("data", [None, 42, b"\xff\xfe", "[1, 2]", [{"resourceType": 3}], {"resourceType": []}])
def test_odd_input_never_raises(tiny_plugin: Plugin, data: Any) -> None:
    result = tiny_plugin.predict(data)
    assert result.has_errors and result.predictions == []


def test_misuse_raises_usage_errors_only(tiny_plugin: Plugin) -> None:
    for call in (
        lambda: tiny_plugin.predict_texts("one string"),
        lambda: tiny_plugin.predict_texts([1, 2]),
        lambda: tiny_plugin.predict_sources(["not a source"]),
        lambda: tiny_plugin.predict_many([("only a name",)]),
        lambda: tiny_plugin.predict_files([3.5]),
    ):
        with pytest.raises(UsageError) as caught:
            call()
        assert isinstance(caught.value, FhirplugError)


# --- the CLI and the CDS service share the budget --------------------------------------------------------------


def test_cli_budget_flags(tmp_path: Path) -> None:
    files = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(document_reference(DIABETES, id_=name)))
        files.append(str(path))
    limit = str(len(DIABETES) + 5)
    result = CliRunner().invoke(
        main, ["predict", str(TINY_PLUGIN), *files, "--allow-unsigned", "--max-input-chars", limit]
    )
    assert result.exit_code == 4
    assert "too-costly" in result.stderr and "--max-input-chars" in result.stderr and "b.json" in result.stderr
    refs = [e["resource"].get("basis", [{}]) for e in json.loads(result.stdout)["entry"]]
    assert "DocumentReference/a" in json.dumps(refs) and "DocumentReference/b" not in json.dumps(refs)
    for command in ("predict", "serve"):
        assert "--max-input-windows" in CliRunner().invoke(main, [command, "--help"]).output


TOKEN = "budget-test-bearer-token-0123456789abcdef"


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    httpx = pytest.importorskip("httpx")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    response = httpx.post(url, content=body, headers=headers, timeout=30)
    return response.status_code, response.json()


def _hook(prefetch: Any) -> bytes:
    return json.dumps({"hook": "patient-view", "hookInstance": "h1", "prefetch": prefetch}).encode()


def test_cds_requests_are_held_to_the_budget(tiny_bundle: Path) -> None:
    """The failure half (a 500 OperationOutcome, never a dropped connection) is in tests/sdk/serve/test_app.py."""
    serve = pytest.importorskip("fhirplug.serve")
    budget = Budget(max_input_chars=len(DIABETES) + 5, max_request_bytes=3_000)
    plugin = load_plugin(tiny_bundle, allow_unsigned=True, budget=budget)
    config = serve.ServeConfig(auth=serve.AuthConfig(bearer_tokens=(TOKEN,)))
    running = serve.run_in_thread(serve.create_app([plugin], config))
    base = f"{running.url}/cds-services"
    try:
        two = collection(document_reference(DIABETES, id_="a"), document_reference(DIABETES, id_="b"), kind="searchset")
        status, body = _post(f"{base}/tiny-notes", _hook({"documentReference": two}))
        assert status == 200
        assert "44054006" in body["cards"][0]["summary"]
        (warning,) = [c for c in body["cards"] if c["indicator"] == "warning" and "too-costly" in c.get("detail", "")]
        assert "max_input_chars" in warning["detail"]
        big = _hook({"documentReference": document_reference("x" * 4_000)})
        status, outcome = _post(f"{base}/tiny-notes", big)
        assert status == 413 and outcome["issue"][0]["code"] == "too-costly"
        assert "max_request_bytes" in outcome["issue"][0]["diagnostics"]
    finally:
        running.stop()


def test_budget_issues_point_into_the_input() -> None:
    """A refused text's issue names its element in the input (Bundle.entry[i]...), not just the element path."""
    notes = [document_reference("diabetes " * 40, id_=f"n{i}") for i in range(3)]
    plugin = load_plugin(TINY_PLUGIN, allow_unsigned=True, variant="fp32", budget=Budget(max_input_chars=500))
    result = plugin.predict(collection(*notes))
    refused = [i for i in result.issues if i.code == "too-costly"]
    assert [i.expression for i in refused] == [
        ("Bundle.entry[1].resource.content[0].attachment",),
        ("Bundle.entry[2].resource.content[0].attachment",),
    ]
    assert {s.reference for s in result.sources} == {"DocumentReference/n0"}  # the refused ones are not even decoded
    assert {p.evidence.reference for p in result.predictions} == {"DocumentReference/n0"}
