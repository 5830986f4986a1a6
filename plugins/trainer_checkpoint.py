"""Package a run stopped early: turn an epoch checkpoint that fhirplug's training loop (transformers Trainer) wrote
into the --save-checkpoint form that `fhirplug convert --from-checkpoint` packages.

    python plugins/trainer_checkpoint.py RECIPE TRAINER_CHECKPOINT_DIR OUT_DIR CONVERT_LOG

TRAINER_CHECKPOINT_DIR is a checkpoint-N folder of the run's temporary fhirplug-train-* directory; CONVERT_LOG is the
run's log (its "epoch N: ..." lines up to that checkpoint become the training history). Used for
medical-abstracts-mesh (see its recipe.toml).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from safetensors.torch import load_file

from fhirplug_convert import finetune
from fhirplug_convert.datasets import load_splits
from fhirplug_convert.pipeline import set_calibration_split
from fhirplug_convert.recipe import load_recipe, resolve_base_model

EPOCH = re.compile(r"epoch (\d+): step (\d+), train loss ([\d.]+), validation (\w+) ([\d.]+)")


def main(recipe_path: str, trainer_checkpoint: str, out: str, log: str) -> None:
    recipe = load_recipe(recipe_path)
    base = str(resolve_base_model(recipe))
    model, _ = finetune.load_base(base, recipe.label_names, recipe.output.multi_label)
    module = finetune.LogitsModel(model)
    missing, unexpected = module.load_state_dict(load_file(str(Path(trainer_checkpoint) / "model.safetensors")))
    if missing or unexpected:
        raise SystemExit(f"error: the checkpoint does not fit the recipe's model: {missing} {unexpected}")
    state = json.loads((Path(trainer_checkpoint) / "trainer_state.json").read_text())
    history = []
    for line in Path(log).read_text().splitlines():
        m = EPOCH.match(line)
        if m and int(m.group(2)) <= state["global_step"]:
            entry = {"epoch": int(m.group(1)), "step": int(m.group(2)), "train_loss": float(m.group(3))}
            history.append({**entry, m.group(4): float(m.group(5))})
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    trained = finetune.TrainedModel(
        module=module.eval(),
        config=model.config,
        max_tokens=finetune.window_size(model.config, recipe),
        trainable_parameters=trainable,
        total_parameters=sum(p.numel() for p in module.parameters()),
        steps=int(state["global_step"]),
        best_epoch=round(state["epoch"]),
        history=history,
    )
    # The splits the run trained on: the recipe's, recomputed as the converter computes them.
    splits = set_calibration_split(recipe, load_splits(recipe))
    finetune.save_checkpoint(trained, base, out, finetune.splits_fingerprint(splits))
    print(f"saved {out}: {state['global_step']} steps, history {history}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
