"""token-classification on the train side: BIO windows, fine-tuning, the terminology, parity and metrics.

The runtime's own code decides what a plugin outputs: windows are made with the runtime's tokenizer setup and
``fhirplug.session`` windows, decoded with :func:`fhirplug.tasks.token_classification.decode_spans` and coded with
:class:`fhirplug._coding.ConceptIndex`, so a model card's numbers are the runtime's numbers.

Training labels: a token is ``B-t`` when it is the first token of a ``t`` mention in its window, ``I-t`` when it
is a later one, ``O`` otherwise; special tokens are ignored by the loss. Every window of every text trains (unlike
text classification, mentions are anywhere in a note). Where mentions overlap (rare), the first one (by start,
longest first) owns the shared characters.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from fhirplug._assertion import DEFAULT_LEXICON, Lexicon
from fhirplug._coding import ConceptIndex, build_index, merge_names
from fhirplug.errors import ConvertError
from fhirplug.session import Window, _window
from fhirplug.tasks.token_classification import Span, decode_spans, drop_cues, merge_windows, tag_names
from fhirplug_convert import _core, finetune
from fhirplug_convert.datasets import Example
from fhirplug_convert.recipe import Recipe

__all__ = [
    "build_terminology",
    "encode",
    "ner_metrics",
    "predict_spans",
    "runtime_logits",
    "score_windows",
    "train",
]

IGNORE = -100


@dataclass
class Encoded:
    """Every window of a list of texts, as the runtime makes them, with BIO targets when mentions are known."""

    windows: list[Window]
    targets: list[list[int]]


def _char_owner(example: Example) -> np.ndarray:
    owner = np.full(len(example.text) + 1, -1, dtype=np.int64)
    for index, mention in sorted(enumerate(example.mentions), key=lambda kv: (kv[1].start, -kv[1].end)):
        segment = owner[mention.start : mention.end]
        segment[segment < 0] = index
    return owner


def encode(tokenizer: Tokenizer, examples: Sequence[Example], types: Sequence[str]) -> Encoded:
    """Windows of ``examples`` (``tokenizer`` from ``finetune._window_tokenizer``) and their BIO targets."""
    tag_index = {t: i for i, t in enumerate(tag_names(types))}
    windows: list[Window] = []
    targets: list[list[int]] = []
    for index, (example, enc) in enumerate(
        zip(examples, tokenizer.encode_batch([e.text for e in examples]), strict=True)
    ):
        owner = _char_owner(example)
        for part in [enc, *enc.overflowing]:
            window = _window(index, part)
            labels = []
            seen: set[int] = set()
            for (s, e), special in zip(part.offsets, part.special_tokens_mask, strict=True):
                if special or e <= s:
                    labels.append(IGNORE)
                    continue
                who = int(owner[s])
                if who < 0:
                    labels.append(tag_index["O"])
                    continue
                mention = example.mentions[who]
                first = who not in seen
                seen.add(who)
                labels.append(tag_index[f"{'B' if first else 'I'}-{mention.type}"])
            windows.append(window)
            targets.append(labels)
    return Encoded(windows, targets)


def _feed(windows: Sequence[Window], pad: int) -> dict[str, np.ndarray]:
    return finetune.pad_batch([list(w.ids) for w in windows], [list(w.type_ids) for w in windows], pad)


def score_windows(module: nn.Module, windows: Sequence[Window], batch_size: int, pad: int) -> list[np.ndarray]:
    """Each window's ``[tokens, tags]`` logits from the torch module (padding cut off), for the per-epoch
    validation; once exported, every variant is scored by the runtime's session (:func:`runtime_logits`)."""
    out: list[np.ndarray] = []
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        logits = finetune.torch_logits(module, _feed(chunk, pad))
        out.extend(logits[row, : len(w.ids)] for row, w in enumerate(chunk))
    return out


def runtime_logits(session: Any, texts: Sequence[str]) -> tuple[list[Window], list[np.ndarray]]:
    """The runtime's windows of ``texts`` and each one's ``[tokens, tags]`` logits (padding cut off)."""
    windows, outputs = _core.window_outputs(session, texts)
    return windows, [o[: len(w.ids)] for w, o in zip(windows, outputs, strict=True)]


def predict_spans(
    texts: Sequence[str],
    windows: Sequence[Window],
    logits: Sequence[np.ndarray],
    types: Sequence[str],
    temperature: float = 1.0,
    min_confidence: float = 0.0,
) -> list[list[Span]]:
    """The runtime's spans for each text (assertion cues dropped with fhirplug's default lexicon)."""
    merged = merge_windows(len(texts), windows, logits, temperature)
    lexicon = Lexicon.default()
    return [
        [s for s in drop_cues(text, decode_spans(text, offsets, probs, types), lexicon) if s.score >= min_confidence]
        for text, (offsets, probs) in zip(texts, merged, strict=True)
    ]


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def ner_metrics(
    examples: Sequence[Example],
    predicted: Sequence[Sequence[Span]],
    types: Sequence[str],
    index: ConceptIndex | None = None,
) -> dict[str, Any]:
    """Strict mention-level P/R/F1 (exact span and type) per type and micro, and — with a terminology — the
    concept-level F1 of (document, type, code) sets (BioCreative V CDR style: composite IDs split, -1 left out)."""
    gold = {(i, m.start, m.end, m.type) for i, e in enumerate(examples) for m in e.mentions}
    pred = {(i, s.start, s.end, s.type) for i, spans in enumerate(predicted) for s in spans}
    out: dict[str, Any] = {"n_texts": len(examples), "mentions": {}}
    for kind in types:
        g = {x for x in gold if x[3] == kind}
        p = {x for x in pred if x[3] == kind}
        out["mentions"][kind] = _prf(len(g & p), len(p - g), len(g - p))
    out["mentions"]["micro"] = _prf(len(gold & pred), len(pred - gold), len(gold - pred))
    if index is not None:
        gold_c = {(i, m.type, c) for i, e in enumerate(examples) for m in e.mentions for c in m.codes}
        pred_c: set[tuple[int, str, str]] = set()
        methods: dict[str, int] = defaultdict(int)
        for i, spans in enumerate(predicted):
            text = examples[i].text
            for s in spans:
                coding = index.code(text[s.start : s.end], s.type)
                methods[coding.method] += 1
                if coding.code is not None:
                    pred_c.add((i, s.type, coding.code))
        out["concepts"] = {}
        for kind in types:
            g = {x for x in gold_c if x[1] == kind}
            p = {x for x in pred_c if x[1] == kind}
            out["concepts"][kind] = _prf(len(g & p), len(p - g), len(g - p))
        out["concepts"]["micro"] = _prf(len(gold_c & pred_c), len(pred_c - gold_c), len(gold_c - pred_c))
        out["coding_methods"] = dict(sorted(methods.items()))
    return out


def build_terminology(
    recipe: Recipe, examples: Sequence[Example], work: Path
) -> tuple[ConceptIndex, dict[str, Path], dict[str, Any]]:
    """The dictionary from the training data (single-concept mentions; composite mentions' components when they
    pair one-to-one with the IDs) and the recipe's concepts file, its n-gram vectors, and the lexicon.

    Returns:
        The index, the bundle files it needs (name → path in ``work``) and facts for the model card.
    """
    assert recipe.entities is not None
    spec = recipe.entities
    seen: list[tuple[str, str, str, str]] = []
    composite = skipped = 0
    for example in examples:
        for m in example.mentions:
            if len(m.codes) == 1:
                seen.append((m.type, m.codes[0], m.text, ""))
            elif len(m.codes) > 1:
                composite += 1
                if len(m.components) == len(m.codes):
                    seen += [(m.type, c, n, "") for c, n in zip(m.codes, m.components, strict=True)]
            else:
                skipped += 1
    extra = 0
    if spec.concepts_file is not None:
        for row in _read_concepts(spec.concepts_file):
            names = [row["display"], *row.get("names", [])]
            seen += [(row["type"], row["code"], n, row["display"]) for n in names]
            extra += 1
    if not seen:
        raise ConvertError("no coded mention in the training data and no concepts_file: nothing to code against")
    concepts, arrays = build_index(merge_names(seen), spec.system)
    files = {"concepts.json": work / "concepts.json", "concept_vectors.npz": work / "concept_vectors.npz"}
    files["concepts.json"].write_text(json.dumps(concepts, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    np.savez_compressed(files["concept_vectors.npz"], **arrays)
    lexicon = spec.assertion_lexicon or DEFAULT_LEXICON
    try:
        Lexicon.load(lexicon)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"entities.assertion_lexicon {lexicon}: not a usable lexicon ({exc})") from exc
    files["assertion.json"] = work / "assertion.json"
    shutil.copyfile(lexicon, files["assertion.json"])
    index = ConceptIndex.load(files["concepts.json"], files["concept_vectors.npz"], spec.coding_threshold)
    facts = {
        "concepts": len(concepts["concepts"]),
        "names": len(arrays["row_concept"]),
        "composite_mentions": composite,
        "mentions_without_concept": skipped,
        "concepts_file_entries": extra,
        "coding_threshold": spec.coding_threshold,
    }
    return index, files, facts


def _read_concepts(path: Path) -> list[dict[str, Any]]:
    import csv

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read the concepts file ({exc.strerror})") from exc
    rows = json.loads(text) if path.suffix == ".json" else list(csv.DictReader(text.splitlines()))
    out = []
    for number, row in enumerate(rows, start=1):
        if not all(row.get(k) for k in ("code", "display", "type")):
            raise ConvertError(f"{path}: entry {number} needs code, display and type")
        names = row.get("names") or []
        if isinstance(names, str):
            names = [n for n in names.split("|") if n.strip()]
        out.append({"code": str(row["code"]), "display": str(row["display"]), "type": str(row["type"]), "names": names})
    return out


def load_base(base: str, types: Sequence[str]) -> tuple[nn.Module, Tokenizer]:
    """The base model with a fresh token-classification head, and its fast tokenizer."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tags = tag_names(types)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(base, use_fast=True)
        model = AutoModelForTokenClassification.from_pretrained(
            base,
            num_labels=len(tags),
            id2label=dict(enumerate(tags)),
            label2id={t: i for i, t in enumerate(tags)},
            attn_implementation="eager",
        )
    except (OSError, ValueError) as exc:
        raise ConvertError(f"base_model {base!r}: cannot load it ({str(exc).splitlines()[0]})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if not hf_tokenizer.is_fast:
        raise ConvertError(f"base_model {base!r}: the runtime needs a fast tokenizer (tokenizer.json); none found")
    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return model, tokenizer


def train(
    recipe: Recipe,
    base: str,
    train_set: Sequence[Example],
    validation: Sequence[Example],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[finetune.TrainedModel, Tokenizer]:
    """Fine-tune ``base`` for BIO tagging with the recipe's method; keep the epoch with the best validation
    strict entity micro-F1 (decoded as the runtime decodes)."""
    if recipe.training.learning_rate is None or recipe.training.epochs is None:
        from fhirplug_convert.recipe import resolve_training

        recipe, _ = resolve_training(recipe, len(train_set))  # called directly, not through convert()
    types = recipe.label_names
    spec = recipe.training
    assert spec.epochs is not None
    finetune._seed(spec.seed)
    model, tokenizer = load_base(base, types)
    max_tokens = finetune.window_size(model.config, recipe)
    module = finetune._prepare(model, recipe, task_type="TOKEN_CLS")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    windowed = finetune._window_tokenizer(tokenizer, max_tokens, spec.stride)
    data = encode(windowed, train_set, types)
    valid = encode(windowed, validation, types)
    pad = tokenizer.token_to_id("[PAD]") or 0
    steps_per_epoch = math.ceil(len(data.windows) / spec.batch_size)
    total_steps = spec.epochs * steps_per_epoch
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)
    optimizer = finetune._optimizer(module, recipe)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(spec.warmup_ratio * total_steps), total_steps)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    show = progress if progress is not None else sys.stderr.isatty()
    rng = np.random.default_rng(spec.seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    best_key: float | None = None
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, stale, step = 0, 0, 0
    history: list[dict[str, float]] = []
    try:
        bar = tqdm(total=total_steps, disable=not show, desc="train", unit="step", leave=False)
        for epoch in range(1, spec.epochs + 1):
            module.train()
            order = rng.permutation(len(data.windows))
            running, seen = 0.0, 0
            for start in range(0, len(order), spec.batch_size):
                if step >= total_steps:
                    break
                rows = order[start : start + spec.batch_size]
                feed = _feed([data.windows[i] for i in rows], pad)
                width = feed["input_ids"].shape[1]
                target = np.full((len(rows), width), IGNORE, dtype=np.int64)
                for r, i in enumerate(rows):
                    target[r, : len(data.targets[i])] = data.targets[i]
                logits = module(*(torch.from_numpy(feed[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
                loss = loss_fn(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(target).reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                running += float(loss.detach()) * len(rows)
                seen += len(rows)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}")
                if step % 50 == 0:
                    log(f"  step {step}/{total_steps}: loss {float(loss.detach()):.4f}")
            module.eval()
            logits_v = score_windows(module, valid.windows, spec.eval_batch_size, pad)
            spans = predict_spans([e.text for e in validation], valid.windows, logits_v, types)
            f1 = ner_metrics(validation, spans, types)["mentions"]["micro"]["f1"]
            history.append({"epoch": epoch, "step": step, "train_loss": running / max(seen, 1), "entity_f1": f1})
            log(f"epoch {epoch}: step {step}, train loss {running / max(seen, 1):.4f}, validation entity F1 {f1:.4f}")
            if best_key is None or f1 > best_key:
                best_key, best_epoch, stale = f1, epoch, 0
                best_state = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
            else:
                stale += 1
                if stale >= spec.early_stopping_patience:
                    log(f"early stop: no better validation entity F1 for {stale} epoch(s)")
                    break
            if step >= total_steps:
                break
        bar.close()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    with torch.no_grad():
        params = dict(module.named_parameters())
        for name, saved in best_state.items():
            params[name].copy_(saved)
    module.eval()
    final = finetune._finish(module, recipe).eval()
    import copy

    return (
        finetune.TrainedModel(
            module=final,
            config=copy.deepcopy(model.config),
            max_tokens=max_tokens,
            trainable_parameters=trainable,
            total_parameters=total,
            steps=step,
            best_epoch=best_epoch,
            history=history,
        ),
        tokenizer,
    )


def _agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, candidate, strict=True))
    count = sum(len(a) for a in reference)
    return same / count if count else 1.0


def build(
    recipe: Recipe,
    trained: finetune.TrainedModel,
    tokenizer: Tokenizer,
    splits: Any,
    work: Path,
    out: Path,
    sign_key: str | Path | None,
    command: str,
    say: Callable[[str], None],
    lap: Callable[[str], None],
    record: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, int]]:
    """Export → optimize → quantize → terminology → parity gate → test metrics → package.

    ``record``: what the pipeline resolved (``resolved`` training values, ``search``, ``timings``) for the
    manifest, metrics and model card.

    Returns:
        The manifest, the metrics, the parity report and the fused-operator counts.
    """
    from fhirplug_convert import validate
    from fhirplug_convert.package import BundleContent, prepare_out_dir, write_bundle
    from fhirplug_convert.pipeline import TEST_SPLIT, _int8_ops, _write_test_split, export_variants, training_record
    from fhirplug_convert.tasks import get_task

    record = record or {}
    assert recipe.entities is not None
    types = recipe.label_names
    task = get_task(recipe.task)
    tolerance = recipe.tolerance()
    made = export_variants(recipe, trained, tokenizer, task, work, say, lap, [e.text for e in splits.train])
    fp32, files, fused, tokenizer_path = made.fp32, made.files, made.fused, made.tokenizer

    index, extra, facts = build_terminology(recipe, [*splits.train, *splits.validation], work)
    say(f"terminology: {facts['concepts']} concepts, {facts['names']} names")
    lap("terminology")

    # Every variant (and torch, on the same windows and batches) is scored by the runtime's own session.
    valid_texts = [e.text for e in splits.validation]
    fp32_session = made.open(fp32, "fp32")
    provider = fp32_session.provider
    windows, fp32_logits = runtime_logits(fp32_session, valid_texts)
    _, torch_logits = runtime_logits(_core.torch_session(trained.module, fp32_session), valid_texts)
    diff = float(max((np.abs(a - b).max() for a, b in zip(torch_logits, fp32_logits, strict=True)), default=0.0))
    fp32_f1 = ner_metrics(splits.validation, predict_spans(valid_texts, windows, fp32_logits, types), types)
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
        "windows": len(windows),
        "batch_size": _core.RUNTIME_BATCH_SIZE,
        "tokens": int(sum(len(x) for x in fp32_logits)),
        "tolerance": tolerance,
        "metric": "strict entity micro-F1; agreement = per-token argmax agreement with fp32",
        "variants": {"fp32": fp32_entry},
    }
    reference = fp32_f1["mentions"]["micro"]["f1"]
    for precision in ("int8", "fp16"):
        if precision not in files:
            continue
        try:
            session = made.open(files[precision], precision)
            used = session.provider
            _, logits = runtime_logits(session, valid_texts)
        except Exception as exc:  # onnxruntime: no kernel for this precision on the providers present
            if precision != "fp16":
                raise
            report["variants"][precision] = {
                "status": "unverified",
                "reason": f"no GPU provider, and the CPU provider cannot run it ({str(exc).splitlines()[0][:200]})",
            }
            continue
        value = ner_metrics(splits.validation, predict_spans(valid_texts, windows, logits, types), types)
        f1 = value["mentions"]["micro"]["f1"]
        agreement = _agreement(fp32_logits, logits)
        drop = round((reference - f1) * 100, 4)
        reasons = []
        if drop > tolerance["max_metric_drop"]:
            reasons.append(f"entity F1 drops {drop:.2f} points (allowed {tolerance['max_metric_drop']})")
        if agreement < tolerance["min_agreement"]:
            reasons.append(f"token agreement {agreement:.2%} (needs {tolerance['min_agreement']:.0%})")
        entry: dict[str, Any] = {
            "status": "failed" if reasons else "passed",
            "provider": used,
            "metric": "entity_f1",
            "fp32": reference,
            "value": f1,
            "metric_drop_points": drop,
            "agreement": round(agreement, 6),
            "max_abs_logit_diff": round(
                float(max((np.abs(a - b).max() for a, b in zip(fp32_logits, logits, strict=True)), default=0.0)), 6
            ),
        }
        if reasons:
            entry["reasons"] = reasons
        if precision == "int8":
            entry["quantization"] = {**made.int8.describe(), "runs_as": _int8_ops(files["int8"])}
        report["variants"][precision] = entry
    keep = validate.gate(report, recipe.export.allow_drop, recipe.parity.require)
    for precision, item in report["variants"].items():
        say(f"parity {precision}: {item['status']}")
    lap("parity")

    test_texts = [e.text for e in splits.test]
    test_metrics: dict[str, Any] = {}
    for precision in keep:
        test_windows, logits = runtime_logits(made.open(files[precision], precision), test_texts)
        spans = predict_spans(test_texts, test_windows, logits, types, 1.0, recipe.entities.min_confidence)
        test_metrics[precision] = ner_metrics(splits.test, spans, types, index)
        say(f"test {precision}: {json.dumps({k: v['f1'] for k, v in test_metrics[precision]['mentions'].items()})}")
    metrics = {
        "split": "test",
        "test": test_metrics,
        "validation": {"fp32": fp32_f1},
        "terminology": facts,
        "splits": splits.counts(),
        "history": trained.history,
    }
    if record.get("search"):
        metrics["search"] = record["search"]
    lap("evaluate")

    entities = recipe.entities
    training = training_record(recipe, trained, splits.description, fused, record)
    training["details"]["tags"] = tag_names(types)  # the runtime's tag order
    prepare_out_dir(out)
    content = BundleContent(
        variants={p: files[p] for p in keep},
        tokenizer=tokenizer_path,
        max_tokens=trained.max_tokens,
        stride=recipe.training.stride,
        calibration={"temperature": 1.0, "thresholds": {}, "default_threshold": 0.5},
        metrics=metrics,
        parity=report,
        training=training,
        timings=record.get("timings", {}),
        command=command,
        extra_files={**extra, TEST_SPLIT: _write_test_split(recipe, splits, work)},
        manifest_extra={
            "entities": {
                "resources": dict(entities.resources),
                "system": entities.system,
                "concepts": "concepts.json",
                "vectors": "concept_vectors.npz",
                "coding_threshold": entities.coding_threshold,
                "assertion_lexicon": "assertion.json",
                "min_confidence": entities.min_confidence,
            }
        },
    )
    manifest = write_bundle(out, recipe, content, fused=fused, signing_key=sign_key, before_card=lambda: lap("package"))
    say(f"bundle: {out} ({', '.join(keep)})")
    return manifest, metrics, report, fused
