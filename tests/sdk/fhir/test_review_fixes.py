"""The reader and writer side of the review fixes (GitHub issues 9 and 10, tests/sdk/test_attacks.py), checked
below the plugin: the input allowance (finding 8), stable placeholders (10), NDJSON with broken lines (14),
identities (5, 11, 17), dom-2 (15), unsent resources that cannot travel (3, 12) and FHIR strings (6).
"""

from __future__ import annotations

import base64
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from fhirplug.errors import UsageError
from fhirplug.fhir.reader import read_fhir, read_fhir_files
from fhirplug.fhir.writer import ModelInfo, build_resources, to_bundle
from fhirplug.predictions import Evidence, Prediction, TextSource

TYPES = ["DocumentReference", "DiagnosticReport", "Observation", "Condition", "Procedure"]
PATIENT_URL = "urn:uuid:11111111-1111-1111-1111-111111111111"
NOTE_URL = "urn:uuid:22222222-2222-2222-2222-222222222222"


def note(text: str, id_: str | None = "n1", content_type: str = "text/plain", **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [{"attachment": {"contentType": content_type, "data": base64.b64encode(text.encode()).decode()}}],
        **extra,
    }
    if id_ is not None:
        resource["id"] = id_
    return resource


def collection(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def transaction(*entries: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for url, r in entries
        ],
    }


# --- finding 8: the input allowance ------------------------------------------------------------------------------


def test_texts_are_taken_in_order_until_the_allowance_and_none_after() -> None:
    texts = ["a" * 40, "b" * 50, "c" * 5, "d" * 5]  # 40 fits, 90 does not: b, and c and d after it, are refused
    data = collection(*(note(t, id_=f"n{i}") for i, t in enumerate(texts)))
    result = read_fhir(data, resource_types=TYPES, max_total_chars=60)
    assert [s.text for s in result.sources] == ["a" * 40]
    refused = [i for i in result.issues if i.code == "too-costly"]
    assert [i.expression for i in refused] == [
        (f"Bundle.entry[{n}].resource.content[0].attachment",) for n in (1, 2, 3)
    ]
    assert (
        "DocumentReference/n1 DocumentReference.content[0].attachment: this text (50 characters) would bring the "
        "input's texts to 90" in refused[0].diagnostics
    )
    assert all("max_input_chars" in i.diagnostics and "--max-input-chars" in i.diagnostics for i in refused)
    assert "not decoded" in refused[1].diagnostics
    assert result.chars_spent
    # No "gave no text to read" on top of the budget's own issue.
    assert not any(i.code == "required" for i in result.issues)


def test_a_text_exactly_at_the_allowance_is_taken() -> None:
    data = collection(note("x" * 10, id_="a"), note("y" * 10, id_="b"))
    result = read_fhir(data, resource_types=TYPES, max_total_chars=20)
    assert len(result.sources) == 2 and not result.chars_spent
    assert read_fhir(note("z"), resource_types=TYPES).chars_spent is False


def test_the_allowance_holds_across_files_and_stops_at_the_first_text_over(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(collection(note("a" * 30, id_="a1"), note("b" * 30, id_="a2"))))
    second.write_text(json.dumps(note("c" * 5, id_="b1")))  # would fit the 10 left, but comes after a refusal
    result = read_fhir_files([first, second], resource_types=TYPES, max_total_chars=40)
    assert [s.reference for s in result.sources] == ["DocumentReference/a1"]
    assert [i.source for i in result.issues if i.code == "too-costly"] == [str(first), str(second)]


def test_max_total_chars_must_be_an_integer() -> None:
    with pytest.raises(UsageError, match="max_total_chars"):
        read_fhir(note("x"), resource_types=TYPES, max_total_chars="10")  # type: ignore[arg-type]


def _html_collection(count: int, chars: int) -> bytes:
    body = ("<p>diabetes and hypertension noted today, &amp; asthma.</p>" * (chars // 56 + 1))[:chars]
    entries = [note(body, id_=f"n{i}", content_type="text/html; charset=utf-8") for i in range(count)]
    return json.dumps(collection(*entries)).encode()


def _peak(data: bytes, limit: int | None) -> int:
    tracemalloc.start()
    try:
        read_fhir(data, resource_types=TYPES, max_total_chars=limit)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_past_the_allowance_does_not_grow_with_the_texts() -> None:
    small, large = _html_collection(3, 100_000), _html_collection(9, 100_000)
    read_fhir(small, resource_types=TYPES)  # the R4B model classes load once, outside what is measured
    grown = _peak(large, 1) - _peak(small, 1)
    # Parsing the input costs a few times its size; the texts past the allowance cost nothing more.
    assert grown <= 5 * (len(large) - len(small)), f"{grown / 1e6:.1f} MB more for {len(large) - len(small):,} bytes"
    # Without an allowance every text is decoded with its offset arrays: the check above is not vacuous.
    unbounded = _peak(large, None) - _peak(small, None)
    assert unbounded > 2 * grown, (unbounded, grown)


# --- finding 10: placeholders ------------------------------------------------------------------------------------


def test_placeholders_are_stable_and_tell_content_and_place_apart() -> None:
    a, b = note("One.", id_=None), note("Two.", id_=None)
    refs = [s.reference for s in read_fhir(collection(a, b, a), resource_types=TYPES).sources]
    again = [s.reference for s in read_fhir(collection(a, b, a), resource_types=TYPES).sources]
    assert refs == again and len(set(refs)) == 3 and all(r.startswith("urn:uuid:") for r in refs)
    # The same place of an input with another text is another resource.
    assert (
        read_fhir(b, resource_types=TYPES).sources[0].reference
        != read_fhir(a, resource_types=TYPES).sources[0].reference
    )


# --- finding 14: NDJSON ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sources", "errors"),
    [
        ('{a}\n{"resourceType": "Docu', 1, ["input:2"]),  # a truncated last line
        ("null\n{a}\n", 1, ["input:1"]),  # the first line parses: NDJSON
        ("oops\n{a}\n", 0, ["input"]),  # the first line neither parses nor opens an object: not NDJSON
        ('[\n{a},\n{"resourceType": "x"\n]', 0, ["input"]),  # a broken pretty-printed array
        ('{\n  "resourceType": "DocumentReference",\n  "id": "x",\n', 0, ["input"]),  # a broken document
    ],
)
def test_ndjson_is_told_from_a_broken_document(text: str, sources: int, errors: list[str]) -> None:
    result = read_fhir(text.replace("{a}", json.dumps(note("Fine."))), resource_types=TYPES)
    assert len(result.sources) == sources
    assert [i.source for i in result.issues if i.is_error] == errors


# --- findings 5, 15, 17: identities and contained ----------------------------------------------------------------


def test_one_type_and_id_twice_without_distinct_fullurls_is_a_duplicate_warning() -> None:
    result = read_fhir(collection(note("One.", id_="1"), note("Two.", id_="1")), resource_types=TYPES)
    assert [s.reference for s in result.sources] == ["DocumentReference/1"] * 2
    (warning,) = [i for i in result.issues if i.code == "duplicate"]
    assert warning.severity == "warning" and "DocumentReference/1" in warning.diagnostics
    assert warning.expression == ("Bundle.entry[0].resource", "Bundle.entry[1].resource")
    # The same resource twice is not a clash: its findings are the same findings.
    same = read_fhir(collection(note("One.", id_="1"), note("One.", id_="1")), resource_types=TYPES)
    assert not any(i.code == "duplicate" for i in same.issues)


def test_distinct_server_fullurls_name_the_resources() -> None:
    data = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": "https://a.example/fhir/DocumentReference/1", "resource": note("One.", id_="1")},
            {"fullUrl": "https://b.example/fhir/DocumentReference/1", "resource": note("Two.", id_="1")},
            {"fullUrl": "https://a.example/fhir/DocumentReference/2", "resource": note("Three.", id_="2")},
        ],
    }
    result = read_fhir(data, resource_types=TYPES)
    assert [s.reference for s in result.sources] == [
        "https://a.example/fhir/DocumentReference/1",
        "https://b.example/fhir/DocumentReference/1",
        "DocumentReference/2",  # unambiguous: named as before
    ]
    assert not any(i.code == "duplicate" for i in result.issues)


@pytest.mark.parametrize(("length", "read"), [(64, True), (65, False)])
def test_an_id_longer_than_64_is_not_read(length: int, read: bool) -> None:
    result = read_fhir(collection(note("Text.", id_="a" * length)), resource_types=TYPES)
    assert bool(result.sources) is read
    if not read:
        (issue,) = [i for i in result.issues if i.is_error]
        assert (issue.code, issue.expression) == ("invalid", ("Bundle.entry[0].resource.id",))
        assert "65 characters" in issue.diagnostics


def test_contained_inside_contained_is_reported_where_it_is() -> None:
    nested = {"resourceType": "Observation", "status": "final", "code": {"text": "z"}, "valueString": "asthma"}
    inner = {
        "resourceType": "DiagnosticReport",
        "id": "i",
        "status": "final",
        "code": {"text": "y"},
        "conclusion": "Diabetes.",
        "contained": [nested],
    }
    outer = {"resourceType": "DiagnosticReport", "id": "dr", "status": "final", "code": {"text": "x"}}
    result = read_fhir({**outer, "contained": [inner]}, resource_types=TYPES)
    assert [s.text for s in result.sources] == ["Diabetes."]  # the contained report's own text is still read
    (issue,) = [i for i in result.issues if i.is_error]
    assert (issue.code, issue.expression) == ("invalid", ("DiagnosticReport.contained[0].contained",))
    assert "dom-2" in issue.diagnostics and "Observation" in issue.diagnostics


# --- findings 3 and 12: unsent resources that cannot travel ------------------------------------------------------


def test_unsent_resources_the_outputs_carry_are_checked_and_others_are_not() -> None:
    bad = {"resourceType": "Patient", "id": "p3", "gender": "bogus"}
    unrelated = {"resourceType": "Patient", "id": "p9", "gender": "bogus"}  # nothing read references it
    controls = note("Two.", id_="n2", description="ESC \x1b here", subject={"reference": PATIENT_URL})
    result = read_fhir(
        transaction(
            (PATIENT_URL, bad),
            (NOTE_URL, note("One.", subject={"reference": PATIENT_URL})),
            ("urn:uuid:33333333-3333-3333-3333-333333333333", unrelated),
            ("urn:uuid:44444444-4444-4444-4444-444444444444", controls),
        ),
        resource_types=TYPES,
    )
    assert len(result.sources) == 2  # both notes are still read: only their travel is refused
    assert set(result.unsent) == {NOTE_URL, "urn:uuid:33333333-3333-3333-3333-333333333333"}
    errors = {i.expression: i for i in result.issues if i.is_error}
    assert set(errors) == {("Bundle.entry[0].resource.gender",), ("Bundle.entry[3].resource.description",)}
    assert errors["Bundle.entry[0].resource.gender",].code == "code-invalid"
    assert "Patient/p3" in errors["Bundle.entry[0].resource.gender",].diagnostics
    assert "U+001B" in errors["Bundle.entry[3].resource.description",].diagnostics


@pytest.mark.parametrize("kind", ["Patient", "DocumentReference"])
def test_an_unsent_resource_holding_a_number_fhir_cannot_hold_is_not_kept(kind: str) -> None:
    resource: dict[str, Any] = (
        {"resourceType": "Patient", "id": "p1", "multipleBirthInteger": 10**40}
        if kind == "Patient"
        else note("One.", extension=[{"url": "http://x", "valueDecimal": 10**40}])
    )
    text = json.dumps(transaction((PATIENT_URL, resource)))
    result = read_fhir(text, resource_types=TYPES)
    assert result.unsent == {}
    (issue,) = [i for i in result.issues if i.code == "value"]  # one issue, not one from the walk and one here
    assert issue.is_error and issue.expression[0].startswith("Bundle.entry[0].resource.")


# --- findings 6 and 11: the writer -------------------------------------------------------------------------------


MODEL = ModelInfo("m", "1.0.0", "cd" * 32, "text-classification", "fp32", "CPUExecutionProvider", "RiskAssessment")


def _prediction(source: TextSource) -> Prediction:
    evidence = Evidence(source.reference, source.element, 0, len(source.text), source.text)
    return Prediction(source, "x", "http://snomed.info/sct", "73211009", "Diabetes mellitus", 0.9, evidence)


def test_control_characters_copied_from_the_input_become_spaces_of_the_same_length() -> None:
    text = "Type 2 diabetes\x00 on metformin; \x1b[31mhypertension\x1b[0m\x0b noted.\x7f\ttab\r\n"
    source = TextSource(
        "DocumentReference/ctl",
        "DocumentReference",
        "DocumentReference.content[0].attachment",
        text,
        text,
        subject={"reference": "Patient/p1", "display": "Jane\x07 Doe"},
    )
    (risk, *_) = build_resources([_prediction(source)], [source], MODEL)
    (span,) = [e for e in risk["extension"] if e["url"].endswith("evidence-span")]
    snippet = next(p["valueString"] for p in span["extension"] if p["url"] == "snippet")
    assert len(snippet) == len(text)
    assert snippet == text.replace("\x00", " ").replace("\x1b", " ").replace("\x0b", " ")  # DEL, tab, CR, LF kept
    assert risk["subject"]["display"] == "Jane  Doe"
    assert source.subject == {"reference": "Patient/p1", "display": "Jane\x07 Doe"}  # the input is not changed


def _source(reference: str) -> TextSource:
    return TextSource(
        reference, "DocumentReference", "DocumentReference.content[0].attachment", "Diabetes.", "Diabetes."
    )


def test_an_input_urn_equal_to_a_generated_fullurl_is_neither_carried_nor_resolved() -> None:
    resources = build_resources([_prediction(_source("urn:uuid:placeholder"))], [], MODEL)
    device = next(r for r in resources if r["resourceType"] == "Device")
    claimed = f"urn:uuid:{device['id']}"
    resources = build_resources([_prediction(_source(claimed))], [_source(claimed)], MODEL)
    warnings: list[Any] = []
    bundle = to_bundle(resources, "transaction", inputs={claimed: note("Diabetes.", id_=None)}, warnings=warnings)
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls))
    assert not any(e["resource"]["resourceType"] == "DocumentReference" for e in bundle["entry"])
    risk = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment")
    assert "reference" not in risk["basis"][0]  # not pointed at the Device
    assert [(w.severity, w.code) for w in warnings if w.code == "duplicate"] == [("error", "duplicate")]
    assert any("generated Device/" in w.diagnostics for w in warnings if w.code == "not-found")
    # The same holds in a collection, where the input is not carried at all.
    warnings.clear()
    collection_bundle = to_bundle(resources, "collection", warnings=warnings)
    risk = next(e["resource"] for e in collection_bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment")
    assert "reference" not in risk["basis"][0]


def test_an_input_with_a_generated_type_and_id_is_not_put_twice() -> None:
    model = ModelInfo(**{**MODEL.__dict__, "model_card": "# Card\n"})
    resources = build_resources([_prediction(_source("DocumentReference/n1"))], [], model)
    card = next(r for r in resources if r["resourceType"] == "DocumentReference")
    source = _source(f"DocumentReference/{card['id']}")
    resources = build_resources([_prediction(source)], [source], model)
    warnings: list[Any] = []
    bundle = to_bundle(
        resources, "transaction", inputs={NOTE_URL: note("Diabetes.", id_=card["id"])}, warnings=warnings
    )
    puts = [e["request"]["url"] for e in bundle["entry"] if e["request"]["method"] == "PUT"]
    assert len(puts) == len(set(puts)) and NOTE_URL not in [e["fullUrl"] for e in bundle["entry"]]
    (issue,) = [w for w in warnings if w.code == "duplicate"]
    assert issue.is_error and f"DocumentReference/{card['id']}" in issue.diagnostics
