"""Occlusion evidence and ``explain=True`` (fhirplug._explain): sentences, bounds, contributions, CLI, FHIR."""

from __future__ import annotations

import base64
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fhirplug import Budget, load_plugin
from fhirplug._explain import (
    EVIDENCE_SEGMENTS,
    EXPLAIN_SEGMENTS,
    MAX_WINDOWS,
    explain_groups,
    merge_segments,
    occlude,
    split_sentences,
)
from fhirplug.cli import main
from fhirplug.errors import UsageError
from fhirplug.fhir.writer import EVIDENCE_SPAN_URL, EXPLAINED_SPANS
from fhirplug.plugin import Plugin
from fhirplug.predictions import TextSource
from tests.conftest import REPO, TINY_PLUGIN
from tests.sdk.helpers import document_reference

DIABETES = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin. Denies fever."
ASTHMA = "Patient seen in clinic today. Uses albuterol inhaler, asthma with wheezing. Sleeping well."
MESH = REPO / "plugins" / "medical-abstracts-mesh"


def _parts(extension: dict[str, Any]) -> dict[str, Any]:
    return {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in extension["extension"]}


def _probability(plugin: Plugin, text: str, label: str) -> float:
    column = [spec.label for spec in plugin.manifest.outputs.labels].index(label)
    return float(plugin.predict_texts([text])[0, column])


# --- sentences and segments ------------------------------------------------------------------------------------


def test_sentences_keep_offsets_and_split_on_terminators_and_lines() -> None:
    text = '  HbA1c 7.2% today. Why? "Stop!" she said;\nplan:\n\n - insulin (10 u.)  \n last line no stop'
    spans = split_sentences(text)
    assert [text[s:e] for s, e in spans] == [
        "HbA1c 7.2% today.",  # "7.2" does not end a sentence
        "Why?",
        '"Stop!"',  # the closing quote stays with its sentence
        "she said;",
        "plan:",
        "- insulin (10 u.)",  # the blank line gives no sentence
        "last line no stop",
    ]
    assert all(text[s:e] == text[s:e].strip() and e > s for s, e in spans)
    assert split_sentences("") == split_sentences(" \n\n\t ") == []
    assert split_sentences("one sentence without an end") == [(0, 27)]


def _seconds(text: str) -> float:
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        split_sentences(text)
        best = min(best, time.perf_counter() - began)
    return best


@pytest.mark.parametrize("unit", ["a", "ok. ", "\n", ".!?;", "x.y ", ' "?")'])
def test_sentence_splitting_is_linear_time(unit: str) -> None:
    # 4x the text must cost about 4x (a quadratic splitter: 16x); notes over MAX_CHARS are never split at all
    small, large = _seconds(unit * (50_000 // len(unit))), _seconds(unit * (200_000 // len(unit)))
    assert large < 8 * small + 0.05, (small, large)


@pytest.mark.parametrize("limit", [1, 2, 3, 8, 32])
@pytest.mark.parametrize("count", [1, 2, 7, 8, 9, 33, 200])
def test_segments_are_bounded_contiguous_and_cover_the_sentences(count: int, limit: int) -> None:
    rng = np.random.default_rng(count * 100 + limit)
    text = " ".join("x" * int(rng.integers(1, 40)) + "." for _ in range(count))
    sentences = split_sentences(text)
    assert len(sentences) == count
    segments = merge_segments(sentences, limit)
    assert 1 <= len(segments) <= limit
    assert len(segments) == min(count, limit)  # merged only when there are more sentences than the limit
    starts, ends = {s for s, _ in sentences}, {e for _, e in sentences}
    assert segments[0][0] == sentences[0][0] and segments[-1][1] == sentences[-1][1]
    for (s, e), (next_start, _) in itertools.pairwise(segments):
        assert s in starts and e in ends and e < next_start  # sentence boundaries, in order, no overlap
        assert text[e:next_start].strip() == ""  # nothing between two segments but whitespace


def test_merged_segments_are_about_equal_in_characters() -> None:
    text = " ".join(f"Sentence number {i:02d} here." for i in range(40))
    segments = merge_segments(split_sentences(text), 8)
    sizes = [e - s for s, e in segments]
    assert len(segments) == 8 and max(sizes) <= 2 * min(sizes)


def test_occlusion_removes_the_span_and_glues_no_words() -> None:
    text = "One. Two words. Three."
    (_, second, _) = split_sentences(text)
    assert occlude(text, second) == "One.  Three."


# --- evidence = the top-contribution segment, and it is what drives the code ------------------------------------


def test_evidence_is_the_sentence_that_drives_the_code(tiny_plugin: Plugin) -> None:
    result = tiny_plugin.predict(document_reference(DIABETES))
    (p,) = [p for p in result.predictions if p.label == "diabetes"]
    assert DIABETES[p.evidence.start : p.evidence.end] == "Type 2 diabetes, elevated HbA1c on metformin."
    assert p.evidence.snippet == "Type 2 diabetes, elevated HbA1c on metformin."
    assert p.details["evidence"] == "occlusion" and "explanation" not in p.details
    assert p.evidence.contribution is not None and p.evidence.contribution > 0.3


def test_contributions_are_sorted_and_equal_an_independent_rescoring(tiny_plugin: Plugin) -> None:
    for text in (DIABETES, ASTHMA):
        result = tiny_plugin.predict(document_reference(text), explain=True)
        assert result.predictions
        for p in result.predictions:
            parts = p.details["explanation"]
            assert len(parts) == 3 and {(x["start"], x["end"]) for x in parts} == set(split_sentences(text))
            contributions = [x["contribution"] for x in parts]
            assert contributions == sorted(contributions, reverse=True)
            top = parts[0]
            assert (p.evidence.start, p.evidence.end) == (top["start"], top["end"])
            assert p.evidence.contribution == top["contribution"] > 0
            for part in parts:
                assert part["text"] == text[part["start"] : part["end"]]
                without = _probability(tiny_plugin, occlude(text, (part["start"], part["end"])), p.label)
                assert part["contribution"] == pytest.approx(p.probability - without, abs=1e-4)


def test_removing_the_evidence_really_lowers_the_probability(tiny_plugin: Plugin) -> None:
    for text in (DIABETES, ASTHMA, "Vitals reviewed. Hypertension on lisinopril. No acute distress."):
        result = tiny_plugin.predict(document_reference(text, id_="full"))
        assert result.predictions
        for p in result.predictions:
            assert p.details["evidence"] == "occlusion"
            edited = text[: p.evidence.start] + text[p.evidence.end :]
            again = tiny_plugin.predict(document_reference(edited, id_="edited"))
            after = [q.probability for q in again.predictions if q.code == p.code]
            # predicted again with a lower probability, or no longer predicted at all (under its threshold)
            assert not after or after[0] < p.probability - 0.01, (text, p.label)


def test_html_evidence_points_into_the_markup(tiny_plugin: Plugin) -> None:
    markup = (
        "<html><body><h1>Clinic&nbsp;note</h1><p>Follow up visit.</p>"
        "<p>Type&nbsp;2 diabetes, elevated HbA1c on metformin.</p><ul><li>Vitals reviewed.</li></ul></body></html>"
    )
    result = tiny_plugin.predict(document_reference(markup, content_type="text/html; charset=utf-8"), explain=True)
    (source,) = result.sources
    assert source.original == markup and source.text != markup
    assert [source.text[s:e] for s, e in split_sentences(source.text)] == [
        "Clinic note",
        "Follow up visit.",
        "Type 2 diabetes, elevated HbA1c on metformin.",
        "Vitals reviewed.",
    ]
    (p,) = [p for p in result.predictions if p.label == "diabetes"]
    sentence = "Type&nbsp;2 diabetes, elevated HbA1c on metformin."
    assert (p.evidence.start, p.evidence.end) == (markup.index(sentence), markup.index(sentence) + len(sentence))
    assert p.evidence.snippet == sentence
    # every listed span is a sentence of the text, mapped to the markup (an entity counts as all its characters)
    mapped = {source.to_original(s, e) for s, e in split_sentences(source.text)}
    assert {(x["start"], x["end"]) for x in p.details["explanation"]} == mapped
    assert {x["text"] for x in p.details["explanation"]} >= {"Clinic&nbsp;note", sentence}


# --- bounds: segments, caps, the budget ----------------------------------------------------------------------


def _long_note(plugin: Plugin, sentence: str, windows: int) -> str:
    """As many sentences as fit in ``windows`` model windows."""
    text = sentence
    while plugin.session.count_windows(text + " " + sentence) <= windows:
        text += " " + sentence
    return text


@pytest.mark.parametrize(("explain", "limit"), [(False, EVIDENCE_SEGMENTS), (True, EXPLAIN_SEGMENTS)])
def test_one_batched_pass_of_at_most_n_copies(tiny_plugin: Plugin, explain: bool, limit: int) -> None:
    text = _long_note(tiny_plugin, "Well.", MAX_WINDOWS - 1) + " Type 2 diabetes on metformin."
    assert len(split_sentences(text)) > EXPLAIN_SEGMENTS and tiny_plugin.session.count_windows(text) <= MAX_WINDOWS
    source = TextSource("DocumentReference/n", "DocumentReference", "DocumentReference.text", text, text)
    (p,) = [p for p in tiny_plugin.predict_sources([source]) if p.label == "diabetes"]
    calls: list[int] = []

    def scorer(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return tiny_plugin.predict_texts(texts)

    labels = [spec.label for spec in tiny_plugin.manifest.outputs.labels]
    ((got,),) = explain_groups(
        [([p], {id(source): text}, 10_000)], scorer, tiny_plugin.session.count_windows, labels, explain=explain
    )
    assert calls == [limit]  # one pass, N copies: the note's sentences were merged into N segments
    assert got.details["evidence"] == "occlusion" and got.evidence.contribution is not None
    # (the toy model scores filler like "Well." too, so which segment wins is not asserted here)
    if explain:
        parts = got.details["explanation"]
        assert len(parts) == EXPLAIN_SEGMENTS
        assert got.evidence.contribution == parts[0]["contribution"] == max(x["contribution"] for x in parts)


def test_a_note_over_the_window_cap_keeps_window_evidence(tiny_plugin: Plugin) -> None:
    text = _long_note(tiny_plugin, "No acute distress.", 2 * MAX_WINDOWS) + " Asthma with wheezing, uses albuterol."
    assert tiny_plugin.session.count_windows(text) > MAX_WINDOWS
    result = tiny_plugin.predict(document_reference(text), explain=True)
    (p,) = [p for p in result.predictions if p.label == "asthma"]
    assert p.details["evidence"] == "window" and "model windows" in p.details["evidence_reason"]
    assert p.details["explanation"] == [] and p.evidence.contribution is None
    assert "asthma" in text[p.evidence.start : p.evidence.end].lower()  # the window that says it


def test_a_one_sentence_note_keeps_window_evidence(tiny_plugin: Plugin) -> None:
    text = "type 2 diabetes, elevated hba1c on metformin"
    (p,) = tiny_plugin.predict(document_reference(text)).predictions
    assert (p.evidence.start, p.evidence.end) == (0, len(text))
    assert p.details["evidence"] == "window" and p.details["evidence_reason"] == "the note is one sentence"


def test_occlusion_windows_count_against_the_input_budget() -> None:
    # The note is one window and is admitted; occluding its 3 sentences would bring the input to 4 windows.
    plugin = load_plugin(TINY_PLUGIN, allow_unsigned=True, variant="fp32", budget=Budget(max_input_windows=3))
    result = plugin.predict(document_reference(DIABETES))
    assert not result.issues and result.predictions
    for p in result.predictions:
        assert p.details["evidence"] == "window" and "max_input_windows" in p.details["evidence_reason"]
        assert (p.evidence.start, p.evidence.end) == (0, len(DIABETES))
    roomy = load_plugin(TINY_PLUGIN, allow_unsigned=True, variant="fp32", budget=Budget(max_input_windows=4))
    assert {p.details["evidence"] for p in roomy.predict(document_reference(DIABETES)).predictions} == {"occlusion"}


def test_occlusion_runs_under_the_window_gate() -> None:
    plugin = load_plugin(
        TINY_PLUGIN, allow_unsigned=True, variant="fp32", budget=Budget(max_windows_in_flight=1, chunk_windows=1)
    )
    result = plugin.predict(document_reference(DIABETES), explain=True)
    assert {p.details["evidence"] for p in result.predictions} == {"occlusion"}
    assert plugin.gate.peak == 1 and plugin.gate.held == 0


def test_every_entry_point_explains(tiny_plugin: Plugin, tmp_path: Path) -> None:
    path = tmp_path / "note.json"
    path.write_text(json.dumps(document_reference(DIABETES)))
    source = TextSource("DocumentReference/s", "DocumentReference", "DocumentReference.text", DIABETES, DIABETES)
    ((batched, _),) = tiny_plugin.predict_batch([[source]], explain=True)
    runs = [
        tiny_plugin.predict(document_reference(DIABETES), explain=True).predictions,
        tiny_plugin.predict_many([("a", document_reference(DIABETES))], explain=True).predictions,
        tiny_plugin.predict_files([path], explain=True).predictions,
        tiny_plugin.predict_sources([source], explain=True),
        batched,
    ]
    first = [(p.code, p.evidence.start, p.evidence.end) for p in runs[0]]
    for predictions in runs:
        assert [(p.code, p.evidence.start, p.evidence.end) for p in predictions] == first
        assert all(len(p.details["explanation"]) == 3 for p in predictions)
    with pytest.raises(UsageError, match="explain must be True or False"):
        tiny_plugin.predict(document_reference(DIABETES), explain="yes")  # type: ignore[arg-type]


# --- FHIR out and the CLI -------------------------------------------------------------------------------------


def test_fhir_output_carries_the_top_spans_with_offsets(tiny_plugin: Plugin) -> None:
    for explain in (False, True):
        result = tiny_plugin.predict(document_reference(DIABETES), explain=explain)
        (p,) = [p for p in result.predictions if p.label == "diabetes"]
        (risk,) = [
            r
            for r in result.resources()
            if r["resourceType"] == "RiskAssessment" and r["prediction"][0]["outcome"]["coding"][0]["code"] == p.code
        ]
        spans = [_parts(e) for e in risk["extension"] if e["url"] == EVIDENCE_SPAN_URL]
        assert spans[0]["start"] == p.evidence.start and spans[0]["end"] == p.evidence.end
        assert spans[0]["snippet"] == "Type 2 diabetes, elevated HbA1c on metformin."
        assert spans[0]["contribution"] == round(p.evidence.contribution or 0, 4) > 0
        if not explain:
            assert len(spans) == 1
            continue
        positive = [x for x in p.details["explanation"] if x["contribution"] > 0][:EXPLAINED_SPANS]
        assert [(s["start"], s["end"]) for s in spans] == [(x["start"], x["end"]) for x in positive]
        assert [s["contribution"] for s in spans] == sorted((s["contribution"] for s in spans), reverse=True)
        assert all(DIABETES[s["start"] : s["end"]] == s["snippet"] for s in spans)


def test_cli_explain_prints_contributions_and_writes_them(tmp_path: Path) -> None:
    note = tmp_path / "note.json"
    note.write_text(json.dumps(document_reference(DIABETES)))
    runner = CliRunner()
    plain = runner.invoke(main, ["predict", str(TINY_PLUGIN), str(note), "--allow-unsigned"])
    assert plain.exit_code == 0, plain.output
    assert "explain " not in plain.stderr
    result = runner.invoke(main, ["predict", str(TINY_PLUGIN), str(note), "--allow-unsigned", "--explain"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("explain DocumentReference/note-1 44054006"))
    assert "evidence: occlusion" in lines[head]
    listed = lines[head + 1 : head + 4]
    assert listed[0].split()[1:] == ["[17:62]", "Type", "2", "diabetes,", "elevated", "HbA1c", "on", "metformin."]
    values = [float(line.split()[0]) for line in listed]
    assert values == sorted(values, reverse=True) and values[0] > 0
    bundle = json.loads(result.stdout)  # the output format is unchanged: a collection Bundle on stdout
    assert bundle["type"] == "collection"
    spans = [
        _parts(e)
        for entry in bundle["entry"]
        if entry["resource"]["resourceType"] == "RiskAssessment"
        for e in entry["resource"]["extension"]
        if e["url"] == EVIDENCE_SPAN_URL
    ]
    assert (spans[0]["start"], spans[0]["end"]) == (17, 62) and spans[0]["contribution"] == pytest.approx(values[0])
    ndjson = runner.invoke(
        main, ["predict", str(TINY_PLUGIN), str(note), "--allow-unsigned", "--explain", "--format", "ndjson"]
    )
    assert ndjson.exit_code == 0 and all(json.loads(line) for line in ndjson.stdout.splitlines())


# --- a real, committed bundle ---------------------------------------------------------------------------------


def _example_text(path: Path) -> str:
    resource = json.loads(path.read_text())
    return base64.b64decode(resource["content"][0]["attachment"]["data"]).decode("utf-8")


def test_removing_the_explained_span_lowers_the_code_on_a_real_bundle() -> None:
    plugin = load_plugin(MESH / "bundle")
    example = MESH / "examples" / "01-documentreference-oncology.json"
    text = _example_text(example)
    result = plugin.predict(json.loads(example.read_text()), explain=True)
    assert result.predictions
    explained = [p for p in result.predictions if p.details["evidence"] == "occlusion"]
    assert explained, [p.details for p in result.predictions]
    for p in explained:
        assert text[p.evidence.start : p.evidence.end] == p.details["explanation"][0]["text"]
        edited = text[: p.evidence.start] + text[p.evidence.end :]
        after = _probability(plugin, edited, p.label)
        assert after < p.probability - 1e-3, (p.code, p.probability, after)


def test_evidence_segments_below_two_keeps_the_window_evidence(tiny_plugin) -> None:
    from tests.sdk.helpers import document_reference

    text = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."
    tiny_plugin.evidence_segments = 0
    try:
        (p,) = tiny_plugin.predict(document_reference(text)).predictions
    finally:
        tiny_plugin.evidence_segments = 8
    assert p.details.get("evidence", "window") == "window"
    assert text[p.evidence.start : p.evidence.end] == text  # one window: the whole note
