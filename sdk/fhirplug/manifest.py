"""The plugin manifest (``manifest.json``, bundle schema v1): a frozen, typed model.

The manifest travels with the model. It says what the plugin reads, what it writes (per label: code system URI,
code, display), which ONNX variants it ships and for which execution providers, how to tokenize and window text,
how to calibrate scores, and the sha256 of every file in the bundle. Unknown keys and a wrong schema version are
errors that name the key, raised when the bundle is loaded, never at first inference.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fhirplug._safe_read import load_json
from fhirplug.errors import ManifestError, ProviderError

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "Abstention",
    "Calibration",
    "EntitiesSpec",
    "InputSpec",
    "LabelSpec",
    "Manifest",
    "OutputSpec",
    "TokenizerSpec",
    "TrainingInfo",
    "VariantSpec",
    "parse_manifest",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
#: The signature file beside the manifest (see fhirplug.bundle); neither may be declared as a bundle file.
SIGNATURE_FILE = "manifest.sig"
#: Largest manifest.json read (the first-party ones are 10-14 KiB).
MAX_MANIFEST_BYTES = 1 << 20

Precision = Literal["fp32", "int8", "fp16"]
OutputResource = Literal["RiskAssessment", "Condition"]

#: Resource types the runtime knows how to read text from (see fhirplug.fhir.extract).
READABLE_TYPES = ("DocumentReference", "DiagnosticReport", "Observation", "Condition", "Procedure")


def check_file_name(name: str) -> str:
    """A bundle file name: a relative POSIX path inside the bundle, not the manifest or its signature.

    Raises:
        ValueError: an absolute path, ``..`` or ``.``, an empty part, a backslash or a control character.
    """
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise ValueError(f"{name[:80]!r} is not a file name inside the bundle (a relative path without '..')")
    if PurePosixPath(name).as_posix() in (MANIFEST_FILE, SIGNATURE_FILE):
        raise ValueError(f"{name!r} is the manifest or its signature, not a bundle file")
    return name


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LabelSpec(_Frozen):
    """One model output index and the code it stands for."""

    label: str = Field(min_length=1)
    system: str = Field(min_length=1, description="Canonical code system URI, e.g. http://snomed.info/sct")
    code: str = Field(min_length=1)
    display: str = Field(min_length=1)

    @field_validator("system")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not (value.startswith(("http://", "https://", "urn:oid:", "urn:uuid:"))):
            raise ValueError(f"code system must be a canonical URI (http://snomed.info/sct ...), got {value!r}")
        return value


class InputSpec(_Frozen):
    resource_types: tuple[str, ...] = READABLE_TYPES
    elements: tuple[str, ...] = ()

    @field_validator("resource_types")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(READABLE_TYPES))
        if unknown:
            raise ValueError(f"cannot read text from {unknown}; readable types are {list(READABLE_TYPES)}")
        if not value:
            raise ValueError("at least one resource type is needed")
        return value


class OutputSpec(_Frozen):
    resource: OutputResource = "RiskAssessment"
    multi_label: bool = False
    labels: tuple[LabelSpec, ...]

    @model_validator(mode="after")
    def _unique(self) -> OutputSpec:
        if not self.labels:
            raise ValueError("outputs.labels is empty: a plugin must map at least one label to a code")
        seen: set[str] = set()
        for spec in self.labels:
            if spec.label in seen:
                raise ValueError(f"label {spec.label!r} appears twice in outputs.labels")
            seen.add(spec.label)
        return self


class VariantSpec(_Frozen):
    file: str
    precision: Precision
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    output_names: tuple[str, ...] = ("logits",)
    opset: int = Field(ge=7)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        return check_file_name(value)


class TokenizerSpec(_Frozen):
    file: str = "tokenizer.json"
    max_tokens: int = Field(ge=8, le=8192, description="Tokens per window, special tokens included")
    stride: int = Field(ge=0, description="Tokens two consecutive windows share")

    @model_validator(mode="after")
    def _stride(self) -> TokenizerSpec:
        if self.stride >= self.max_tokens - 2:
            raise ValueError(f"stride {self.stride} must be smaller than max_tokens - 2 = {self.max_tokens - 2}")
        return self


class Abstention(_Frozen):
    """When a text-classification plugin says "none of my codes" (``calibration.abstention``).

    The score is the Mahalanobis distance of the text's pooled embedding (the model output ``output``, the mean
    over the text's windows) to the nearest class mean, under the shared covariance fitted at convert time on
    the training split (see :mod:`fhirplug._abstain`); a text farther than ``threshold`` gets no code and an
    informational issue with its distance.
    """

    method: Literal["mahalanobis", "mahalanobis+discriminator"] = "mahalanobis"
    #: The .npz in the bundle: ``whitening`` [H, H] and ``means`` [classes, H] (the class means, whitened); with
    #: the discriminator also ``discriminator`` [H] and ``discriminator_bias`` [1].
    file: str = "abstention.npz"
    #: The model output holding the pooled embedding, one row per window.
    output: str = "embedding"
    #: Distances above it abstain (chosen on in-domain validation and out-of-domain calibration texts).
    threshold: float = Field(gt=0)
    #: ``mahalanobis+discriminator``: a discriminator probability above it abstains too (set on in-domain texts).
    discriminator_threshold: float | None = Field(default=None, gt=0, lt=1)

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        return check_file_name(value)

    @model_validator(mode="after")
    def _method_fits(self) -> Abstention:
        if (self.method == "mahalanobis+discriminator") != (self.discriminator_threshold is not None):
            raise ValueError(
                "calibration.abstention: method 'mahalanobis+discriminator' needs discriminator_threshold, and "
                "only it may have one"
            )
        return self


class Calibration(_Frozen):
    temperature: float = Field(default=1.0, gt=0)
    #: Per-code decision thresholds on calibrated probabilities, keyed by label.
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float = Field(default=0.5, ge=0, le=1)
    #: Multi-class: a text whose top probability is below it gets no code (the plugin abstains); 0: never.
    min_probability: float = Field(default=0.0, ge=0, le=1)
    #: Out-of-domain abstention (text-classification); None: the plugin answers every text.
    abstention: Abstention | None = None
    #: Labels the model has but the plugin never predicts, each with the reason (e.g. test AUROC under the
    #: converter's reliability bar). A multi-class text whose top label is withheld gets no code.
    withheld: dict[str, str] = Field(default_factory=dict)

    @field_validator("thresholds")
    @classmethod
    def _range(cls, value: dict[str, float]) -> dict[str, float]:
        for label, threshold in value.items():
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold for {label!r} is {threshold}, expected 0..1")
        return value


EntityResource = Literal["Condition", "MedicationStatement"]


class EntitiesSpec(_Frozen):
    """What a token-classification plugin does with the spans it finds (``entities`` in the manifest).

    The entity types are ``outputs.labels`` (their order gives the BIO tags: ``O``, then ``B-`` and ``I-`` of each
    label); this says which FHIR resource each type becomes, where the terminology is and how sure a
    nearest-neighbour code must be.
    """

    #: Entity type (a label of outputs.labels) → the resource a coded mention of it becomes.
    resources: dict[str, EntityResource]
    #: Code system URI of the mention codes (the terminology in ``concepts``).
    system: str
    #: concepts.json: the dictionary (code, display, type, names) built at convert time.
    concepts: str = "concepts.json"
    #: concept_vectors.npz: character 3-gram TF-IDF vectors of every name (see fhirplug._coding).
    vectors: str = "concept_vectors.npz"
    #: Least cosine similarity for a nearest-neighbour code; below it a mention stays uncoded.
    coding_threshold: float = Field(default=0.6, ge=0, le=1)
    #: The assertion trigger lexicon (JSON) shipped in the bundle.
    assertion_lexicon: str = "assertion.json"
    #: Least mean token probability for a span to be reported.
    min_confidence: float = Field(default=0.0, ge=0, le=1)


class TrainingInfo(_Frozen):
    base_model: str
    method: str
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    dataset: str | None = None
    seed: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Frozen):
    """A parsed, validated manifest.json."""

    schema_version: Literal[1]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(min_length=1)
    task: str
    license: str
    description: str = ""
    intended_use: str
    limitations: str = ""
    inputs: InputSpec = InputSpec()
    outputs: OutputSpec
    variants: tuple[VariantSpec, ...]
    tokenizer: TokenizerSpec
    calibration: Calibration = Calibration()
    metrics: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    training: TrainingInfo | None = None
    #: token-classification plugins: entity types → resources, terminology and assertion lexicon.
    entities: EntitiesSpec | None = None
    #: sha256 of every bundle file other than the manifest, the signature and the model variants.
    files: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if not self.variants:
            raise ValueError("variants is empty: a plugin needs at least one ONNX model")
        names = [v.file for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants list a file twice: {names}")
        precisions = [v.precision for v in self.variants]
        if len(set(precisions)) != len(precisions):
            raise ValueError(f"variants list a precision twice: {precisions}")
        if self.tokenizer.file not in self.files:
            raise ValueError(f"tokenizer file {self.tokenizer.file!r} has no sha256 in files")
        labels = {spec.label for spec in self.outputs.labels}
        unknown = sorted(set(self.calibration.thresholds) - labels)
        if unknown:
            raise ValueError(f"calibration.thresholds names labels not in outputs.labels: {unknown}")
        unknown = sorted(set(self.calibration.withheld) - labels)
        if unknown:
            raise ValueError(f"calibration.withheld names labels not in outputs.labels: {unknown}")
        if self.entities is not None:
            unknown = sorted(set(self.entities.resources) - labels)
            if unknown:
                raise ValueError(f"entities.resources names labels not in outputs.labels: {unknown}")
            for key in ("concepts", "vectors", "assertion_lexicon"):
                name = getattr(self.entities, key)
                if name not in self.files:
                    raise ValueError(f"entities.{key} file {name!r} has no sha256 in files")
        for file, digest in self.files.items():
            check_file_name(file)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"files[{file!r}] is not a lowercase hex sha256")
        return self

    def variant(self, precision: str) -> VariantSpec:
        """The variant of ``precision`` (fp32, int8, fp16).

        Raises:
            ProviderError: the plugin ships no such variant (the message lists those it offers).
        """
        for spec in self.variants:
            if spec.precision == precision:
                return spec
        offered = [v.precision for v in self.variants]
        raise ProviderError(f"{self.name}: no {precision} variant; this plugin offers {offered}")

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys, 2-space indent): the bytes that get hashed and signed."""
        # A manifest without entities is written exactly as before the key existed (same bytes, same hash).
        data = self.model_dump(mode="json", exclude={"entities"} if self.entities is None else None)
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        elif item["type"] == "missing":
            parts.append(f"missing key {where!r}")
        else:
            parts.append(f"{where}: {item['msg']}")
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _short(value: Any) -> str:
    # repr of a huge int raises ValueError (Python's int max str digits): describe it instead.
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_manifest(data: bytes | str | dict[str, Any], source: str | Path = MANIFEST_FILE) -> Manifest:
    """Parse manifest JSON (text, bytes or an already-decoded dict) into a :class:`Manifest`.

    JSON text is parsed with limits (at most 1 MiB, nesting depth 64, integers of at most 20 digits, unique
    keys, no NaN): whatever the bytes, the only error that comes out is :class:`ManifestError`.

    Raises:
        ManifestError: naming the file and the offending key.
    """
    if isinstance(data, dict):
        raw: Any = data
    else:
        size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{source}: {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
        raw = load_json(data, source, ManifestError)
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    # Exactly the integer 1: True and 1.0 compare equal to 1 but are not a schema version.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ManifestError(
            f"{source}: schema_version is {_short(version)}, this fhirplug reads schema_version {SCHEMA_VERSION}; "
            "rebuild the plugin with a matching fhirplug or upgrade fhirplug"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{source}: {_describe(exc)}") from exc
