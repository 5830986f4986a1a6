"""Fine-tuning: full, LoRA (peft, merged before export), BitFit, and prompt tuning.

Whatever the method, training ends with a plain ``torch.nn.Module`` that maps ``(input_ids, attention_mask,
token_type_ids)`` to ``logits`` (:class:`LogitsModel`): that is what gets exported, so the ONNX graph has the same
three inputs for every method and the runtime needs no special case. Prompt tuning's virtual tokens live inside
that module (:class:`PromptTuningModel`), and so inside the exported graph.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from fhirplug.errors import ConvertError
from fhirplug_convert.datasets import Example
from fhirplug_convert.evaluate import (
    aggregate_windows,
    classification_metrics,
    negative_log_likelihood,
    task_metric,
)
from fhirplug_convert.recipe import BitFit, Lora, PromptTuning, Recipe, resolve_training

__all__ = [
    "LogitsModel",
    "PromptTuningModel",
    "TrainedModel",
    "load_base",
    "pad_batch",
    "search_learning_rate",
    "targets_of",
    "torch_logits",
    "train",
    "training_targets",
]


class LogitsModel(nn.Module):
    """A Hugging Face sequence classifier seen as ``(input_ids, attention_mask, token_type_ids) → logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.logits  # type: ignore[no-any-return]


class PromptTuningModel(nn.Module):
    """Prompt tuning as a plain module: ``num_virtual_tokens`` learned embeddings enter every window.

    They go right after the first token ([CLS]), so the pooler and classifier still read [CLS] at position 0;
    the attention mask and token types grow to match. The inputs stay the normal ``input_ids``,
    ``attention_mask``, ``token_type_ids``, so the exported graph carries the virtual tokens and the runtime
    feeds it like any other model — with windows ``num_virtual_tokens`` shorter (see the manifest's
    ``tokenizer.max_tokens``).
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int, seed: int) -> None:
        super().__init__()
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        table = model.get_input_embeddings().weight  # type: ignore[operator]
        # Start from real vocabulary embeddings (peft's RANDOM init samples vocab rows too): random noise
        # sits far from anything the frozen encoder has seen.
        rows = torch.randint(0, table.shape[0], (num_virtual_tokens,), generator=torch.Generator().manual_seed(seed))
        self.prompt = nn.Parameter(table[rows].detach().clone())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)  # type: ignore[operator]
        # Broadcasting against a batch-sized zero keeps the batch axis dynamic in the traced graph.
        prompt = self.prompt.unsqueeze(0) + torch.zeros_like(embeds[:, :1, :1])
        first_mask = attention_mask[:, :1]
        virtual_mask = torch.ones_like(first_mask).expand(-1, self.num_virtual_tokens)
        virtual_types = torch.zeros_like(token_type_ids[:, :1]).expand(-1, self.num_virtual_tokens)
        out = self.model(
            inputs_embeds=torch.cat([embeds[:, :1], prompt, embeds[:, 1:]], dim=1),
            attention_mask=torch.cat([first_mask, virtual_mask, attention_mask[:, 1:]], dim=1),
            token_type_ids=torch.cat([token_type_ids[:, :1], virtual_types, token_type_ids[:, 1:]], dim=1),
        )
        return out.logits  # type: ignore[no-any-return]


@dataclass
class TrainedModel:
    """What training produced: the exportable module and what the manifest and model card report."""

    module: nn.Module
    config: Any
    #: Tokens per window the runtime must use (prompt tuning: the model's maximum minus the virtual tokens).
    max_tokens: int
    trainable_parameters: int
    total_parameters: int
    steps: int
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def load_base(base: str, labels: Sequence[str], multi_label: bool) -> tuple[nn.Module, Tokenizer]:
    """The base model with a fresh classification head, and its fast tokenizer (padding, truncation off).

    Raises:
        ConvertError: the model or tokenizer cannot be loaded, or the tokenizer has no fast version.
    """
    problem = "multi_label_classification" if multi_label else "single_label_classification"
    return load_pretrained(base, "AutoModelForSequenceClassification", labels, problem_type=problem)


def load_pretrained(base: str, auto_class: str, labels: Sequence[str], **options: Any) -> tuple[nn.Module, Tokenizer]:
    """``base`` through ``transformers.<auto_class>`` with a fresh head over ``labels``, and its fast tokenizer.

    Raises:
        ConvertError: the model or tokenizer cannot be loaded, or the tokenizer has no fast version.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    # A fresh head is the point here: transformers' "newly initialized ... you should TRAIN" notice is noise.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = load_tokenizer(base)
        # eager attention: the exported graph then has the MatMul/Softmax pattern onnxruntime's BERT fusion
        # recognises (the sdpa path exports a graph it does not fuse).
        model = getattr(transformers, auto_class).from_pretrained(
            base,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            attn_implementation="eager",
            **options,
        )
    except (OSError, ValueError) as exc:
        raise ConvertError(f"base_model {base!r}: cannot load it ({str(exc).splitlines()[0]})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def load_tokenizer(base: str) -> Tokenizer:
    """``base``'s fast tokenizer, padding and truncation off (the runtime windows long notes itself; a
    tokenizer.json with fixed padding/truncation would fight it).

    Raises:
        ConvertError: the tokenizer cannot be loaded, or has no fast version.
        OSError, ValueError: from transformers, for the caller to word (see :func:`load_pretrained`).
    """
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(base, use_fast=True)
    if not hf_tokenizer.is_fast:
        raise ConvertError(f"base_model {base!r}: the runtime needs a fast tokenizer (tokenizer.json); none found")
    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


TRAINING_RECORD = "fhirplug-training.json"


def splits_fingerprint(splits: Any) -> dict[str, str]:
    """sha256 per split of its texts and labels, in order: what ``load_checkpoint`` compares so that a model
    trained on other splits (whose training data may hold today's test rows) is never packaged as this recipe's."""
    out = {}
    for name in ("train", "validation", "test"):
        digest = hashlib.sha256()
        for example in getattr(splits, name):
            digest.update(json.dumps([example.text, sorted(example.labels)], ensure_ascii=False).encode())
            digest.update(b"\n")
        out[name] = digest.hexdigest()
    return out


def save_checkpoint(trained: TrainedModel, base: str, folder: str | Path, splits: dict[str, str] | None = None) -> None:
    """The trained model as a Hugging Face checkpoint (``save_pretrained``) plus the base model's tokenizer and
    ``fhirplug-training.json`` (steps, best epoch, history, parameter counts) for ``load_checkpoint``.

    Raises:
        ConvertError: the model has no Hugging Face form (prompt tuning).
    """
    hf_model = trained.module.model if isinstance(trained.module, LogitsModel) else None
    if hf_model is None:
        raise ConvertError("--save-checkpoint: a prompt-tuning model has no Hugging Face checkpoint form")
    from transformers import AutoTokenizer

    hf_model.save_pretrained(folder)
    # Fine-tuning does not change the tokenizer: the base model's, in its Hugging Face form.
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(folder)
    record = {
        "max_tokens": trained.max_tokens,
        "trainable_parameters": trained.trainable_parameters,
        "total_parameters": trained.total_parameters,
        "steps": trained.steps,
        "best_epoch": trained.best_epoch,
        "history": trained.history,
        **({"splits": splits} if splits is not None else {}),
    }
    (Path(folder) / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(
    folder: str | Path, recipe: Recipe, splits: dict[str, str] | None = None
) -> tuple[TrainedModel, Tokenizer, bool]:
    """A model this recipe fine-tuned earlier (saved by ``--save-checkpoint``), to export and package again
    without training. Its labels must be the recipe's, in order.

    Raises:
        ConvertError: not a checkpoint, or one whose labels or window differ from the recipe's.
    """
    path = Path(folder)
    record_path = path / TRAINING_RECORD
    if not (path / "config.json").is_file() or not record_path.is_file():
        raise ConvertError(
            f"--from-checkpoint {folder}: not a checkpoint saved by --save-checkpoint "
            f"(needs config.json and {TRAINING_RECORD})"
        )
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    id2label = config.get("id2label") or {}
    saved = [id2label.get(str(i)) for i in range(len(id2label))]
    if recipe.task == "token-classification":
        from fhirplug_convert.token_classification import load_base as load_tagger
        from fhirplug_convert.token_classification import tag_names

        expected = list(tag_names(recipe.label_names))
    else:
        expected = list(recipe.label_names)
    if saved != expected:
        raise ConvertError(f"--from-checkpoint {folder}: its labels {saved} are not the recipe's {expected}")
    if recipe.task == "token-classification":
        model, tokenizer = load_tagger(str(path), recipe.label_names)
    else:
        model, tokenizer = load_base(str(path), recipe.label_names, recipe.output.multi_label)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        saved_splits = record.get("splits")
        int(record["max_tokens"]), int(record["steps"]), int(record["best_epoch"]), list(record["history"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConvertError(f"--from-checkpoint {folder}: {TRAINING_RECORD} is not a training record ({exc})") from exc
    if saved_splits is not None and splits is not None and saved_splits != splits:
        differ = [k for k in splits if saved_splits.get(k) != splits[k]]
        raise ConvertError(
            f"--from-checkpoint {folder}: it was trained on other data splits ({', '.join(differ)} differ from this "
            "recipe's): its training data may hold this recipe's test rows"
        )
    max_tokens = window_size(model.config, recipe)
    if int(record["max_tokens"]) != max_tokens:
        raise ConvertError(
            f"--from-checkpoint {folder}: trained with {record['max_tokens']}-token windows, "
            f"the recipe asks for {max_tokens}"
        )
    trained = TrainedModel(
        module=LogitsModel(model).eval(),
        config=copy.deepcopy(model.config),
        max_tokens=max_tokens,
        trainable_parameters=int(record["trainable_parameters"]),
        total_parameters=int(record["total_parameters"]),
        steps=int(record["steps"]),
        best_epoch=int(record["best_epoch"]),
        history=list(record["history"]),
    )
    return trained, tokenizer, saved_splits is not None


def _is_head(name: str) -> bool:
    # The classification head of a Hugging Face sequence classifier: classifier/score, and BERT's pooler.
    return name.startswith(("classifier", "score")) or ".pooler." in name


def _encoder_linears(model: nn.Module) -> list[str]:
    """LoRA's default targets: the names of every linear layer but the classifier (attention, feed-forward and,
    through ``dense``, BERT's pooler).

    Adapters on query and value only (peft's BERT default) trained 2.2 points below the best full fine-tuning on
    the short-notes benchmark (``benchmarks/recipe_defaults.py titles``); QLoRA (Dettmers et al. 2023) likewise
    found every linear layer needed to match full fine-tuning. peft's ``"all-linear"`` is not used: it keeps the
    head out for sequence classification only, not for token classification.
    """
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.startswith(("classifier", "score"))
    }
    return sorted(names)


def _prepare(model: nn.Module, recipe: Recipe, task_type: str = "SEQ_CLS") -> nn.Module:
    """The module to train, with requires_grad set for the recipe's method (``task_type``: peft's, for LoRA)."""
    method = recipe.method
    if isinstance(method, Lora):
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType[task_type],
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=list(method.target_modules) if method.target_modules else _encoder_linears(model),
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise ConvertError(f"method.target_modules: {exc}") from exc
        return LogitsModel(peft_model)
    if isinstance(method, BitFit):
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith(".bias") or _is_head(name)
        return LogitsModel(model)
    if isinstance(method, PromptTuning):
        for name, param in model.named_parameters():
            param.requires_grad = _is_head(name)
        return PromptTuningModel(model, method.num_virtual_tokens, recipe.training.seed)
    return LogitsModel(model)


def _finish(module: nn.Module, recipe: Recipe) -> nn.Module:
    """The exportable module: LoRA adapters merged into the base weights (no peft at inference)."""
    if isinstance(recipe.method, Lora):
        assert isinstance(module, LogitsModel)
        return LogitsModel(module.model.merge_and_unload())  # type: ignore[operator]
    return module


def window_size(config: Any, recipe: Recipe) -> int:
    """Tokens per runtime window: the recipe's max_tokens, within what the model's positions allow.

    Raises:
        ConvertError: the stride does not fit the resulting window.
    """
    virtual = recipe.method.num_virtual_tokens if isinstance(recipe.method, PromptTuning) else 0
    limit = int(getattr(config, "max_position_embeddings", recipe.training.max_tokens + virtual)) - virtual
    size = min(recipe.training.max_tokens, limit)
    if recipe.training.stride >= size - 2:
        raise ConvertError(
            f"training.stride {recipe.training.stride} does not fit a window of {size} tokens "
            f"(the model allows {limit}); lower the stride below {size - 2}"
        )
    return size


def targets_of(examples: Sequence[Example], labels: Sequence[str], multi_label: bool) -> np.ndarray:
    """``[n]`` class indices, or ``[n, labels]`` 0/1: multi-label, or multi-class data where some example has
    several gold labels (merged duplicates: any of them is a right answer)."""
    index = {label: i for i, label in enumerate(labels)}
    if not multi_label and all(len(e.labels) == 1 for e in examples):
        return np.array([index[e.labels[0]] for e in examples], dtype=np.int64)
    out = np.zeros((len(examples), len(labels)), dtype=np.int64)
    for row, example in enumerate(examples):
        for label in example.labels:
            out[row, index[label]] = 1
    return out


def training_targets(targets: np.ndarray, multi_label: bool) -> np.ndarray:
    """What the loss reads: class indices as they are; 0/1 rows as floats, and for multi-class (several gold
    labels) as soft targets, uniform over the example's labels (cross-entropy with probabilities)."""
    if targets.ndim == 1:
        return targets
    rows = targets.astype(np.float32)
    return rows if multi_label else rows / np.maximum(rows.sum(axis=1, keepdims=True), 1.0)


def count_windows(base: str, recipe: Recipe, texts: Sequence[str]) -> int:
    """The training windows ``texts`` make at the recipe's window and stride: what one epoch trains on (every
    window of a long text trains), so what the default epochs are counted from.

    Raises:
        ConvertError: the base model's config or tokenizer cannot be loaded.
    """
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base)
        tokenizer = load_tokenizer(base)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"base_model {base!r}: cannot load it ({str(exc).splitlines()[0]})") from exc
    windowed = _window_tokenizer(tokenizer, window_size(config, recipe), recipe.training.stride)
    return sum(1 + len(e.overflowing) for e in windowed.encode_batch(list(texts)))


def _window_tokenizer(tokenizer: Tokenizer, max_tokens: int, stride: int) -> Tokenizer:
    """A private copy that truncates into ``max_tokens`` windows sharing ``stride`` tokens (no padding)."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length=max_tokens, stride=stride)
    return copy


def pad_batch(ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]], pad: int) -> dict[str, np.ndarray]:
    """A training batch, right-padded to its longest row with a zero mask (int64, the model's inputs)."""
    width = max(len(row) for row in ids)
    out_ids = np.full((len(ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    out_types = np.zeros((len(ids), width), dtype=np.int64)
    for row, (i, t) in enumerate(zip(ids, types, strict=True)):
        out_ids[row, : len(i)] = i
        mask[row, : len(i)] = 1
        out_types[row, : len(t)] = t
    return {"input_ids": out_ids, "attention_mask": mask, "token_type_ids": out_types}


def torch_logits(module: nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    """One padded batch through the torch module (inference mode), float32 logits."""
    with torch.inference_mode():
        logits = module(*(torch.from_numpy(feed[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
    return logits.float().numpy()  # type: ignore[no-any-return]


def evaluate_torch(
    module: nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int,
) -> list[np.ndarray]:
    """Per-note window logits from the torch module, for the per-epoch validation that picks the best epoch.

    ``tokenizer`` comes from :func:`_window_tokenizer`: every overflowing window, as the runtime windows. Nothing
    a model card reports comes from here: once exported, every variant is scored by the runtime's own session
    (:mod:`fhirplug_convert._core`).
    """
    was_training = module.training
    module.eval()
    pad = tokenizer.token_to_id("[PAD]") or 0
    try:
        per_note: list[list[np.ndarray]] = [[] for _ in texts]
        rows = [
            (index, part)
            for index, enc in enumerate(tokenizer.encode_batch(list(texts)))
            for part in [enc, *enc.overflowing]
        ]
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            feed = pad_batch([p.ids for _, p in chunk], [p.type_ids for _, p in chunk], pad)
            for (index, _), logits in zip(chunk, torch_logits(module, feed), strict=True):
                per_note[index].append(logits)
        return [np.stack(rows) for rows in per_note]
    finally:
        module.train(was_training)


def resolved(recipe: Recipe, train_examples: int) -> Recipe:
    """The recipe with its learning rate and epochs chosen (training called directly, not through convert(),
    which counts the training windows: here epochs count one window per example)."""
    if recipe.training.learning_rate is None or recipe.training.epochs is None:
        recipe, _ = resolve_training(recipe, train_examples)
    return recipe


def train(
    recipe: Recipe,
    base: str,
    train_set: Sequence[Example],
    validation: Sequence[Example],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[TrainedModel, Tokenizer]:
    """Fine-tune ``base`` with the recipe's method; keep the best epoch by the validation task metric.

    Every window of a long text trains (with the text's labels); validation scores every window and aggregates
    them as the runtime does (:func:`fhirplug_convert.evaluate.aggregate_windows`, temperature 1); ties between
    epochs go to the lower validation NLL. The loop is :func:`fhirplug_convert.trainer.fit`.

    Args:
        recipe: the validated recipe.
        base: a local folder or Hugging Face id (``recipe.resolve_base_model``).
        train_set: training examples.
        validation: validation examples (early stopping, best checkpoint).
        progress: a progress bar; None = only when stderr is a terminal.
        log: receives one line per epoch.

    Returns:
        The trained model in eval mode and the tokenizer (padding and truncation off) that feeds it.
    """
    from transformers import set_seed

    # Imported here: the Trainer brings accelerate along, which the rest of this module's users never need.
    from fhirplug_convert.trainer import TrainingTask, fit, window_loss

    recipe = resolved(recipe, len(train_set))
    labels, multi_label, spec = recipe.label_names, recipe.output.multi_label, recipe.training
    set_seed(spec.seed)  # the fresh head's initialisation
    model, tokenizer = load_base(base, labels, multi_label)
    max_tokens = window_size(model.config, recipe)
    windowed = _window_tokenizer(tokenizer, max_tokens, spec.stride)
    # Every window of every training text (the recipe's stride), each with its text's targets: the runtime scores
    # every window of a note, so training must see them all, not only the first.
    targets = training_targets(targets_of(train_set, labels, multi_label), multi_label)
    windows = [
        {"input_ids": part.ids, "token_type_ids": part.type_ids, "labels": targets[index]}
        for index, enc in enumerate(windowed.encode_batch([e.text for e in train_set]))
        for part in [enc, *enc.overflowing]
    ]
    log(f"training on {len(windows)} windows of {len(train_set)} texts")
    valid_texts = [e.text for e in validation]
    valid_targets = targets_of(validation, labels, multi_label)

    def validate(module: nn.Module) -> dict[str, float]:
        notes = evaluate_torch(module, windowed, valid_texts, spec.eval_batch_size)
        probs = np.stack([aggregate_windows(w, 1.0, multi_label) for w in notes])
        metrics = classification_metrics(probs, valid_targets, labels, multi_label=multi_label)
        name, value = task_metric(metrics, multi_label)
        return {name: value, "nll": negative_log_likelihood(probs, valid_targets, multi_label)}

    pad = windowed.token_to_id("[PAD]") or 0
    task = TrainingTask(model, "SEQ_CLS", windows, window_loss(multi_label), validate, pad)
    show = progress if progress is not None else sys.stderr.isatty()
    return fit(recipe, task, max_tokens=max_tokens, progress=show, log=log), tokenizer


# --- learning-rate search ------------------------------------------------------------------------------------------

#: History keys that are not the validation task metric.
_NOT_METRIC = frozenset({"epoch", "step", "train_loss", "nll"})


def validation_score(trained: TrainedModel) -> tuple[str, float, float]:
    """The best epoch's validation task metric (name, value) and its NLL (inf when not recorded)."""
    entry = trained.history[trained.best_epoch - 1] if trained.best_epoch else {}
    names = [k for k in entry if k not in _NOT_METRIC]
    if not names:
        return "none", float("-inf"), float("inf")
    return names[0], float(entry[names[0]]), float(entry.get("nll", float("inf")))


def search_learning_rate(
    recipe: Recipe,
    run: Callable[[Recipe], tuple[TrainedModel, Tokenizer]],
    *,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[TrainedModel, Tokenizer, dict[str, Any]]:
    """Train once per candidate of ``recipe.training.search`` and keep the best on validation.

    The score is the metric the model card reports, at each trial's best epoch (ties: the lower validation NLL,
    then the earlier candidate). Only the winning model is kept in memory.

    A grid on purpose, not ``Trainer.hyperparameter_search`` with optuna: ``trials`` is at most 8, where optuna's
    TPE is still in its random start-up phase (10 trials), so it would be a seeded random search with worse
    coverage than these log-spaced candidates; and it keeps no trained model, so the winner would train twice.

    Args:
        recipe: a recipe with ``training.search`` and its training values resolved (``resolve_training``).
        run: trains one model from a recipe (``train`` or the token-classification ``train``, bound to the data).
        log: receives one line per trial.

    Returns:
        The chosen model, its tokenizer, and the record for metrics.json: ``{"parameter", "metric", "chosen",
        "trials": [{"learning_rate", "validation_<metric>", "validation_nll", "best_epoch", "epochs_run", "steps"}]}``
        (``validation_nll`` where the task records it).
    """
    spec = recipe.training
    assert spec.search is not None and spec.learning_rate is not None
    best: tuple[tuple[float, float], TrainedModel, Tokenizer, float] | None = None
    trials: list[dict[str, Any]] = []
    metric = "none"
    candidates = spec.search.candidates(spec.learning_rate)
    for number, rate in enumerate(candidates, start=1):
        trial = recipe.model_copy(update={"training": spec.model_copy(update={"learning_rate": rate, "search": None})})
        trained, tokenizer = run(trial)
        metric, value, nll = validation_score(trained)
        trials.append(
            {
                "learning_rate": rate,
                f"validation_{metric}": value,
                **({"validation_nll": nll} if math.isfinite(nll) else {}),
                "best_epoch": trained.best_epoch,
                "epochs_run": len(trained.history),
                "steps": trained.steps,
            }
        )
        log(f"search {number}/{len(candidates)}: learning_rate {rate:g} → validation {metric} {value:.4f}")
        key = (value, -nll)
        if best is None or key > best[0]:
            best = (key, trained, tokenizer, rate)
    assert best is not None
    _, trained, tokenizer, chosen = best
    log(f"search: learning_rate {chosen:g} chosen (best validation {metric})")
    return trained, tokenizer, {"parameter": "learning_rate", "metric": metric, "chosen": chosen, "trials": trials}
