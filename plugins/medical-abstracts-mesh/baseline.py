"""TF-IDF + logistic-regression baseline for the medical-abstracts-mesh plugin, on the plugin's own split.

    python plugins/medical-abstracts-mesh/baseline.py [--recipe plugins/medical-abstracts-mesh/recipe.toml]
        [--single-label] [--out plugins/medical-abstracts-mesh/baseline.json]

The data are read and split by the converter itself (``fhirplug_convert.datasets.load_splits`` on the recipe), so
train / validation / test are exactly the plugin's. TfidfVectorizer (word 1-2-grams, sublinear tf, fitted on
train) + LogisticRegression, with C chosen on validation over a small grid (ties → the smaller C):

- single-label (the recipe says ``multi_label = false``, or ``--single-label``): one multinomial model; an
  abstract the corpus files under several labels trains once per label with weight 1/labels (the plugin's soft
  targets, half each), and is scored right when the top class is any of its labels
  (``fhirplug_convert.evaluate.classification_metrics``); C picked on validation top-1.

Every duplicated abstract must keep all its gold labels, so the data are read through the recipe's multi-label
view (duplicate rows merged into one example carrying every label; the split does not depend on ``multi_label``:
each example is stratified by its rarest label either way). For a multi-class recipe the plugin's own reading is
loaded too and must give the same texts in every split, or the script stops; where the converter's multi-class
reader refuses the duplicates, the JSON says so (``split_check``).
- multi-label: one-vs-rest logistic regressions, per-label thresholds from
  ``fhirplug_convert.evaluate.decision_policy`` on validation; C picked on validation micro-F1.

Prints the test numbers as JSON and writes them to ``baseline.json`` next to this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from scipy.sparse import spmatrix
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from fhirplug.errors import ConvertError
from fhirplug_convert.datasets import Example, Splits, load_splits
from fhirplug_convert.evaluate import classification_metrics, decision_policy
from fhirplug_convert.recipe import Recipe, load_recipe

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
C_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
SEED = 13


def gold_matrix(examples: list[Example], labels: list[str]) -> np.ndarray:
    """``[n, labels]`` 0/1: every label the corpus gives the text."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(examples), len(labels)), dtype=np.int64)
    for row, example in enumerate(examples):
        out[row, [index[label] for label in example.labels]] = 1
    return out


def fit(x: spmatrix, train: list[Example], labels: list[str], c: float, single_label: bool) -> Any:
    if single_label:  # one row per (text, gold label)
        rows = [i for i, e in enumerate(train) for _ in e.labels]
        targets = [labels.index(label) for e in train for label in e.labels]
        weights = [1 / len(e.labels) for e in train for _ in e.labels]
        model = LogisticRegression(C=c, max_iter=3000, random_state=SEED)
        return model.fit(x[rows], targets, sample_weight=weights)
    model = OneVsRestClassifier(LogisticRegression(C=c, max_iter=3000, random_state=SEED))
    return model.fit(x, gold_matrix(train, labels))


def plugin_splits(recipe: Recipe) -> tuple[Splits, str]:
    """The plugin's train/validation/test split, every example with all of its gold labels (see the module doc)."""
    if recipe.output.multi_label:
        return load_splits(recipe), "read as the recipe reads it (multi-label)"
    view = recipe.model_copy(update={"output": recipe.output.model_copy(update={"multi_label": True})})
    merged = load_splits(view)
    try:
        own = load_splits(recipe)
    except ConvertError as exc:
        return merged, f"read with duplicates merged; the converter's multi-class reader refuses the data: {exc}"
    for name in ("train", "validation", "test"):
        if [e.text for e in getattr(own, name)] != [e.text for e in getattr(merged, name)]:
            raise ConvertError(f"the {name} split read with duplicates merged differs from the plugin's own")
    return merged, "identical texts to the plugin's multi-class split in train, validation and test (checked)"


def run(recipe_path: Path, single_label: bool | None) -> dict[str, Any]:
    recipe = load_recipe(recipe_path)
    if recipe.task != "text-classification":
        raise ConvertError(f"{recipe_path}: a baseline needs a text-classification recipe, not {recipe.task}")
    single = not recipe.output.multi_label if single_label is None else single_label
    splits, check = plugin_splits(recipe)
    labels = list(recipe.label_names)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x_train = vectorizer.fit_transform([e.text for e in splits.train])
    x_valid = vectorizer.transform([e.text for e in splits.validation])
    x_test = vectorizer.transform([e.text for e in splits.test])
    y_valid, y_test = gold_matrix(splits.validation, labels), gold_matrix(splits.test, labels)
    metric = "top1_accuracy" if single else "micro_f1"

    def evaluate(model: Any, x: spmatrix, y: np.ndarray, thresholds: np.ndarray | None) -> dict[str, Any]:
        return classification_metrics(model.predict_proba(x), y, labels, multi_label=not single, thresholds=thresholds)

    trials: dict[str, float] = {}
    best: tuple[float, float, Any, np.ndarray | None] | None = None
    for c in C_GRID:
        model = fit(x_train, splits.train, labels, c, single)
        thresholds = None
        if not single:
            policy = decision_policy(model.predict_proba(x_valid), y_valid, labels, multi_label=True)
            thresholds = np.array([policy["thresholds"][k] for k in labels])
        score = evaluate(model, x_valid, y_valid, thresholds)[metric]
        trials[str(c)] = score
        if best is None or score > best[0]:
            best = (score, c, model, thresholds)
    assert best is not None
    _, c, model, thresholds = best
    test = evaluate(model, x_test, y_test, thresholds)
    return {
        "model": "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2) + LogisticRegression"
        + ("" if single else " one-vs-rest, thresholds by decision_policy"),
        "mode": "single-label" if single else "multi-label",
        "recipe": recipe_path.resolve().relative_to(REPO).as_posix()
        if recipe_path.resolve().is_relative_to(REPO)
        else recipe_path.name,
        "split": splits.description,
        "split_check": check,
        "counts": splits.counts(),
        "scikit_learn": sklearn.__version__,
        "selection": {"metric": f"validation {metric}", "C": c, "trials": trials},
        "test": {
            key: test[key]
            for key in ("n", "top1_accuracy", "accuracy", "macro_f1", "micro_f1", "macro_auroc")
            if key in test
        }
        | {"per_label_f1": {k: v["f1"] for k, v in test["per_label"].items()}},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=HERE / "recipe.toml")
    parser.add_argument("--single-label", action="store_true", help="score single-label even if the recipe is not")
    parser.add_argument("--out", type=Path, default=HERE / "baseline.json")
    args = parser.parse_args(argv)
    try:
        result = run(args.recipe, True if args.single_label else None)
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
