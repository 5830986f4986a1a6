"""Duplicate merging, publishing a variant subset, and the saved PyTorch checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.converters.conftest import write_recipe

from fhirplug import load_plugin
from fhirplug.bundle import verify_bundle
from fhirplug.errors import ConvertError
from fhirplug_convert.datasets import Example, merge_duplicates
from fhirplug_convert.package import publish_variants
from fhirplug_convert.pipeline import convert

pytestmark = pytest.mark.train


def _ex(text: str, *labels: str, row: int) -> Example:
    return Example(text, labels, group=f"row {row}", where=f"data.csv row {row}")


def test_multilabel_duplicates_merge_their_labels() -> None:
    rows = [_ex("a", "1", row=2), _ex("b", "2", row=3), _ex("a", "5", row=4), _ex("a", "1", row=5)]
    merged, dropped = merge_duplicates(rows, multi_label=True)
    assert dropped == 2
    assert [(e.text, e.labels, e.where) for e in merged] == [
        ("a", ("1", "5"), "data.csv row 2"),
        ("b", ("2",), "data.csv row 3"),
    ]


def test_multiclass_duplicates_carry_every_label_they_were_filed_under() -> None:
    merged, dropped = merge_duplicates([_ex("a", "1", row=2), _ex("a", "1", row=3)], multi_label=False)
    assert (len(merged), dropped) == (1, 1) and merged[0].labels == ("1",)
    merged, dropped = merge_duplicates([_ex("a", "1", row=2), _ex("a", "2", row=3)], multi_label=False)
    assert dropped == 1 and [(e.labels, e.where) for e in merged] == [(("1", "2"), "data.csv row 2")]


@pytest.fixture(scope="module")
def full_bundle(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("publish")
    recipe = write_recipe(folder, tiny_base)
    result = convert(recipe, folder / "bundle", progress=False, checkpoint=folder / "checkpoint")
    return result.bundle, folder / "checkpoint"


def test_limitations_reach_the_manifest(full_bundle: tuple[Path, Path]) -> None:
    manifest = verify_bundle(full_bundle[0], allow_unsigned=True).manifest
    assert manifest.limitations == "Template sentences; not clinical."


def test_publish_int8_only(full_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = full_bundle
    published = publish_variants(source, tmp_path / "int8", ["int8"])
    assert [v.precision for v in published.variants] == ["int8"]
    assert not (tmp_path / "int8" / "model.fp32.onnx").exists()
    verified = verify_bundle(tmp_path / "int8", allow_unsigned=True)
    original = verify_bundle(source, allow_unsigned=True).manifest
    assert verified.manifest.metrics == original.metrics
    assert verified.manifest.variant("int8").sha256 == original.variant("int8").sha256
    texts = ["a note about nothing in particular", "another note"]
    np.testing.assert_allclose(
        load_plugin(tmp_path / "int8", allow_unsigned=True).predict_texts(texts),
        load_plugin(source, allow_unsigned=True, variant="int8").predict_texts(texts),
        atol=1e-6,
    )
    with pytest.raises(ConvertError, match="not empty"):
        publish_variants(source, tmp_path / "int8", ["int8"])
    with pytest.raises(ConvertError, match=r"cannot keep \['bf16'\]"):
        publish_variants(source, tmp_path / "bf16", ["bf16"])


def test_checkpoint_is_the_trained_model(full_bundle: tuple[Path, Path]) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source, checkpoint = full_bundle
    assert len(json.loads((checkpoint / "config.json").read_text())["id2label"]) == 3
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = "patient reports chest pain"
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0].numpy()
    plugin = load_plugin(source, allow_unsigned=True, variant="fp32")
    windows = plugin.session.windows([text])
    # The session gives logits ‖ embedding per window (abstention reads the embedding): compare the logits.
    np.testing.assert_allclose(plugin.session.run(windows)[0][: len(logits)], logits, atol=1e-4)


def test_from_checkpoint_packages_the_same_model_without_training(
    full_bundle: tuple[Path, Path], tiny_base: Path, tmp_path: Path
) -> None:
    source, checkpoint = full_bundle
    recipe = write_recipe(tmp_path, tiny_base)
    again = convert(recipe, tmp_path / "again", progress=False, from_checkpoint=checkpoint, variants=["fp32"])
    assert again.timings.get("train", 0.0) < 30
    texts = ["wheezing and albuterol given", "blood pressure high, on lisinopril"]
    np.testing.assert_allclose(
        load_plugin(again.bundle, allow_unsigned=True).predict_texts(texts),
        load_plugin(source, allow_unsigned=True, variant="fp32").predict_texts(texts),
        atol=1e-5,
    )
    original = verify_bundle(source, allow_unsigned=True).manifest.metrics
    repacked = verify_bundle(again.bundle, allow_unsigned=True).manifest.metrics
    assert repacked["history"] == original["history"] and len(original["history"]) >= 1


def test_from_checkpoint_refuses_other_labels(full_bundle: tuple[Path, Path], tiny_base: Path, tmp_path: Path) -> None:
    from tests.converters.conftest import LABELS

    _, checkpoint = full_bundle
    reordered = "\n".join(
        f'[[labels]]\nlabel = "{n}"\nsystem = "http://snomed.info/sct"\ncode = "{c}"\ndisplay = "{d}"\n'
        for n, c, d in reversed(LABELS)
    )
    recipe = write_recipe(tmp_path, tiny_base, labels=reordered)
    with pytest.raises(ConvertError, match=r"its labels \[.*\] are not the recipe's"):
        convert(recipe, tmp_path / "x", progress=False, from_checkpoint=checkpoint)
    with pytest.raises(ConvertError, match="not a checkpoint saved by --save-checkpoint"):
        convert(recipe, tmp_path / "y", progress=False, from_checkpoint=tmp_path)


def test_from_checkpoint_refuses_a_model_trained_on_other_splits(
    full_bundle: tuple[Path, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """Another split seed puts other rows in the test split, some of which this checkpoint was trained on."""
    _, checkpoint = full_bundle
    record = json.loads((checkpoint / "fhirplug-training.json").read_text())
    assert set(record["splits"]) == {"train", "validation", "test"}
    recipe = write_recipe(tmp_path, tiny_base)
    recipe.write_text(recipe.read_text().replace("seed = 3", "seed = 4"), encoding="utf-8")
    with pytest.raises(ConvertError, match=r"trained on other data splits \(train, validation, test differ"):
        convert(recipe, tmp_path / "x", progress=False, from_checkpoint=checkpoint)
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "fhirplug-training.json").write_text("{}")
    with pytest.raises(ConvertError, match="is not a training record"):
        convert(write_recipe(tmp_path, tiny_base), tmp_path / "y", progress=False, from_checkpoint=broken)
