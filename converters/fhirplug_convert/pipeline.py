"""Recipe → plugin bundle, every step in order: data → fine-tune → ONNX → optimize → quantize → calibrate →
parity gate → evaluate → package.

Data problems stop the run before anything trains. fp32 ONNX that disagrees with torch, or a variant the recipe
lists in ``parity.require`` failing the parity gate, stops the run before anything is packaged. Any other variant
that fails is left out: the bundle is written with the variants that passed, and the parity report's ``failed``
names the ones left out (the CLI then exits 8; ``export.allow_drop`` makes such an omission expected, exit 0).

Training values the recipe leaves out are chosen here (:func:`fhirplug_convert.recipe.resolve_training`), and
recorded with where they came from in the manifest and the model card, as are the stage timings.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fhirplug.manifest import Manifest
from fhirplug.tasks.token_classification import tag_names
from fhirplug_convert import _core, abstention, export, finetune, quantize, validate
from fhirplug_convert import token_classification as ner
from fhirplug_convert.datasets import Splits, load_splits
from fhirplug_convert.evaluate import (
    classification_metrics,
    decision_policy,
    expected_calibration_error,
    fit_temperature,
    reliable_labels,
    split_for_calibration,
    task_metric,
)
from fhirplug_convert.package import (
    BundleContent,
    portable_path,
    prepare_out_dir,
    recorded_base_model,
    test_split_record,
    write_bundle,
)
from fhirplug_convert.recipe import Recipe, load_recipe, resolve_base_model, resolve_training
from fhirplug_convert.tasks import get_task
from fhirplug_convert.terminology import build_terminology

__all__ = ["ConvertResult", "Int8Quantizer", "Variants", "convert", "export_variants"]


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` built.

    Attributes:
        bundle: the bundle directory (verify or load it with fhirplug).
        manifest: the manifest that was written.
        metrics: test-split metrics per packaged variant, calibration and split sizes (= metrics.json).
        parity: the parity report (= parity.json).
        fused_operators: onnxruntime fusion counts of the fp32 graph.
        timings: seconds per stage, in order: data, train, export, optimize, quantize, calibrate (text
            classification) or terminology (token classification), parity, evaluate, package (= the model card's
            table), then manifest (hashing and signing, after the card was written).
    """

    bundle: Path
    manifest: Manifest
    metrics: dict[str, Any]
    parity: dict[str, Any]
    fused_operators: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def left_out(self) -> list[str]:
        """Variants that failed the parity gate and were left out without the recipe allowing it."""
        return list(self.parity.get("failed", []))


def _command(recipe: Recipe, out_dir: Path, overrides: dict[str, Any]) -> str:
    # Run in the recipe's folder: paths relative to it, so no machine's absolute paths enter the model card.
    folder = recipe.source.parent if recipe.source is not None else Path.cwd()
    name = recipe.source.name if recipe.source is not None else "recipe.toml"
    parts = ["fhirplug", "convert", name, "--out", portable_path(out_dir, folder)]
    for name, value in sorted(overrides.items()):
        if value is not None and name in ("max_steps", "epochs", "max_train_examples"):
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if overrides.get("from_checkpoint") is not None:
        # Packaged again without training: say so, and from what (the checkpoint came from --save-checkpoint).
        parts += ["--from-checkpoint", portable_path(Path(overrides["from_checkpoint"]).resolve(), folder)]
    return shlex.join(parts)


def _method_options(recipe: Recipe) -> dict[str, Any]:
    return {k: v for k, v in recipe.method.model_dump(mode="json").items() if k != "kind"}


def convert(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    sign_key: str | Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    checkpoint: str | Path | None = None,
    from_checkpoint: str | Path | None = None,
    **overrides: Any,
) -> ConvertResult:
    """Build a plugin bundle from a recipe.

    Args:
        recipe_path: the recipe (TOML or YAML).
        out_dir: the bundle folder to write (created; a previous bundle there is replaced).
        sign_key: an ed25519 private key (PEM) to sign the manifest with.
        progress: tqdm progress bars; None = only on a terminal.
        log: receives one line per step (default: silent).
        checkpoint: also save the trained PyTorch model and tokenizer here (``save_pretrained``), e.g. as the
            PyTorch baseline for benchmarks/compare.py. LoRA is saved merged; prompt tuning cannot be saved
            this way (its virtual tokens live in a wrapper) and raises.
        from_checkpoint: skip training: export and package a model this recipe fine-tuned
            earlier and saved with ``checkpoint`` (its labels and window must match the recipe). Data is still
            split as the recipe says, so calibration, the parity gate and the test metrics are recomputed.
        **overrides: recipe keys for quick runs: ``max_steps``, ``epochs``, ``max_train_examples``,
            ``batch_size``, ``learning_rate``, ``seed``, ``variants``, ``allow_drop``.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        ConvertError: bad recipe or data (before training), failed export, or a failed parity gate
            (:class:`fhirplug_convert.validate.ParityError`, with the report).
    """
    say = log or (lambda _: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    recipe = load_recipe(recipe_path, **overrides)
    out = Path(out_dir).resolve()
    splits = set_calibration_split(recipe, load_splits(recipe))
    base = resolve_base_model(recipe)
    windows = None
    if recipe.training.epochs is None:  # an epoch trains every window of a long text
        windows = finetune.count_windows(str(base), recipe, [e.text for e in splits.train])
    recipe, resolved = resolve_training(recipe, len(splits.train), windows)
    say(f"data: {splits.description}; {splits.counts()}")
    say(
        "training: "
        + ", ".join(
            f"{k} {v['value']:g} ({v['source']})" for k, v in resolved.items() if k != "early_stopping_patience"
        )
    )
    lap("data")

    search: dict[str, Any] | None = None
    if from_checkpoint is not None:
        trained, tokenizer, verified = finetune.load_checkpoint(
            from_checkpoint, recipe, finetune.splits_fingerprint(splits)
        )
        say(f"loaded the model this recipe fine-tuned earlier from {from_checkpoint} (no training)")
        if not verified:
            say(
                "warning: the checkpoint records no data splits (saved by an older converter): that it was trained "
                "on this recipe's training split cannot be checked"
            )
    else:
        trainer = _TASKS[recipe.task].train

        def run(trial: Recipe) -> tuple[finetune.TrainedModel, Any]:
            return trainer(trial, base, splits.train, splits.validation, progress=progress, log=say)

        if recipe.training.search is not None:
            trained, tokenizer, search = finetune.search_learning_rate(recipe, run, log=say)
            recipe = recipe.model_copy(
                update={"training": recipe.training.model_copy(update={"learning_rate": search["chosen"]})}
            )
            resolved["learning_rate"] = {
                "value": search["chosen"],
                "source": "search",
                "reason": f"best validation {search['metric']} of {len(search['trials'])} trials",
            }
        else:
            trained, tokenizer = run(recipe)
    say(
        f"trained {trained.steps} steps ({recipe.method.kind}): {trained.trainable_parameters:,} of "
        f"{trained.total_parameters:,} parameters trainable"
    )
    lap("train")
    if checkpoint is not None:
        # Full, BitFit and (merged) LoRA models are a plain Hugging Face classifier inside LogitsModel.
        finetune.save_checkpoint(trained, str(base), checkpoint, finetune.splits_fingerprint(splits))
        say(f"saved the PyTorch checkpoint to {checkpoint}")

    record = {"resolved": resolved, "search": search, "timings": timings}
    with tempfile.TemporaryDirectory(prefix="fhirplug-convert-") as tmp:
        shown = {**overrides, "from_checkpoint": from_checkpoint} if from_checkpoint is not None else overrides
        result = _build(recipe, trained, tokenizer, splits, Path(tmp), out, sign_key, shown, say, lap, record)
    lap("manifest")
    return ConvertResult(result.bundle, result.manifest, result.metrics, result.parity, result.fused_operators, timings)


def set_calibration_split(recipe: Recipe, splits: Splits) -> Splits:
    """text-classification: part of the validation split (``[data.split] calibration``, stratified, seeded) is
    kept apart for calibration — temperature, thresholds, the multi-class floor and the abstention threshold are
    fitted on texts that neither chose the epoch nor ran the parity gate. Token classification keeps it whole."""
    if recipe.task != "text-classification":
        return splits
    valid = splits.validation
    if len(valid) < 4:  # too few to halve: calibration shares the validation texts, and the card says so
        return Splits(
            splits.train,
            valid,
            splits.test,
            f"{splits.description}; validation too small to halve ({len(valid)} texts): calibration uses it too",
            list(valid),
        )
    seed, fraction = recipe.data.split.seed, recipe.data.split.calibration
    groups = list(dict.fromkeys(e.group for e in valid))
    if recipe.data.format == "fhir" and len(groups) >= 2:
        # Notes of one patient stay together, as in the train/validation/test split.
        _, chosen = split_for_calibration(len(groups), seed, fraction)
        apart = {groups[i] for i in chosen}
        calibration = np.array([i for i, e in enumerate(valid) if e.group in apart], dtype=np.int64)
        selection = np.array([i for i, e in enumerate(valid) if e.group not in apart], dtype=np.int64)
    else:
        strata = ["|".join(sorted(e.labels)) for e in valid]
        selection, calibration = split_for_calibration(len(valid), seed, fraction, strata=strata)
    valid = splits.validation
    return Splits(
        splits.train,
        [valid[i] for i in selection],
        splits.test,
        f"{splits.description}; validation halved for calibration ({len(calibration)} of {len(valid)} texts, "
        f"seed {recipe.data.split.seed})",
        [valid[i] for i in calibration],
    )


def training_record(
    recipe: Recipe, trained: finetune.TrainedModel, dataset: str, fused: dict[str, int], record: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``training`` table: what trained, with which values (and where each came from)."""
    return {
        "base_model": recorded_base_model(recipe),
        "method": recipe.method.kind,
        "trainable_parameters": trained.trainable_parameters,
        "total_parameters": trained.total_parameters,
        "dataset": dataset,
        "seed": recipe.training.seed,
        "details": {
            "method_options": _method_options(recipe),
            "steps": trained.steps,
            "best_epoch": trained.best_epoch,
            "epochs": recipe.training.epochs,
            "batch_size": recipe.training.batch_size,
            "learning_rate": recipe.training.learning_rate,
            "early_stopping_patience": recipe.training.early_stopping_patience,
            # Each chosen value with its source: recipe, default (and why) or search.
            "resolved": record.get("resolved", {}),
            "max_tokens": trained.max_tokens,
            "fused_operators": fused,
            "opset": recipe.opset,
        },
    }


#: What the card says of the full-int8 attempt that failed the gate.
_FAILED_FACTS = ("metric_drop_points", "agreement", "max_abs_logit_diff", "reasons")


def _int8_fallback(
    fp32: Path,
    work: Path,
    int8: Int8Quantizer,
    score_path: Callable[[Path], list[np.ndarray]],
    judge: Callable[[list[np.ndarray]], dict[str, Any]],
    failed: dict[str, Any],
    say: Callable[[str], None],
) -> tuple[Path, list[np.ndarray], dict[str, Any]] | None:
    """Mixed-precision int8 after full int8 failed the gate: as few MatMuls as possible kept in fp32.

    When int8 was made from the graph without the Attention fusion, the Attention-fused graph (Q/K/V projections
    fp32) is tried first. Then each encoder layer's MatMuls are kept fp32 in turn (a quantize + a validation pass
    each, seconds for MiniLM); the passing layer with the smallest metric drop (then the highest agreement) is
    chosen. Then each single MatMul of that layer is tried alone: a passing one is preferred (a smaller, faster
    model). The report entry says which nodes stayed fp32 and what full int8 measured. None when nothing passes
    (the gate fails).
    ``judge`` is the task's parity verdict on a variant's validation outputs (:meth:`_Task.compare`).
    """

    def attempt(name: str, nodes: list[str]) -> tuple[tuple[float, float], Path, list[np.ndarray], dict[str, Any]]:
        path = work / f"model.int8.{name}.onnx"
        int8.quantize(fp32, path, nodes)
        notes = score_path(path)
        entry = judge(notes)
        say(
            f"int8 fallback, {name} kept fp32: {entry['metric']} drop {entry['metric_drop_points']:.2f} points, "
            f"agreement {entry['agreement']:.4f} ({entry['status']})"
        )
        entry["mixed_precision"] = {"kept_fp32": nodes}
        return (entry["metric_drop_points"], -entry["agreement"]), path, notes, entry

    def best_of(tries: list[tuple[tuple[float, float], Path, list[np.ndarray], dict[str, Any]]]) -> Any:
        passing = [t for t in tries if t[3]["status"] == "passed"]
        return min(passing, key=lambda t: t[0]) if passing else None

    if int8.source is not None:
        # First the Attention-fused graph, whose Q/K/V projections stay fp32 (slower, closer to fp32).
        fused = Int8Quantizer(int8.mode, int8.feeds)
        path = work / "model.int8.fused-attention.onnx"
        fused.quantize(fp32, path)
        notes = score_path(path)
        entry = judge(notes)
        say(
            f"int8 fallback, Attention Q/K/V kept fp32: {entry['metric']} drop {entry['metric_drop_points']:.2f} "
            f"points, agreement {entry['agreement']:.4f} ({entry['status']})"
        )
        if entry["status"] == "passed":
            entry["mixed_precision"] = {"kept_fp32": ["Attention Q/K/V projections (fused Attention)"]}
            entry["mixed_precision"]["full_int8"] = {k: failed[k] for k in _FAILED_FACTS if k in failed}
            return path, notes, entry
    layers = quantize.layer_matmuls(int8.source or fp32)
    skip = set(quantize.activation_matmuls(int8.source or fp32))
    layers = {layer: [n for n in nodes if n not in skip] for layer, nodes in layers.items()}
    chosen = best_of([attempt(f"layer{layer}", nodes) for layer, nodes in layers.items()])
    if chosen is None:
        return None
    layer_nodes = chosen[3]["mixed_precision"]["kept_fp32"]
    if len(layer_nodes) > 1:
        single = best_of([attempt(node.strip("/").replace("/", "."), [node]) for node in layer_nodes])
        chosen = single or chosen
    _, path, notes, entry = chosen
    entry["mixed_precision"]["full_int8"] = {k: failed[k] for k in _FAILED_FACTS if k in failed}
    return path, notes, entry


@dataclass(frozen=True)
class Int8Quantizer:
    """How this build makes int8: the recipe's mode and, for static, the calibration windows (kept, so the
    mixed-precision fallback re-quantizes with the very same ranges)."""

    mode: quantize.Int8Mode
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    #: The fp32 graph int8 is made from: for static int8 the one optimized without the Attention fusion, so the
    #: Q/K/V projections are quantized too (export.optimize_onnx); None: the fp32 variant itself.
    source: Path | None = None

    def quantize(self, source: Path, target: Path, keep_fp32: list[str] | tuple[str, ...] = ()) -> None:
        quantize.quantize_int8(self.source or source, target, keep_fp32, mode=self.mode, calibration=self.feeds)

    def describe(self) -> dict[str, Any]:
        """The parity report's ``quantization`` entry."""
        if self.mode == "dynamic":
            return {"mode": "dynamic", "weights": "int8 per channel", "activations": "uint8, range per batch"}
        return {
            "mode": "static",
            "format": "QDQ",
            "weights": "int8 per channel",
            "activations": "uint8, calibrated range (MinMax)",
            "quantized": "encoder weight MatMuls (Q/K/V projections, attention output, feed-forward) when the "
            "source graph leaves attention unfused; attention products, pooler and classifier fp32",
            "calibration": {"split": "train", "windows": len(self.feeds)},
        }


@dataclass(frozen=True)
class Variants:
    """What :func:`export_variants` made."""

    fp32: Path
    #: precision → ONNX file, every variant the recipe asks for.
    files: dict[str, Path]
    fused: dict[str, int]
    tokenizer: Path
    int8: Int8Quantizer
    #: Opens the runtime's session for one of ``files`` (see :mod:`fhirplug_convert._core`).
    open: Callable[[Path, str], Any]


def export_variants(
    recipe: Recipe,
    trained: finetune.TrainedModel,
    tokenizer: Any,
    task: Any,
    work: Path,
    say: Callable[[str], None],
    lap: Callable[[str], None],
    calibration_texts: list[str],
) -> Variants:
    """Export → optimize → quantize, each stage timed (``lap``).

    Static int8 is calibrated on the runtime's windows of ``calibration_texts`` (the training split), at most
    ``export.int8_calibration_windows`` of them.
    """
    raw = work / "model.raw.onnx"
    export.export_onnx(trained.module, raw, task, recipe.opset, int(trained.config.vocab_size))
    tokenizer_path = work / "tokenizer.json"
    export.save_tokenizer(tokenizer, tokenizer_path)
    lap("export")
    fp32 = work / "model.fp32.onnx"
    fused: dict[str, int] = {}
    if recipe.export.optimize:
        fused = export.optimize_onnx(raw, fp32, trained.config)
        say(f"optimized: fused {fused or 'nothing'}")
    else:
        raw.replace(fp32)
    lap("optimize")

    def open_session(path: Path, precision: str) -> Any:
        return _core.open_session(
            path,
            tokenizer_path,
            max_tokens=trained.max_tokens,
            stride=recipe.training.stride,
            precision=precision,
            opset=recipe.opset,
        )

    files = {"fp32": fp32}
    int8 = Int8Quantizer(recipe.export.int8)
    if "int8" in recipe.export.variants:
        if recipe.export.int8 == "static":
            feeds = _core.calibration_feeds(
                open_session(fp32, "fp32"), calibration_texts, recipe.export.int8_calibration_windows
            )
            source = None
            if recipe.export.optimize:
                source = work / "model.int8-source.onnx"
                export.optimize_onnx(raw, source, trained.config, attention=False)
            int8 = Int8Quantizer("static", feeds, source)
        files["int8"] = work / "model.int8.onnx"
        int8.quantize(fp32, files["int8"])
        calibrated = f", calibrated on {len(int8.feeds)} training windows" if int8.feeds else ""
        say(f"int8: {recipe.export.int8}{calibrated}")
    if "fp16" in recipe.export.variants:
        files["fp16"] = work / "model.fp16.onnx"
        quantize.convert_fp16(fp32, files["fp16"])
    lap("quantize")
    return Variants(fp32, files, fused, tokenizer_path, int8, open_session)


#: The bundle file that names the rows of the test split, so anyone can re-score it (see package.test_split_record).
TEST_SPLIT = "test_split.json"


def _write_test_split(recipe: Recipe, splits: Splits, work: Path) -> Path:
    path = work / TEST_SPLIT
    path.write_text(json.dumps(test_split_record(recipe, splits), indent=2, ensure_ascii=False) + "\n", "utf-8")
    return path


def _int8_ops(path: Path) -> dict[str, int]:
    """The quantization-relevant operators onnxruntime runs the int8 graph as (after its graph optimization)."""
    counts = quantize.runtime_op_counts(path)
    watched = ("QLinear", "QGemm", "QAttention", "MatMulInteger", "DynamicQuantize", "QuantizeLinear", "Dequantize")
    return {op: n for op, n in counts.items() if op.startswith(watched) or op in ("MatMul", "Attention")}


# --- the task's part of the build ------------------------------------------------------------------------------


class _Task(ABC):
    """What differs between tasks in :func:`_build`: how a variant's validation/test outputs are scored, what the
    parity metric is, what is fitted on validation before the gate (``stage``), and what the bundle adds."""

    stage = ""

    def __init__(self, recipe: Recipe, splits: Splits, work: Path, say: Callable[[str], None]) -> None:
        self.recipe, self.splits, self.work, self.say = recipe, splits, work, say
        self.texts = {"validation": [e.text for e in splits.validation], "test": [e.text for e in splits.test]}
        self.tolerance = recipe.tolerance()
        #: Model-card facts (calibration or terminology), the bundle's calibration entry and extra files.
        self.facts: dict[str, Any] = {}
        self.calibration: dict[str, Any] = {"temperature": 1.0, "thresholds": {}, "default_threshold": 0.5}
        self.files: dict[str, Path] = {}
        self.manifest_extra: dict[str, Any] = {}
        self.details: dict[str, Any] = {}

    @abstractmethod
    def score(self, session: Any, split: str) -> list[np.ndarray]:
        """A variant's outputs on ``split`` (validation, test), through the runtime's session."""

    @abstractmethod
    def windows(self, outputs: list[np.ndarray]) -> dict[str, int]:
        """The parity report's counts of what was compared."""

    def prepare(self, fp32_session: Any) -> None:  # noqa: B027 - optional hook
        """Score what ``fit`` needs besides the validation outputs (text classification: the calibration split)."""

    @abstractmethod
    def fit(self, fp32: list[np.ndarray]) -> None:
        """What is fitted on the fp32 ONNX validation outputs before the gate."""

    def finish(self, sessions: dict[str, Any], test: dict[str, list[np.ndarray]]) -> None:  # noqa: B027
        """After the gate, with the sessions and test outputs of every variant that ships: what needs them
        (text classification: test ECE, codes withheld for low test AUROC, abstention)."""

    @abstractmethod
    def compare(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
        """The parity verdict of a reduced-precision variant against fp32 (see :func:`validate.compare_variant`)."""

    @abstractmethod
    def metrics(self, outputs: list[np.ndarray], split: str) -> dict[str, Any]:
        """The model card's metrics of a variant's outputs on ``split``."""


class _TextClassification(_Task):
    """Per-note logits aggregated as the runtime does. On the calibration part of the validation split: the
    temperature and the decision policy (guarded multi-label thresholds, or the multi-class floor); after the gate,
    on the test split: ECE, the codes withheld for low AUROC, and the abstention model's rates."""

    stage = "calibrate"
    train = staticmethod(finetune.train)

    def __init__(self, recipe: Recipe, splits: Splits, work: Path, say: Callable[[str], None]) -> None:
        super().__init__(recipe, splits, work, say)
        labels, multi_label = recipe.label_names, recipe.output.multi_label
        self.texts["calibration"] = [e.text for e in splits.calibration]
        self.targets = {
            name: finetune.targets_of(examples, labels, multi_label)
            for name, examples in (
                ("validation", splits.validation),
                ("calibration", splits.calibration),
                ("test", splits.test),
            )
        }
        self.calibrated = validate.Calibrated(labels, multi_label)
        self.calibration_out: list[np.ndarray] = []
        self.abstains: dict[str, np.ndarray] = {}

    def score(self, session: Any, split: str) -> list[np.ndarray]:
        return _core.note_logits(session, self.texts[split])

    def windows(self, outputs: list[np.ndarray]) -> dict[str, int]:
        return {"windows": int(sum(len(n) for n in outputs))}

    def prepare(self, fp32_session: Any) -> None:
        self.calibration_out = self.score(fp32_session, "calibration")

    def fit(self, fp32: list[np.ndarray]) -> None:
        # Fit on what ships (fp32 ONNX), aggregated as the runtime aggregates, on texts model selection never saw.
        labels, multi_label = self.calibrated.labels, self.calibrated.multi_label
        outputs, targets = self.calibration_out, self.targets["calibration"]
        temperature = fit_temperature(outputs, targets, multi_label=multi_label)
        probs = validate.Calibrated(labels, multi_label, temperature).probabilities(outputs)
        policy = decision_policy(probs, targets, labels, multi_label=multi_label)
        thresholds: dict[str, float] = dict(policy.get("thresholds", {}))
        limits = np.array([thresholds[k] for k in labels]) if multi_label else None
        self.calibrated = validate.Calibrated(labels, multi_label, temperature, limits)
        self.calibration = {"temperature": temperature, "thresholds": thresholds, "default_threshold": 0.5}
        if not multi_label:
            self.calibration["min_probability"] = policy["floor"]
        how = "; ".join(f"{k} {r['reason']}" for k, r in policy["labels"].items() if r["reason"] != "tuned")
        self.say(
            f"calibration: T = {temperature:.3f} on {len(outputs)} calibration texts" + (f"; {how}" if how else "")
        )
        self.facts = {
            "calibration": {
                "temperature": temperature,
                "fit_on": f"the calibration part of the validation split, {len(outputs)} texts",
            },
            "decisions": policy,
        }

    def finish(self, sessions: dict[str, Any], test: dict[str, list[np.ndarray]]) -> None:
        labels, multi_label = self.calibrated.labels, self.calibrated.multi_label
        targets = self.targets["test"]
        reference = test["fp32"] if "fp32" in test else next(iter(test.values()))
        uncalibrated = validate.Calibrated(labels, multi_label).probabilities(reference)
        before = expected_calibration_error(uncalibrated, targets, multi_label=multi_label)
        after = expected_calibration_error(self.calibrated.probabilities(reference), targets, multi_label=multi_label)
        self.facts["calibration"].update(ece_before=round(before, 6), ece_after=round(after, 6), measured_on="test")
        self.say(f"test ECE {before:.4f} → {after:.4f} (temperature {self.calibrated.temperature:.3f})")
        # A code the model cannot rank on held-out notes is not shipped (multi-label). Multi-class classes partition
        # the texts, so a class is never withheld; its AUROC is reported.
        per_label = classification_metrics(
            self.calibrated.probabilities(reference), targets, labels, multi_label=multi_label
        )
        _, dropped = reliable_labels(per_label)
        if multi_label and dropped:
            self.calibration["withheld"] = dropped
            limits = np.array([np.inf if k in dropped else self.calibration["thresholds"][k] for k in labels])
            self.calibrated = validate.Calibrated(labels, multi_label, self.calibrated.temperature, limits)
            self.say(f"withheld: {json.dumps(dropped)}")
        self.facts["decisions"]["reliability"] = {"rule": "test AUROC ≥ 0.7 on ≥ 5 positive test notes", **dropped}
        spec = self.recipe.abstention
        if spec.enabled:
            train = self.splits.train
            truth = np.zeros((len(train), len(labels)), dtype=np.int64)
            index = {k: i for i, k in enumerate(labels)}
            for row, example in enumerate(train):
                truth[row, [index[k] for k in example.labels]] = 1
            built = abstention.build_abstention(
                spec,
                sessions,
                len(labels),
                ([e.text for e in train], truth),
                self.texts["calibration"],
                self.texts["test"],
                self.work,
                seed=self.recipe.data.split.seed,
            )
            self.files["abstention.npz"] = built.file
            self.calibration["abstention"] = built.manifest_entry
            self.abstains = built.test_abstains
            self.facts["abstention"] = built.facts
            rates = built.facts["rates"][next(iter(built.facts["rates"]))]
            self.say("abstention: " + ", ".join(f"{k} {v['abstained']}" for k, v in rates.items()))
        floor = self.calibration.get("min_probability", 0.0)
        answered: dict[str, Any] = {}
        for precision, outputs in test.items():
            probs = self.calibrated.probabilities(outputs)
            refused = self.abstains.get(precision, np.zeros(len(outputs), dtype=bool))
            if not multi_label:
                refused = refused | (probs.max(axis=1) < floor)
            kept = ~refused
            name, value = task_metric(self.calibrated.metrics(outputs, targets), multi_label)
            entry: dict[str, Any] = {"texts": len(outputs), "answered": int(kept.sum()), name: value}
            if kept.any():
                subset = targets[kept]
                answered_metrics = classification_metrics(
                    probs[kept], subset, labels, multi_label=multi_label, thresholds=self.calibrated.thresholds
                )
                entry[f"{name}_on_answered"] = task_metric(answered_metrics, multi_label)[1]
            answered[precision] = entry
        if "abstention" in self.facts:
            self.facts["abstention"]["answered"] = answered
        else:
            self.facts["answered"] = answered

    def compare(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
        return validate.compare_variant(
            reference, candidate, self.targets["validation"], self.calibrated, self.tolerance
        )

    def metrics(self, outputs: list[np.ndarray], split: str) -> dict[str, Any]:
        return self.calibrated.metrics(outputs, self.targets[split])


class _TokenClassification(_Task):
    """Per-window token logits decoded into spans as the runtime does; the terminology built before the gate; the
    gate on strict entity micro-F1 and per-token argmax agreement."""

    stage = "terminology"
    train = staticmethod(ner.train)

    def __init__(self, recipe: Recipe, splits: Splits, work: Path, say: Callable[[str], None]) -> None:
        super().__init__(recipe, splits, work, say)
        assert recipe.entities is not None
        self.entities = recipe.entities
        self.types = recipe.label_names
        self.examples = {"validation": splits.validation, "test": splits.test}
        self.window_list: dict[str, list[Any]] = {}
        self.index: Any = None
        self.reference: float = 0.0
        self.details = {"tags": tag_names(self.types)}  # the runtime's tag order

    def score(self, session: Any, split: str) -> list[np.ndarray]:
        windows, logits = ner.runtime_logits(session, self.texts[split])
        self.window_list[split] = windows
        return logits

    def windows(self, outputs: list[np.ndarray]) -> dict[str, int]:
        return {"windows": len(outputs), "tokens": int(sum(len(x) for x in outputs))}

    def _mentions(self, outputs: list[np.ndarray], split: str, index: Any = None) -> dict[str, Any]:
        minimum = self.entities.min_confidence if split == "test" else 0.0
        texts, windows = self.texts[split], self.window_list[split]
        spans = ner.predict_spans(texts, windows, outputs, self.types, 1.0, minimum)
        return ner.ner_metrics(self.examples[split], spans, self.types, index)

    def fit(self, fp32: list[np.ndarray]) -> None:
        splits = self.splits
        self.index, self.files, facts = build_terminology(
            self.recipe, [*splits.train, *splits.validation], self.work, held_out=splits.test
        )
        self.say(f"terminology: {facts['concepts']} concepts, {facts['names']} names")
        self.facts = {"terminology": facts}
        self.reference = self._mentions(fp32, "validation")["mentions"]["micro"]["f1"]
        entities = self.entities
        self.manifest_extra = {
            "entities": {
                "resources": dict(entities.resources),
                "system": entities.system,
                "concepts": "concepts.json",
                "vectors": "concept_vectors.npz",
                "coding_threshold": entities.coding_threshold,
                "assertion_lexicon": "assertion.json",
                "min_confidence": entities.min_confidence,
            }
        }

    def compare(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
        f1 = self._mentions(candidate, "validation")["mentions"]["micro"]["f1"]
        agreement = ner.agreement(reference, candidate)
        drop = round((self.reference - f1) * 100, 4)
        reasons = []
        if drop > self.tolerance["max_metric_drop"]:
            reasons.append(f"entity F1 drops {drop:.2f} points (allowed {self.tolerance['max_metric_drop']})")
        if agreement < self.tolerance["min_agreement"]:
            reasons.append(f"token agreement {agreement:.2%} (needs {self.tolerance['min_agreement']:.0%})")
        entry: dict[str, Any] = {
            "status": "failed" if reasons else "passed",
            "metric": "entity_f1",
            "fp32": self.reference,
            "value": f1,
            "metric_drop_points": drop,
            "agreement": round(agreement, 6),
            "max_abs_logit_diff": round(validate.torch_vs_onnx(reference, candidate), 6),
        }
        if reasons:
            entry["reasons"] = reasons
        return entry

    def metrics(self, outputs: list[np.ndarray], split: str) -> dict[str, Any]:
        if split == "validation":
            return self._mentions(outputs, split)
        value = self._mentions(outputs, split, self.index)
        self.say(f"test: {json.dumps({k: v['f1'] for k, v in value['mentions'].items()})}")
        return value


_TASKS: dict[str, type[_TextClassification | _TokenClassification]] = {
    "text-classification": _TextClassification,
    "token-classification": _TokenClassification,
}


def _build(
    recipe: Recipe,
    trained: finetune.TrainedModel,
    tokenizer: Any,
    splits: Splits,
    work: Path,
    out: Path,
    sign_key: str | Path | None,
    overrides: dict[str, Any],
    say: Callable[[str], None],
    lap: Callable[[str], None],
    record: dict[str, Any],
) -> ConvertResult:
    """Export → optimize → quantize → the task's fit (calibrate / terminology) → parity gate → test metrics →
    package, each stage timed (``lap``). Every number comes from the runtime's own session (see :mod:`_core`)."""
    task = _TASKS[recipe.task](recipe, splits, work, say)
    tolerance = task.tolerance
    made = export_variants(
        recipe, trained, tokenizer, get_task(recipe.task), work, say, lap, [e.text for e in splits.train]
    )
    fp32, files, fused = made.fp32, made.files, made.fused

    # --- fit on validation (fp32 ONNX, and torch on the very same windows and batches for the gate) ---
    fp32_session = made.open(fp32, "fp32")
    fp32_out = task.score(fp32_session, "validation")
    torch_out = task.score(_core.torch_session(trained.module, fp32_session), "validation")
    task.prepare(fp32_session)
    task.fit(fp32_out)
    lap(task.stage)

    # --- parity gate ---
    diff = validate.torch_vs_onnx(torch_out, fp32_out)
    fp32_entry: dict[str, Any] = {
        "status": "passed" if diff <= tolerance["max_abs_logit_diff"] else "failed",
        "provider": fp32_session.provider,
        "max_abs_logit_diff_vs_torch": diff,
    }
    if fp32_entry["status"] == "failed":
        fp32_entry["reasons"] = [
            f"max |Δlogit| torch vs ONNX is {diff:.2e} (allowed {tolerance['max_abs_logit_diff']:.0e})"
        ]
    report: dict[str, Any] = {
        "split": "validation",
        "texts": len(splits.validation),
        **task.windows(fp32_out),
        "batch_size": _core.RUNTIME_BATCH_SIZE,
        "tolerance": tolerance,
        "variants": {"fp32": fp32_entry},
    }
    if recipe.task == "token-classification":
        report["metric"] = "strict entity micro-F1; agreement = per-token argmax agreement with fp32"
    for precision in ("int8", "fp16"):
        if precision not in files:
            continue
        try:
            session = made.open(files[precision], precision)
            outputs = task.score(session, "validation")
        except Exception as exc:  # onnxruntime: no kernel for this precision on the providers present
            if precision != "fp16":
                raise
            report["variants"][precision] = {
                "status": "unverified",
                "reason": f"no GPU provider, and the CPU provider cannot run it ({str(exc).splitlines()[0][:200]})",
            }
            continue
        entry = task.compare(fp32_out, outputs)
        if precision == "int8" and entry["status"] == "failed" and recipe.export.int8_fallback:
            fallback = _int8_fallback(
                fp32,
                work,
                made.int8,
                lambda path: task.score(made.open(path, "int8"), "validation"),
                lambda candidate: task.compare(fp32_out, candidate),
                entry,
                say,
            )
            if fallback is not None:
                path, outputs, entry = fallback
                path.replace(files["int8"])
        if precision == "int8":
            entry["quantization"] = {**made.int8.describe(), "runs_as": _int8_ops(files["int8"])}
        report["variants"][precision] = {"provider": session.provider, **entry}
    keep = validate.gate(report, recipe.export.allow_drop, recipe.parity.require)
    for precision, entry in report["variants"].items():
        say(
            f"parity {precision}: {entry['status']}"
            + (f" ({'; '.join(entry['reasons'])})" if "reasons" in entry else "")
        )
    lap("parity")

    # --- test metrics of every variant that ships ---
    sessions = {p: made.open(files[p], p) for p in keep}
    test_out = {p: task.score(sessions[p], "test") for p in keep}
    task.finish(sessions, test_out)
    test_metrics = {p: task.metrics(test_out[p], "test") for p in keep}
    metrics = {
        "split": "test",
        "test": test_metrics,
        "validation": {"fp32": task.metrics(fp32_out, "validation")},
        **task.facts,
        "splits": splits.counts(),
        "history": trained.history,
    }
    if record.get("search"):
        metrics["search"] = record["search"]
    lap("evaluate")

    # --- package ---
    training = training_record(recipe, trained, splits.description, fused, record)
    training["details"].update(task.details)
    prepare_out_dir(out)
    content = BundleContent(
        variants={p: files[p] for p in keep},
        tokenizer=made.tokenizer,
        max_tokens=trained.max_tokens,
        stride=recipe.training.stride,
        calibration=task.calibration,
        metrics=metrics,
        parity=report,
        training=training,
        timings=record["timings"],
        command=_command(recipe, out, overrides),
        extra_files={**task.files, TEST_SPLIT: _write_test_split(recipe, splits, work)},
        manifest_extra=task.manifest_extra,
    )
    manifest = write_bundle(out, recipe, content, fused=fused, signing_key=sign_key, before_card=lambda: lap("package"))
    say(f"bundle: {out} ({', '.join(keep)})")
    return ConvertResult(out, manifest, metrics, report, fused)
