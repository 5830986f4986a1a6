"""Reading whole inputs: Bundles, arrays, NDJSON, validation issues with FHIRPath expressions, real corpora."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from fhirplug.errors import InputError
from fhirplug.fhir.outcome import Issue
from fhirplug.fhir.reader import iter_resources, read_fhir, read_fhir_files

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures" / "fhir"
SHARED_DATA = REPO / ".." / "shared" / "data"
ALL = ("DocumentReference", "DiagnosticReport", "Observation", "Condition", "Procedure")


def table(issues: list[Issue]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(i.severity, i.code, i.expression) for i in issues]


def doc(text: str, **extra: Any) -> dict[str, Any]:
    data = base64.b64encode(text.encode()).decode()
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [{"attachment": {"contentType": "text/plain", "data": data}}],
        **extra,
    }


def bundle(*resources: dict[str, Any], kind: str = "collection") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [{"resource": r} for r in resources]}


def test_transaction_bundle_keeps_good_entries_and_reports_each_bad_one() -> None:
    raw = (FIXTURES / "transaction-mixed.json").read_bytes()
    result = read_fhir(raw, resource_types=("DocumentReference", "Condition"), source_name="mixed.json")
    assert [(s.reference, s.text) for s in result.sources] == [
        ("urn:uuid:0b6d1c3e-1111-4a4a-9c9c-000000000002", "Follow-up: type 2 diabetes, HbA1c 8.1%, start metformin.\n"),
        ("Condition/cond-1", "Chronic kidney disease stage 3a, stable."),
    ]
    assert table(result.issues) == [
        ("error", "structure", ("Bundle.entry[2].resource.content[0].attachment.contentType",)),
        ("error", "invalid", ("Bundle.entry[3].resource.content[0].attachment.data",)),
        ("warning", "not-supported", ("Bundle.entry[5].resource.content[0].attachment.url",)),
        ("error", "required", ("Bundle.entry[5].resource",)),
        ("error", "required", ("Bundle.entry[7].resource",)),
    ]
    assert {i.source for i in result.issues} == {"mixed.json"}
    assert "got 42" in result.issues[0].diagnostics
    # Four DocumentReferences and a Condition; the Patient is not a read type, the DELETE entry has no resource.
    assert result.resources_read == 5


def test_ndjson_bad_line_is_named_and_the_other_lines_are_read() -> None:
    result = read_fhir((FIXTURES / "notes.ndjson").read_bytes(), resource_types=ALL, source_name="notes.ndjson")
    assert [(s.reference, s.element) for s in result.sources] == [
        ("Procedure/proc-1", "Procedure.note[0].text"),
        ("Condition/cond-2", "Condition.note[0].text"),
    ]
    (issue,) = result.issues
    assert (issue.severity, issue.code, issue.source) == ("error", "structure", "notes.ndjson:3")
    assert "line 3" in issue.diagnostics


def test_ndjson_whose_first_line_is_bad_is_still_ndjson() -> None:
    text = '{"resourceType": "Condition", \n' + json.dumps(doc("Asthma.", id="d1")) + "\n"
    result = read_fhir(text, resource_types=ALL, source_name="x.ndjson")
    assert [s.reference for s in result.sources] == ["DocumentReference/d1"]
    assert [(i.code, i.source) for i in result.issues] == [("structure", "x.ndjson:1")]


def test_broken_pretty_json_is_one_structure_error_with_its_position() -> None:
    text = json.dumps(doc("Asthma."), indent=2).replace('"status": "current",', '"status": "current"')
    result = read_fhir(text, resource_types=ALL, source_name="bad.json")
    (issue,) = result.issues
    assert (issue.severity, issue.code, issue.source) == ("error", "structure", "bad.json")
    assert "line 4 column" in issue.diagnostics
    assert result.sources == []


def test_bytes_that_are_not_utf8() -> None:
    raw = json.dumps(doc("x")).encode().replace(b"current", b"curr\xe9nt")
    (issue,) = read_fhir(raw, resource_types=ALL).issues
    assert (issue.severity, issue.code) == ("error", "invalid")
    offset = raw.index(b"\xe9")
    assert f"byte 0xe9 at byte offset {offset}" in issue.diagnostics


@pytest.mark.parametrize("data", [b"", "  \n", "42", '"text"', "[1]", "{}"])
def test_inputs_that_are_not_resources_never_raise(data: bytes | str) -> None:
    result = read_fhir(data, resource_types=ALL)
    assert result.sources == [] and any(i.is_error for i in result.issues)


def test_lone_resource_of_another_type_is_not_supported() -> None:
    (issue,) = read_fhir({"resourceType": "Patient", "id": "p"}, resource_types=("DocumentReference",)).issues
    assert table([issue]) == [("error", "not-supported", ("Patient",))]
    assert "DocumentReference" in issue.diagnostics


def test_bundle_without_accepted_types_says_what_it_holds() -> None:
    data = bundle({"resourceType": "Patient"}, {"resourceType": "Patient"}, {"resourceType": "Claim"})
    (issue,) = read_fhir(data, resource_types=("DocumentReference",)).issues
    assert (issue.severity, issue.code) == ("error", "not-found")
    assert "Claim ×1, Patient ×2" in issue.diagnostics and "DocumentReference" in issue.diagnostics
    (empty,) = read_fhir(bundle(), resource_types=("DocumentReference",)).issues
    assert empty.code == "not-found"


def test_numeric_observations_in_a_bundle_are_information_not_errors() -> None:
    numeric = {"resourceType": "Observation", "status": "final", "code": {"text": "HR"}, "valueInteger": 72}
    worded = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueString": "Anxious."}
    result = read_fhir(bundle(numeric, worded, numeric), resource_types=("Observation",))
    assert [s.text for s in result.sources] == ["Anxious."]
    assert table(result.issues) == [
        ("information", "informational", ("Bundle.entry[0].resource", "Bundle.entry[2].resource"))
    ]
    # With nothing readable at all, the input as a whole is an error.
    result = read_fhir(bundle(numeric), resource_types=("Observation",))
    assert [i.severity for i in result.issues] == ["information", "error"]


def test_nested_bundle_expressions_and_validation_paths() -> None:
    bad = doc("x", id="bad")
    bad["content"][0]["attachment"]["size"] = "big"
    inner = bundle(doc("Chest pain.", id="ok"), bad)
    result = read_fhir(bundle({"resourceType": "Patient"}, inner, kind="searchset"), resource_types=ALL)
    assert [s.reference for s in result.sources] == ["DocumentReference/ok"]
    assert table(result.issues) == [
        ("error", "invalid", ("Bundle.entry[1].resource.entry[1].resource.content[0].attachment.size",))
    ]


def test_resources_the_validator_chokes_on_are_issues_not_exceptions() -> None:
    deep: dict[str, Any] = {"url": "https://example.org/x", "valueString": "x"}
    for _ in range(300):  # exhausts fhir.resources' recursion
        deep = {"url": "https://example.org/x", "extension": [deep]}
    nested = doc("x", id="deep")
    nested["content"][0]["attachment"]["extension"] = [deep]
    odd = doc("x", id="odd")
    odd["content"][0]["attachment"]["url"] = 7  # an AttributeError inside fhir.resources
    result = read_fhir(bundle(nested, odd, doc("Wheeze.", id="ok")), resource_types=ALL)
    assert [s.reference for s in result.sources] == ["DocumentReference/ok"]
    assert [(i.severity, i.code) for i in result.issues] == [("error", "structure")] * 2
    # The depth limit (100 levels from the document root) names the element where it is crossed.
    (too_deep,) = result.issues[0].expression
    assert too_deep.startswith("Bundle.entry[0].resource.content[0].attachment.extension[0].extension[0]")
    # Levels: Bundle 1, entry 2, entry[0] 3, resource 4, content[0] 6, attachment 7, extension[0] 9, 11 ... 101.
    assert too_deep.count(".extension[0]") == (101 - 9) // 2 + 1
    assert result.issues[1].expression == ("Bundle.entry[1].resource",)
    assert "nested too deeply" in result.issues[0].diagnostics


def test_references_fall_back_to_full_url_then_a_fresh_urn() -> None:
    data = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "https://fhir.example.org/DocumentReference/a", "resource": doc("One.")},
            {"resource": doc("Two.")},
            {"resource": doc("Three.")},
        ],
    }
    refs = [s.reference for s in read_fhir(data, resource_types=ALL).sources]
    assert refs[0] == "https://fhir.example.org/DocumentReference/a"
    assert refs[1].startswith("urn:uuid:") and refs[2].startswith("urn:uuid:") and refs[1] != refs[2]


def test_array_and_object_inputs() -> None:
    result = read_fhir([doc("One.", id="1"), {"resourceType": "Patient"}, "junk"], resource_types=ALL)
    assert [s.reference for s in result.sources] == ["DocumentReference/1"]
    assert [(i.code, i.source) for i in result.issues] == [("structure", "input[2]")]


def test_read_files_concatenates_and_names_each_file(tmp_path: Path) -> None:
    paths = [FIXTURES / "observation.json", tmp_path / "missing.json", FIXTURES / "diagnosticreport.json"]
    result = read_fhir_files(paths, resource_types=ALL)
    assert [s.reference for s in result.sources] == ["Observation/obs-smoking"] * 2 + ["DiagnosticReport/ct-1"] * 2
    assert [(i.code, Path(str(i.source)).name) for i in result.issues] == [
        ("value", "observation.json"),
        ("not-found", "missing.json"),
        ("not-supported", "diagnosticreport.json"),
    ]
    assert result.resources_read == 2


def test_iter_resources_yields_every_type_and_raises_or_collects() -> None:
    data = bundle({"resourceType": "Patient", "id": "p"}, doc("x", id="d"))
    assert [(r["resourceType"], ref, path) for r, ref, path in iter_resources(data)] == [
        ("Patient", "Patient/p", "Bundle.entry[0].resource"),
        ("DocumentReference", "DocumentReference/d", "Bundle.entry[1].resource"),
    ]
    text = json.dumps({"resourceType": "Patient"}) + "\n{oops\n"
    with pytest.raises(InputError, match=r"x\.ndjson:2"):
        list(iter_resources(text, source_name="x.ndjson"))
    issues: list[Issue] = []
    assert len(list(iter_resources(text, source_name="x.ndjson", issues=issues))) == 1
    assert [i.source for i in issues] == ["x.ndjson:2"]


def test_unknown_resource_type_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="Patient"):
        read_fhir({}, resource_types=("Patient",))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_real_corpora_never_raise_and_synthea_yields_notes() -> None:
    for path in sorted((SHARED_DATA / "fhir-r4-examples").rglob("*.json")):
        read_fhir(path.read_bytes(), resource_types=ALL, source_name=path.name)
    bundles = sorted((SHARED_DATA / "synthea-r4" / "bundles").glob("*.json"))
    assert bundles
    for path in bundles:
        raw = path.read_bytes()
        # CPU time, not wall time: on a shared 2-core machine other processes stretch the wall clock.
        started = time.process_time()
        result = read_fhir(raw, resource_types=ALL, source_name=path.name)
        elapsed = time.process_time() - started
        assert elapsed < 2.0, f"{path.name}: {elapsed:.2f} s CPU"
        assert not [i for i in result.issues if i.is_error], path.name
        attachments = [s for s in result.sources if s.element.endswith(("attachment", "]"))]
        assert {s.resource_type for s in attachments} == {"DocumentReference", "DiagnosticReport"}
        assert all(len(s.text) > 100 for s in attachments)


def test_read_fhir_files_never_waits_on_a_fifo(tmp_path: Path) -> None:
    """A FIFO among the files is an issue at once (Path.read_bytes would wait forever for a writer)."""
    import os
    import threading

    fifo = tmp_path / "notes.ndjson"
    os.mkfifo(fifo)
    good = tmp_path / "note.json"
    good.write_text(
        json.dumps(
            {
                "resourceType": "Condition",
                "id": "c1",
                "subject": {"reference": "Patient/p1"},
                "note": [{"text": "type 2 diabetes"}],
            }
        )
    )
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(read_fhir_files([fifo, good], resource_types=ALL)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert got, "read_fhir_files blocked on a FIFO"
    (result,) = got
    assert [s.reference for s in result.sources] == ["Condition/c1"]
    (issue,) = [i for i in result.issues if i.is_error]
    assert (issue.code, issue.source) == ("not-found", str(fifo)) and "not a regular file" in issue.diagnostics
