"""Text extraction from single resources: offsets, charsets, attachments and the issues for each problem."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from fhirplug.fhir.extract import extract_texts, has_text_elements
from fhirplug.fhir.outcome import Issue

FIXTURES = Path(__file__).parents[2] / "fixtures" / "fhir"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def note(data: str | None = None, content_type: str | None = "text/plain", **attachment: Any) -> dict[str, Any]:
    if content_type is not None:
        attachment["contentType"] = content_type
    if data is not None:
        attachment["data"] = data
    return {
        "resourceType": "DocumentReference",
        "id": "n1",
        "status": "current",
        "content": [{"attachment": attachment}],
    }


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def span(text: str, words: str) -> tuple[int, int]:
    start = text.index(words)
    return start, start + len(words)


def only(issues: list[Issue], code: str) -> Issue:
    (issue,) = [i for i in issues if i.code == code]
    return issue


def test_plain_attachment_with_wrapped_base64_and_multibyte_text() -> None:
    sources, issues = extract_texts(load("documentreference-plain.json"), reference="DocumentReference/note-plain")
    assert issues == []
    (source,) = sources
    assert (
        source.text == "Seen after the café visit 😀 with chest tightness.\nAssessment: stable angina, no ST changes.\n"
    )
    assert source.original == source.text and source.offsets is None
    assert source.element == "DocumentReference.content[0].attachment"
    assert source.subject == {"reference": "Patient/p-100", "display": "Ada Example"}
    assert source.encounter == {"reference": "Encounter/enc-7"}
    assert source.date == "2024-03-05T09:30:00+01:00"
    # Offsets count code points: the emoji is one character, so "with" starts 2 characters after it.
    start, end = source.to_original(*span(source.text, "café visit 😀"))
    assert (start, end) == (15, 27)
    assert source.original[start:end] == "café visit 😀"
    assert source.original[end + 1 : end + 5] == "with"


def test_html_offsets_point_at_the_markup_including_entities() -> None:
    (source,), issues = extract_texts(load("documentreference-html.json"), reference="DocumentReference/note-html")
    assert issues == []
    assert (
        source.text
        == "Discharge summary\nPain & swelling of the left knee—improving.\nNaïve to NSAIDs\nFollow‑up in 2 weeks\n"
    )
    assert "color" not in source.text and "alert" not in source.text
    assert source.offsets is not None and source.offsets.typecode in "lq"
    assert len(source.offsets) == len(source.text)
    for words, markup in [
        ("Pain & swelling", "Pain &amp; swelling"),
        ("knee—improving", "knee&#8212;improving"),
        ("Naïve", "Na&iuml;ve"),
        ("Follow‑up in 2 weeks", "Follow&#x2011;up in 2&nbsp;weeks"),
        ("Discharge summary", "Discharge&nbsp;summary"),
    ]:
        start, end = source.to_original(*span(source.text, words))
        assert source.original[start:end] == markup
    # The newline that stands for </h1> maps to that tag's "<".
    newline = source.text.index("\n")
    assert source.original[source.offsets[newline] :].startswith("</h1>")


def test_html_with_multibyte_text_and_script() -> None:
    html = "<div>caf&eacute; 😀<script>var x = '<p>no</p>';</script> then <b>r&eacute;sum&eacute;</b></div>"
    (source,), _ = extract_texts(note(b64(html.encode()), "text/html"), reference="DocumentReference/n1")
    assert source.text == "café 😀 then résumé\n"
    assert source.to_original(*span(source.text, "😀")) == span(html, "😀")
    start, end = source.to_original(*span(source.text, "résumé"))
    assert html[start:end] == "r&eacute;sum&eacute;"


def test_latin1_charset_is_honoured() -> None:
    (source,), issues = extract_texts(load("documentreference-latin1.json"), reference="DocumentReference/note-latin1")
    assert issues == []
    assert source.text == "Fièvre à 39,5 °C; toux sèche depuis trois jours.\n"


def test_bytes_not_in_the_declared_charset() -> None:
    raw = "Fièvre".encode("latin-1")
    sources, issues = extract_texts(note(b64(raw), "text/plain; charset=utf-8"), reference="DocumentReference/n1")
    assert sources == []
    bad = issues[0]
    assert (bad.severity, bad.code) == ("error", "invalid")
    assert bad.expression == ("DocumentReference.content[0].attachment.data",)
    assert "utf-8" in bad.diagnostics and "byte offset 2" in bad.diagnostics and "0xe8" in bad.diagnostics
    assert only(issues, "required").is_error


def test_unknown_charset() -> None:
    _, issues = extract_texts(note(b64(b"fine"), 'text/plain; charset="klingon-8"'), reference="x")
    issue = issues[0]
    assert (issue.severity, issue.code) == ("error", "not-supported")
    assert "klingon-8" in issue.diagnostics
    assert issue.expression == ("DocumentReference.content[0].attachment.contentType",)


@pytest.mark.parametrize("data", ["SGVsbG8*", "SGVsbG8", "SGVs bG8=é"])
def test_invalid_base64(data: str) -> None:
    sources, issues = extract_texts(note(data), reference="x")
    assert sources == []
    issue = issues[0]
    assert (issue.severity, issue.code) == ("error", "invalid")
    assert issue.expression == ("DocumentReference.content[0].attachment.data",)
    assert "base64" in issue.diagnostics


def test_invalid_base64_names_the_character() -> None:
    _, issues = extract_texts(note("SGVs\nbG8*"), reference="x")
    assert "'*' at offset 7" in issues[0].diagnostics


def test_url_only_attachment_is_reported_not_fetched() -> None:
    resource = note(None, url="https://ehr.example.org/Binary/9")
    sources, issues = extract_texts(resource, reference="DocumentReference/n1", path="Bundle.entry[4].resource")
    assert sources == []
    url = issues[0]
    assert (url.severity, url.code) == ("warning", "not-supported")
    assert url.expression == ("Bundle.entry[4].resource.content[0].attachment.url",)
    assert "not fetched" in url.diagnostics and "base64" in url.diagnostics
    nothing = issues[1]
    assert (nothing.severity, nothing.code, nothing.expression) == ("error", "required", ("Bundle.entry[4].resource",))


def test_report_presented_form_pdf_skipped_others_read() -> None:
    sources, issues = extract_texts(load("diagnosticreport.json"), reference="DiagnosticReport/ct-1")
    assert [s.element for s in sources] == ["DiagnosticReport.presentedForm[0]", "DiagnosticReport.conclusion"]
    assert sources[1].text == "No acute intracranial abnormality; chronic small vessel change."
    assert sources[0].encounter == {"reference": "Encounter/enc-9"}
    assert sources[0].date == "2024-02-11T14:00:00Z"
    (pdf,) = issues
    assert (pdf.severity, pdf.code) == ("warning", "not-supported")
    assert pdf.expression == ("DiagnosticReport.presentedForm[1].contentType",)


def test_observation_empty_note_is_a_warning_when_other_text_exists() -> None:
    sources, issues = extract_texts(load("observation.json"), reference="Observation/obs-smoking")
    assert [s.element for s in sources] == ["Observation.valueString", "Observation.note[0].text"]
    assert [(i.severity, i.code, i.expression) for i in issues] == [("warning", "value", ("Observation.note[1].text",))]


def test_a_resource_with_only_empty_text_is_an_error() -> None:
    resource = {"resourceType": "Procedure", "status": "completed", "subject": {"reference": "Patient/1"}}
    resource["note"] = [{"text": " \n\t "}]
    sources, issues = extract_texts(resource, reference="Procedure/p1", path="Bundle.entry[0].resource")
    assert sources == []
    assert [(i.severity, i.code, i.expression) for i in issues] == [
        ("warning", "value", ("Bundle.entry[0].resource.note[0].text",)),
        ("error", "required", ("Bundle.entry[0].resource",)),
    ]


def test_a_resource_without_text_elements_is_an_error() -> None:
    resource = {"resourceType": "Condition", "subject": {"reference": "Patient/1"}}
    assert not has_text_elements(resource)
    sources, issues = extract_texts(resource, reference="Condition/c1")
    assert sources == []
    (issue,) = issues
    assert (issue.severity, issue.code, issue.expression) == ("error", "required", ("Condition",))
    assert "Condition.note.text" in issue.diagnostics


def test_fifty_megabyte_note_is_too_costly() -> None:
    data = b64(b"Stable. " * 6_250_000)
    sources, issues = extract_texts(note(data), reference="x")
    assert sources == []
    issue = issues[0]
    assert (issue.severity, issue.code) == ("error", "too-costly")
    assert "50,000,000 bytes" in issue.diagnostics and "1,000,000" in issue.diagnostics
    assert "max_chars" in issue.diagnostics


def test_text_just_over_the_limit_is_too_costly_and_at_the_limit_is_read() -> None:
    resource = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}, "conclusion": "a" * 1001}
    _, issues = extract_texts(resource, reference="x", max_chars=1000)
    assert issues[0].code == "too-costly" and "1,001 characters" in issues[0].diagnostics
    assert issues[0].expression == ("DiagnosticReport.conclusion",)
    _, issues = extract_texts(note(b64(b"b" * 1001)), reference="x", max_chars=1000)
    assert issues[0].code == "too-costly" and "1,001 characters" in issues[0].diagnostics
    sources, issues = extract_texts(note(b64(b"b" * 1000)), reference="x", max_chars=1000)
    assert len(sources[0].text) == 1000 and issues == []


def test_missing_content_type_is_read_as_utf8_with_a_warning() -> None:
    (source,), issues = extract_texts(note(b64("Dyspnée".encode()), content_type=None), reference="x")
    assert source.text == "Dyspnée"
    assert [(i.severity, i.expression) for i in issues] == [
        ("warning", ("DocumentReference.content[0].attachment.contentType",))
    ]


def test_utf8_byte_order_mark_is_not_text() -> None:
    (source,), _ = extract_texts(note(b64("\ufeffBP 140/90".encode())), reference="x")
    assert source.text == "BP 140/90"


def test_condition_date_and_encounter() -> None:
    resource = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/1"},
        "encounter": {"reference": "Encounter/2"},
        "onsetDateTime": "2020-01-01",
        "recordedDate": "2021-06-30",
        "note": [{"text": "Asthma, well controlled."}],
    }
    (source,), _ = extract_texts(resource, reference="Condition/c")
    assert (source.date, source.encounter, source.element) == (
        "2021-06-30",
        {"reference": "Encounter/2"},
        "Condition.note[0].text",
    )


def test_html_unknown_references_and_bare_angle_brackets_stay_text() -> None:
    html = "<p>BP < 120 &bogus; AT&amp;T</p><table><tr><td>Na</td><td>140</td></tr></table>"
    (source,), _ = extract_texts(note(b64(html.encode()), "text/html"), reference="x")
    assert source.text == "BP < 120 &bogus; AT&T\nNa 140 \n"
    assert source.to_original(*span(source.text, "&bogus; AT&T")) == span(html, "&bogus; AT&amp;T")
