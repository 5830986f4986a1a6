"""Method internals the pipeline tests cannot see: what trains, what the exported module computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.converters.conftest import write_recipe

from fhirplug_convert import finetune
from fhirplug_convert.finetune import (
    LogitsModel,
    PromptTuningModel,
    _finish,
    _prepare,
    count_windows,
    load_base,
    window_size,
)
from fhirplug_convert.recipe import Lora, load_recipe, resolve_training

pytestmark = pytest.mark.train
LABELS = ["diabetes", "hypertension", "asthma"]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[2, 40, 41, 42, 3, 0], [2, 50, 51, 52, 53, 3]])
    mask = (ids != 0).long()
    return ids, mask, torch.zeros_like(ids)


def _trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_lora_merges_into_the_base_weights_without_changing_logits(tiny_base: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, method="lora"))
    model, _ = load_base(str(tiny_base), LABELS, multi_label=False)
    module = _prepare(model, recipe)
    assert all("lora_" in n or "classifier" in n for n in _trainable(module))
    with torch.no_grad():  # move the adapters and the head off their initial values, as training would
        for param in module.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    module.eval()
    with torch.no_grad():
        before = module(*_inputs())
        merged = _finish(module, recipe).eval()
        after = merged(*_inputs())
    assert isinstance(merged, LogitsModel)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_lora_without_target_modules_adapts_every_linear_layer_but_the_classifier(
    tiny_base: Path, tmp_path: Path
) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, method="lora"))
    recipe = recipe.model_copy(update={"method": Lora(kind="lora")})
    model, _ = load_base(str(tiny_base), LABELS, multi_label=False)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    adapted = {
        n.removeprefix("model.base_model.model.").removesuffix(".lora_A.default.weight")
        for n in _trainable(_prepare(model, recipe))
        if n.endswith(".lora_A.default.weight")
    }
    assert adapted == linears - {"classifier"}  # attention, feed-forward and pooler; 2 layers x 6 + pooler
    assert len(adapted) == 13


def test_bitfit_trains_biases_and_the_head_only(tiny_base: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, method="bitfit"))
    model, _ = load_base(str(tiny_base), LABELS, multi_label=False)
    trainable = _trainable(_prepare(model, recipe))
    assert "model.classifier.weight" in trainable and "model.bert.pooler.dense.weight" in trainable
    assert "model.bert.encoder.layer.0.attention.self.query.bias" in trainable
    assert "model.bert.encoder.layer.0.attention.self.query.weight" not in trainable
    assert all(n.endswith(".bias") or ".classifier." in f".{n}" or ".pooler." in n for n in trainable)


def test_prompt_tuning_puts_virtual_tokens_after_cls(tiny_base: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, method="prompt-tuning", max_tokens=64))
    model, _ = load_base(str(tiny_base), LABELS, multi_label=False)
    module = _prepare(model, recipe)
    assert isinstance(module, PromptTuningModel)
    assert _trainable(module) == {
        "prompt",
        "model.bert.pooler.dense.weight",
        "model.bert.pooler.dense.bias",
        "model.classifier.weight",
        "model.classifier.bias",
    }
    assert window_size(model.config, recipe) == 60  # 64 positions − 4 virtual tokens
    module.eval()
    ids, mask, types = _inputs()
    seen: dict[str, torch.Tensor] = {}
    original = module.model.forward

    def spy(**kwargs: torch.Tensor) -> object:
        seen.update(kwargs)
        return original(**kwargs)

    module.model.forward = spy  # type: ignore[method-assign]
    with torch.no_grad():
        logits = module(ids, mask, types)
    assert logits.shape == (2, 3)
    assert seen["inputs_embeds"].shape == (2, 6 + 4, 64)
    assert seen["attention_mask"].tolist()[0] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]  # padding stays last
    embeddings = module.model.get_input_embeddings()
    torch.testing.assert_close(seen["inputs_embeds"][:, 0], embeddings(ids[:, 0]))  # [CLS] first
    torch.testing.assert_close(seen["inputs_embeds"][0, 1:5], module.prompt.detach())


def test_every_window_of_a_long_training_text_trains(tiny_base: Path, tmp_path: Path) -> None:
    """One epoch is one pass over every window (stride as in the recipe), not over the texts' first windows."""
    import math

    from tokenizers import Tokenizer

    from fhirplug_convert.datasets import load_splits
    from fhirplug_convert.finetune import train

    recipe = load_recipe(write_recipe(tmp_path, tiny_base, training="", max_tokens=32))
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"epochs": 1})})
    splits = load_splits(recipe)
    tokenizer = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=32, stride=8)
    windows = sum(1 + len(e.overflowing) for e in tokenizer.encode_batch([x.text for x in splits.train]))
    # Some training notes are longer than one window: more steps than a pass over the texts takes.
    assert math.ceil(windows / 16) > math.ceil(len(splits.train) / 16)
    trained, _ = train(recipe, str(tiny_base), splits.train, splits.validation, progress=False)
    assert trained.steps == math.ceil(windows / recipe.training.batch_size)


def _spy_fit(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every call of the one training loop: the task's model before training, per-epoch snapshots."""
    import fhirplug_convert.trainer

    real = fhirplug_convert.trainer.fit
    calls: list[dict[str, Any]] = []

    def spy(recipe: Any, task: Any, **options: Any) -> Any:
        call: dict[str, Any] = {"before": _state(task.model), "epochs": []}
        calls.append(call)
        validate = task.validate

        def recorded(module: torch.nn.Module) -> dict[str, float]:
            values = validate(module)
            call["epochs"].append({"values": values, "state": _state(module)})
            return values

        task.validate = recorded
        return real(recipe, task, **options)

    monkeypatch.setattr(fhirplug_convert.trainer, "fit", spy)
    return calls


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["full", "lora", "bitfit", "prompt-tuning"])
def test_every_method_trains_through_the_one_loop(
    method: str, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhirplug_convert.datasets import load_splits
    from fhirplug_convert.finetune import train

    calls = _spy_fit(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, method=method, training="max_steps = 3"))
    splits = load_splits(recipe)
    trained, _ = train(recipe, str(tiny_base), splits.train, splits.validation, progress=False)
    (call,) = calls
    assert trained.steps == 3 and len(trained.history) == 1 and trained.best_epoch == 1
    assert set(trained.history[0]) == {"epoch", "step", "train_loss", "accuracy", "nll"}
    after = _state(trained.module.model)  # the Hugging Face model inside the exportable module (LoRA merged)
    assert not any("lora_" in name for name in after)

    def moved(name: str) -> bool:
        return not torch.equal(call["before"][name], after[name])

    query = "bert.encoder.layer.0.attention.self.query"
    assert moved("classifier.weight")
    assert moved(f"{query}.weight") == (method in ("full", "lora"))  # LoRA: the merged adapters
    assert moved(f"{query}.bias") == (method in ("full", "bitfit"))
    if method == "prompt-tuning":
        assert isinstance(trained.module, PromptTuningModel)
        assert moved("bert.pooler.dense.weight") and not moved("bert.embeddings.word_embeddings.weight")


def test_early_stopping_restores_the_best_epoch(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation peaks at epoch 2, then stays lower for ``early_stopping_patience`` (2) epochs: training stops
    after epoch 4 and the module that comes back is epoch 2's, weights and validation score."""
    import fhirplug_convert.trainer
    from fhirplug_convert.datasets import load_splits
    from fhirplug_convert.finetune import train

    calls = _spy_fit(monkeypatch)
    spied = fhirplug_convert.trainer.fit
    scripted = iter([0.5, 0.9, 0.7, 0.6, 1.0, 1.0])
    real: list[Any] = []  # the task's own validation, and what it scored each epoch

    def scripted_fit(recipe: Any, task: Any, **options: Any) -> Any:
        real.append(task.validate)

        def validate(module: torch.nn.Module) -> dict[str, float]:
            real.append(real[0](module))
            return {"accuracy": next(scripted), "nll": 0.0}

        task.validate = validate
        return spied(recipe, task, **options)

    monkeypatch.setattr(fhirplug_convert.trainer, "fit", scripted_fit)
    path = write_recipe(tmp_path, tiny_base)
    path.write_text(path.read_text().replace("early_stopping_patience = 8", "early_stopping_patience = 2"))
    recipe = load_recipe(path)
    splits = load_splits(recipe)
    trained, _ = train(recipe, str(tiny_base), splits.train, splits.validation, progress=False)
    (call,) = calls
    assert [h["accuracy"] for h in trained.history] == [0.5, 0.9, 0.7, 0.6]  # 2 epochs without gain: stop
    assert trained.best_epoch == 2 and trained.steps == 4 * trained.history[0]["step"]
    epochs = call["epochs"]
    restored = _state(trained.module)
    assert all(torch.equal(restored[k], v) for k, v in epochs[1]["state"].items())  # epoch 2's weights
    assert not all(torch.equal(restored[k], v) for k, v in epochs[3]["state"].items())  # not the last epoch's
    assert real[0](trained.module) == real[2]  # so it scores on validation what epoch 2 scored


def test_default_epochs_count_the_windows_an_epoch_trains(tiny_base: Path, tmp_path: Path) -> None:
    """Every window of a long text is a training row: 3 windows per text make an epoch 3x the steps, so the
    default epochs (about 800 steps) count windows, not texts."""
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, omit=("epochs",)))
    assert recipe.training.epochs is None
    by_texts, used = resolve_training(recipe, 2022)
    by_windows, used_w = resolve_training(recipe, 2022, 6060)
    assert (by_texts.training.epochs, by_windows.training.epochs) == (7, 3)  # 127 vs 379 steps an epoch
    assert used_w["epochs"]["reason"].startswith("2022 training examples (6060 windows), batch 16:")
    assert used["epochs"]["reason"].startswith("2022 training examples, batch 16:")
    short, long = "asthma follow up", " ".join(["wheeze and cough at night"] * 40)  # window: 32 tokens
    assert count_windows(str(tiny_base), recipe, [short]) == 1
    windows = count_windows(str(tiny_base), recipe, [short, long])
    assert (
        windows > 3
        and windows
        == 1
        + len(
            finetune._window_tokenizer(load_base(str(tiny_base), LABELS, False)[1], 32, recipe.training.stride)
            .encode(long)
            .overflowing
        )
        + 1
    )
