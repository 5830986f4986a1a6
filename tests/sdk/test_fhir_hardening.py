"""FHIR input as FHIR defines it (issue 9): JSON limits per resource, NDJSON line by line, charsets by
allow-list, text that is Unicode, contained resources, required code bindings."""

from __future__ import annotations

import base64
import encodings
import encodings.aliases
import json
import pkgutil
from pathlib import Path
from typing import Any

import pytest

from fhirplug.errors import UsageError
from fhirplug.fhir._attachment import CHARSETS, decode_attachment
from fhirplug.fhir.extract import extract_texts
from fhirplug.fhir.outcome import Issue, operation_outcome
from fhirplug.fhir.reader import ReadResult, read_fhir

ADVERSARIAL = Path(__file__).resolve().parents[1] / "fixtures" / "adversarial" / "fhir"
ALL = ("DocumentReference", "DiagnosticReport", "Observation", "Condition", "Procedure")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def doc(text: str, rid: str, content_type: str = "text/plain", raw: bytes | None = None) -> dict[str, Any]:
    data = b64(text.encode() if raw is None else raw)
    return {
        "resourceType": "DocumentReference",
        "id": rid,
        "status": "current",
        "content": [{"attachment": {"contentType": content_type, "data": data}}],
    }


def bundle(*resources: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def table(issues: list[Issue]) -> list[tuple[str, str, tuple[str, ...], str | None]]:
    return [(i.severity, i.code, i.expression, i.source) for i in issues]


def read(name: str) -> ReadResult:
    return read_fhir((ADVERSARIAL / name).read_bytes(), resource_types=ALL, source_name=name)


def texts(result: ReadResult) -> list[tuple[str, str]]:
    return [(s.reference, s.text) for s in result.sources]


def assert_serialisable(result: ReadResult) -> None:
    # Issues reach users as UTF-8 JSON: a lone surrogate echoed from the input would crash that write.
    json.dumps(operation_outcome(result.issues), ensure_ascii=False).encode("utf-8")


# --- JSON limits: errors for the resource holding them, never for the file -------------------------------------


def test_a_5000_digit_integer_refuses_only_its_entry() -> None:
    good = json.dumps(doc("Chest pain resolved.", "d1"))
    big = '{"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}, '
    big += '"valueQuantity": {"value": ' + "7" * 5000 + '}, "note": [{"text": "Never read."}]}'
    tail = json.dumps(doc("Wheeze on exam.", "d3"))
    text = f'{{"resourceType": "Bundle", "type": "collection", "entry": [{{"resource": {good}}}, '
    text += f'{{"resource": {big}}}, {{"resource": {tail}}}]}}'
    result = read_fhir(text, resource_types=ALL, source_name="big.json")
    assert texts(result) == [
        ("DocumentReference/d1", "Chest pain resolved."),
        ("DocumentReference/d3", "Wheeze on exam."),
    ]
    assert table(result.issues) == [("error", "value", ("Bundle.entry[1].resource.valueQuantity.value",), "big.json")]
    assert "5,000 characters" in result.issues[0].diagnostics


def test_nan_and_an_out_of_range_decimal_are_errors_of_their_resource() -> None:
    obs = '{"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueString": "Calm.",'
    text = "\n".join([obs + ' "valueQuantity": {"value": NaN}}', obs + ' "valueQuantity": {"value": 1e999}}'])
    text += "\n" + json.dumps(doc("Afebrile.", "ok"))
    result = read_fhir(text, resource_types=ALL, source_name="n.ndjson")
    assert texts(result) == [("DocumentReference/ok", "Afebrile.")]
    assert table(result.issues) == [
        ("error", "structure", ("Observation.valueQuantity.value",), "n.ndjson:1"),
        ("error", "value", ("Observation.valueQuantity.value",), "n.ndjson:2"),
    ]


def test_a_10000_deep_array_in_one_entry_refuses_only_that_entry() -> None:
    deep = "[" * 10_000 + "]" * 10_000
    bad = json.dumps(doc("Never read.", "deep"))[:-1] + f', "extension": {deep}}}'
    text = json.dumps(bundle(doc("Dyspnoea on exertion.", "d1"), {}, doc("Ankle oedema.", "d3")))
    text = text.replace("{}", bad)
    result = read_fhir(text, resource_types=ALL, source_name="deep.json")
    assert texts(result) == [
        ("DocumentReference/d1", "Dyspnoea on exertion."),
        ("DocumentReference/d3", "Ankle oedema."),
    ]
    # The resource is level 4 and its extension array 5; the first container past level 100 is named.
    where = "Bundle.entry[1].resource.extension" + "[0]" * (101 - 5)
    assert table(result.issues) == [("error", "structure", (where,), "deep.json")]
    assert "nested too deeply" in result.issues[0].diagnostics


def test_a_python_bundle_nested_600_deep_does_not_raise() -> None:
    inner: dict[str, Any] = bundle(doc("Too deep to read.", "bottom"))
    for _ in range(600):
        inner = bundle(inner)
    result = read_fhir(bundle(doc("Top-level note.", "top"), inner), resource_types=ALL, source_name="py")
    assert texts(result) == [("DocumentReference/top", "Top-level note.")]
    # Level 1 + 3 per Bundle entry: the 34th nested resource is the first below level 100.
    where = "Bundle.entry[1].resource" + ".entry[0].resource" * 33
    assert table(result.issues) == [("error", "structure", (where,), "py")]


def test_a_python_dict_resource_nested_3000_deep_is_one_issue() -> None:
    deep: dict[str, Any] = {"url": "https://example.org/x", "valueString": "x"}
    for _ in range(3000):
        deep = {"url": "https://example.org/x", "extension": [deep]}
    nested = doc("Never read.", "deep")
    nested["extension"] = [deep]
    result = read_fhir(bundle(nested, doc("Read.", "ok")), resource_types=ALL)
    assert texts(result) == [("DocumentReference/ok", "Read.")]
    assert [(i.severity, i.code) for i in result.issues] == [("error", "structure")]
    assert result.issues[0].expression[0].startswith("Bundle.entry[0].resource.extension[0].extension[0]")


def test_repeated_names_refuse_the_resource_holding_them() -> None:
    result = read("duplicate-names.json")
    assert texts(result) == [
        ("Condition/c-ok", "Type 2 diabetes mellitus."),
        ("Procedure/proc-ok", "Colonoscopy, two polyps removed."),
    ]
    src = "duplicate-names.json"
    assert table(result.issues) == [
        ("error", "structure", ("Bundle.entry[0].resource.resourceType",), src),
        ("error", "structure", ("Bundle.entry[2].resource.note[0].text",), src),
        ("error", "structure", ("Bundle.entry[3].resource",), src),
    ]
    assert "'resourceType' appears 2 times" in result.issues[0].diagnostics


# --- NDJSON judged line by line ---------------------------------------------------------------------------------


def test_ndjson_with_2_good_and_3_broken_lines_reads_the_good_ones() -> None:
    result = read("ndjson-2-good-3-broken.ndjson")
    assert texts(result) == [
        ("Condition/c-1", "Asthma, well controlled."),
        ("Procedure/proc-1", "Bronchoscopy without complications."),
    ]
    name = "ndjson-2-good-3-broken.ndjson"
    assert table(result.issues) == [("error", "structure", (), f"{name}:{n}") for n in (2, 4, 5)]
    assert [i.diagnostics.split(":")[0] for i in result.issues] == ["line 2 is not valid JSON"] + [
        f"line {n} is not valid JSON" for n in (4, 5)
    ]
    assert "at column 2" in result.issues[1].diagnostics


def test_a_broken_pretty_printed_document_is_still_one_error() -> None:
    text = json.dumps(bundle(doc("a", "1"), doc("b", "2")), indent=2).replace('"type": "collection",', '"type": 1 2,')
    result = read_fhir(text, resource_types=ALL, source_name="pretty.json")
    assert table(result.issues) == [("error", "structure", (), "pretty.json")]
    assert (
        "not valid JSON or NDJSON" in result.issues[0].diagnostics and "line 3 column" in result.issues[0].diagnostics
    )


# --- Charsets by allow-list -------------------------------------------------------------------------------------


def every_codec_name() -> list[str]:
    names = set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values())
    names |= {m.name for m in pkgutil.iter_modules(encodings.__path__)}
    names |= {n.replace("_", "-") for n in names}
    return sorted(names | {"utf-8\x00", "utf\x008", " UTF-8 ", "undefined", "punycode", "utf-7", "mbcs", "palmos"})


@pytest.mark.parametrize(
    "charset",
    [
        *("undefined", "punycode", "utf-8\x00", "utf-7", "unicode_escape", "raw_unicode_escape", "rot13", "idna"),
        *("base64", "zlib", "hex", "uu", "bz2", "quopri", "mbcs", "palmos", "utf-32", "iso-2022-kr", "x-user-defined"),
    ],
)
def test_dangerous_charsets_are_not_supported(charset: str) -> None:
    raw = b"+2AA-" if charset == "utf-7" else b"\\ud800 Stable."  # each decodes to a lone surrogate in Python
    resource = doc("", "n", content_type=f'text/plain; charset="{charset}"', raw=raw)
    result = read_fhir(bundle(resource, doc("Read.", "ok")), resource_types=ALL, source_name="cs.json")
    assert texts(result) == [("DocumentReference/ok", "Read.")]
    assert table(result.issues)[0] == (
        "error",
        "not-supported",
        ("Bundle.entry[0].resource.content[0].attachment.contentType",),
        "cs.json",
    )
    assert ascii(charset) in result.issues[0].diagnostics and "windows-1252" in result.issues[0].diagnostics
    assert_serialisable(result)


def test_every_codec_name_python_knows_decodes_by_the_allow_list_or_is_not_supported() -> None:
    names = every_codec_name()
    assert len(names) > 300
    read_ok = 0
    for name in names:
        codec = CHARSETS.get(name.strip().lower())
        raw = "Stable angina.".encode(codec) if codec else b"Stable angina."
        attachment = {"contentType": f'text/plain; charset="{name}"', "data": b64(raw)}
        decoded, issues = decode_attachment(attachment, "A", 1000)
        if codec:
            assert decoded is not None and decoded.text == "Stable angina.", name
            assert issues == [], name
            read_ok += 1
        else:
            assert decoded is None, name
            assert [(i.severity, i.code) for i in issues] == [("error", "not-supported")], name
    # Common aliases are read: latin1, us-ascii, ascii, utf8, cp1252, shift_jis ...
    assert {"latin1", "us-ascii", "ascii", "utf8", "utf-8", "cp1252", "shift_jis", "euc-jp", "koi8-r"} <= {
        n.lower() for n in names if n.strip().lower() in CHARSETS
    }
    assert read_ok > 50


def test_allow_listed_charsets_decode_what_they_name() -> None:
    for charset, text in [("latin1", "Fièvre"), ("windows-1252", "naïve “quote”"), ("shift_jis", "胸痛")]:
        codec = CHARSETS[charset]
        attachment = {"contentType": f"text/plain; charset={charset}", "data": b64(text.encode(codec))}
        decoded, issues = decode_attachment(attachment, "A", 1000)
        assert decoded is not None and decoded.text == text and issues == []
    # utf-16 honours the byte order mark; utf-16le/be drop a leading one.
    for charset, raw in [
        ("utf-16", "Dyspnée".encode("utf-16")),
        ("utf-16be", b"\xfe\xff" + "Dyspnée".encode("utf-16-be")),
    ]:
        decoded, _ = decode_attachment({"contentType": f"text/plain; charset={charset}", "data": b64(raw)}, "A", 99)
        assert decoded is not None and decoded.text == "Dyspnée"


# --- Text that is not Unicode -----------------------------------------------------------------------------------


def test_lone_surrogates_in_strings_are_invalid_not_exceptions() -> None:
    text = (
        '{"resourceType": "Bundle", "type": "collection", "entry": ['
        '{"resource": {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}, '
        '"conclusion": "Effusion \\ud800."}},'
        '{"resource": {"resourceType": "Observation", "id": "x\\udc00", "status": "final", "code": {"text": "x"}, '
        '"valueString": "Fine."}},'
        '{"fullUrl": "urn:uuid:\\ud83d", "resource": {"resourceType": "Condition", '
        '"subject": {"reference": "Patient/1"}, "note": [{"text": "Fine."}]}},'
        '{"resource": {"resourceType": "Condition", "id": "ok", "subject": {"reference": "Patient/1"}, '
        '"note": [{"text": "Read \\ud83d\\ude00."}]}}]}'
    )
    result = read_fhir(text, resource_types=ALL, source_name="s.json")
    assert texts(result) == [("Condition/ok", "Read 😀.")]
    assert table(result.issues) == [
        ("error", "invalid", ("Bundle.entry[0].resource.conclusion",), "s.json"),
        ("error", "invalid", ("Bundle.entry[1].resource.id",), "s.json"),
        ("error", "invalid", ("Bundle.entry[2].fullUrl",), "s.json"),
    ]
    assert_serialisable(result)


def test_extract_texts_reports_a_surrogate_in_an_unvalidated_string() -> None:
    obs = {"resourceType": "Observation", "valueString": "a\ud800b", "note": [{"text": "Fine."}]}
    sources, issues = extract_texts(obs, reference="Observation/o")
    assert [s.text for s in sources] == ["Fine."]
    assert [(i.severity, i.code, i.expression) for i in issues] == [("error", "invalid", ("Observation.valueString",))]
    assert "U+D800 at character 1" in issues[0].diagnostics


def test_utf16_bytes_holding_an_unpaired_surrogate_are_invalid() -> None:
    attachment = {"contentType": "text/plain; charset=utf-16le", "data": b64(b"a\x00\x00\xd8b\x00")}
    decoded, issues = decode_attachment(attachment, "A", 100)
    assert decoded is None
    assert [(i.severity, i.code, i.expression) for i in issues] == [("error", "invalid", ("A.data",))]


# --- contained resources ----------------------------------------------------------------------------------------


def test_contained_resources_are_read_and_point_at_their_container() -> None:
    result = read("contained.json")
    assert [(s.reference, s.resource_type, s.element, s.text) for s in result.sources] == [
        ("DiagnosticReport/dr-1", "DiagnosticReport", "DiagnosticReport.conclusion", "Small right pleural effusion."),
        (
            "DiagnosticReport/dr-1",
            "DocumentReference",
            "DiagnosticReport.contained[0].content[0].attachment",
            "Findings: effusion, no nodules.",
        ),
        (
            "DiagnosticReport/dr-1",
            "Observation",
            "DiagnosticReport.contained[2].valueString",
            "Likely parapneumonic effusion.",
        ),
        ("Encounter/enc-1", "Condition", "Encounter.contained[0].note[0].text", "Pleuritic chest pain."),
    ]
    # A contained resource without its own subject and date takes its container's.
    assert result.sources[1].subject == {"reference": "Patient/p-7"} and result.sources[1].date == "2024-04-02"
    assert table(result.issues) == [
        ("error", "code-invalid", ("Bundle.entry[0].resource.contained[3].status",), "contained.json"),
        ("information", "informational", ("Bundle.entry[0].resource.contained[4].status",), "contained.json"),
    ]
    assert "contained at Bundle.entry[0].resource.contained[4]" in result.issues[1].diagnostics
    assert result.resources_read == 6


# --- Required code bindings and entered-in-error ----------------------------------------------------------------


def test_codes_outside_required_bindings_refuse_their_resource() -> None:
    result = read("bad-codes.json")
    assert texts(result) == [
        ("DocumentReference/good", "Note good."),
        ("DiagnosticReport/dr-partial", "Partial report."),
        ("Condition/cond-active", "Condition cond-active."),
    ]
    e = "Bundle.entry"
    assert [(i.severity, i.code, i.expression) for i in result.issues] == [
        ("error", "code-invalid", (f"{e}[1].resource.status",)),
        ("error", "code-invalid", (f"{e}[2].resource.docStatus",)),
        ("error", "code-invalid", (f"{e}[4].resource.status",)),
        ("error", "code-invalid", (f"{e}[5].resource.status",)),  # partial is a report status, not an observation's
        ("error", "code-invalid", (f"{e}[6].resource.status",)),
        ("error", "code-invalid", (f"{e}[8].resource.clinicalStatus.coding[0].code",)),
        ("error", "code-invalid", (f"{e}[9].resource.clinicalStatus",)),
        ("error", "code-invalid", (f"{e}[10].resource.verificationStatus.coding[0].code",)),
        ("information", "informational", (f"{e}[11].resource.verificationStatus",)),
        ("information", "informational", (f"{e}[12].resource.status",)),
        ("error", "code-invalid", (f"{e}[13].resource.content[0].attachment.contentType",)),
    ]
    assert "'bogus'" in result.issues[0].diagnostics and "current | entered-in-error | superseded" in (
        result.issues[0].diagnostics
    )
    assert {i.source for i in result.issues} == {"bad-codes.json"}


# --- Misuse -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("types", [(), ("Patient",), ("DocumentReference", "Claim")])
def test_bad_resource_types_is_a_usage_error(types: tuple[str, ...]) -> None:
    with pytest.raises(UsageError, match="readable types are"):
        read_fhir({}, resource_types=types)
