"""Which embedding separates a plugin's own texts from out-of-domain texts: the classification head's input (the
BERT pooler output) or the attention-masked mean of the encoder's last hidden states (the abstention output the
converter exports, see fhirplug_convert.abstention.WithEmbedding).

For one recipe and one model (a checkpoint saved with ``fhirplug convert --save-checkpoint``, or the base model),
both embeddings of the training split fit the same class-conditional Mahalanobis model
(``fhirplug_convert.abstention.fit_mahalanobis``); the in-domain texts are the calibration and test splits, the
out-of-domain texts the held-out halves of the recipe's ``[abstention] ood`` sets and fhirplug's generic English.
Reported per set: AUROC (in-domain vs that set) and the share refused at the distance that keeps 99% of the
in-domain texts.

Run (needs the [train] extra, ../shared/data for the corpora):

    python benchmarks/abstention_embeddings.py plugins/synthea-conditions/recipe.toml
    python benchmarks/abstention_embeddings.py plugins/medical-abstracts-mesh/recipe.toml \\
        --checkpoint plugins/medical-abstracts-mesh/build/checkpoint --limit 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def embed(model: Any, tokenizer: Any, texts: list[str], max_tokens: int) -> dict[str, np.ndarray]:
    """Per text (its first window): the pooler output and the masked mean of the last hidden states."""
    import torch

    pooled, mean = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), 16):
            batch = tokenizer(
                texts[start : start + 16], truncation=True, max_length=max_tokens, padding=True, return_tensors="pt"
            )
            out = model.base_model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean.append(((out.last_hidden_state * mask).sum(1) / mask.sum(1)).numpy())
            pooled.append(out.pooler_output.numpy())
    return {"pooler": np.concatenate(pooled), "mean": np.concatenate(mean)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="a trained model folder (default: the recipe's base model)")
    parser.add_argument("--limit", type=int, default=300, help="texts per set at most (default 300)")
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    args = parser.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fhirplug_convert import abstention
    from fhirplug_convert.datasets import load_splits
    from fhirplug_convert.pipeline import set_calibration_split
    from fhirplug_convert.recipe import load_recipe, resolve_base_model

    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    splits = set_calibration_split(recipe, load_splits(recipe))
    source = str(args.checkpoint or resolve_base_model(recipe))
    labels = recipe.label_names
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels)).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    max_tokens = recipe.training.max_tokens or 256
    limit = args.limit
    train = splits.train[: limit * 4]
    truth = np.zeros((len(train), len(labels)), dtype=np.int64)
    for row, example in enumerate(train):
        truth[row, [labels.index(k) for k in example.labels]] = 1
    inside = [e.text for e in [*splits.calibration, *splits.test]][:limit]
    sets = {s.name: s.evaluation[:limit] for s in abstention.read_ood(list(recipe.abstention.ood), seed=0)}
    fitted = embed(model, tokenizer, [e.text for e in train], max_tokens)
    in_emb = embed(model, tokenizer, inside, max_tokens)
    result: dict[str, Any] = {"recipe": str(args.recipe), "model": "checkpoint" if args.checkpoint else "base"}
    for kind in ("pooler", "mean"):
        arrays = abstention.fit_mahalanobis(fitted[kind], truth)
        d_in = abstention.distances(arrays, in_emb[kind])
        cut = float(np.quantile(d_in, 0.99))
        rows = {}
        for name, texts in sets.items():
            d_out = abstention.distances(arrays, embed(model, tokenizer, texts, max_tokens)[kind])
            y = np.r_[np.zeros(len(d_in)), np.ones(len(d_out))]
            rows[name] = {
                "texts": len(texts),
                "auroc": round(float(roc_auc_score(y, np.r_[d_in, d_out])), 4),
                "refused_at_99pct_kept": round(float((d_out > cut).mean()), 4),
            }
        result[kind] = rows
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
