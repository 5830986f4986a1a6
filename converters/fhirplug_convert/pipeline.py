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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fhirplug.errors import ConvertError
from fhirplug.manifest import Manifest
from fhirplug_convert import _core, export, finetune, quantize, validate
from fhirplug_convert.datasets import Splits, load_splits
from fhirplug_convert.evaluate import expected_calibration_error, fit_temperature, tune_thresholds
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
        from_checkpoint: skip training: export and package a text-classification model this recipe fine-tuned
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
    splits = load_splits(recipe)
    base = resolve_base_model(recipe)
    recipe, resolved = resolve_training(recipe, len(splits.train))
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
        if recipe.task != "text-classification":
            raise ConvertError("--from-checkpoint: only text-classification checkpoints can be packaged again")
        trained, tokenizer = finetune.load_checkpoint(from_checkpoint, recipe)
        say(f"loaded the model this recipe fine-tuned earlier from {from_checkpoint} (no training)")
    else:
        if recipe.task == "token-classification":
            from fhirplug_convert import token_classification as ner

            trainer = ner.train
        else:
            trainer = finetune.train

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
        finetune.save_checkpoint(trained, str(base), checkpoint)
        say(f"saved the PyTorch checkpoint to {checkpoint}")

    record = {"resolved": resolved, "search": search, "timings": timings}
    with tempfile.TemporaryDirectory(prefix="fhirplug-convert-") as tmp:
        work = Path(tmp)
        if recipe.task == "token-classification":
            from fhirplug_convert import token_classification as ner

            manifest, metrics, parity, fused = ner.build(
                recipe,
                trained,
                tokenizer,
                splits,
                work,
                out,
                sign_key,
                _command(recipe, out, overrides),
                say,
                lap,
                record=record,
            )
            lap("manifest")
            return ConvertResult(out, manifest, metrics, parity, fused, timings)
        result = _build(recipe, trained, tokenizer, splits, work, out, sign_key, overrides, say, lap, record)
    lap("manifest")
    return ConvertResult(result.bundle, result.manifest, result.metrics, result.parity, result.fused_operators, timings)


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


def _int8_fallback(
    fp32: Path,
    work: Path,
    int8: Int8Quantizer,
    score_path: Callable[[Path], list[np.ndarray]],
    fp32_notes: list[np.ndarray],
    targets: np.ndarray,
    calibrated: validate.Calibrated,
    tolerance: dict[str, float],
    failed: dict[str, Any],
    say: Callable[[str], None],
) -> tuple[Path, list[np.ndarray], dict[str, Any]] | None:
    """Mixed-precision int8 after full int8 failed the gate: as few MatMuls as possible kept in fp32.

    First each encoder layer's MatMuls are kept fp32 in turn (a quantize + a validation pass each, seconds for
    MiniLM); the passing layer with the smallest metric drop (then the highest agreement) is chosen. Then each
    single MatMul of that layer is tried alone: a passing one is preferred (a smaller, faster model). The report
    entry says which nodes stayed fp32 and what full int8 measured. None when nothing passes (the gate fails).
    """

    def attempt(name: str, nodes: list[str]) -> tuple[tuple[float, float], Path, list[np.ndarray], dict[str, Any]]:
        path = work / f"model.int8.{name}.onnx"
        int8.quantize(fp32, path, nodes)
        notes = score_path(path)
        entry = validate.compare_variant(fp32_notes, notes, targets, calibrated, tolerance)
        say(
            f"int8 fallback, {name} kept fp32: {entry['metric']} drop {entry['metric_drop_points']:.2f} points, "
            f"agreement {entry['agreement']:.4f} ({entry['status']})"
        )
        entry["mixed_precision"] = {"kept_fp32": nodes}
        return (entry["metric_drop_points"], -entry["agreement"]), path, notes, entry

    def best_of(tries: list[tuple[tuple[float, float], Path, list[np.ndarray], dict[str, Any]]]) -> Any:
        passing = [t for t in tries if t[3]["status"] == "passed"]
        return min(passing, key=lambda t: t[0]) if passing else None

    layers = quantize.layer_matmuls(fp32)
    chosen = best_of([attempt(f"layer{layer}", nodes) for layer, nodes in layers.items()])
    if chosen is None:
        return None
    layer_nodes = chosen[3]["mixed_precision"]["kept_fp32"]
    if len(layer_nodes) > 1:
        single = best_of([attempt(node.strip("/").replace("/", "."), [node]) for node in layer_nodes])
        chosen = single or chosen
    _, path, notes, entry = chosen
    entry["mixed_precision"]["full_int8"] = {
        k: failed[k] for k in ("metric_drop_points", "agreement", "max_abs_logit_diff", "reasons") if k in failed
    }
    return path, notes, entry


@dataclass(frozen=True)
class Int8Quantizer:
    """How this build makes int8: the recipe's mode and, for static, the calibration windows (kept, so the
    mixed-precision fallback re-quantizes with the very same ranges)."""

    mode: quantize.Int8Mode
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)

    def quantize(self, source: Path, target: Path, keep_fp32: list[str] | tuple[str, ...] = ()) -> None:
        quantize.quantize_int8(source, target, keep_fp32, mode=self.mode, calibration=self.feeds)

    def describe(self) -> dict[str, Any]:
        """The parity report's ``quantization`` entry."""
        if self.mode == "dynamic":
            return {"mode": "dynamic", "weights": "int8 per channel", "activations": "uint8, range per batch"}
        return {
            "mode": "static",
            "format": "QDQ",
            "weights": "int8 per channel",
            "activations": "uint8, calibrated range (MinMax)",
            "quantized": "encoder MatMuls (feed-forward, attention output); Attention QKV, pooler, classifier fp32",
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
            int8 = Int8Quantizer("static", feeds)
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
    task = get_task(recipe.task)
    labels = recipe.label_names
    multi_label = recipe.output.multi_label
    tolerance = recipe.tolerance()
    stride = recipe.training.stride

    made = export_variants(recipe, trained, tokenizer, task, work, say, lap, [e.text for e in splits.train])
    fp32, files, fused, tokenizer_path = made.fp32, made.files, made.fused, made.tokenizer

    # Every number below comes from the runtime's own session (windows, batches, padding): see _core.
    valid_texts = [e.text for e in splits.validation]
    valid_targets = finetune.targets_of(splits.validation, labels, multi_label)
    fp32_session = made.open(fp32, "fp32")
    provider = fp32_session.provider
    fp32_notes = _core.note_logits(fp32_session, valid_texts)
    torch_notes = _core.note_logits(_core.torch_session(trained.module, fp32_session), valid_texts)

    def score(path: Path, precision: str, texts: list[str]) -> tuple[list[np.ndarray], str]:
        session = made.open(path, precision)
        return _core.note_logits(session, texts), session.provider

    # Calibration is fit on what ships (fp32 ONNX), on validation, aggregated as the runtime aggregates.
    temperature = fit_temperature(fp32_notes, valid_targets, multi_label=multi_label)
    uncalibrated = validate.Calibrated(labels, multi_label)
    calibrated = validate.Calibrated(labels, multi_label, temperature)
    thresholds: dict[str, float] = {}
    if multi_label:
        thresholds = tune_thresholds(calibrated.probabilities(fp32_notes), valid_targets, labels)
        calibrated = validate.Calibrated(
            labels, multi_label, temperature, np.array([thresholds.get(k, 0.5) for k in labels])
        )
    ece_before = expected_calibration_error(
        uncalibrated.probabilities(fp32_notes), valid_targets, multi_label=multi_label
    )
    ece_after = expected_calibration_error(calibrated.probabilities(fp32_notes), valid_targets, multi_label=multi_label)
    say(f"calibration: T = {temperature:.3f}, validation ECE {ece_before:.4f} → {ece_after:.4f}")
    lap("calibrate")

    diff = validate.torch_vs_onnx(torch_notes, fp32_notes)
    fp32_entry: dict[str, Any] = {
        "status": "passed" if diff <= tolerance["max_abs_logit_diff"] else "failed",
        "provider": provider,
        "max_abs_logit_diff_vs_torch": diff,
    }
    if fp32_entry["status"] == "failed":
        fp32_entry["reasons"] = [
            f"max |Δlogit| torch vs ONNX is {diff:.2e} (allowed {tolerance['max_abs_logit_diff']:.0e})"
        ]
    report: dict[str, Any] = {
        "split": "validation",
        "texts": len(valid_texts),
        "windows": int(sum(len(n) for n in fp32_notes)),
        "batch_size": _core.RUNTIME_BATCH_SIZE,
        "tolerance": tolerance,
        "variants": {"fp32": fp32_entry},
    }
    for precision in ("int8", "fp16"):
        if precision not in files:
            continue
        try:
            notes, used = score(files[precision], precision, valid_texts)
        except Exception as exc:  # onnxruntime: no kernel for this precision on the providers present
            if precision != "fp16":
                raise
            report["variants"][precision] = {
                "status": "unverified",
                "reason": f"no GPU provider, and the CPU provider cannot run it ({str(exc).splitlines()[0][:200]})",
            }
            continue
        entry = validate.compare_variant(fp32_notes, notes, valid_targets, calibrated, tolerance)
        if precision == "int8" and entry["status"] == "failed" and recipe.export.int8_fallback:
            fallback = _int8_fallback(
                fp32,
                work,
                made.int8,
                lambda path: score(path, "int8", valid_texts)[0],
                fp32_notes,
                valid_targets,
                calibrated,
                tolerance,
                entry,
                say,
            )
            if fallback is not None:
                path, notes, entry = fallback
                path.replace(files["int8"])
        if precision == "int8":
            entry["quantization"] = {**made.int8.describe(), "runs_as": _int8_ops(files["int8"])}
        report["variants"][precision] = {"provider": used, **entry}
    keep = validate.gate(report, recipe.export.allow_drop, recipe.parity.require)
    for precision, entry in report["variants"].items():
        say(
            f"parity {precision}: {entry['status']}"
            + (f" ({'; '.join(entry['reasons'])})" if "reasons" in entry else "")
        )
    lap("parity")

    test_texts = [e.text for e in splits.test]
    test_targets = finetune.targets_of(splits.test, labels, multi_label)
    test_metrics: dict[str, Any] = {}
    for precision in keep:
        notes = score(files[precision], precision, test_texts)[0]
        test_metrics[precision] = calibrated.metrics(notes, test_targets)
    metrics = {
        "split": "test",
        "test": test_metrics,
        "validation": {"fp32": calibrated.metrics(fp32_notes, valid_targets)},
        "calibration": {
            "temperature": temperature,
            "ece_before": round(ece_before, 6),
            "ece_after": round(ece_after, 6),
            "split": "validation",
        },
        "splits": splits.counts(),
        "history": trained.history,
    }
    if record.get("search"):
        metrics["search"] = record["search"]
    lap("evaluate")

    prepare_out_dir(out)
    content = BundleContent(
        variants={p: files[p] for p in keep},
        tokenizer=tokenizer_path,
        max_tokens=trained.max_tokens,
        stride=stride,
        calibration={"temperature": temperature, "thresholds": thresholds, "default_threshold": 0.5},
        metrics=metrics,
        parity=report,
        training=training_record(recipe, trained, splits.description, fused, record),
        timings=record["timings"],
        command=_command(recipe, out, overrides),
        extra_files={TEST_SPLIT: _write_test_split(recipe, splits, work)},
    )
    manifest = write_bundle(out, recipe, content, fused=fused, signing_key=sign_key, before_card=lambda: lap("package"))
    say(f"bundle: {out} ({', '.join(keep)})")
    return ConvertResult(out, manifest, metrics, report, fused)
