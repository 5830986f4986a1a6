"""Write a plugin folder's model card (plugins/<name>/README.md) from the card its real build generated.

The build's card (inside the bundle) is kept as it is, with repository-relative paths in the commands, the
multi-label exact-match row named as such, and the example inputs with what the committed bundle yields.

    python plugins/write_card.py <name> BUILD_BUNDLE "<the exact convert command that was run>"
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import fhirplug

HERE = Path(__file__).parent


def main(name: str, build: str, command: str) -> None:
    folder = HERE / name
    card = (Path(build) / "README.md").read_text(encoding="utf-8")
    card = re.sub(r"\| accuracy \|", "| exact-match accuracy (all codes right) |", card) if "AUROC" in card else card
    card = card.split("## Reproduce")[0].rstrip() + "\n"
    plugin = fhirplug.load_plugin(folder / "bundle", allow_unsigned=True)
    rows = ["| example | code | display | probability |", "|---|---|---|---|"]
    for path in sorted((folder / "examples").glob("*.json")):
        for p in plugin.predict_files([path]).predictions:
            rows.append(f"| {path.name} | {p.code} | {p.display} | {p.probability:.3f} |")
    expected = json.loads((folder / "expected.json").read_text())
    baseline = folder / "baseline.json"
    if baseline.is_file():
        built = json.loads((Path(build) / "metrics.json").read_text())
        card += _baseline_section(json.loads(baseline.read_text()), built)
    card += _defaults_section(name)
    card += "\n## Example inputs (committed int8 bundle)\n\n" + "\n".join(rows) + "\n\n"
    card += f"`expected.json` promises: {json.dumps(expected)} (checked by tests/plugins/test_first_party.py).\n"
    misses = folder / "known_misses.json"
    if misses.is_file():
        card += "\nKnown misses on the examples (`known_misses.json`, checked to still be exactly these):\n\n"
        for example, notes in json.loads(misses.read_text()).items():
            for ref, entry in notes.items():
                card += f"- {example} {ref}: {entry['why']}\n"
    card += (
        "\n## Reproduce\n\nFrom the repository root, with the train extra and the offline base model installed "
        "(see the top-level README), and ../shared/data beside the checkout:\n\n```bash\n"
        f"{command}\n"
        f'python -c "from fhirplug_convert.package import publish_variants as p; '
        f"p('plugins/{name}/build/bundle', 'plugins/{name}/bundle', ['int8'])\"\n"
        f'python plugins/write_card.py {name} plugins/{name}/build/bundle "{command}"\n```\n'
    )
    notes = folder / "card_notes.md"  # sections measured by the plugin's own scripts (each names its command)
    if notes.is_file():
        card += "\n" + notes.read_text(encoding="utf-8")
    (folder / "README.md").write_text(card, encoding="utf-8")
    print(f"wrote {folder / 'README.md'}")


#: The corpus name ``benchmarks/recipe_defaults.py`` gives each first-party plugin's data.
DEFAULTS_CORPUS = {"medical-abstracts-mesh": "mesh", "synthea-conditions": "synthea", "bc5cdr-ner": "bc5cdr"}
RUN_LABELS = {
    "default-lora": 'data, labels, base model and `[method] kind = "lora"`, nothing else',
    "lora-qv": 'the same with `target_modules = ["query", "value"]`',
    "default-full": 'the same with `kind = "full"`',
    "search-full": "full with `[training] search = { trials = 3 }`",
    "shipped": "this plugin's recipe (the committed bundle, not retrained)",
}


def _defaults_section(name: str) -> str:
    """The converter's default recipe on this plugin's data against its tuned recipe (benchmarks/recipe_defaults.py)."""
    corpus = DEFAULTS_CORPUS.get(name)
    path = HERE.parent / "benchmarks" / "results" / f"recipe_defaults_{corpus}.json"
    if corpus is None or not path.is_file():
        return ""
    report = json.loads(path.read_text(encoding="utf-8"))
    order = list(RUN_LABELS)
    runs = sorted(
        (r for r in report["runs"] if r.get("fp32") is not None),
        key=lambda r: order.index(r["run"]) if r["run"] in order else len(order),
    )
    if not runs:
        return ""
    best = max(r["fp32"] for r in runs)
    commands = report.get("commands") or [report["command"]]
    lines = [
        "",
        "## Default recipe vs this recipe",
        "",
        "The same data, labels and base model with the converter's defaults (no `[training]` table), one run each "
        "on 2 CPU cores (" + "; ".join(f"`{c}`" for c in commands) + f"); test {runs[0]['metric']} of fp32 (int8):",
        "",
        "| recipe | learning rate | best epoch | test fp32 (int8) | points below the best |",
        "|---|---|---:|---|---:|",
    ]
    for r in runs:
        rate = (r.get("resolved") or {}).get("learning_rate", {}).get("value")
        int8 = f"{r['int8']:.4f}" if r.get("int8") is not None else "not packaged"
        lines.append(
            f"| {RUN_LABELS.get(r['run'], r['run'])} | {rate if rate is not None else '–'} | "
            f"{r.get('best_epoch') or '–'} | {r['fp32']:.4f} ({int8}) | {(best - r['fp32']) * 100:.1f} |"
        )
    return "\n".join([*lines, ""])


def _baseline_section(baseline: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The TF-IDF + logistic-regression baseline on the same split (plugins/<name>/baseline.py), beside the model."""
    test = baseline["test"]
    lines = [
        "",
        "## Baseline on the same split",
        "",
        f"{baseline['model']} (scikit-learn {baseline['scikit_learn']}, C chosen on validation), "
        f"`python plugins/{Path(baseline['recipe']).parent.name}/baseline.py`:",
        "",
        "| model | test top-1 accuracy | macro-F1 |",
        "|---|---:|---:|",
        f"| TF-IDF + logistic regression | {test['top1_accuracy']:.4f} | {test['macro_f1']:.4f} |",
    ]
    beaten = []
    for precision, values in metrics["test"].items():
        top1 = values.get("top1_accuracy", values.get("accuracy"))
        lines.append(f"| this plugin, {precision} | {top1:.4f} | {values['macro_f1']:.4f} |")
        beaten.append(top1 > test["top1_accuracy"] and values["macro_f1"] > test["macro_f1"])
    verdict = (
        "The transformer beats the baseline on both metrics."
        if all(beaten)
        else "The transformer does NOT beat the baseline on both metrics: a TF-IDF model does as well here."
    )
    return "\n".join([*lines, "", verdict, ""])


if __name__ == "__main__":
    main(*sys.argv[1:4])
