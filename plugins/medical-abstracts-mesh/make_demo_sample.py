"""Cut the small embedded training sample `data/demo-sample.csv` that `fhirplug demo --train` uses.

Source: the Medical Abstracts TC corpus (Schopf et al. 2022), CC BY-SA 3.0, as copied to
../shared/data/medical-abstracts (see its PROVENANCE.md). The sample keeps 60 abstracts per class, chosen with a
fixed seed among abstracts that carry one label only, so a fresh clone can run the whole train-side pipeline
without the shared data. It is derived data and carries the same license (see data/LICENSE.md).

Run from the repository root:  python plugins/medical-abstracts-mesh/make_demo_sample.py
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE.parents[1].parent / "shared" / "data" / "medical-abstracts" / "medical_tc_test.csv"
PER_CLASS, SEED = 60, 20261123


def main() -> None:
    labels_of: dict[str, set[str]] = defaultdict(set)
    with SOURCE.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            labels_of[row["medical_abstract"]].add(row["condition_label"])
    by_class: dict[str, list[str]] = defaultdict(list)
    for text, labels in labels_of.items():
        if len(labels) == 1:
            by_class[next(iter(labels))].append(text)
    rng = random.Random(SEED)
    rows = []
    for label in sorted(by_class):
        texts = sorted(by_class[label])
        rows += [(label, t) for t in rng.sample(texts, PER_CLASS)]
    rng.shuffle(rows)
    out = HERE / "data" / "demo-sample.csv"
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["condition_label", "medical_abstract"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} abstracts to {out}")


if __name__ == "__main__":
    main()
