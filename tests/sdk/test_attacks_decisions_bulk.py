"""Attacks on bulk scoring, abstention, occlusion explanations and abbreviation finding (each one a finding that
was fixed: a traceback, a file read from outside an export, a silent wrong answer, or quadratic time)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from numpy.lib import format as npy_format

from fhirplug import load_plugin
from fhirplug._abbrev import abbreviations, find_abbreviations
from fhirplug._abstain import Abstainer
from fhirplug._explain import split_sentences
from fhirplug.bulk import _local as bulk_local
from fhirplug.bulk import score
from fhirplug.bundle import write_manifest
from fhirplug.errors import PluginError, TaskError, UsageError
from tests.conftest import TINY_PLUGIN

WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TINY = str(TINY_PLUGIN)


def _note(i: int, text: str = "Type 2 diabetes on metformin. Asthma with wheezing.") -> str:
    resource = {
        "resourceType": "DocumentReference",
        "id": f"n{i}",
        "status": "current",
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
    }
    return json.dumps(resource, separators=(",", ":")) + "\n"


def _score(inputs: list[Path], out: Path, **kwargs: Any) -> Any:
    return score(TINY, [str(i) for i in inputs], str(out), allow_unsigned=True, transaction_time=WHEN, **kwargs)


def _outcomes(out: Path) -> list[dict[str, Any]]:
    path = out / "OperationOutcome.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _export(folder: Path, url: str) -> Path:
    folder.mkdir()
    manifest = {
        "transactionTime": "2024-01-01T00:00:00Z",
        "request": "x",
        "output": [{"type": "DocumentReference", "url": url}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# --- bulk: hostile lines and export manifests --------------------------------------------------------------------


def test_a_deeply_nested_line_is_one_outcome_and_the_good_lines_are_scored(tmp_path: Path) -> None:
    """Was: RecursionError out of ``json.loads`` in the type peek, killing the whole run."""
    path = tmp_path / "notes.ndjson"
    path.write_text(_note(1) + "[" * 100_000 + "]" * 100_000 + "\n" + _note(2))
    result = _score([path], tmp_path / "out")
    assert result.notes == 2 and result.error_lines == 1
    [outcome] = _outcomes(tmp_path / "out")
    assert outcome["issue"][0]["severity"] == "error"
    assert f"{path}:2" in json.dumps(outcome)


def test_an_export_url_with_an_encoded_slash_cannot_read_outside_the_export(tmp_path: Path) -> None:
    """Was: ``…/..%2Fsecret.ndjson`` unquoted to ``../secret.ndjson`` and the file beside the export was scored."""
    (tmp_path / "secret.ndjson").write_text(_note(1))
    export = _export(tmp_path / "export", "https://fhir.example/files/..%2Fsecret.ndjson")
    with pytest.raises(UsageError, match="does not end in a file name in the export folder"):
        _score([export], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_file_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """Was: a link named like the export's file was followed wherever it pointed."""
    (tmp_path / "secret.ndjson").write_text(_note(1))
    export = _export(tmp_path / "export", "https://fhir.example/files/DocumentReference.ndjson")
    os.symlink(tmp_path / "secret.ndjson", export / "DocumentReference.ndjson")
    with pytest.raises(UsageError, match="is a symbolic link"):
        _score([export], tmp_path / "out")


def test_an_export_file_that_is_a_fifo_is_named_as_such(tmp_path: Path) -> None:
    """Was: "does not exist; download the export first" for a pipe that does exist."""
    export = _export(tmp_path / "export", "DocumentReference.ndjson")
    os.mkfifo(export / "DocumentReference.ndjson")
    with pytest.raises(UsageError, match="not a regular file"):
        _score([export], tmp_path / "out")


@pytest.mark.parametrize("as_folder", [True, False])
def test_a_deeply_nested_export_manifest_is_a_usage_error(tmp_path: Path, as_folder: bool) -> None:
    """Was: RecursionError from the manifest (folder) or from the look at a ``.json`` input."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    if as_folder:
        with pytest.raises(UsageError, match="nested too deeply"):
            _score([folder], tmp_path / "out")
    else:  # a .json file that is no manifest is read as NDJSON: its one line is an error, the run completes
        result = _score([folder / "manifest.json"], tmp_path / "out")
        assert result.error_lines == 1


def test_an_oversized_export_manifest_is_refused_unread(tmp_path: Path) -> None:
    """Was: read whole into memory whatever its size."""
    export = _export(tmp_path / "export", "DocumentReference.ndjson")
    (export / "DocumentReference.ndjson").write_text(_note(1))
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["padding"] = "x" * (17 * 1024 * 1024)
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="manifest is over"):
        _score([export], tmp_path / "out")


# --- bulk: files that change, folders that cannot be written -----------------------------------------------------


def test_an_input_that_changes_after_hashing_is_refused_not_scored_as_other_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the run recorded one sha256 in manifest.json and scored the appended/rewritten bytes silently."""
    path = tmp_path / "notes.ndjson"
    path.write_text(_note(1) + _note(2))
    real = bulk_local.iter_chunks

    def writer_appends_then_reads(file: Any, wanted: Any, limit: int) -> Any:
        with path.open("a") as handle:  # another process still writing the export
            handle.write(_note(3, "Hypertension on lisinopril."))
        return real(file, wanted, limit)

    monkeypatch.setattr(bulk_local, "iter_chunks", writer_appends_then_reads)
    with pytest.raises(UsageError, match="changed during the run"):
        _score([path], tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.undo()
    result = _score([path], tmp_path / "out2")  # once whole, it scores, hashed as it is
    assert result.notes == 3


def test_an_io_error_while_finishing_is_one_line_and_the_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """Was: a bare OSError traceback (a full disk does the same: ENOSPC in the merge or the manifest)."""
    path = tmp_path / "notes.ndjson"
    path.write_text("".join(_note(i) for i in range(6)))
    clean = _score([path], tmp_path / "clean", chunk_lines=2)
    out = tmp_path / "out"
    (out / ".fhirplug-score").mkdir(parents=True)
    (out / ".fhirplug-score" / "merge").write_text("in the way")  # the merge folder cannot be made
    with pytest.raises(UsageError, match=r"I/O error.*re-run the same command to resume"):
        _score([path], out, chunk_lines=2)
    (out / ".fhirplug-score" / "merge").unlink()
    resumed = _score([path], out, chunk_lines=2)
    assert resumed.resumed_chunks == 3
    for name in ("RiskAssessment.ndjson", "Provenance.ndjson", "manifest.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert clean.counts == resumed.counts


def test_a_manifest_left_half_written_by_a_kill_is_cleaned_up(tmp_path: Path) -> None:
    """Was: ``.manifest.json.PID.tmp`` of a run killed while writing its manifest stayed in --out for good."""
    path = tmp_path / "notes.ndjson"
    path.write_text(_note(1))
    out = tmp_path / "out"
    (out / ".fhirplug-score").mkdir(parents=True)
    (out / ".manifest.json.4242.tmp").write_text('{"transactionTi')
    _score([path], out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".fhirplug-score"]


# --- abstention file: declared sizes ----------------------------------------------------------------------------


def _declared_npz(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """An .npz whose .npy headers declare ``shapes`` but hold almost no data (a few bytes compress to this)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, shape in shapes.items():
            header = io.BytesIO()
            npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", header.getvalue() + b"\0" * 64)
    return buffer.getvalue()


def test_an_abstention_file_declaring_terabytes_is_refused_before_allocation() -> None:
    """Was: MemoryError ("Unable to allocate 3.64 TiB") out of np.load: the header sizes the array."""
    data = _declared_npz({"whitening": (10**6, 10**6), "means": (1, 10**6)})
    with pytest.raises(TaskError, match="declare more than"):
        Abstainer.from_bytes(data, "abstention.npz", 1.0)


def test_a_negative_declared_dimension_or_a_repeated_member_is_refused() -> None:
    """Was: a member declaring shape (2**40, -1) added a negative size to the declared total, and a second member
    of the same name (the one np.load reads) passed the check: MemoryError (2 TiB) out of np.load."""
    import warnings

    negative = _declared_npz({"whitening": (2**40, -1), "means": (1, 2)})
    with pytest.raises(TaskError, match=r"declares shape \(1099511627776, -1\)"):
        Abstainer.from_bytes(negative, "abstention.npz", 1.0)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it writes
        for shape in ((2**40, -1), (2, 2)):
            header = io.BytesIO()
            npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            archive.writestr("whitening.npy", header.getvalue() + b"\0" * 16)
    with pytest.raises(TaskError, match="repeats a member name"):
        Abstainer.from_bytes(buffer.getvalue(), "abstention.npz", 1.0)


def test_a_bundle_with_such_an_abstention_file_fails_to_load_with_one_error(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(TINY_PLUGIN, bundle)
    (bundle / "abstention.npz").write_bytes(_declared_npz({"whitening": (10**6, 10**6), "means": (3, 10**6)}))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").unlink()
    manifest["calibration"]["abstention"] = {"file": "abstention.npz", "threshold": 3.0}
    variants = [{k: v for k, v in variant.items() if k != "sha256"} for variant in manifest.pop("variants")]
    for variant in variants:
        variant["output_names"] = ["logits", "embedding"]
    manifest.pop("files")
    write_manifest(bundle, manifest, variants=variants)
    with pytest.raises(PluginError, match="declare more than"):
        load_plugin(bundle, allow_unsigned=True)


# --- occlusion and abbreviations: linear time ----------------------------------------------------------------------


def test_sentence_splitting_of_a_run_of_marks_without_a_space_is_linear() -> None:
    """Was: quadratic backtracking: 8,000 dots took 1.6 s, the 20,000 a note may have about 10 s."""
    started = time.perf_counter()
    spans = split_sentences("." * 20_000 + "x")
    assert time.perf_counter() - started < 0.5
    assert spans == [(0, 20_001)]
    assert split_sentences("Stop... Go?! x.y e.g.x (ok.) end") == [(0, 7), (8, 12), (13, 28), (29, 32)]


def test_abbreviations_of_a_long_sentence_with_many_parentheses_are_linear() -> None:
    """Was: each parenthesis re-read its sentence from its start: 8,000 × "word (ab) " took 27 s (20,000: minutes)."""
    started = time.perf_counter()
    found = find_abbreviations("word (xy) " * 20_000)
    assert time.perf_counter() - started < 5
    assert found == []  # no "x" before any of them to start "xy" (an earlier "(xy)" is no long form of it)
    started = time.perf_counter()
    defined = abbreviations("Heart failure (HF) " * 10_000 + "HF")
    assert time.perf_counter() - started < 5
    assert defined == {"HF": "Heart failure"}


def test_abbreviations_of_deeply_nested_parentheses_are_linear() -> None:
    """Was: each of the 300,000 "(" searched to the one ")" at the end again (quadratic)."""
    started = time.perf_counter()
    assert [a.long_form for a in find_abbreviations("(" * 300_000 + " Heart failure (HF))")] == ["Heart failure"]
    assert find_abbreviations("(" * 1_000_000) == []
    assert time.perf_counter() - started < 2
