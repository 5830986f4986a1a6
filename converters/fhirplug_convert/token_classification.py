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

import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from torch import nn

from fhirplug._abbrev import abbreviations
from fhirplug._assertion import Lexicon
from fhirplug._coding import ConceptIndex
from fhirplug.session import Window, _window
from fhirplug.tasks.token_classification import Span, decode_spans, drop_cues, merge_windows, tag_names
from fhirplug_convert import _core, finetune
from fhirplug_convert.datasets import Example
from fhirplug_convert.recipe import Recipe
from fhirplug_convert.terminology import _read_concepts, build_terminology  # noqa: F401

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
    concept-level F1 of (document, type, code) sets (BioCreative V CDR style: composite IDs split, -1 left out),
    each mention coded as the runtime codes it (abbreviations defined in the text resolved)."""
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
            # As the runtime codes: an abbreviation defined in the same text is coded as its long form.
            defined = abbreviations(text) if spans else None
            for s in spans:
                coding = index.code(text[s.start : s.end], s.type, defined)
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


def load_base(base: str, types: Sequence[str]) -> tuple[nn.Module, Tokenizer]:
    """The base model with a fresh token-classification head over the BIO tags, and its fast tokenizer."""
    return finetune.load_pretrained(base, "AutoModelForTokenClassification", tag_names(types))


def train(
    recipe: Recipe,
    base: str,
    train_set: Sequence[Example],
    validation: Sequence[Example],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[finetune.TrainedModel, Tokenizer]:
    """Fine-tune ``base`` for BIO tagging with the recipe's method (:func:`fhirplug_convert.trainer.fit`); keep
    the epoch with the best validation strict entity micro-F1 (decoded as the runtime decodes)."""
    from transformers import set_seed

    from fhirplug_convert.trainer import TrainingTask, fit, token_loss

    recipe = finetune.resolved(recipe, len(train_set))
    types, spec = recipe.label_names, recipe.training
    set_seed(spec.seed)  # the fresh head's initialisation
    model, tokenizer = load_base(base, types)
    max_tokens = finetune.window_size(model.config, recipe)
    windowed = finetune._window_tokenizer(tokenizer, max_tokens, spec.stride)
    data = encode(windowed, train_set, types)
    valid = encode(windowed, validation, types)
    valid_texts = [e.text for e in validation]
    pad = tokenizer.token_to_id("[PAD]") or 0

    def validate(module: nn.Module) -> dict[str, float]:
        logits = score_windows(module, valid.windows, spec.eval_batch_size, pad)
        spans = predict_spans(valid_texts, valid.windows, logits, types)
        return {"entity_f1": ner_metrics(validation, spans, types)["mentions"]["micro"]["f1"]}

    windows = [
        {"input_ids": list(w.ids), "token_type_ids": list(w.type_ids), "labels": t}
        for w, t in zip(data.windows, data.targets, strict=True)
    ]
    task = TrainingTask(model, "TOKEN_CLS", windows, token_loss, validate, pad, per_token=True)
    show = progress if progress is not None else sys.stderr.isatty()
    return fit(recipe, task, max_tokens=max_tokens, progress=show, log=log), tokenizer


def agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Share of tokens whose argmax tag is the same in both."""
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, candidate, strict=True))
    count = sum(len(a) for a in reference)
    return same / count if count else 1.0
