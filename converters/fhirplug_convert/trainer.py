"""The one training loop, for every task and method: ``transformers.Trainer``.

A task hands :func:`fit` its Hugging Face model (fresh head), its training windows with their targets and a
``validate`` function that scores the validation texts the way the runtime will (text classification: every
window, aggregated; token classification: spans decoded as the runtime decodes them). The loop is the library's:
AdamW with linear warm-up and decay, weight decay, gradient clipping at 1.0, seeded data order, an evaluation and
a checkpoint per epoch (in a temporary folder, removed afterwards), ``EarlyStoppingCallback`` and the best epoch
restored (``load_best_model_at_end``). The method (full, LoRA, BitFit, prompt tuning) is applied before and undone
(LoRA merged) after, by :func:`fhirplug_convert.finetune._prepare` / ``_finish``.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, Trainer, TrainingArguments

from fhirplug_convert.finetune import TrainedModel, _finish, _prepare, pad_batch
from fhirplug_convert.recipe import Recipe

__all__ = ["IGNORE", "TrainingTask", "fit"]

#: Target of a token the loss skips (special tokens, padding).
IGNORE = -100
#: What ``metric_for_best_model`` watches: the task metric, ties broken by the lower validation NLL.
SELECTION = "selection"


@dataclass
class TrainingTask:
    """What a task gives the loop."""

    #: The Hugging Face model with its fresh head (the method is applied by :func:`fit`).
    model: nn.Module
    #: peft's task type for LoRA: ``SEQ_CLS`` or ``TOKEN_CLS``.
    peft_task: str
    #: Training windows: ``input_ids``, ``token_type_ids`` and ``labels`` (a class index, a ``[labels]`` float row
    #: — multi-label 0/1 or soft multi-class — or, per token, a list as long as ``input_ids``).
    windows: Sequence[dict[str, Any]]
    #: ``(logits, labels) → loss``.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: Scores the module on the validation texts: ``{metric: value}`` first, optionally ``"nll"`` (tie-break).
    validate: Callable[[nn.Module], dict[str, float]]
    pad: int = 0
    #: True when ``labels`` are per token (padded with :data:`IGNORE`).
    per_token: bool = False


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every token, :data:`IGNORE` left out."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def window_loss(multi_label: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE-with-logits (multi-label) or cross-entropy with class indices or probability rows (multi-class)."""
    if multi_label:
        return lambda logits, labels: nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return nn.functional.cross_entropy


def _collate(rows: Sequence[dict[str, Any]], pad: int, per_token: bool) -> dict[str, torch.Tensor]:
    feed = pad_batch([r["input_ids"] for r in rows], [r["token_type_ids"] for r in rows], pad)
    if per_token:
        labels = np.full(feed["input_ids"].shape, IGNORE, dtype=np.int64)
        for row, r in enumerate(rows):
            labels[row, : len(r["labels"])] = r["labels"]
    else:
        labels = np.stack([np.asarray(r["labels"]) for r in rows])
    return {**{k: torch.from_numpy(v) for k, v in feed.items()}, "labels": torch.from_numpy(labels)}


def selection_score(entry: dict[str, float]) -> float:
    """The task metric with the validation NLL as tie-break, as one number for ``metric_for_best_model``.

    Metrics move in steps of at least 1/n (n validation texts or mentions), far above 1e-7, so the NLL term
    (in (0, 1e-7]) only orders epochs whose metric is equal.
    """
    value = next(iter(entry.values()))
    nll = entry.get("nll")
    return value if nll is None or not math.isfinite(nll) else value + 1e-7 / (1.0 + nll)


class _Trainer(Trainer):
    """``Trainer`` with the task's loss and the task's own validation (every epoch, no ``compute_metrics``)."""

    def __init__(self, task: TrainingTask, log: Callable[[str], None], patience: int, **kwargs: Any) -> None:
        super().__init__(
            callbacks=[EarlyStoppingCallback(early_stopping_patience=patience)],
            # The loss and the validation are the task's; the collator pads each batch to its longest window.
            data_collator=lambda rows: _collate(rows, task.pad, task.per_token),
            **kwargs,
        )
        self.task = task
        self.say = log
        self.patience = patience
        self.history: list[dict[str, float]] = []
        self._loss_sum, self._loss_rows = 0.0, 0

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # The library's rule (no decay on biases and LayerNorm), and none on prompt tuning's virtual tokens.
        return [n for n in super().get_decay_parameter_names(model) if n != "prompt"]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs.pop("labels")
        logits = model(**inputs)
        loss = self.task.loss(logits, labels)
        self._loss_sum += float(loss.detach()) * len(labels)
        self._loss_rows += len(labels)
        return (loss, logits) if return_outputs else loss

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
        model = self.model
        assert model is not None
        was_training = model.training
        model.eval()
        try:
            values = self.task.validate(model)
        finally:
            model.train(was_training)
        name, value = next(iter(values.items()))
        step = self.state.global_step
        train_loss = self._loss_sum / max(self._loss_rows, 1)
        self._loss_sum, self._loss_rows = 0.0, 0
        self.history.append({"epoch": len(self.history) + 1, "step": step, "train_loss": train_loss, **values})
        self.say(f"epoch {len(self.history)}: step {step}, train loss {train_loss:.4f}, validation {name} {value:.4f}")
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in values.items()}
        metrics[f"{metric_key_prefix}_{SELECTION}"] = selection_score(values)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        if self.control.should_training_stop and step < self.state.max_steps:
            self.say(f"early stop: no better validation {name} for {self.patience} epoch(s)")
        return metrics


def fit(
    recipe: Recipe,
    task: TrainingTask,
    *,
    max_tokens: int,
    progress: bool,
    log: Callable[[str], None],
) -> TrainedModel:
    """Train ``task.model`` with the recipe's method and training values; the best validation epoch is kept.

    Deterministic torch algorithms while it runs (warn-only: some CPU kernels have no deterministic twin);
    the seed (``training.seed``) drives the initialisation, the data order and dropout.

    Returns:
        The exportable module (LoRA merged) in eval mode, with the counts and the per-epoch history.
    """
    spec = recipe.training
    assert spec.epochs is not None and spec.learning_rate is not None
    module = _prepare(task.model, recipe, task.peft_task)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    steps = spec.epochs * math.ceil(len(task.windows) / spec.batch_size)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with tempfile.TemporaryDirectory(prefix="fhirplug-train-") as checkpoints:
            args = TrainingArguments(
                output_dir=checkpoints,
                use_cpu=True,
                num_train_epochs=spec.epochs,
                max_steps=min(steps, spec.max_steps) if spec.max_steps is not None else -1,
                per_device_train_batch_size=spec.batch_size,
                learning_rate=spec.learning_rate,
                weight_decay=spec.weight_decay,
                warmup_ratio=spec.warmup_ratio,
                lr_scheduler_type="linear",
                max_grad_norm=1.0,
                seed=spec.seed,
                data_seed=spec.seed,
                eval_strategy="epoch",
                save_strategy="epoch",
                save_only_model=True,
                save_total_limit=1,
                load_best_model_at_end=True,
                metric_for_best_model=SELECTION,
                greater_is_better=True,
                logging_strategy="no",
                report_to="none",
                disable_tqdm=not progress,
                remove_unused_columns=False,
                dataloader_pin_memory=False,
            )
            trainer = _Trainer(
                task,
                log,
                spec.early_stopping_patience,
                model=module,
                args=args,
                train_dataset=list(task.windows),
                eval_dataset=[],  # validation is the task's own (``task.validate``), not a dataset pass
            )
            # Our epoch lines replace the library's printed log dicts; a progress bar only on request.
            trainer.remove_callback(PrinterCallback)
            if not progress:
                trainer.remove_callback(ProgressCallback)
            with warnings.catch_warnings():
                # Epochs of a small model end within a second: the checkpoint rotation then orders checkpoints by
                # number instead of mtime (what we want) and says so with a UserWarning.
                warnings.filterwarnings("ignore", message="mtime may not be reliable")
                trainer.train()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    best_step = trainer.state.best_global_step
    best_epoch = next((h["epoch"] for h in trainer.history if h["step"] == best_step), 0)
    return TrainedModel(
        module=_finish(module.eval(), recipe).eval(),
        config=copy.deepcopy(task.model.config),
        max_tokens=max_tokens,
        trainable_parameters=trainable,
        total_parameters=total,
        steps=trainer.state.global_step,
        best_epoch=int(best_epoch),
        history=trainer.history,
    )
