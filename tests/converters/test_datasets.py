"""Data readers and splits: every problem named by file and row, before anything trains."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from tests.converters.conftest import write_recipe

import fhirplug_convert.finetune
from fhirplug.errors import ConvertError
from fhirplug_convert import convert
from fhirplug_convert.datasets import Example, load_splits, read_jsonl, split_examples
from fhirplug_convert.recipe import load_recipe

KNOWN = ["diabetes", "hypertension", "asthma"]
FHIR_DATA = 'format = "fhir"\npath = "synthea-like-bundle.json"\n[data.split]\nvalidation = 0.25\ntest = 0.25\nseed = 1'


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call into training fails the test: data errors must come first."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started before the data was checked")

    monkeypatch.setattr(fhirplug_convert.finetune, "train", fail)


def _csv(folder: Path, rows: list[tuple[str, str]]) -> Path:
    body = "".join(f'"{text}",{label}\n' for text, label in rows)
    (folder / "data.csv").write_text("text,label\n" + body)
    return write_recipe(folder, Path("unused"), data='format = "csv"\npath = "data.csv"')


def _many(label: str, n: int) -> list[tuple[str, str]]:
    return [(f"{label} note number {i}", label) for i in range(n)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [*_many("diabetes", 5), ("  ", "asthma"), *_many("asthma", 5)],
            r"data\.csv row 7: empty text",
        ),
        (
            [*_many("diabetes", 5), ("copd with wheeze", "copd")],
            r"data\.csv row 7: unknown label 'copd'; known labels: diabetes, hypertension, asthma",
        ),
        (
            [*_many("diabetes", 5), ("no label here", "")],
            r"data\.csv row 7: no label; a multi-class recipe needs exactly one label",
        ),
        (
            [*_many("diabetes", 5), *_many("hypertension", 5), *_many("asthma", 2)],
            r"label 'asthma' has 2 example\(s\); a stratified train/validation/test split needs at least 3",
        ),
        (
            [*_many("diabetes", 5), *_many("hypertension", 5)],
            r"label 'asthma' has 0 examples in the data",
        ),
    ],
)
def test_bad_data_fails_before_training(
    tmp_path: Path, no_training: None, rows: list[tuple[str, str]], message: str
) -> None:
    recipe = _csv(tmp_path, rows)
    with pytest.raises(ConvertError, match=message):
        convert(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_data_file_fails_before_training(tmp_path: Path, no_training: None) -> None:
    recipe = write_recipe(tmp_path, Path("unused"), data='format = "csv"\npath = "absent.csv"')
    with pytest.raises(ConvertError, match=r"absent\.csv: data file not found"):
        convert(recipe, tmp_path / "out")


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, Path("unused"), data='format = "csv"\npath = "notes.csv"\ntext = "note"')
    with pytest.raises(ConvertError, match=r"notes\.csv: no column 'note'; the header has \['text', 'label'\]"):
        load_splits(load_recipe(recipe))


def test_jsonl_rows_are_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "labels": ["asthma"]}\n\n{"text": "b", "labels": ["asthma", "gout"]}\n')
    with pytest.raises(ConvertError, match=r"d\.jsonl line 3: unknown label 'gout'"):
        read_jsonl(path, text="text", label="labels", known=KNOWN, multi_label=True, separator=None)
    path.write_text('{"text": "a", "labels": ["asthma"]}\n{"text": "b"}\n')
    with pytest.raises(ConvertError, match=r"d\.jsonl line 2: no key 'labels'"):
        read_jsonl(path, text="text", label="labels", known=KNOWN, multi_label=True, separator=None)
    path.write_text('{"text": "a", "labels": ["asthma"]}\n{"text": "b", "labels": []}\n')
    rows = read_jsonl(path, text="text", label="labels", known=KNOWN, multi_label=True, separator=None)
    assert [(e.text, e.labels) for e in rows] == [("a", ("asthma",)), ("b", ())]


def test_multilabel_csv_with_a_separator(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("text,codes\nboth,diabetes; asthma\nnone,\n")
    recipe = write_recipe(
        tmp_path,
        Path("unused"),
        multi_label=True,
        data='format = "csv"\ntrain = "m.csv"\nvalidation = "m.csv"\ntest = "m.csv"\nlabel = "codes"\n'
        'label_separator = ";"',
    )
    splits = load_splits(load_recipe(recipe))
    assert [(e.text, e.labels) for e in splits.train] == [("both", ("diabetes", "asthma")), ("none", ())]
    # The same file given three times: the reader says so instead of silently scoring on training data.
    assert (
        splits.description == "given files m.csv, m.csv, m.csv; warning: 4 validation/test text(s) also occur in train"
    )


def test_the_stratified_split_is_seeded_and_proportional(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, Path("unused")))
    first, again = load_splits(recipe), load_splits(recipe)
    assert first == again
    # 150 template rows, 44 of them repeats of an earlier text: merged first, so no text is in two parts.
    assert "106 examples" in first.description and "44 duplicate row(s) merged" in first.description
    assert first.counts() == {"train": 64, "validation": 21, "test": 21}
    for part in (first.validation, first.test):
        assert Counter(e.labels[0] for e in part) == {"diabetes": 7, "hypertension": 7, "asthma": 7}
    texts = [{e.where for e in part} for part in (first.train, first.validation, first.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    other = load_splits(
        recipe.model_copy(
            update={"data": recipe.data.model_copy(update={"split": recipe.data.split.model_copy(update={"seed": 4})})}
        )
    )
    assert {e.where for e in other.test} != texts[2]


def test_max_train_examples_caps_training_only(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, Path("unused")), max_train_examples=20)
    splits = load_splits(recipe)
    assert splits.counts() == {"train": 20, "validation": 21, "test": 21}
    assert "training capped at 20 examples" in splits.description


def test_groups_are_never_split() -> None:
    examples = [Example(f"t{i}", ("asthma",), group=f"p{i % 4}", where=str(i)) for i in range(12)]
    train, valid, test = split_examples(examples, validation=0.25, test=0.25, seed=0, stratify=False)
    groups = [{e.group for e in part} for part in (train, valid, test)]
    assert sorted(len(g) for g in groups) == [1, 1, 2]
    assert set.union(*groups) == {"p0", "p1", "p2", "p3"}
    assert sum(len(p) for p in (train, valid, test)) == 12
    with pytest.raises(ConvertError, match=r"only 2 group\(s\)"):
        split_examples(examples[:2], validation=0.25, test=0.25, seed=0, stratify=False)


# --- FHIR -----------------------------------------------------------------------------------------------------


def test_fhir_notes_get_the_conditions_active_at_their_date(tmp_path: Path) -> None:
    from fhirplug_convert._fhir import read_fhir_examples

    recipe = load_recipe(write_recipe(tmp_path, Path("unused"), multi_label=True, data=FHIR_DATA))
    got = {e.where: (e.group, e.labels) for e in read_fhir_examples(recipe.data.path, recipe)}
    assert got == {
        # diabetes since 2015; hypertension starts 2018, after this note; bronchitis is not in the label map
        "DocumentReference/n1": ("p1", ("diabetes",)),
        "DocumentReference/n2": ("p1", ("diabetes", "hypertension")),
        # (the DiagnosticReport n2r repeats n2's text for the same patient: kept once)
        "DocumentReference/n3": ("p2", ("asthma",)),
        "DocumentReference/n4": ("p2", ()),  # the asthma abated in 2019
        "DocumentReference/n5": ("p3", ("hypertension",)),  # onset later on the same day
        "DocumentReference/n6": ("p3", ("hypertension",)),
        "DocumentReference/n7": ("p4", ("diabetes", "asthma")),
    }


def test_fhir_data_is_split_by_patient(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, Path("unused"), multi_label=True, data=FHIR_DATA))
    splits = load_splits(recipe)
    groups = [{e.group for e in part} for part in (splits.train, splits.validation, splits.test)]
    assert all(groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(splits.counts().values()) == 7
    assert "split by patient" in splits.description


def test_fhir_multiclass_needs_one_active_label(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, Path("unused"), data=FHIR_DATA))
    with pytest.raises(ConvertError, match=r"DocumentReference/n2: 2 active label\(s\) \['diabetes', 'hypertension'\]"):
        load_splits(recipe)


def test_fhir_problems_are_named(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, Path("unused"), multi_label=True, data=FHIR_DATA))
    from fhirplug_convert._fhir import read_fhir_examples

    with pytest.raises(ConvertError, match="data file not found"):
        read_fhir_examples(tmp_path / "none.json", recipe)
    (tmp_path / "bad.ndjson").write_text('{"resourceType": "Patient", "id": "x"}\nnot json\n')
    with pytest.raises(ConvertError, match=r"bad\.ndjson"):
        read_fhir_examples(tmp_path / "bad.ndjson", recipe)
    (tmp_path / "nosubject.json").write_text(
        '{"resourceType": "DocumentReference", "id": "d", "status": "current", "date": "2020-01-01",'
        ' "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}]}'
    )
    with pytest.raises(ConvertError, match=r"DocumentReference/d .* has no subject"):
        read_fhir_examples(tmp_path / "nosubject.json", recipe)
