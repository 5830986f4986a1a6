"""Score the built bc5cdr-ner bundle through the fhirplug runtime, side by side with the corpus's baselines.

    python plugins/bc5cdr-ner/evaluate.py [--bundle plugins/bc5cdr-ner/build/bundle] [--variant int8]
        [--rebuild-terminology] [--no-abbreviations] [--no-write]

``--rebuild-terminology`` scores a temporary copy of the bundle whose dictionary is rebuilt from recipe.toml as the
converter builds it now (fhirplug_convert.terminology), the model unchanged: what a new dictionary alone is worth.
``--no-abbreviations`` codes each mention alone, without the abbreviations its abstract defines.

- BC5CDR test split (500 abstracts): each abstract goes in as a FHIR DocumentReference (text/plain, base64), the
  runtime predicts (tokenize → ONNX → BIO decode → MeSH coding → assertion), and the predicted spans are scored:
  strict mention-level precision/recall/F1 per type (exact character span and type), and concept-level
  precision/recall/F1 of (document, MeSH ID) pairs per type — the BioCreative V CDR normalisation measure
  (composite gold IDs split into their parts; ID -1 left out). Assertion is not used for scoring (abstracts
  rarely negate, and the gold standard annotates negated mentions as mentions).
- The shipped DNorm (disease) and tmChem (chemical) test-set outputs are scored the same way.
- NCBI disease test split (100 abstracts), without retraining: Disease mention F1 (all four NCBI mention
  classes count as Disease), and concept F1 over the MeSH-coded gold mentions (OMIM gold IDs cannot be matched
  by a MeSH plugin and are left out of that number).

Writes plugins/bc5cdr-ner/results.json and the numbers between the results markers of plugins/bc5cdr-ner/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data"
START, END = "<!-- results:start -->", "<!-- results:end -->"

Doc = dict[str, Any]


def read_pubtator(path: Path, type_map: dict[str, str]) -> list[Doc]:
    """Documents: id, text, mentions as (start, end, type, ids); types mapped by ``type_map`` (others dropped)."""
    docs: list[Doc] = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        pmid, title, abstract, mentions = "", "", "", []
        for line in lines:
            if "|t|" in line[:40] and not title:
                pmid, _, title = line.partition("|t|")
            elif "|a|" in line[:40] and not abstract:
                abstract = line.partition("|a|")[2]
            else:
                cells = line.split("\t")
                if len(cells) >= 5 and cells[4] in type_map:
                    raw = cells[5] if len(cells) > 5 else ""
                    ids = []
                    for part in raw.replace("+", "|").split("|"):
                        part = part.strip().removeprefix("MESH:")
                        if part and part != "-1" and part[:1] in "CD" and part[1:].isdigit():
                            ids.append(part)
                    mentions.append((int(cells[1]), int(cells[2]), type_map[cells[4]], tuple(ids)))
        docs.append({"id": pmid, "text": f"{title} {abstract}", "mentions": mentions})
    return docs


def prf(gold: set[Any], pred: set[Any]) -> dict[str, Any]:
    tp, fp, fn = len(gold & pred), len(pred - gold), len(gold - pred)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "tp": tp, "fp": fp, "fn": fn}


def score(gold: list[Doc], pred: dict[str, list[tuple[int, int, str, tuple[str, ...]]]], types: Iterable[str]) -> Doc:
    out: Doc = {"mentions": {}, "concepts": {}}
    for kind in types:
        g_m = {(d["id"], s, e) for d in gold for s, e, t, _ in d["mentions"] if t == kind}
        p_m = {(doc, s, e) for doc, items in pred.items() for s, e, t, _ in items if t == kind}
        out["mentions"][kind] = prf(g_m, p_m)
        g_c = {(d["id"], c) for d in gold for _, _, t, ids in d["mentions"] if t == kind for c in ids}
        p_c = {(doc, c) for doc, items in pred.items() for _, _, t, ids in items if t == kind for c in ids}
        out["concepts"][kind] = prf(g_c, p_c)
    return out


def run_plugin(plugin: Any, docs: list[Doc]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    resources = [
        {
            "resourceType": "DocumentReference",
            "id": f"pmid-{d['id']}",
            "status": "current",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "data": base64.b64encode(d["text"].encode("utf-8")).decode(),
                    }
                }
            ],
        }
        for d in docs
    ]
    started = time.perf_counter()
    result = plugin.predict(resources)
    seconds = time.perf_counter() - started
    pred: dict[str, list[Any]] = {d["id"]: [] for d in docs}
    stats = {"predictions": 0, "uncoded": 0, "negated": 0, "possible": 0, "historical": 0, "family": 0}
    methods: dict[str, int] = {}
    for p in result.predictions:
        doc = p.source.reference.removeprefix("DocumentReference/pmid-")
        entity = p.entity
        pred[doc].append((p.evidence.start, p.evidence.end, entity.type, (p.code,) if p.code else ()))
        stats["predictions"] += 1
        stats["uncoded"] += not entity.coded
        stats["negated"] += entity.negated
        stats["possible"] += entity.possible
        stats["historical"] += entity.historical
        stats["family"] += entity.subject == "family"
        methods[entity.coding_method] = methods.get(entity.coding_method, 0) + 1
    if result.issues:
        raise SystemExit(f"the runtime reported issues: {result.issues[:3]}")
    stats["uncoded_rate"] = round(stats["uncoded"] / stats["predictions"], 4) if stats["predictions"] else 0.0
    stats["coding_methods"] = dict(sorted(methods.items()))
    stats["seconds"] = round(seconds, 1)
    stats["docs_per_second"] = round(len(docs) / seconds, 2)
    return pred, stats


def rebuild_terminology(bundle: Path, recipe_path: Path, into: Path) -> dict[str, Any]:
    """Copy ``bundle`` to ``into`` with the dictionary rebuilt from the recipe (model files untouched), re-hashed
    and unsigned; returns the terminology facts."""
    from fhirplug.bundle import read_manifest, write_manifest
    from fhirplug_convert.datasets import load_splits
    from fhirplug_convert.recipe import load_recipe
    from fhirplug_convert.terminology import build_terminology

    recipe = load_recipe(recipe_path)
    splits = load_splits(recipe)
    shutil.copytree(bundle, into)
    (into / "manifest.sig").unlink(missing_ok=True)
    work = into.parent / "terminology-work"
    work.mkdir()
    _, files, facts = build_terminology(recipe, [*splits.train, *splits.validation], work, held_out=splits.test)
    for name in ("concepts.json", "concept_vectors.npz"):
        shutil.copyfile(files[name], into / name)
    manifest, _ = read_manifest(into)
    fields = manifest.model_dump(mode="json", exclude={"variants", "files"})
    write_manifest(into, fields, variants=[v.model_dump(mode="json", exclude={"sha256"}) for v in manifest.variants])
    return facts


def baseline(path: Path, type_map: dict[str, str]) -> dict[str, list[Any]]:
    return {d["id"]: d["mentions"] for d in read_pubtator(path, type_map)}


def _row(name: str, result: Doc, kind: str) -> str:
    m, c = result["mentions"][kind], result["concepts"][kind]
    return (
        f"| {name} | {kind} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
        f"{c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} |"
    )


def render(results: Doc) -> str:
    bc = results["bc5cdr_test"]
    lines = [
        START,
        f"Measured by `python plugins/bc5cdr-ner/evaluate.py` on the **{results['variant']}** variant through the "
        f"runtime (bundle manifest sha256 `{results['manifest_sha256'][:16]}…`).",
        "",
        "BC5CDR test split (500 abstracts; strict = exact span and type; concept = (document, MeSH ID) pairs):",
        "",
        "| system | type | mention P | mention R | mention F1 | concept P | concept R | concept F1 |",
        "|---|---|---|---|---|---|---|---|",
        _row("fhirplug bc5cdr-ner", bc["fhirplug"], "Disease"),
        _row("DNorm (shipped output)", bc["dnorm"], "Disease"),
        _row("fhirplug bc5cdr-ner", bc["fhirplug"], "Chemical"),
        _row("tmChem (shipped output)", bc["tmchem"], "Chemical"),
        "",
        f"Runtime: {bc['runtime']['docs_per_second']} abstracts/s on this machine; coding methods "
        f"{bc['runtime']['coding_methods']}.",
    ]
    ncbi = results.get("ncbi_disease_test")
    if ncbi:
        m, c = ncbi["fhirplug"]["mentions"]["Disease"], ncbi["fhirplug"]["concepts"]["Disease"]
        lines += [
            "",
            f"NCBI disease test split (100 abstracts, no retraining): Disease mention P/R/F1 {m['precision']:.4f} / "
            f"{m['recall']:.4f} / {m['f1']:.4f}; concept F1 over MeSH-coded gold {c['f1']:.4f} (NCBI annotates "
            'differently from BC5CDR — e.g. modifiers such as "copper toxicosis" in "copper toxicosis locus" — '
            "so this is a transfer check, not a tuned score).",
        ]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=HERE / "build" / "bundle")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--no-write", action="store_true", help="print, do not write results.json / README.md")
    parser.add_argument(
        "--rebuild-terminology",
        action="store_true",
        help="score a temporary copy of --bundle with the dictionary rebuilt from recipe.toml (implies --no-write)",
    )
    parser.add_argument("--recipe", type=Path, default=HERE / "recipe.toml", help="for --rebuild-terminology")
    parser.add_argument("--no-abbreviations", action="store_true", help="do not resolve in-text abbreviations")
    args = parser.parse_args(argv)
    if args.rebuild_terminology:
        with tempfile.TemporaryDirectory(prefix="bc5cdr-terminology-") as folder:
            copy = Path(folder) / "bundle"
            facts = rebuild_terminology(args.bundle, args.recipe, copy)
            return evaluate(args, copy, {"terminology_rebuilt_from": str(args.recipe), "terminology": facts})
    return evaluate(args, args.bundle, {})


def evaluate(args: argparse.Namespace, bundle: Path, extra: Doc) -> int:
    import fhirplug

    plugin = fhirplug.load_plugin(bundle, allow_unsigned=True, variant=args.variant, provider="cpu")
    plugin.task.resolve_abbreviations = not args.no_abbreviations
    bc5 = args.data / "bc5cdr"
    gold = read_pubtator(bc5 / "pubtator" / "CDR_TestSet.PubTator.txt", {"Disease": "Disease", "Chemical": "Chemical"})
    pred, runtime = run_plugin(plugin, gold)
    results: Doc = {
        "bundle": str(args.bundle),
        "variant": plugin.variant,
        "manifest_sha256": plugin.manifest_sha256,
        "abbreviations_resolved": not args.no_abbreviations,
        **extra,
        "bc5cdr_test": {
            "documents": len(gold),
            "fhirplug": score(gold, pred, ("Disease", "Chemical")),
            "dnorm": score(
                gold,
                baseline(bc5 / "baseline_predictions_testset" / "TestSet.DNorm.PubTator.txt", {"Disease": "Disease"}),
                ("Disease",),
            ),
            "tmchem": score(
                gold,
                baseline(
                    bc5 / "baseline_predictions_testset" / "TestSet.tmChem.PubTator.txt", {"Chemical": "Chemical"}
                ),
                ("Chemical",),
            ),
            "runtime": runtime,
        },
    }
    ncbi_file = args.data / "ncbi-disease" / "NCBItestset_corpus.txt"
    if ncbi_file.is_file():
        classes = {k: "Disease" for k in ("SpecificDisease", "DiseaseClass", "Modifier", "CompositeMention")}
        ncbi = read_pubtator(ncbi_file, classes)
        ncbi_pred, ncbi_runtime = run_plugin(plugin, ncbi)
        only_disease = {k: [x for x in v if x[2] == "Disease"] for k, v in ncbi_pred.items()}
        results["ncbi_disease_test"] = {
            "documents": len(ncbi),
            "fhirplug": score(ncbi, only_disease, ("Disease",)),
            "runtime": ncbi_runtime,
        }
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    if args.no_write or extra:
        sys.stdout.write(text)
        return 0
    (HERE / "results.json").write_text(text, encoding="utf-8")
    card = HERE / "README.md"
    body = card.read_text(encoding="utf-8")
    if START in body and END in body:
        head, rest = body.split(START, 1)
        body = head + render(results) + rest.split(END, 1)[1]
        card.write_text(body, encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
