"""Train-side task registry: one declarative spec per task, registered by name.

Each spec says what the exported ONNX graph looks like (inputs with their dynamic axes, outputs), the opset, and
the parity tolerances a recipe starts from — the same idea as optimum's ``TasksManager.create_register``, kept to
a table a person can read. ``register_task`` refuses a name twice; ``get_task`` refuses an unknown name and lists
the known ones.

>>> @register_task("token-classification")
... def _token_classification() -> TaskSpec: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

from fhirplug.errors import ConvertError

__all__ = ["TaskSpec", "Tolerance", "get_task", "known_tasks", "register_task"]

#: Axis name by axis index, as ``torch.onnx.export(dynamic_axes=...)`` takes them.
Axes = dict[int, str]


@dataclass(frozen=True)
class Tolerance:
    """Default parity tolerances of a task; a recipe's ``[parity]`` table overrides them."""

    #: Largest |Δlogit| allowed between torch and ONNX fp32 on the same padded inputs.
    max_abs_logit_diff: float = 1e-3
    #: Largest drop (percentage points) of the task metric from fp32 to int8/fp16.
    max_metric_drop: float = 1.0
    #: Smallest share of decisions (argmax, or per-label decisions) int8/fp16 must agree on with fp32.
    min_agreement: float = 0.98


@dataclass(frozen=True)
class TaskSpec:
    """What the exporter builds for a task and how the parity gate judges it."""

    name: str
    #: Model inputs, int64, in graph order, each with its dynamic axes.
    inputs: MappingProxyType[str, Axes]
    outputs: MappingProxyType[str, Axes]
    opset: int = 17
    tolerance: Tolerance = field(default_factory=Tolerance)


_TASKS: dict[str, TaskSpec] = {}


def register_task(name: str) -> Callable[[Callable[[], TaskSpec]], Callable[[], TaskSpec]]:
    """Register the spec a zero-argument factory returns under ``name``.

    Raises:
        ConvertError: ``name`` is registered already, or the spec names another task.
    """

    def decorate(factory: Callable[[], TaskSpec]) -> Callable[[], TaskSpec]:
        if name in _TASKS:
            raise ConvertError(f"task {name!r} is registered twice (second time by {factory.__qualname__})")
        spec = factory()
        if spec.name != name:
            raise ConvertError(f"task registered as {name!r} describes itself as {spec.name!r}")
        _TASKS[name] = spec
        return factory

    return decorate


def known_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> TaskSpec:
    """The spec of ``name``.

    Raises:
        ConvertError: unknown task; the message lists the known ones.
    """
    try:
        return _TASKS[name]
    except KeyError:
        raise ConvertError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}") from None


_BATCH_SEQ: Axes = {0: "batch", 1: "sequence"}


@register_task("text-classification")
def _text_classification() -> TaskSpec:
    return TaskSpec(
        name="text-classification",
        inputs=MappingProxyType({"input_ids": _BATCH_SEQ, "attention_mask": _BATCH_SEQ, "token_type_ids": _BATCH_SEQ}),
        # logits, and the pooled embedding the head reads: abstention's out-of-domain score (fhirplug._abstain).
        outputs=MappingProxyType({"logits": {0: "batch"}, "embedding": {0: "batch"}}),
    )


@register_task("token-classification")
def _token_classification() -> TaskSpec:
    # Logits per token, [batch, sequence, tags]; the parity gate reads the metric as strict entity-level F1 and
    # the agreement as per-token argmax agreement.
    return TaskSpec(
        name="token-classification",
        inputs=MappingProxyType({"input_ids": _BATCH_SEQ, "attention_mask": _BATCH_SEQ, "token_type_ids": _BATCH_SEQ}),
        outputs=MappingProxyType({"logits": _BATCH_SEQ}),
    )
