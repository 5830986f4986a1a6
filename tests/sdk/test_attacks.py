"""A reviewer's attacks on the hardened runtime (GitHub issues 9 and 10): as an attacker, an integrator and a
careless client would use it.

The review found 17 problems (numbered by severity, 1 the worst: a FIFO that hung ``predict_files``, an endless
stdin, a transaction that could not be serialized, ...); each was a test marked ``xfail(strict=True)`` that failed
on the code as it was, and lost its marker with the fix. All are fixed: every test here is now a regression test,
next to the attacks that held from the start.

Every test is bounded: threads are joined with a timeout, subprocesses run under a wall limit (and a memory limit
where the attack is memory), sockets have timeouts, and the only network is 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fhirplug import Budget, load_plugin
from fhirplug.cli import main
from fhirplug.errors import UsageError
from fhirplug.fhir.reader import read_fhir
from fhirplug.fhir.writer import _uuid
from fhirplug.plugin import Plugin
from tests.conftest import TINY_PLUGIN
from tests.sdk.helpers import document_reference

ATTACKS = Path(__file__).parents[1] / "fixtures" / "attacks"
TINY = str(TINY_PLUGIN)
TYPES = ["DocumentReference", "DiagnosticReport", "Observation", "Condition", "Procedure"]
DIABETES = "Follow up visit. Type 2 diabetes, elevated HbA1c on metformin."
#: How long a hostile input may keep a call busy before the test calls it a hang.
HANG_S = 5


def _tx(*entries: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """An unsent transaction Bundle: each entry POSTed under its urn:uuid fullUrl."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": res, "request": {"method": "POST", "url": res["resourceType"]}}
            for url, res in entries
        ],
    }


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, args)


def _one_line_error(result: Any) -> None:
    """What the CLI promises for an expected failure: a non-zero exit with a message, never a Python exception."""
    assert result.exit_code not in (0, None), result.output
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"a {type(escaped).__name__} escaped the CLI: {escaped}"
    assert "Error" in result.output or "error" in result.output, result.output


# ---------------------------------------------------------------------------------------------------------------
# Finding 1 (high): reading a FIFO blocks forever — predict_files (and the CLI) hang on a path that is a pipe
# ---------------------------------------------------------------------------------------------------------------


def test_predict_files_on_a_fifo_does_not_hang(tiny_plugin: Plugin, tmp_path: Path) -> None:
    fifo = tmp_path / "notes.ndjson"
    os.mkfifo(fifo)
    done: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: done.setdefault("result", tiny_plugin.predict_files([fifo])), daemon=True)
    worker.start()
    worker.join(HANG_S)
    hung = worker.is_alive()
    if hung:  # let the blocked open() finish: a writer appears and leaves, the reader sees EOF
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(HANG_S)
    assert not hung, f"predict_files on a FIFO was still blocked after {HANG_S} s"
    (issue,) = done["result"].issues
    assert issue.is_error and issue.source == str(fifo)


# ---------------------------------------------------------------------------------------------------------------
# Finding 2 (high): the CLI reads stdin (or /dev/zero) to the end, however long: memory grows until it dies
# ---------------------------------------------------------------------------------------------------------------


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    # Enough for Python, onnxruntime and the tiny plugin; an unbounded read dies here instead of taking the machine.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_endless_stdin_stops_with_a_too_costly_error() -> None:
    command = [sys.executable, "-c", "from fhirplug.cli import main; main()", "predict", TINY, "--allow-unsigned", "-"]
    child = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_limit_memory,
    )
    assert child.stdin is not None and child.stderr is not None
    chunk = b"y\n" * (1 << 19)  # `yes`
    deadline = time.monotonic() + 60
    try:
        while child.poll() is None and time.monotonic() < deadline:
            child.stdin.write(chunk)
    except (BrokenPipeError, OSError):
        pass  # the child stopped reading: what a bounded reader does
    finally:
        with contextlib.suppress(OSError):
            child.stdin.close()
    try:
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    stderr = child.stderr.read().decode("utf-8", "replace")
    child.stderr.close()
    assert "Traceback" not in stderr, stderr[-2000:]
    assert child.returncode == 4, (child.returncode, stderr[-2000:])
    assert "too-costly" in stderr or "too long" in stderr or "budget" in stderr, stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Finding 3 (high): a number FHIR cannot hold in an unsent input resource makes the transaction unwritable
# ---------------------------------------------------------------------------------------------------------------


def test_unsent_resource_with_a_41_digit_number_gives_a_writable_transaction(tiny_plugin: Plugin) -> None:
    result = tiny_plugin.predict((ATTACKS / "unsent-patient-long-number.json").read_bytes())
    assert result.predictions, [i.diagnostics for i in result.issues]
    bundle = result.to_fhir("transaction")
    text = json.dumps(bundle)  # what every caller (and the CLI) does next
    # The Patient cannot travel as it is: either it is left out with an issue, or the value is.
    assert "1" + "0" * 40 not in text
    # The FHIRPath of an entry's resource does not name its type (Bundle.entry[0].resource...): the diagnostics do.
    assert any(
        i.is_error
        and i.source == "input"
        and i.expression == ("Bundle.entry[0].resource.multipleBirthInteger",)
        and "Patient/p1" in i.diagnostics
        for i in result.issues
    ), result.issues


def test_cli_transaction_of_an_unsent_resource_with_a_long_number_has_no_traceback() -> None:
    result = _cli(
        [
            "predict",
            TINY,
            "--allow-unsigned",
            str(ATTACKS / "unsent-patient-long-number.json"),
            "--format",
            "transaction",
        ]
    )
    assert not isinstance(result.exception, TypeError), result.exception
    assert result.exit_code == 4, result.output


# ---------------------------------------------------------------------------------------------------------------
# Finding 4 (medium): a CLI output path that cannot be written is a traceback, not a one-line error
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["-o", "--outcome", "keygen"])
def test_cli_unwritable_output_is_a_one_line_error(which: str, tmp_path: Path) -> None:
    note = tmp_path / "note.json"
    note.write_text(json.dumps(document_reference(DIABETES)))
    missing = tmp_path / "no-such-folder" / "out.json"
    if which == "keygen":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        result = _cli(["keygen", "--out", str(blocker / "keys")])
    else:
        result = _cli(["predict", TINY, "--allow-unsigned", str(note), which, str(missing)])
    _one_line_error(result)


# ---------------------------------------------------------------------------------------------------------------
# Finding 5 (medium): two notes with the same Type/id from different servers: one finding silently dropped
# ---------------------------------------------------------------------------------------------------------------


def test_same_type_and_id_from_two_servers_gives_two_findings(tiny_plugin: Plugin) -> None:
    result = tiny_plugin.predict((ATTACKS / "two-servers-same-id.json").read_bytes())
    diabetes = [p for p in result.predictions if p.label == "diabetes"]
    assert len(diabetes) == 2, "precondition: each note gives a diabetes prediction"
    code = diabetes[0].code  # the second note also gives other findings: only the diabetes ones are compared
    written = [
        r
        for r in result.resources()
        if r["resourceType"] == "RiskAssessment" and r["prediction"][0]["outcome"]["coding"][0]["code"] == code
    ]
    subjects = sorted(r["subject"]["reference"] for r in written)
    # Each note's patient gets the finding, or the clash is at least reported.
    assert subjects == ["Patient/a1", "Patient/b7"] or any(
        "DocumentReference/1" in i.diagnostics for i in result.issues
    )


# ---------------------------------------------------------------------------------------------------------------
# Finding 6 (medium): control characters in a note reach the evidence snippet: the output is not valid FHIR
# ---------------------------------------------------------------------------------------------------------------


def test_control_characters_in_a_note_give_valid_output(tiny_plugin: Plugin) -> None:
    from tests.fhir_tools import errors, validate_resources

    result = tiny_plugin.predict((ATTACKS / "note-with-control-characters.json").read_bytes())
    assert result.predictions, [i.diagnostics for i in result.issues]
    lines = [json.loads(line) for line in result.to_ndjson().split("\n") if line]
    outputs = [result.to_fhir("collection"), result.to_fhir("transaction"), *lines]
    found = [e for issues in validate_resources(outputs) for e in errors(issues)]
    assert found == [], found[:5]


def test_control_characters_are_kept_in_the_text_the_model_reads(tiny_plugin: Plugin) -> None:
    """Held (and guards the fix for finding 6): the model still reads the note as sent; only output is cleaned."""
    result = read_fhir((ATTACKS / "note-with-control-characters.json").read_bytes(), resource_types=TYPES)
    (source,) = result.sources
    assert "\x00" in source.text and "\x1b" in source.text


# ---------------------------------------------------------------------------------------------------------------
# Finding 7 (medium): the CLI drops every good input when one input file cannot be read
# ---------------------------------------------------------------------------------------------------------------


def test_cli_predicts_the_good_file_next_to_a_missing_one(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(document_reference(DIABETES)))
    out = tmp_path / "out.ndjson"
    result = _cli(
        [
            "predict",
            TINY,
            "--allow-unsigned",
            str(good),
            str(tmp_path / "missing.json"),
            "--format",
            "ndjson",
            "-o",
            str(out),
        ]
    )
    assert result.exit_code == 4, result.output
    assert out.is_file(), result.output
    assert any(json.loads(line)["resourceType"] == "RiskAssessment" for line in out.read_text().splitlines())


# ---------------------------------------------------------------------------------------------------------------
# Finding 8 (medium): memory grows with every text read, not with the budget
# ---------------------------------------------------------------------------------------------------------------


def _html_notes(count: int, chars: int) -> bytes:
    body = ("<p>diabetes and hypertension noted today, &amp; asthma.</p>" * (chars // 56 + 1))[:chars]
    entries = [
        {"resource": document_reference(body, id_=f"n{i}", content_type="text/html; charset=utf-8", encounter=None)}
        for i in range(count)
    ]
    return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()


def _peak(plugin: Plugin, data: bytes) -> int:
    tracemalloc.start()
    try:
        plugin.predict(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_past_the_input_budget_does_not_grow_with_the_texts(tiny_bundle: Path) -> None:
    plugin = load_plugin(
        tiny_bundle, allow_unsigned=True, variant="fp32", provider="cpu", budget=Budget(max_input_chars=1)
    )
    small, large = _html_notes(3, 100_000), _html_notes(9, 100_000)
    plugin.predict(small)  # one-time costs (R4B model classes, caches) are not what is measured
    grown = _peak(plugin, large) - _peak(plugin, small)
    # Parsing the input itself costs a few times its size; what is past the budget should cost no more.
    assert grown <= 5 * (len(large) - len(small)), f"{grown / 1e6:.1f} MB more for {len(large) - len(small):,} bytes"


# ---------------------------------------------------------------------------------------------------------------
# Finding 9 (medium-low): the CDS/$predict service answers a body with a >4,300-digit integer 500, not 400
# ---------------------------------------------------------------------------------------------------------------

TOKEN = "attack-test-bearer-token-0123456789abcdef"


@pytest.fixture
def serve_address(tiny_plugin: Plugin) -> Iterator[tuple[str, int]]:
    """The rewritten service (fhirplug.serve) on 127.0.0.1, a static bearer token, a 2 s body timeout."""
    serve = pytest.importorskip("fhirplug.serve")
    config = serve.ServeConfig(auth=serve.AuthConfig(bearer_tokens=(TOKEN,)), body_timeout_s=2.0)
    running = serve.run_in_thread(serve.create_app([tiny_plugin], config))
    try:
        yield running.sock.getsockname()[:2]
    finally:
        running.stop()


def _exchange(address: tuple[str, int], data: bytes, wait: float = 10) -> bytes:
    """Send raw bytes, read until the server closes (or ``wait`` seconds of silence); b"" means dropped."""
    with socket.create_connection(address, timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            got += b"<still open>"
        return got


def _post(body: bytes, *, length: str | None = None, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length or len(body)}\r\n"
    head = (
        f"POST /cds-services/tiny-notes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n{framing}\r\n"
    )
    return head.encode() + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def test_a_request_with_a_huge_integer_is_answered_400(serve_address: tuple[str, int]) -> None:
    body = b'{"hook": "patient-view", "hookInstance": "x", "prefetch": {"a": ' + b"7" * 5000 + b"}}"
    answer = _exchange(serve_address, _post(body))
    assert _status(answer) == 400, answer[:300]
    assert b"OperationOutcome" in answer


def test_a_body_that_never_finishes_is_answered_408(serve_address: tuple[str, int]) -> None:
    """Held by the rewrite (the stdlib server waited forever: slowloris)."""
    started = time.monotonic()
    answer = _exchange(serve_address, _post(b"{", length="1000"), wait=15)
    assert _status(answer) == 408, answer[:300]
    assert time.monotonic() - started < 10


def test_chunked_and_lying_bodies_are_answered(serve_address: tuple[str, int]) -> None:
    """Held by the rewrite: a chunked body is read like a sized one; a negative or huge length is a 4xx answer."""
    body = b'{"hook": "patient-view", "hookInstance": "x", "prefetch": {}}'
    sized, chunked = _exchange(serve_address, _post(body)), _exchange(serve_address, _post(body, chunked=True))
    assert _status(sized) == _status(chunked) == 412, (sized[:300], chunked[:300])
    for length in ("-5", "99999999999"):
        answer = _exchange(serve_address, _post(b"", length=length))
        assert _status(answer) in (400, 413), answer[:300]


# ---------------------------------------------------------------------------------------------------------------
# Finding 10 (medium-low): ids of outputs for a note without an id change on every run
# ---------------------------------------------------------------------------------------------------------------


def test_ids_of_an_id_less_note_are_the_same_on_every_run(tiny_plugin: Plugin) -> None:
    note = document_reference(DIABETES)
    del note["id"]
    runs = [[r["id"] for r in tiny_plugin.predict([note]).resources()] for _ in range(2)]
    assert runs[0] and runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------------------------
# Finding 11 (low): generated identities collide with input identities an input can choose
# ---------------------------------------------------------------------------------------------------------------


def test_an_input_fullurl_equal_to_a_generated_one_does_not_duplicate_it(tiny_plugin: Plugin) -> None:
    device = _uuid("Device", tiny_plugin.manifest_sha256)
    note = document_reference(DIABETES, encounter=None)
    del note["id"]
    result = tiny_plugin.predict(_tx((f"urn:uuid:{device}", note)))
    bundle = result.to_fhir("transaction")
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls)), urls


def test_an_input_id_equal_to_a_generated_id_is_not_put_twice(tiny_plugin: Plugin) -> None:
    card = _uuid("DocumentReference", "model-card", tiny_plugin.manifest_sha256)
    result = tiny_plugin.predict(
        _tx(("urn:uuid:33333333-3333-3333-3333-333333333333", document_reference(DIABETES, id_=card)))
    )
    puts = [e["request"]["url"] for e in result.to_fhir("transaction")["entry"] if e["request"]["method"] == "PUT"]
    assert len(puts) == len(set(puts)), puts


# ---------------------------------------------------------------------------------------------------------------
# Finding 12 (low): unsent input resources are copied into the output transaction unchecked
# ---------------------------------------------------------------------------------------------------------------


def test_an_invalid_unsent_patient_is_reported_not_copied(tiny_plugin: Plugin) -> None:
    from tests.fhir_tools import errors, validate_resources

    patient = {"resourceType": "Patient", "id": "p3", "gender": "bogus"}
    note = document_reference(DIABETES, patient="urn:uuid:11111111-1111-1111-1111-111111111111", encounter=None)
    result = tiny_plugin.predict(
        _tx(
            ("urn:uuid:11111111-1111-1111-1111-111111111111", patient),
            ("urn:uuid:22222222-2222-2222-2222-222222222222", note),
        )
    )
    assert result.predictions
    bundle = result.to_fhir("transaction")
    (found,) = validate_resources([bundle])
    assert errors(found) == [] or any("gender" in " ".join(i.expression) for i in result.issues), errors(found)


# ---------------------------------------------------------------------------------------------------------------
# Finding 13 (low): a decode error after a UTF-8 byte order mark names the wrong byte and offset
# ---------------------------------------------------------------------------------------------------------------


def test_a_bad_byte_after_a_bom_is_named_with_its_offset() -> None:
    note = document_reference("x")
    note["content"][0]["attachment"]["data"] = base64.b64encode(b"\xef\xbb\xbfabc\xff").decode()
    issues = [i.diagnostics for i in read_fhir(note, resource_types=TYPES).issues if i.code == "invalid"]
    assert any("0xff at byte offset 6" in d for d in issues), issues


# ---------------------------------------------------------------------------------------------------------------
# Finding 14 (low): NDJSON of one good line and one broken line loses the good one
# ---------------------------------------------------------------------------------------------------------------


def test_ndjson_with_one_bad_line_still_reads_the_good_line() -> None:
    text = json.dumps(document_reference(DIABETES)) + "\noops\n"
    result = read_fhir(text, resource_types=TYPES)
    assert len(result.sources) == 1
    assert [i.source for i in result.issues if i.is_error] == ["input:2"]


# ---------------------------------------------------------------------------------------------------------------
# Finding 15 (low): contained inside contained (dom-2) is read silently and its text dropped without an issue
# ---------------------------------------------------------------------------------------------------------------


def test_contained_inside_contained_is_reported() -> None:
    nested = {
        "resourceType": "Observation",
        "id": "o",
        "status": "final",
        "code": {"text": "z"},
        "valueString": "asthma",
    }
    inner = {
        "resourceType": "DiagnosticReport",
        "id": "i",
        "status": "final",
        "code": {"text": "y"},
        "conclusion": DIABETES,
        "contained": [nested],
    }
    outer = {
        "resourceType": "DiagnosticReport",
        "id": "dr",
        "status": "final",
        "code": {"text": "x"},
        "contained": [inner],
    }
    result = read_fhir(outer, resource_types=TYPES)
    assert any(i.is_error and "contained" in " ".join(i.expression) for i in result.issues), result.issues


# ---------------------------------------------------------------------------------------------------------------
# Finding 16 (low): a TypeError inside the caller's own iterator is blamed on the argument's type
# ---------------------------------------------------------------------------------------------------------------


def test_a_failing_generator_is_not_called_a_non_iterable(tiny_plugin: Plugin) -> None:
    def inputs() -> Iterator[tuple[str, Any]]:
        yield "a", document_reference(DIABETES)
        raise TypeError("the caller's own bug")

    with pytest.raises(Exception) as caught:
        tiny_plugin.predict_many(inputs())
    assert "must be an iterable" not in str(caught.value), caught.value


# ---------------------------------------------------------------------------------------------------------------
# Finding 17 (low): an id of 65 characters (R4 allows 64) is read, and every output loses its link to the note
# ---------------------------------------------------------------------------------------------------------------


def test_a_65_character_id_is_an_input_error(tiny_plugin: Plugin) -> None:
    result = tiny_plugin.predict(document_reference(DIABETES, id_="a" * 65))
    assert not result.predictions
    assert any(i.is_error and i.expression == ("DocumentReference.id",) for i in result.issues), result.issues


# ===============================================================================================================
# Attacks that held (regression tests)
# ===============================================================================================================


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("CRLF NDJSON", "{a}\r\n{b}\r\n"),
        ("no final newline", "{a}\n{b}"),
        ("a million empty lines", "{a}" + "\n" * 1_000_000 + "{b}"),
    ],
)
def test_ndjson_line_endings(name: str, data: str) -> None:
    a, b = (json.dumps(document_reference(DIABETES, id_=i)) for i in ("n1", "n2"))
    result = read_fhir(data.replace("{a}", a).replace("{b}", b).encode(), resource_types=TYPES)
    assert [s.reference for s in result.sources] == ["DocumentReference/n1", "DocumentReference/n2"], name
    assert not any(i.is_error for i in result.issues)


@pytest.mark.parametrize(
    ("content_type", "data", "read"),
    [
        ("text/plain; charset=utf-8", base64.b64encode(DIABETES.encode()).decode().rstrip("="), False),  # no padding
        ("text/plain; charset=utf-8", base64.urlsafe_b64encode(b"\xff\xfe?>>>").decode(), False),  # URL-safe
        ("text/plain; charset=utf-8", " \n".join(base64.b64encode(DIABETES.encode()).decode()), True),  # whitespace
        ('text/plain; charset="UTF-8"', base64.b64encode(DIABETES.encode()).decode(), True),
        ("text/plain; CHARSET=latin1", base64.b64encode("café".encode("latin-1")).decode(), True),
        ("text/plain; charset=utf-7", base64.b64encode(b"+ADw-script+AD4-").decode(), False),
        ("text/plain; charset=utf-16le", base64.b64encode("hello".encode("utf-16-le") + b"\x00").decode(), False),
    ],
)
def test_odd_attachments_are_read_or_reported(content_type: str, data: str, read: bool) -> None:
    note = document_reference("x")
    note["content"][0]["attachment"] = {"contentType": content_type, "data": data}
    result = read_fhir(note, resource_types=TYPES)
    assert bool(result.sources) is read
    if not read:
        assert any(
            i.is_error and i.expression[0].endswith(("attachment.data", "attachment.contentType", "attachment"))
            for i in result.issues
        )
    else:
        assert result.sources[0].text in (DIABETES, "café")


@pytest.mark.parametrize(
    ("name", "resource", "code"),
    [
        ("Cyrillic look-alike", {"resourceType": "DocumentReferen\u0441e", "id": "x"}, "invalid"),
        ("fullwidth letter", {"resourceType": "\uff24ocumentReference", "id": "x"}, "invalid"),
        ("id with a slash", document_reference(DIABETES, id_="a/b"), "invalid"),
        ("unicode id", document_reference(DIABETES, id_="\u00e9"), "invalid"),
        ("reference not a string", {**document_reference(DIABETES), "subject": {"reference": 42}}, "structure"),
        (
            "valueString an object",
            {
                "resourceType": "Observation",
                "id": "o",
                "status": "final",
                "code": {"text": "x"},
                "valueString": {"a": 1},
            },
            "structure",
        ),
        ("contentType with CRLF", {**document_reference(DIABETES, content_type="text/plain\r\nX: y")}, "invalid"),
    ],
)
def test_hostile_resources_are_one_clear_issue(name: str, resource: dict[str, Any], code: str) -> None:
    result = read_fhir(resource, resource_types=TYPES)
    assert not result.sources, name
    assert code in {i.code for i in result.issues if i.is_error}, result.issues


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1" * 40])
def test_numbers_fhir_cannot_hold_are_errors_for_their_resource(literal: str) -> None:
    good = json.dumps(document_reference(DIABETES, id_="ok"))
    bad = (
        json.dumps(document_reference(DIABETES, id_="bad"))[:-1]
        + f', "extension": [{{"url": "http://x", "valueDecimal": {literal}}}]}}'
    )
    result = read_fhir(f"{good}\n{bad}\n", resource_types=TYPES)
    assert [s.reference for s in result.sources] == ["DocumentReference/ok"]
    assert [i.code for i in result.issues if i.is_error] == ["value"]


@pytest.mark.parametrize(("depth", "too_deep"), [(100, False), (101, True)])
def test_nesting_at_the_depth_limit(depth: int, too_deep: bool) -> None:
    # The resource is level 1; an extension array opens level 2: depth - 1 arrays reach `depth`.
    text = (
        json.dumps(document_reference(DIABETES))[:-1] + ', "extension": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    )
    issues = read_fhir(text, resource_types=TYPES).issues
    said_deep = any("nested more than 100 levels" in i.diagnostics for i in issues)
    assert said_deep is too_deep


@pytest.mark.parametrize(
    "markup",
    [
        "<a " + "=" * 200_000,
        "<script>" + "<!--<script>" * 20_000,
        "<textarea>" + "&amp" * 50_000,
        "&#" + "1" * 200_000,
        "&notin" * 30_000,
        "<template>" * 20_000 + "x",
        "<1" * 200_000,
        "</a" * 100_000,
        "&;" * 200_000,
    ],
)
def test_html_edge_cases_stay_linear(markup: str) -> None:
    from fhirplug.fhir._html import html_to_text

    started = time.perf_counter()
    html_to_text(markup)
    html_to_text(markup + markup)
    assert time.perf_counter() - started < 2.0


def test_plaintext_inside_a_template_stays_inert() -> None:
    from fhirplug.fhir._html import html_to_text

    text, _, _ = html_to_text("<p>seen</p><template><plaintext>hidden <b>x</b>")
    assert text.strip() == "seen"


def test_same_text_in_two_resources_gives_two_prediction_ids(tiny_plugin: Plugin) -> None:
    result = tiny_plugin.predict([document_reference(DIABETES, id_="a"), document_reference(DIABETES, id_="b")])
    ids = [r["id"] for r in result.resources() if r["resourceType"] == "RiskAssessment"]
    assert len(ids) == 2 and len(set(ids)) == 2


def test_eight_threads_of_huge_and_tiny_inputs_answer_every_tiny_one_as_serial(tiny_bundle: Path) -> None:
    plugin = load_plugin(
        tiny_bundle,
        allow_unsigned=True,
        variant="fp32",
        provider="cpu",
        budget=Budget(max_windows_in_flight=16, chunk_windows=8),
    )
    tiny = [document_reference(f"{DIABETES} visit {i}", id_=f"t{i}") for i in range(8)]
    huge = document_reference("asthma wheeze " * 3_000, id_="huge")
    serial = [[(p.label, round(p.probability, 5)) for p in plugin.predict(t).predictions] for t in tiny]
    answers: dict[int, Any] = {}

    def work(i: int) -> None:
        plugin.predict(huge)
        answers[i] = [(p.label, round(p.probability, 5)) for p in plugin.predict(tiny[i]).predictions]

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread never finished"
    assert [answers[i] for i in range(8)] == serial
    assert plugin.gate.peak <= 16 and plugin.gate.held == 0


def test_predict_files_on_a_directory_is_one_issue(tiny_plugin: Plugin, tmp_path: Path) -> None:
    (issue,) = tiny_plugin.predict_files([tmp_path]).issues
    assert issue.is_error and issue.code == "not-found"


def test_a_generator_raising_its_own_error_passes_it_through(tiny_plugin: Plugin) -> None:
    def inputs() -> Iterator[tuple[str, Any]]:
        yield "a", "{}"
        raise KeyError("mine")

    with pytest.raises(KeyError):
        tiny_plugin.predict_many(inputs())
    with pytest.raises(UsageError):
        tiny_plugin.predict_many(42)


def test_a_lone_surrogate_in_a_copied_display_is_refused_before_output(tiny_plugin: Plugin, tmp_path: Path) -> None:
    note = document_reference(DIABETES)
    note["subject"]["display"] = "\udc00"
    result = tiny_plugin.predict(note)
    assert not result.predictions and result.has_errors
    out = tmp_path / "out.ndjson"
    path = tmp_path / "note.json"
    path.write_text(json.dumps(note))
    cli = _cli(["predict", TINY, "--allow-unsigned", str(path), "--format", "ndjson", "-o", str(out)])
    assert cli.exit_code == 4, cli.output
    assert cli.exception is None or isinstance(cli.exception, SystemExit), cli.exception


# --- bundles -----------------------------------------------------------------------------------------------------


@pytest.fixture
def first_party(tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "medical-abstracts-mesh"
    shutil.copytree(Path(__file__).parents[2] / "plugins" / "medical-abstracts-mesh" / "bundle", target)
    return target


def test_a_pinned_manifest_next_to_other_model_bytes_fails_on_hashes(first_party: Path) -> None:
    from fhirplug.bundle import verify_bundle
    from fhirplug.errors import IntegrityError

    model = first_party / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.int8\.onnx"):
        verify_bundle(first_party)


def test_a_first_party_name_with_other_content_is_not_pin_trusted(first_party: Path) -> None:
    from fhirplug.bundle import verify_bundle
    from fhirplug.errors import SignatureError

    manifest = first_party / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": "', '"version": "9', 1))
    with pytest.raises(SignatureError, match="not the first-party bundle"):
        verify_bundle(first_party)
    assert verify_bundle(first_party, allow_unsigned=True).trusted_by == "unsigned"


@pytest.mark.parametrize("garbage", [b"\n\nAAAA", b"!!", b" trailing"])
def test_a_signature_with_trailing_garbage_is_refused(tiny_bundle: Path, garbage: bytes, tmp_path: Path) -> None:
    from fhirplug.bundle import generate_keypair, verify_bundle, write_manifest
    from fhirplug.errors import SignatureError

    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(key, pub)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    variants = [{k: v for k, v in var.items() if k != "sha256"} for var in manifest.pop("variants")]
    manifest.pop("files")
    write_manifest(tiny_bundle, manifest, variants=variants, signing_key=key)
    assert verify_bundle(tiny_bundle, trusted_keys=[pub]).trusted_by == "key"
    sig = tiny_bundle / "manifest.sig"
    sig.write_bytes(sig.read_bytes().strip() + garbage)
    with pytest.raises(SignatureError):
        verify_bundle(tiny_bundle, trusted_keys=[pub])


def test_a_key_file_that_is_a_fifo_is_refused_without_blocking(tiny_bundle: Path, tmp_path: Path) -> None:
    from fhirplug.bundle import verify_bundle
    from fhirplug.errors import SignatureError

    fifo = tmp_path / "key.pub"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(SignatureError, match="not a regular file"):
        verify_bundle(tiny_bundle, trusted_keys=[fifo])
    assert time.monotonic() - started < HANG_S


def test_a_manifest_declaring_paths_outside_the_bundle_is_refused(tiny_bundle: Path) -> None:
    from fhirplug.bundle import verify_bundle
    from fhirplug.errors import ManifestError

    manifest = tiny_bundle / "manifest.json"
    original = manifest.read_text()
    for name in ("../tokenizer.json", "/etc/passwd", "a/../../x", "README.md\\..\\x"):
        data = json.loads(original)
        data["files"][name] = "0" * 64
        manifest.write_text(json.dumps(data))
        with pytest.raises(ManifestError):
            verify_bundle(tiny_bundle, allow_unsigned=True)


def test_a_bundle_reached_through_a_symlink_loads_and_a_linked_file_does_not(tiny_bundle: Path, tmp_path: Path) -> None:
    from fhirplug.bundle import verify_bundle
    from fhirplug.errors import IntegrityError

    link = tmp_path / "via-link"
    link.symlink_to(tiny_bundle, target_is_directory=True)
    assert verify_bundle(link, allow_unsigned=True).manifest.name == "tiny-notes"
    readme = tiny_bundle / "README.md"
    (tmp_path / "README.md").write_bytes(readme.read_bytes())
    readme.unlink()
    readme.symlink_to(tmp_path / "README.md")
    with pytest.raises(IntegrityError, match="symbolic link"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_changing_the_files_after_verify_does_not_change_what_loads(tiny_bundle: Path) -> None:
    from fhirplug.bundle import verify_bundle
    from fhirplug.plugin import Plugin as Loaded

    bundle = verify_bundle(tiny_bundle, allow_unsigned=True)
    (tiny_bundle / "tokenizer.json").write_text("{}")
    (tiny_bundle / "model.fp32.onnx").write_bytes(b"not a model")
    plugin = Loaded(bundle, variant="fp32", provider="cpu")
    assert [p.label for p in plugin.predict(document_reference(DIABETES)).predictions] == ["diabetes"]


# --- CLI ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["predict"], 2),
        (["predict", TINY], 2),
        (["verify", "/no/such/bundle"], 3),
        (["inspect", "/no/such/bundle"], 3),
        (["bench", TINY, "--batch", "0"], 2),
        (["bench", TINY, "--batch", "x"], 2),
        (["bench", TINY, "--duration", "0"], 2),
        (["demo", "-o", "."], 2),
        (["serve", TINY, "--port", "70000"], 2),
    ],
)
def test_cli_odd_arguments_are_one_line_with_the_documented_code(args: list[str], code: int) -> None:
    result = _cli(args)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_cli_serve_on_a_used_port_is_one_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli(["serve", TINY, "--allow-unsigned", "--bearer-token-file", str(token), "--port", str(port)])
    assert result.exit_code == 1 and "cannot listen" in result.output, result.output
