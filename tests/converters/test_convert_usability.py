"""A first-guess recipe, as a new user writes it: defaults chosen per method and recorded, a bundle even when a
variant fails the gate (exit 8), an optional learning-rate search, stage timings, and no absolute paths in the
bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.converters.conftest import corrupt_int8, write_recipe

from fhirplug.bundle import verify_bundle
from fhirplug_convert import ConvertResult, convert
from fhirplug_convert.cli import PARTIAL_BUNDLE_EXIT
from fhirplug_convert.cli import convert as convert_command

pytestmark = pytest.mark.train

STAGES = ["data", "train", "export", "optimize", "quantize", "calibrate", "parity", "evaluate", "package"]


@pytest.fixture(scope="module")
def first_guess(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    """LoRA with no learning rate or epochs in the recipe, and an int8 that fails the gate."""
    folder = tmp_path_factory.mktemp("first-guess")
    recipe = write_recipe(
        folder,
        tiny_base,
        method="lora",
        omit=("learning_rate", "epochs", "early_stopping_patience"),
        export='variants = ["fp32", "int8"]\nint8_fallback = false',
    )
    with pytest.MonkeyPatch.context() as patch:  # undone before the other tests run
        corrupt_int8(patch)
        return convert(recipe, folder / "bundle", progress=False, max_steps=40)


def test_defaults_are_chosen_per_method_and_recorded(first_guess: ConvertResult) -> None:
    details = first_guess.manifest.training.details  # type: ignore[union-attr]
    assert details["learning_rate"] == 1e-3  # LoRA's default, not full fine-tuning's 1e-4
    resolved = details["resolved"]
    assert resolved["learning_rate"]["value"] == 1e-3 and resolved["learning_rate"]["source"] == "default"
    assert resolved["learning_rate"]["reason"].startswith("lora: adapters start at zero")
    train = first_guess.metrics["splits"]["train"]
    assert resolved["epochs"]["source"] == "default" and f"{train} training examples" in resolved["epochs"]["reason"]
    assert details["epochs"] == resolved["epochs"]["value"] == 20  # a tiny set: the upper bound
    assert resolved["early_stopping_patience"] == {"value": 3, "source": "default"}
    card = (first_guess.bundle / "README.md").read_text()
    assert "- learning_rate: 0.001 (default: lora: adapters start at zero" in card
    assert "- epochs: 20 (default: " in card


def test_a_failed_variant_costs_only_itself(first_guess: ConvertResult) -> None:
    verified = verify_bundle(first_guess.bundle, allow_unsigned=True)
    assert [v.precision for v in verified.manifest.variants] == ["fp32"]
    assert not (first_guess.bundle / "model.int8.onnx").exists()
    parity = json.loads((first_guess.bundle / "parity.json").read_text())
    assert parity["failed"] == ["int8"] and parity["packaged"] == ["fp32"]
    assert parity["variants"]["int8"]["status"] == "failed" and parity["variants"]["int8"]["reasons"]
    assert "parity.require" in parity["variants"]["int8"]["note"]
    assert first_guess.left_out == ["int8"]
    card = (first_guess.bundle / "README.md").read_text()
    assert "Left out: int8 failed the parity gate (reasons above); this bundle has fp32 only." in card


def test_every_stage_is_timed_in_the_result_the_card_and_the_manifest(first_guess: ConvertResult) -> None:
    assert list(first_guess.timings) == [*STAGES, "manifest"]
    assert all(seconds >= 0 for seconds in first_guess.timings.values())
    assert first_guess.timings["train"] > 0
    card = (first_guess.bundle / "README.md").read_text()
    table = card.split("## Build timings", 1)[1].split("## Reproduce", 1)[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["stage", *STAGES, "total (to this card)"]
    details = first_guess.manifest.training.details  # type: ignore[union-attr]
    assert details["timings"] == {k: first_guess.timings[k] for k in STAGES}


def test_no_absolute_path_enters_the_bundle(first_guess: ConvertResult, tiny_base: Path) -> None:
    """Every text file of the bundle, read for the temporary folders the recipe, data, base model and bundle
    live in."""
    roots = {str(first_guess.bundle.parent), str(tiny_base), str(tiny_base.parent)}
    texts = [p for p in first_guess.bundle.iterdir() if p.suffix in (".json", ".md", ".txt", ".sig")]
    assert {p.name for p in texts} >= {"README.md", "manifest.json", "metrics.json", "parity.json", "labels.json"}
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for root in roots:
            assert root not in text, f"{path.name} holds the absolute path {root}"
    card = (first_guess.bundle / "README.md").read_text()
    assert "fhirplug convert recipe.toml --out bundle --max-steps 40" in card
    assert first_guess.manifest.training.base_model == "../" + tiny_base.name  # type: ignore[union-attr]


def test_the_cli_exits_8_when_the_bundle_lacks_a_variant(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt_int8(monkeypatch)
    recipe = write_recipe(tmp_path, tiny_base, export='variants = ["fp32", "int8"]\nint8_fallback = false')
    out = tmp_path / "bundle"
    result = CliRunner().invoke(convert_command, [str(recipe), "--out", str(out), "--max-steps", "40"])
    assert result.exit_code == PARTIAL_BUNDLE_EXIT == 8, result.output
    assert f"built {out} (fp32); left out: int8" in result.output
    assert "bundle written without int8, which failed the parity gate (int8: " in result.output
    assert "Traceback" not in result.output
    timings = next(line for line in result.output.splitlines() if line.startswith("timings: "))
    assert [part.split()[0] for part in timings.removeprefix("timings: ").split(" · ")] == [
        *STAGES,
        "manifest",
        "total",
    ]
    verify_bundle(out, allow_unsigned=True)


def test_a_small_learning_rate_search(tiny_base: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        tiny_base,
        omit=("learning_rate",),
        training="search = { learning_rate = [1e-4, 3e-3] }",
        export='variants = ["fp32"]',
    )
    result = convert(recipe, tmp_path / "bundle", progress=False, max_steps=4)
    search = json.loads((result.bundle / "metrics.json").read_text())["search"]
    trials = search["trials"]
    assert [t["learning_rate"] for t in trials] == [1e-4, 3e-3]
    assert search["metric"] == "accuracy" and all(t["steps"] == 4 for t in trials)
    assert all(
        set(t) == {"learning_rate", "validation_accuracy", "validation_nll", "best_epoch", "epochs_run", "steps"}
        for t in trials
    )
    # Different learning rates train different models (a loop that ignored the candidate would not).
    assert trials[0]["validation_nll"] != trials[1]["validation_nll"]
    best = max(trials, key=lambda t: (t["validation_accuracy"], -t["validation_nll"]))
    assert search["chosen"] == best["learning_rate"]
    details = result.manifest.training.details  # type: ignore[union-attr]
    assert details["learning_rate"] == best["learning_rate"]
    assert details["resolved"]["learning_rate"]["source"] == "search"
    # The packaged model is the chosen trial's: its validation history is the one metrics.json reports.
    assert result.metrics["history"][best["best_epoch"] - 1]["accuracy"] == best["validation_accuracy"]
    card = (result.bundle / "README.md").read_text()
    assert "## Learning-rate search (validation split)" in card
    assert f"| {best['learning_rate']:g} (chosen) |" in card
