"""``fhirplug score``: bulk NDJSON scoring, resumable, local engine (tests/sdk/test_bulk_spark.py: Spark)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fhirplug.bulk import score
from fhirplug.cli import main
from tests.conftest import FIXTURES, REPO, TINY_PLUGIN

EXPORT = FIXTURES / "bulk" / "export"
WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TINY = str(TINY_PLUGIN)
SENTENCES = [
    "Patient seen in clinic today. Type 2 diabetes, elevated HbA1c on metformin.",
    "Follow up visit for high blood pressure; hypertension on lisinopril.",
    "Uses albuterol inhaler for asthma with wheezing.",
    "Routine visit. No complaints. Vitals normal.",
]


def _note(i: int, text: str, padding: int = 0) -> str:
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": f"n{i}",
        "status": "current",
        "subject": {"reference": f"Patient/p{i % 7}"},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
    }
    if padding:  # bytes the reader parses and validates but the model never reads
        resource["description"] = "x" * padding
    return json.dumps(resource, separators=(",", ":")) + "\n"


def _notes(path: Path, n: int, padding: int = 0, start: int = 0) -> Path:
    with path.open("w") as handle:
        for i in range(start, start + n):
            handle.write(_note(i, SENTENCES[i % len(SENTENCES)], padding))
    return path


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file a run leaves for its user (the state folder aside)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _ndjson(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _coded(out: Path) -> set[tuple[str, str]]:
    """(note reference, code) of every RiskAssessment written."""
    return {
        (r["basis"][0]["reference"], r["prediction"][0]["outcome"]["coding"][0]["code"])
        for r in _ndjson(out / "RiskAssessment.ndjson")
    }


#: The ``fhirplug`` console script, run by this interpreter.
FHIRPLUG = [sys.executable, "-c", "import sys; from fhirplug.cli import main; sys.exit(main())"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FHIRPLUG, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_export_with_manifest_bad_line_gzip_and_skipped_types(tmp_path: Path) -> None:
    from fhirplug import load_plugin

    tiny_plugin = load_plugin(TINY, allow_unsigned=True)  # the variant score() picks (auto: int8 on the CPU)
    out = tmp_path / "out"
    result = score(TINY, [EXPORT, EXPORT / "Mixed.ndjson"], out, allow_unsigned=True, transaction_time=WHEN)

    # The malformed line 6 is reported with its file and line number; every other note is scored.
    outcomes = _ndjson(out / "OperationOutcome.ndjson")
    where = sorted(o["issue"][0]["diagnostics"].split(": ", 1)[0] for o in outcomes)
    assert where == [f"{EXPORT / 'DocumentReference.ndjson'}:6", f"{EXPORT / 'Mixed.ndjson'}:3"]
    assert outcomes[0]["issue"][0]["code"] == "structure" and outcomes[1]["issue"][0]["code"] == "code-invalid"
    assert result.error_lines == 2

    # Bulk output equals predicting each good line on its own: nothing lost, nothing added.
    expected: set[tuple[str, str]] = set()
    files = [EXPORT / "DocumentReference.ndjson", EXPORT / "Mixed.ndjson"]
    lines = [line for f in files for line in f.read_text().splitlines()]
    lines += gzip.decompress((EXPORT / "Condition.ndjson.gz").read_bytes()).decode().splitlines()
    for line in lines:
        if line.strip() and '"broken"' not in line and "bogus" not in line:
            found = tiny_plugin.predict(line)
            expected |= {(p.evidence.reference, p.code) for p in found.predictions}
    assert {ref for ref, _ in expected} >= {"DocumentReference/note-0", "Condition/cond-0"}  # gzip file scored
    assert _coded(out) == expected
    provenance = _ndjson(out / "Provenance.ndjson")
    assert len(provenance) == len({ref for ref, _ in expected})  # one Provenance per note with predictions
    assert len(_ndjson(out / "Device.ndjson")) == 1

    # Types the plugin does not read are skipped with a count: a whole file by its manifest type, a line by its own.
    assert result.skipped == {"Encounter": 1, "Patient": 3}
    assert result.no_text == {"Condition": 2}
    manifest = json.loads((out / "manifest.json").read_text())
    about = manifest["extension"]["fhirplug"]
    by_file = {Path(i["file"]).name: i for i in about["inputs"]}
    assert list(by_file) == ["DocumentReference.ndjson", "Condition.ndjson.gz", "Patient.ndjson", "Mixed.ndjson"]
    assert by_file["Patient.ndjson"]["scored"] is False and by_file["Condition.ndjson.gz"]["type"] == "Condition"
    for name, entry in by_file.items():
        assert entry["sha256"] == hashlib.sha256((EXPORT / name).read_bytes()).hexdigest()
    assert about["plugin"]["manifestSha256"] == tiny_plugin.manifest_sha256
    assert manifest["transactionTime"] == "2024-05-01T12:00:00.000+00:00"
    counts = {o["type"]: o["count"] for o in manifest["output"]}
    assert counts["RiskAssessment"] == len(expected) and counts["Provenance"] == len(provenance)
    assert manifest["error"] == [{"type": "OperationOutcome", "url": "OperationOutcome.ndjson", "count": 2}]
    assert all(r["occurrenceDateTime"] == manifest["transactionTime"] for r in _ndjson(out / "RiskAssessment.ndjson"))

    # Running it again is idempotent: nothing redone, nothing changed.
    before = _outputs(out)
    again = score(TINY, [EXPORT, EXPORT / "Mixed.ndjson"], out, allow_unsigned=True)
    assert again.already_complete and _outputs(out) == before


def test_gzip_input_scores_like_the_plain_file(tmp_path: Path) -> None:
    plain = _notes(tmp_path / "DocumentReference.ndjson", 40)
    packed = tmp_path / "gz" / "DocumentReference.ndjson.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a = score(TINY, [plain], tmp_path / "a", allow_unsigned=True, transaction_time=WHEN, chunk_lines=7)
    b = score(TINY, [packed.parent], tmp_path / "b", allow_unsigned=True, transaction_time=WHEN, chunk_lines=7)
    assert a.notes == b.notes == 40 and a.predictions > 0
    for name in ("RiskAssessment.ndjson", "Provenance.ndjson", "Device.ndjson"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_line_over_the_byte_limit_is_reported_unread(tmp_path: Path) -> None:
    from fhirplug import Budget

    source = tmp_path / "notes.ndjson"
    source.write_text(_note(0, SENTENCES[0]) + _note(1, SENTENCES[1], padding=5000) + _note(2, SENTENCES[2]))
    result = score(TINY, [source], tmp_path / "out", allow_unsigned=True, budget=Budget(max_request_bytes=2000))
    (outcome,) = _ndjson(tmp_path / "out" / "OperationOutcome.ndjson")
    assert outcome["issue"][0]["code"] == "too-costly"
    assert outcome["issue"][0]["diagnostics"].startswith(f"{source}:2: the line is longer than 2,000 bytes")
    assert result.notes == 2 and {ref for ref, _ in _coded(tmp_path / "out")} == {
        "DocumentReference/n0",
        "DocumentReference/n2",
    }


def test_two_workers_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    source = _notes(tmp_path / "DocumentReference.ndjson", 120)
    one = score(TINY, [source], tmp_path / "one", allow_unsigned=True, transaction_time=WHEN, chunk_lines=9)
    two = score(TINY, [source], tmp_path / "two", allow_unsigned=True, transaction_time=WHEN, chunk_lines=9, workers=2)
    assert one.notes == two.notes == 120
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")


def test_killed_runs_resume_to_the_uninterrupted_bytes(tmp_path: Path) -> None:
    """SIGKILL at random moments (each after ≥ 1 committed chunk), re-run each time: the same bytes in the end."""
    source = _notes(tmp_path / "DocumentReference.ndjson", 160)
    args = [TINY, str(source), "--allow-unsigned", "--chunk-lines", "8", "--transaction-time", "2024-05-01T12:00:00Z"]
    clean = _cli("score", *args, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    chunks = 20
    out = tmp_path / "killed"
    journal = out / ".fhirplug-score" / "journal.ndjson"
    rng = random.Random(14)
    kills = 0
    for _ in range(4):
        committed = journal.read_bytes().count(b"\n") if journal.exists() else 0
        if committed >= chunks - 1:
            break
        # ≥ 1 chunk committed by this attempt, at most half of what is left, so the run is still going when killed
        wanted = committed + rng.randint(1, max(1, (chunks - 1 - committed) // 2))
        process = subprocess.Popen(
            [*FHIRPLUG, "score", *args, "--out", str(out)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if journal.exists() and journal.read_bytes().count(b"\n") >= wanted:
                time.sleep(rng.uniform(0, 0.05))  # not only right after a journal line
                break
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 2  # the test killed runs mid-way, not only finished ones
    resumed = _cli("score", *args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(out) == _outputs(tmp_path / "clean")
    assert len(_ndjson(out / "Provenance.ndjson")) == len(
        {r["basis"][0]["reference"] for r in _ndjson(out / "RiskAssessment.ndjson")}
    )


def test_memory_stays_flat_as_the_input_grows(tmp_path: Path) -> None:
    """Peak RSS of a run on 100 and on 1,000 notes (each line padded to ~10 KB: 1 MB and 10 MB of input).

    Tolerance 6 MB: the 10x input is 9 MB more bytes than the 1x, and writes ~4 MB more output, so an engine
    that held the input, the parsed lines or the outputs would grow by more than that; a streaming one grows by
    allocator noise only (measured: under 1 MB).
    """
    small = _notes(tmp_path / "small.ndjson", 100, padding=10_000)
    large = _notes(tmp_path / "large.ndjson", 1000, padding=10_000)
    probe = (
        "import resource, sys\n"
        "from fhirplug.cli import main\n"
        "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )

    def peak_kb(source: Path, out: Path) -> int:
        args = ["score", TINY, str(source), "--out", str(out), "--allow-unsigned", "--chunk-lines", "50"]
        run = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr
        return int(run.stderr.rsplit("PEAK ", 1)[1].split()[0])

    one, ten = peak_kb(small, tmp_path / "o1"), peak_kb(large, tmp_path / "o10")
    assert len(_ndjson(tmp_path / "o10" / "Provenance.ndjson")) > 500
    print(f"peak RSS {one} KB for 1x, {ten} KB for 10x")
    assert ten - one < 6 * 1024, f"peak RSS {one} KB for 1x, {ten} KB for 10x"


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    source = _notes(tmp_path / "DocumentReference.ndjson", 3)

    def one_line(args: list[str], code: int, says: str) -> None:
        result = runner.invoke(main, ["score", *args])
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert says in result.output

    one_line(
        [TINY, str(tmp_path / "missing.ndjson"), "--out", str(tmp_path / "o"), "--allow-unsigned"], 2, "no such file"
    )
    one_line([TINY, str(source), "--out", str(tmp_path / "o")], 3, "unsigned")
    one_line([TINY, str(source), "--out", str(source), "--allow-unsigned"], 2, "is a file, not a folder")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line([TINY, str(source), "--out", str(busy), "--allow-unsigned"], 2, "not empty")
    broken = tmp_path / "broken.ndjson.gz"
    broken.write_bytes(gzip.compress(source.read_bytes())[:-12])
    one_line([TINY, str(broken), "--out", str(tmp_path / "o2"), "--allow-unsigned"], 2, "cannot be read")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.ndjson"))


def test_a_folder_with_another_run_is_refused_unless_restarted(tmp_path: Path) -> None:
    from fhirplug.errors import UsageError

    a = _notes(tmp_path / "a.ndjson", 4)
    b = _notes(tmp_path / "b.ndjson", 6, start=100)
    out = tmp_path / "out"
    score(TINY, [a], out, allow_unsigned=True, transaction_time=WHEN)
    with pytest.raises(UsageError, match="holds a run of other inputs"):
        score(TINY, [b], out, allow_unsigned=True)
    with pytest.raises(UsageError, match=r"transactionTime 2024-05-01T12:00:00\.000"):
        score(TINY, [a], out, allow_unsigned=True, transaction_time=datetime(2025, 1, 1, tzinfo=UTC))
    again = score(TINY, [b], out, allow_unsigned=True, restart=True)
    assert again.notes == 6 and not again.already_complete
    notes = {ref for ref, _ in _coded(out)}  # b's notes only: a's outputs went with its run
    assert notes and notes <= {f"DocumentReference/n{i}" for i in range(100, 106)}


def _spans(out: Path) -> list[tuple[int, int]]:
    """(start, end) of the evidence span of every RiskAssessment written."""
    spans = []
    for resource in _ndjson(out / "RiskAssessment.ndjson"):
        (span,) = [e for e in resource["extension"] if e["url"].endswith("/evidence-span")]
        parts = {p["url"]: p for p in span["extension"]}
        spans.append((parts["start"]["valueInteger"], parts["end"]["valueInteger"]))
    return spans


def test_evidence_segments_zero_gives_window_evidence_and_is_part_of_the_run(tmp_path: Path) -> None:
    note = "Patient seen in clinic today. Type 2 diabetes, elevated HbA1c on metformin. Vitals normal."
    source = tmp_path / "notes.ndjson"
    source.write_text(_note(0, note))
    score(TINY, [source], tmp_path / "occluded", allow_unsigned=True, transaction_time=WHEN)
    result = score(TINY, [source], tmp_path / "window", allow_unsigned=True, transaction_time=WHEN, evidence_segments=0)
    assert result.predictions == 1
    # Occlusion finds the diabetes sentence; without it the evidence is the whole (one-window) note.
    assert _spans(tmp_path / "occluded") == [(30, 75)]
    assert _spans(tmp_path / "window") == [(0, len(note))]
    # The same codes and probabilities either way: only the evidence differs.
    assert _coded(tmp_path / "occluded") == _coded(tmp_path / "window")
    # A different evidence setting is a different run: resuming the folder with it is refused.
    from fhirplug.errors import UsageError

    with pytest.raises(UsageError, match="holds a run"):
        score(TINY, [source], tmp_path / "window", allow_unsigned=True, transaction_time=WHEN, evidence_segments=4)
    # The same effective setting is the same run: 1 occludes nothing, as 0 does; 8 is the default.
    again = score(TINY, [source], tmp_path / "window", allow_unsigned=True, transaction_time=WHEN, evidence_segments=1)
    assert again.already_complete
    kept = score(TINY, [source], tmp_path / "occluded", allow_unsigned=True, transaction_time=WHEN, evidence_segments=8)
    assert kept.already_complete
    refused = CliRunner().invoke(
        main,
        ["score", TINY, str(source), "--out", str(tmp_path / "cli"), "--allow-unsigned", "--evidence-segments", "-1"],
    )
    assert refused.exit_code == 2 and "--evidence-segments" in refused.output and "Traceback" not in refused.output
