"""Method internals the pipeline tests cannot see: what trains, what the exported module computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.converters.conftest import write_recipe

from fhirplug_convert.finetune import LogitsModel, PromptTuningModel, _finish, _prepare, load_base, window_size
from fhirplug_convert.recipe import load_recipe

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
