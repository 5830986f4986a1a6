"""Write ``docs/recipe.md``, the recipe reference, from the recipe schema itself.

Every key, its type, default and meaning come from the pydantic models in :mod:`fhirplug_convert.recipe` (their
``Field(description=...)``), and the per-method defaults from :data:`~fhirplug_convert.recipe.DEFAULT_LEARNING_RATES`,
so the document cannot say something the converter does not do; a test fails when the committed file differs from
what this module prints, and another loads every example recipe below with ``load_recipe``.

    python -m fhirplug_convert._recipe_docs > docs/recipe.md
    python -m fhirplug_convert._recipe_docs --write            # the same, into docs/recipe.md of this checkout
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fhirplug.manifest import LabelSpec
from fhirplug_convert import recipe as schema

__all__ = ["EXAMPLES", "render"]

#: LabelSpec lives in the SDK's manifest model; its meaning, for the reference.
_LABEL_KEYS = {
    "label": "The model output's name (as in the data).",
    "system": "Code system URI, e.g. http://snomed.info/sct.",
    "code": "The code a prediction of this label becomes.",
    "display": "The code's display text.",
}

_COMMON = """\
version = "0.1.0"
license = "Apache-2.0"
intended_use = "Suggest problem-list codes from clinic notes for clinician review."
"""
_LABELS = """\
[[labels]]
label = "diabetes"
system = "http://snomed.info/sct"
code = "44054006"
display = "Diabetes mellitus type 2"

[[labels]]
label = "asthma"
system = "http://snomed.info/sct"
code = "195967001"
display = "Asthma"
"""
_TEXT_DATA = """\
[data]
format = "csv"
path = "notes.csv"       # columns text,label; split 70/15/15 here
"""

#: Example recipes: name → (what it shows, TOML). Each is loaded by a test, so none can rot.
EXAMPLES: dict[str, tuple[str, str]] = {
    "full": (
        "text-classification, full fine-tuning, every training value left to the defaults",
        f'name = "notes-full"\n{_COMMON}\n{_TEXT_DATA}\n{_LABELS}\n[method]\nkind = "full"\n',
    ),
    "lora": (
        "text-classification with LoRA and a small learning-rate search; int8 must pass the parity gate",
        f'name = "notes-lora"\n{_COMMON}\n{_TEXT_DATA}\n{_LABELS}\n'
        '[method]\nkind = "lora"\nr = 8\nalpha = 16\ntarget_modules = ["query", "key", "value", "dense"]\n\n'
        "[training]\nsearch = { learning_rate = [3e-4, 1e-3, 3e-3] }\n\n"
        '[parity]\nrequire = ["int8"]\n',
    ),
    "bitfit": (
        "text-classification with BitFit, multi-label JSONL data, explicit epochs and learning rate",
        f'name = "notes-bitfit"\n{_COMMON}\n[output]\nresource = "Condition"\nmulti_label = true\n\n'
        '[data]\nformat = "jsonl"\npath = "notes.jsonl"\nlabel = "labels"   # a list of labels per line\n\n'
        f'{_LABELS}\n[method]\nkind = "bitfit"\n\n[training]\nepochs = 8\nlearning_rate = 5e-4\n',
    ),
    "prompt-tuning": (
        "text-classification with prompt tuning (the encoder stays frozen), fp16 allowed to be left out",
        f'name = "notes-prompt"\n{_COMMON}\n{_TEXT_DATA}\n{_LABELS}\n'
        '[method]\nkind = "prompt-tuning"\nnum_virtual_tokens = 20\n\n'
        "[training]\nsearch = { trials = 3 }   # 1/3x, 1x and 3x the method's default learning rate\n\n"
        '[export]\nallow_drop = ["fp16"]\n',
    ),
    "token-classification": (
        "token-classification (mentions with spans) from PubTator files, LoRA",
        'name = "abstracts-ner"\ntask = "token-classification"\n'
        f"{_COMMON}\n"
        '[inputs]\nresource_types = ["DocumentReference"]\n\n'
        '[data]\nformat = "pubtator"\ntrain = "train.pubtator"\nvalidation = "dev.pubtator"\n'
        'test = "test.pubtator"\n\n'
        '[[labels]]\nlabel = "Disease"\nsystem = "https://www.nlm.nih.gov/mesh"\ncode = "C"\n'
        'display = "Diseases"\n\n'
        '[[labels]]\nlabel = "Chemical"\nsystem = "https://www.nlm.nih.gov/mesh"\ncode = "D"\n'
        'display = "Chemicals and Drugs"\n\n'
        '[entities]\nresources = { Disease = "Condition", Chemical = "MedicationStatement" }\n'
        'system = "https://www.nlm.nih.gov/mesh"\n\n'
        '[method]\nkind = "lora"\ntarget_modules = ["query", "value"]\n',
    ),
}

#: The tables in document order: (heading, model).
_TABLES: list[tuple[str, type[BaseModel]]] = [
    ("top level", schema.Recipe),
    ("[output]", schema.OutputSpec),
    ("[inputs]", schema.InputsSpec),
    ("[data]", schema.DataSpec),
    ("[data.split]", schema.SplitSpec),
    ("[[labels]]", LabelSpec),
    ('[method] kind = "full"', schema.Full),
    ('[method] kind = "lora"', schema.Lora),
    ('[method] kind = "bitfit"', schema.BitFit),
    ('[method] kind = "prompt-tuning"', schema.PromptTuning),
    ("[training]", schema.TrainingSpec),
    ("[training.search]", schema.SearchSpec),
    ("[export]", schema.ExportSpec),
    ("[parity]", schema.ParitySpec),
    ("[entities]", schema.EntitiesRecipe),
]


def _type(annotation: Any) -> str:
    """A TOML-minded type name: ``"csv" | "jsonl"``, ``list of string``, ``number``, ``table``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in args)
    if origin in (typing.Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in present):
            name = "table"  # a tagged union of tables ([method])
        else:
            name = " or ".join(_type(a) for a in present)
        return name + (" (optional)" if len(present) < len(args) else "")
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is tuple:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"table of {_type(args[0])} → {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}.get(annotation, "value")


def _toml(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "(see its table)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "–"
    if isinstance(value, BaseModel):
        return "(see its table)"
    return f"`{_toml(value)}`"


def _rows(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if model is schema.Recipe and name == "source":
            continue  # set by load_recipe, not a key
        meaning = field.description or _LABEL_KEYS.get(name, "")
        if model is schema.Recipe and name == "method":
            meaning += " A table with kind = full | lora | bitfit | prompt-tuning (keys below)."
        cell = meaning.replace("|", "\\|")  # a pipe would end the Markdown cell
        lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {cell} |")
    return lines


def _rate(value: float) -> str:
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _defaults_section() -> list[str]:
    lines = [
        "## Defaults per method",
        "",
        "A recipe without `[training]` (or without `learning_rate` / `epochs` in it) trains with these; an explicit "
        "value always wins. The values used, and which were defaults, are recorded in the manifest "
        "(`training.details.resolved`) and the model card.",
        "",
        "| method | learning_rate | why |",
        "|---|---|---|",
    ]
    for kind, (rate, why) in schema.DEFAULT_LEARNING_RATES.items():
        lines.append(f"| {kind} | {_rate(rate)} | {why} |")
    low, high = schema.EPOCH_BOUNDS
    lines += [
        "",
        f"**epochs**: enough for about {schema.TARGET_STEPS} optimizer steps at the recipe's batch size, at least "
        f"{low} and at most {high}, counted in training windows — every window of a long text trains, so 2,000 "
        f"abstracts of three windows each make an epoch of 6,000 rows (e.g. 840 windows at batch 16 → "
        f"{schema.default_epochs(840, 16)} epochs; 6,000 → {schema.default_epochs(6000, 16)}; 20,000 → "
        f"{schema.default_epochs(20000, 16)}). Every epoch ends "
        "with a validation pass; training stops after `early_stopping_patience` epochs without a better "
        "validation metric, and the best epoch's weights are restored before export.",
        "",
        "**search**: `search = { learning_rate = [...] }` (or `search = { trials = N }`) trains once per "
        "candidate and keeps the one with the best validation metric — the metric the model card reports "
        "(accuracy; micro-F1 if multi-label; strict entity F1) at its best epoch. Every trial (value, validation "
        "metric, best epoch, epochs run, steps) is in `metrics.json` (`search`) and the model card.",
    ]
    return lines


_INTRO = """\
# Recipe reference

A recipe is one TOML (or YAML) file that says how `fhirplug convert` builds a plugin: the data, the label → code
map, the base model, the fine-tuning method and what the parity gate requires. Unknown keys are errors that name
the closest known key; relative paths are relative to the recipe file.

```
fhirplug convert recipe.toml --out build/my-plugin
```

This page is generated from the recipe schema (`converters/fhirplug_convert/recipe.py`):
`python -m fhirplug_convert._recipe_docs --write`.
"""

_EXITS = """\
## Exit codes and the parity gate

| exit | meaning |
|---|---|
| 0 | bundle written with every variant, or without only those `export.allow_drop` lists |
| 7 | nothing written: bad recipe or data, fp32 ONNX disagrees with torch, or a `parity.require` variant failed |
| 8 | bundle written **without** variants that failed the parity gate (`parity.json` and the card say why) |

A reduced-precision variant (int8, fp16) that fails the gate never costs the whole bundle: the variants that
passed are written. List a variant in `parity.require` when a bundle without it is useless to you (then its
failure stops the build), or in `export.allow_drop` when its absence is expected (exit 0).
"""


def render() -> str:
    """The whole reference, as Markdown."""
    lines = [_INTRO, "## Examples", ""]
    for name, (what, text) in EXAMPLES.items():
        lines += [f"### {name}", "", f"{what[0].upper()}{what[1:]}.", "", "```toml", text.rstrip("\n"), "```", ""]
    lines += ["## Keys", ""]
    for heading, model in _TABLES:
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        lines += [f"### {heading}", ""]
        if doc and model is not LabelSpec:
            lines += [doc, ""]
        lines += [*_rows(model), ""]
    lines += [*_defaults_section(), "", _EXITS]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--write":
        target = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(), encoding="utf-8")
        print(f"wrote {target}", file=sys.stderr)
        return 0
    if argv:
        print("usage: python -m fhirplug_convert._recipe_docs [--write [PATH]]", file=sys.stderr)
        return 2
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
