"""Every first-party plugin in plugins/: its recipe, card, examples, and — where a built bundle is committed —
that the bundle verifies and its example inputs yield the codes the plugin promises.

A recipe whose training data is present is also built end to end with the tiny random BERT in place of its base
model (a few steps), so a recipe that no longer matches its data fails here, not in a 30-minute real build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirplug import load_plugin
from fhirplug.bundle import verify_bundle
from tests.conftest import REPO

PLUGINS = sorted(p for p in (REPO / "plugins").iterdir() if (p / "recipe.toml").is_file())
NAMES = [p.name for p in PLUGINS]


def test_there_are_first_party_plugins() -> None:
    assert {"medical-abstracts-mesh", "synthea-conditions"} <= set(NAMES)


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_every_plugin_has_examples_a_card_and_expectations(plugin: Path) -> None:
    examples = sorted((plugin / "examples").glob("*.json"))
    assert examples, f"{plugin.name} has no example FHIR input in examples/"
    expected = json.loads((plugin / "expected.json").read_text())
    assert set(expected) == {e.name for e in examples}, "expected.json must name every example, and only those"
    assert all(expected[e.name] for e in examples), "every example must promise at least one code"
    assert (plugin / "README.md").is_file(), f"{plugin.name} has no model card"


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_recipe_is_valid(plugin: Path) -> None:
    pytest.importorskip("fhirplug_convert.recipe")
    from fhirplug_convert.recipe import load_recipe

    recipe = load_recipe(plugin / "recipe.toml")
    assert recipe.name == plugin.name
    assert {spec.system for spec in recipe.labels} <= {
        "http://snomed.info/sct",
        "https://www.nlm.nih.gov/mesh",
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://loinc.org",
    }


@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_committed_bundle_yields_the_promised_codes(plugin: Path) -> None:
    bundle = plugin / "bundle"
    if not bundle.is_dir():
        pytest.skip(f"{plugin.name}: no committed bundle (built by its recipe)")
    verified = verify_bundle(bundle, allow_unsigned=True)
    assert verified.manifest.name == plugin.name
    loaded = load_plugin(bundle, allow_unsigned=True)
    expected = json.loads((plugin / "expected.json").read_text())
    for name, codes in expected.items():
        result = loaded.predict_files([plugin / "examples" / name])
        got = {p.code for p in result.predictions}
        assert set(codes) <= got, f"{name}: promised {codes}, got {sorted(got)}"


@pytest.mark.train
@pytest.mark.parametrize("plugin", PLUGINS, ids=NAMES)
def test_recipe_builds_with_a_tiny_model(plugin: Path, tiny_base: Path, tmp_path: Path) -> None:
    from fhirplug_convert import convert
    from fhirplug_convert.recipe import load_recipe

    recipe = load_recipe(plugin / "recipe.toml")
    data = recipe.data.path or recipe.data.train
    if data is None or not data.exists():
        pytest.skip(f"{plugin.name}: training data {data} is not here (../shared/data is beside CI's checkout)")
    result = convert(
        plugin / "recipe.toml",
        tmp_path / "bundle",
        progress=False,
        base_model=str(tiny_base),
        max_tokens=32,
        stride=8,
        max_steps=3,
        max_train_examples=48,
        variants=["fp32"],
        allow_drop=[],
    )
    manifest = verify_bundle(result.bundle, allow_unsigned=True).manifest
    assert manifest.name == plugin.name
    assert [spec.code for spec in manifest.outputs.labels] == [spec.code for spec in recipe.labels]
    predicted = load_plugin(result.bundle, allow_unsigned=True).predict_files(
        sorted((plugin / "examples").glob("*.json"))
    )
    assert predicted.sources  # the examples are readable by this plugin's inputs
