"""fhirplug_convert: recipe → fine-tuned, exported, quantized, parity-checked, packaged fhirplug plugin.

>>> from fhirplug_convert import convert
>>> result = convert("plugins/notes/recipe.toml", "build/notes", max_steps=50)
>>> result.bundle, result.metrics["test"]["int8"]["accuracy"], result.parity["packaged"]

The train side (torch, transformers, peft, onnx): install the [train] extra. It imports fhirplug; fhirplug never
imports it. Names load on first use, so ``fhirplug convert --help`` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ConvertResult": "fhirplug_convert.pipeline",
    "convert": "fhirplug_convert.pipeline",
    "Recipe": "fhirplug_convert.recipe",
    "load_recipe": "fhirplug_convert.recipe",
    "TaskSpec": "fhirplug_convert.tasks",
    "get_task": "fhirplug_convert.tasks",
    "register_task": "fhirplug_convert.tasks",
    "ParityError": "fhirplug_convert.validate",
}

__all__ = [
    "ConvertResult",
    "ParityError",
    "Recipe",
    "TaskSpec",
    "convert",
    "get_task",
    "load_recipe",
    "register_task",
]

if TYPE_CHECKING:
    from fhirplug_convert.pipeline import ConvertResult, convert
    from fhirplug_convert.recipe import Recipe, load_recipe
    from fhirplug_convert.tasks import TaskSpec, get_task, register_task
    from fhirplug_convert.validate import ParityError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fhirplug_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
