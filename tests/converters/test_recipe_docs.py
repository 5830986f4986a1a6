"""The recipe reference: generated from the schema, committed, linked from --help, its examples load."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fhirplug_convert import _recipe_docs
from fhirplug_convert.cli import convert as convert_command
from fhirplug_convert.recipe import DEFAULT_LEARNING_RATES, load_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"


def test_the_committed_reference_is_what_the_schema_generates() -> None:
    assert DOCS.is_file(), "docs/recipe.md is missing: python -m fhirplug_convert._recipe_docs --write"
    assert DOCS.read_text(encoding="utf-8") == _recipe_docs.render(), (
        "docs/recipe.md and the recipe schema disagree: run python -m fhirplug_convert._recipe_docs --write"
    )


def test_every_key_is_described_and_listed() -> None:
    text = _recipe_docs.render()
    for heading, model in _recipe_docs._TABLES:
        assert f"### {heading}\n" in text
        for name, field in model.model_fields.items():
            if name == "source":
                continue
            # LabelSpec is the SDK's manifest model: the generator carries its meanings.
            meaning = field.description or _recipe_docs._LABEL_KEYS.get(name)
            assert meaning, f"{model.__name__}.{name} has no Field(description=...)"
            assert f"| `{name}` |" in text
    # The per-method defaults table is the converter's own table, value for value.
    for kind, (rate, _) in DEFAULT_LEARNING_RATES.items():
        assert f"| {kind} | {rate:.0e}".replace("e-0", "e-") in text


@pytest.mark.parametrize("name", list(_recipe_docs.EXAMPLES))
def test_every_example_recipe_loads(name: str, tmp_path: Path) -> None:
    what, text = _recipe_docs.EXAMPLES[name]
    assert f"```toml\n{text.rstrip()}\n```" in _recipe_docs.render()
    path = tmp_path / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    recipe = load_recipe(path)
    if name == "token-classification":
        assert recipe.task == "token-classification" and recipe.entities is not None
    else:
        assert recipe.task == "text-classification" and recipe.method.kind == name
    assert recipe.label_names and what


def test_the_cli_help_links_the_reference() -> None:
    result = CliRunner().invoke(convert_command, ["--help"])
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    assert "docs/recipe.md" in flat and "python -m fhirplug_convert._recipe_docs" in flat
    assert "8 built without some variants" in flat


def test_write_option(tmp_path: Path) -> None:
    target = tmp_path / "out" / "recipe.md"
    assert _recipe_docs.main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == _recipe_docs.render()
    assert _recipe_docs.main(["--bogus"]) == 2
