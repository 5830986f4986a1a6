"""Property tests: no input makes ``Plugin.predict`` raise, and a bad entry never costs a good one.

hypothesis generates resources, Bundles, NDJSON, raw bytes and attachments (every codec name Python knows as a
charset). Each generated input is mixed with two known-good notes; the test asserts that

- no exception escapes ``predict`` (anything about the input is an OperationOutcome issue),
- both good notes are read and predicted exactly as they are when predicted alone (codes and probabilities), and
- every issue is a well-formed OperationOutcome issue.

The default run is seeded (``derandomize``) and bounded; ``pytest -m fuzz`` runs many more examples.
"""

from __future__ import annotations

import base64
import codecs
import encodings.aliases
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirplug.fhir.outcome import Issue
from tests.sdk.helpers import collection, document_reference

_EXAMPLES = int(os.environ.get("FHIRPLUG_FUZZ_EXAMPLES", "40"))
_SETTINGS = settings(
    derandomize=True,
    max_examples=_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
_BIG = settings(_SETTINGS, max_examples=int(os.environ.get("FHIRPLUG_FUZZ_MANY", "600")))

_GOOD_A = document_reference("Known type 2 diabetes, on metformin; blood sugar well controlled.", id_="good-a")
_GOOD_B = document_reference("Blood pressure 162/98 today: hypertension, start amlodipine.", id_="good-b")
_GOOD_REFS = ("DocumentReference/good-a", "DocumentReference/good-b")

#: Every codec name Python knows (aliases and canonical names): none may reach a decoder unless allow-listed.
CODEC_NAMES = sorted(
    {*encodings.aliases.aliases, *encodings.aliases.aliases.values()}
    | {"undefined", "punycode", "unicode_escape", "raw_unicode_escape", "rot13", "idna", "utf-7", "utf_7"}
    | {"utf8\x00", "utf-8;", "", " ", "UTF-8", "x" * 300}
)

_TEXT = st.text(
    alphabet=st.characters(codec=None, categories=None),  # every code point, lone surrogates included
    max_size=60,
)
_JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
)
_JSON = st.recursive(
    _JSON_SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def attachments(draw: st.DrawFn) -> dict[str, Any]:
    charset = draw(st.sampled_from(CODEC_NAMES))
    mime = draw(st.sampled_from(["text/plain", "text/html", "application/pdf", "text/rtf", "", "text/plain;;"]))
    content_type = f"{mime}; charset={charset}" if draw(st.booleans()) else mime
    payload = draw(
        st.one_of(
            st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
            _TEXT.map(lambda t: base64.b64encode(t.encode("utf-8", "surrogatepass")).decode()),
            _TEXT,  # not base64 at all
        )
    )
    attachment: dict[str, Any] = {"contentType": content_type, "data": payload}
    if draw(st.booleans()):
        attachment[draw(st.sampled_from(["url", "title", "size", "language"]))] = draw(_JSON)
    return attachment


@st.composite
def resources(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["DocumentReference", "DiagnosticReport", "Observation", "Condition", "junk"]))
    rid = draw(st.one_of(st.from_regex(r"[A-Za-z0-9\-.]{1,20}", fullmatch=True), _TEXT))
    if kind == "DocumentReference":
        resource: Any = {
            "resourceType": kind,
            "id": rid,
            "status": draw(st.sampled_from(["current", "superseded", "entered-in-error", "bogus", ""])),
            "content": [{"attachment": draw(attachments())}],
        }
    elif kind == "DiagnosticReport":
        resource = {
            "resourceType": kind,
            "id": rid,
            "status": draw(st.sampled_from(["final", "amended", "bogus"])),
            "code": {"text": "report"},
            "conclusion": draw(_TEXT),
            "presentedForm": [draw(attachments())],
        }
    elif kind == "Observation":
        resource = {
            "resourceType": kind,
            "id": rid,
            "status": "final",
            "code": {"text": "note"},
            "valueString": draw(_TEXT),
        }
    elif kind == "Condition":
        resource = {
            "resourceType": kind,
            "id": rid,
            "subject": {"reference": "Patient/p"},
            "note": [{"text": draw(_TEXT)}],
        }
    else:
        return draw(_JSON)
    if draw(st.booleans()):  # break one element: any JSON where FHIR wants something else
        key = draw(st.sampled_from(sorted(resource)))
        resource[key] = draw(_JSON)
    if draw(st.integers(0, 5)) == 0:  # contained resources, nested deep sometimes
        resource["contained"] = [draw(resources())]
    return resource


def _good_alone(plugin: Any) -> dict[str, list[tuple[str, float]]]:
    result = plugin.predict(collection(_GOOD_A, _GOOD_B))
    return _by_source(result)


def _by_source(result: Any) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {ref: [] for ref in _GOOD_REFS}
    for p in result.predictions:
        if p.evidence.reference in out:
            out[p.evidence.reference].append((p.code, round(p.probability, 5)))
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def expected(tiny_plugin: Any) -> dict[str, list[tuple[str, float]]]:
    got = _good_alone(tiny_plugin)
    assert all(got[ref] for ref in _GOOD_REFS), "the good notes must yield codes, or the property is vacuous"
    return got


def _check(plugin: Any, data: Any, expected: dict[str, list[tuple[str, float]]]) -> None:
    result = plugin.predict(data)  # must not raise, whatever data is
    assert _by_source(result) == expected
    read = {s.reference for s in result.sources}
    assert set(_GOOD_REFS) <= read
    for issue in result.issues:
        assert isinstance(issue, Issue)
        assert issue.severity in ("fatal", "error", "warning", "information")
        assert issue.code and issue.diagnostics
    json.dumps(result.outcome())  # the OperationOutcome serializes (no lone surrogate breaks it as JSON text)
    result.to_fhir("collection")
    result.to_fhir("transaction")
    result.to_ndjson()


@_SETTINGS
@given(bad=st.lists(resources(), min_size=1, max_size=4))
def test_bundles_with_bad_entries_keep_every_good_one(tiny_plugin: Any, expected: Any, bad: list[Any]) -> None:
    entries = [{"resource": r} for r in bad]
    bundle = collection(_GOOD_A, _GOOD_B)
    bundle["entry"][1:1] = entries
    _check(tiny_plugin, bundle, expected)


@_SETTINGS
@given(bad=st.lists(st.one_of(resources(), _JSON), min_size=1, max_size=4), garbage=st.lists(_TEXT, max_size=3))
def test_ndjson_with_bad_lines_keeps_every_good_one(
    tiny_plugin: Any, expected: Any, bad: list[Any], garbage: list[str]
) -> None:
    lines = [json.dumps(_GOOD_A)]
    lines += [json.dumps(item) for item in bad]
    lines += ["{" + g.replace("\n", " ") for g in garbage]  # broken lines that still look like objects
    lines.append(json.dumps(_GOOD_B))
    text = "\n".join(lines)
    _check(tiny_plugin, text.encode("utf-8", "surrogatepass"), expected)


@_SETTINGS
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_raise(tiny_plugin: Any, raw: bytes) -> None:
    result = tiny_plugin.predict(raw)
    assert result.predictions == [] or result.sources
    json.dumps(result.outcome())


@_SETTINGS
@given(attachment=attachments())
def test_attachments_with_any_codec_never_raise(tiny_plugin: Any, expected: Any, attachment: dict[str, Any]) -> None:
    bad = {"resourceType": "DocumentReference", "id": "x", "status": "current", "content": [{"attachment": attachment}]}
    _check(tiny_plugin, collection(_GOOD_A, bad, _GOOD_B), expected)


@pytest.mark.parametrize("charset", CODEC_NAMES)
def test_every_codec_name_is_decoded_by_allow_list_or_reported(tiny_plugin: Any, charset: str) -> None:
    """Each name Python's codec registry knows, as an attachment charset: read, or an issue, never a raise."""
    data = base64.b64encode(b"no fever +ACI-").decode()
    bad = {
        "resourceType": "DocumentReference",
        "id": "x",
        "status": "current",
        "content": [{"attachment": {"contentType": f"text/plain; charset={charset}", "data": data}}],
    }
    result = tiny_plugin.predict(collection(_GOOD_A, bad, _GOOD_B))
    assert set(_GOOD_REFS) <= {s.reference for s in result.sources}
    read = [s for s in result.sources if s.reference == "DocumentReference/x"]
    if not read:
        assert any(i.code in ("not-supported", "invalid", "code-invalid") for i in result.issues), result.issues
    else:  # a real text encoding decodes ASCII as ASCII: never a transform such as rot13 or utf-7's "+ACI-" → '"'
        assert codecs.lookup(charset.strip()).name  # the name is a real codec, not something invented
        if "16" not in charset:  # UTF-16 reads these bytes as other (valid) characters
            assert "no fever +ACI-" in read[0].text, (charset, read[0].text)


def test_predict_texts_of_nothing_is_empty(tiny_plugin: Any) -> None:
    probs = tiny_plugin.predict_texts([])
    assert probs.shape == (0, len(tiny_plugin.manifest.outputs.labels))


def test_deeply_nested_dict_bundle_is_an_issue(tiny_plugin: Any, expected: Any) -> None:
    inner: dict[str, Any] = collection(_GOOD_A, _GOOD_B)
    deep: dict[str, Any] = inner
    for _ in range(700):
        deep = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": deep}]}
    result = tiny_plugin.predict(deep)
    assert result.has_errors
    assert any(i.code in ("too-costly", "structure") for i in result.issues)


@pytest.fixture
def fuzz_selected(request: pytest.FixtureRequest) -> None:
    """The long runs go only when asked for: ``pytest -m fuzz`` (the default run has the seeded short ones)."""
    if "fuzz" not in (request.config.getoption("-m") or ""):
        pytest.skip("long fuzz run: select it with -m fuzz")


@pytest.mark.fuzz
@pytest.mark.usefixtures("fuzz_selected")
@_BIG
@given(bad=st.lists(resources(), min_size=1, max_size=6))
def test_many_bundles_with_bad_entries(tiny_plugin: Any, expected: Any, bad: list[Any]) -> None:
    bundle = collection(_GOOD_A, _GOOD_B)
    bundle["entry"][1:1] = [{"resource": r} for r in bad]
    _check(tiny_plugin, bundle, expected)


@pytest.mark.fuzz
@pytest.mark.usefixtures("fuzz_selected")
@_BIG
@given(raw=st.binary(max_size=2000))
def test_many_raw_inputs(tiny_plugin: Any, raw: bytes) -> None:
    tiny_plugin.predict(raw)
