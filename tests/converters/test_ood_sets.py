"""The out-of-domain text sets for abstention: the project's generic English, the held-out test fixture, the
per-plugin corpus samples, and the seeded script that cuts those samples (run here on fake corpora in tmp_path;
nothing reads ../shared)."""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tests.conftest import FIXTURES, REPO

DATA = REPO / "converters" / "fhirplug_convert" / "data"
CALIBRATION = DATA / "ood_english_calibration.jsonl"
EVALUATION = DATA / "ood_english_eval.jsonl"
OFF_DOMAIN = FIXTURES / "ood" / "off_domain.jsonl"
PLUGIN_SETS = {
    REPO / "plugins" / "medical-abstracts-mesh" / "ood" / "synthea-notes.jsonl": r"synthea-r4 \S+\.json",
    REPO / "plugins" / "synthea-conditions" / "ood" / "medical-abstracts.jsonl": r"medical-abstracts "
    r"medical_tc_test\.csv row \d+",
    REPO / "plugins" / "synthea-conditions" / "ood" / "bc5cdr-abstracts.jsonl": r"bc5cdr "
    r"CDR_TrainingSet\.PubTator\.txt PMID \d+",
}
# A sentence ends at . ! or ? before whitespace and a capital, digit or quote (the texts avoid "Dr."-style periods).
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_ood_sets", REPO / "plugins" / "make_ood_sets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


script = _load_script()


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        assert isinstance(row, dict) and set(row) == {"text", "source"}, f"{path.name}:{number}: {row!r}"
        assert isinstance(row["text"], str) and row["text"].strip() == row["text"] != "", f"{path.name}:{number}"
        assert isinstance(row["source"], str) and row["source"].strip(), f"{path.name}:{number}"
        rows.append(row)
    return rows


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def _length_class(text: str) -> str:
    words = len(text.split())
    if words >= 80:
        return "paragraph" if words <= 200 else "too long"
    sentences = len(_SENTENCE.split(text))
    return "short" if sentences == 1 else "medium" if sentences <= 4 else "long, not a paragraph"


@pytest.mark.parametrize(
    ("path", "at_least", "mix"),
    [
        (CALIBRATION, 200, {"short": 0.4, "medium": 0.4, "paragraph": 0.2}),
        (EVALUATION, 150, {"short": 0.4, "medium": 0.4, "paragraph": 0.2}),
        (OFF_DOMAIN, 40, {"short": 1.0}),
    ],
    ids=["calibration", "evaluation", "off-domain fixture"],
)
def test_generic_english_sizes_and_length_mix(path: Path, at_least: int, mix: dict[str, float]) -> None:
    rows = _rows(path)
    assert len(rows) >= at_least
    if path == OFF_DOMAIN:
        assert len(rows) == 40
    classes = Counter(_length_class(r["text"]) for r in rows)
    assert set(classes) == set(mix), classes
    for name, share in mix.items():
        assert classes[name] / len(rows) == pytest.approx(share, abs=0.02), classes
    assert all(r["source"].startswith("fhirplug-written ") for r in rows)
    assert len({_norm(r["text"]) for r in rows}) == len(rows), "a text occurs twice in the file"


def test_generic_english_topics_differ_between_calibration_and_evaluation() -> None:
    topics = [
        Counter(r["source"].removeprefix("fhirplug-written ") for r in _rows(p)) for p in (CALIBRATION, EVALUATION)
    ]
    assert len(topics[0]) >= 12 and len(topics[1]) >= 12
    assert "everyday health" in topics[0] and "everyday health" in topics[1]
    # The held-out set mostly covers topics calibration never saw.
    unseen = sum(n for topic, n in topics[1].items() if topic not in topics[0])
    assert unseen / sum(topics[1].values()) > 0.5


def test_no_text_or_sentence_shared_between_calibration_evaluation_and_fixture() -> None:
    sets = {path.name: _rows(path) for path in (CALIBRATION, EVALUATION, OFF_DOMAIN)}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            texts_a, texts_b = ({r["text"] for r in sets[n]} for n in (a, b))
            assert not texts_a & texts_b, (a, b)
            assert not {_norm(t) for t in texts_a} & {_norm(t) for t in texts_b}, (a, b)
            sentences_a, sentences_b = (
                {_norm(s) for t in texts for s in _SENTENCE.split(t)} for texts in (texts_a, texts_b)
            )
            assert not sentences_a & sentences_b, (a, b, sentences_a & sentences_b)


def test_fixture_holds_the_issue_examples() -> None:
    texts = {r["text"] for r in _rows(OFF_DOMAIN)}
    assert {"The weather is nice today.", "I feel fine.", "Please reset my password."} <= texts


def test_package_ships_the_generic_english() -> None:
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert package_data["package-data"]["fhirplug_convert"] == ["data/*.jsonl", "data/*.md"]
    assert (DATA / "README.md").is_file()


@pytest.mark.parametrize("path", list(PLUGIN_SETS), ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_plugin_ood_samples_as_committed(path: Path) -> None:
    rows = _rows(path)
    assert len(rows) == script.PER_SET
    assert path.stat().st_size < 1_000_000
    assert all(len(r["text"]) <= script.MAX_CHARS for r in rows)
    assert all(re.fullmatch(PLUGIN_SETS[path], r["source"]) for r in rows), "a source names no provenance"
    assert len({r["text"] for r in rows}) == len(rows)
    assert (path.parent / "README.md").is_file()


# ---- the script, on fake corpora -----------------------------------------------------------------------------------


def _note(i: int) -> str:
    return f"2020-01-{i % 28 + 1:02d}\n\n# Chief Complaint\nFake complaint number {i}.\n\n# Plan\nFollow up.\n"


def _attachment(text: str) -> dict[str, str]:
    return {"contentType": "text/plain; charset=utf-8", "data": base64.b64encode(text.encode()).decode()}


def _fake_corpora(root: Path, n: int) -> Path:
    """``root`` laid out like ../shared/data, with ``n`` distinct texts per corpus (and duplicates)."""
    bundles = root / "synthea-r4" / "bundles"
    bundles.mkdir(parents=True)
    for b in range(3):
        entries = []
        for i in range(b, n, 3):
            text = _note(i)  # like Synthea: every note twice, in a DocumentReference and a DiagnosticReport
            entries.append(
                {"resource": {"resourceType": "DocumentReference", "content": [{"attachment": _attachment(text)}]}}
            )
            entries.append({"resource": {"resourceType": "DiagnosticReport", "presentedForm": [_attachment(text)]}})
        entries.append({"resource": {"resourceType": "Patient", "id": "p"}})
        (bundles / f"state__{b}.json").write_text(json.dumps({"resourceType": "Bundle", "entry": entries}))
    abstracts = root / "medical-abstracts"
    abstracts.mkdir()
    with (abstracts / "medical_tc_test.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["condition_label", "medical_abstract"])
        for i in range(n):
            writer.writerow([i % 5 + 1, f"Abstract {i}, with a comma. It studies case {i}."])
        writer.writerow([1, "Abstract 0, with a comma. It studies case 0."])  # a multi-label duplicate
    pubtator = root / "bc5cdr" / "pubtator"
    pubtator.mkdir(parents=True)
    docs = [
        f"{1000 + i}|t|Title {i}.\n{1000 + i}|a|Abstract {i}.\n{1000 + i}\t0\t5\tTitle\tDisease\tD000001"
        for i in range(n)
    ]
    (pubtator / "CDR_TrainingSet.PubTator.txt").write_text("\n\n".join(docs) + "\n\n", encoding="utf-8")
    return root


def test_readers_decode_every_corpus(tmp_path: Path) -> None:
    data = _fake_corpora(tmp_path, 9)
    notes = script.read_synthea_notes(data / "synthea-r4" / "bundles")
    assert len(notes) == 18 and {r["text"] for r in notes} == {_note(i) for i in range(9)}
    assert notes[0]["source"] == "synthea-r4 state__0.json"
    rows = script.read_medical_abstracts(data / "medical-abstracts" / "medical_tc_test.csv")
    assert rows[3] == {
        "text": "Abstract 3, with a comma. It studies case 3.",
        "source": "medical-abstracts medical_tc_test.csv row 4",
    }
    docs = script.read_pubtator(data / "bc5cdr" / "pubtator" / "CDR_TrainingSet.PubTator.txt")
    assert docs[2] == {"text": "Title 2. Abstract 2.", "source": "bc5cdr CDR_TrainingSet.PubTator.txt PMID 1002"}


@pytest.mark.parametrize(
    ("sample", "where"),
    [
        ("sample_synthea_notes", "synthea-r4/bundles"),
        ("sample_medical_abstracts", "medical-abstracts/medical_tc_test.csv"),
        ("sample_pubtator", "bc5cdr/pubtator/CDR_TrainingSet.PubTator.txt"),
    ],
)
def test_sampling_is_seeded_and_deduplicated(tmp_path: Path, sample: str, where: str) -> None:
    source = _fake_corpora(tmp_path, 40) / where
    first, again = (getattr(script, sample)(source, n=20, seed=7) for _ in range(2))
    assert first == again
    assert getattr(script, sample)(source, n=20, seed=8).records != first.records
    assert len(first.records) == 20 and len({r["text"] for r in first.records}) == 20
    # All 40 distinct texts, duplicates dropped: drawing 40 works, 41 does not.
    assert len(getattr(script, sample)(source, n=40, seed=7).records) == 40
    with pytest.raises(script.OodSetError, match="40 distinct non-empty texts, 41 needed"):
        getattr(script, sample)(source, n=41, seed=7)


def test_main_writes_the_same_bytes_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _fake_corpora(tmp_path / "data", script.PER_SET + 30)
    outputs = []
    for run in ("a", "b"):
        assert script.main(["--data", str(data), "--plugins", str(tmp_path / run), "--seed", "3"]) == 0
        files = sorted((tmp_path / run).rglob("*.jsonl"))
        assert [f.relative_to(tmp_path / run).as_posix() for f in files] == [
            "medical-abstracts-mesh/ood/synthea-notes.jsonl",
            "synthea-conditions/ood/bc5cdr-abstracts.jsonl",
            "synthea-conditions/ood/medical-abstracts.jsonl",
        ]
        outputs.append([f.read_bytes() for f in files])
        assert all(len(_rows(f)) == script.PER_SET for f in files)
    assert outputs[0] == outputs[1]
    assert capsys.readouterr().out.count("wrote 300 texts (0 cut") == 6


def test_truncation_cuts_at_a_sentence_end() -> None:
    text = "One two three. " * 200  # 3,000 characters
    cut = script.truncate_at_sentence(text)
    assert len(cut) <= script.MAX_CHARS and cut.endswith("three.") and text.startswith(cut)
    assert len(cut) > script.MAX_CHARS - 20
    lines = "\n".join(f"- item {i}" for i in range(400))
    assert script.truncate_at_sentence(lines).endswith(tuple(f"item {i}" for i in range(400)))
    no_end = "word " * 600
    assert script.truncate_at_sentence(no_end) == ("word " * 400).strip()
    assert script.truncate_at_sentence("  Short text.  ") == "Short text."
    sampled = script._sample([{"text": text, "source": "s"}], 1, 0, "x")
    assert sampled.truncated == 1 and sampled.records[0]["text"] == cut


def test_bad_input_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert script.main(["--data", str(tmp_path / "missing"), "--plugins", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no *.json FHIR bundles" in err
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bundles"
    bad.mkdir()
    (bad / "x.json").write_text("{not json")
    with pytest.raises(script.OodSetError, match=r"x\.json: not a readable JSON bundle"):
        script.read_synthea_notes(bad)
    (bad / "x.json").write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "DocumentReference",
                            "content": [{"attachment": {"contentType": "text/plain", "data": "@@"}}],
                        }
                    }
                ],
            }
        )
    )
    with pytest.raises(script.OodSetError, match="not base64 UTF-8 text"):
        script.read_synthea_notes(bad)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("label,text\n1,abc\n")
    with pytest.raises(script.OodSetError, match="no 'medical_abstract' column"):
        script.read_medical_abstracts(wrong)
    with pytest.raises(script.OodSetError, match="expected a PubTator file"):
        script.read_pubtator(wrong)
