"""Precision, recall and F1 of the assertion engine per category, on the hand-written ConText-style set.

Usage::

    python benchmarks/assertion_eval.py [--set tests/fixtures/assertion/context_eval.jsonl]
                                        [--lexicon assertion.json] [--json OUT]

Each line of the set is a sentence, its target mention (a ``[start, end]`` span or the phrase itself) and the
labels a clinician gave it (``negated``, ``possible``, ``historical``, ``hypothetical``, ``subject``,
``relationship``), with a ``split``: ``dev`` (what the lexicon was tuned on) or ``test`` (held out). Per split
and category (negated, possible, historical, hypothetical, family, other) it prints precision, recall, F1 and
support (the sentences the label is true for), the relationship accuracy on family mentions, and every
misclassified sentence.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirplug._assertion import Assertion, Lexicon, assert_spans

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ROOT / "tests" / "fixtures" / "assertion" / "context_eval.jsonl"
#: The categories scored: the four booleans, then the experiencer as two one-vs-rest labels.
CATEGORIES = ("negated", "possible", "historical", "hypothetical", "family", "other")
SPLITS = ("dev", "test", "all")


@dataclass(frozen=True)
class Case:
    """One sentence of the set with its target span and expected labels."""

    line: int
    text: str
    span: tuple[int, int]
    expected: Mapping[str, Any]
    category: str
    split: str
    note: str


def load_cases(path: Path = DEFAULT_SET) -> list[Case]:
    """Read the set; a target given as a phrase must occur exactly once in its sentence."""
    cases = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        row = json.loads(raw)
        text, target = row["text"], row["target"]
        if isinstance(target, str):
            if text.count(target) != 1:
                raise ValueError(f"{path}:{number}: target {target!r} must occur exactly once in {text!r}")
            start = text.index(target)
            span = (start, start + len(target))
        else:
            span = (int(target[0]), int(target[1]))
        if row.get("split") not in ("dev", "test"):
            raise ValueError(f"{path}:{number}: split must be dev or test, got {row.get('split')!r}")
        cases.append(Case(number, text, span, row["expected"], row["category"], row["split"], row.get("note", "")))
    return cases


def labels(value: Mapping[str, Any] | Assertion) -> dict[str, bool]:
    """The six scored labels of an expectation (a mapping) or of the engine's :class:`Assertion`."""
    get = value.get if isinstance(value, Mapping) else lambda k: getattr(value, k)
    return {
        "negated": bool(get("negated")),
        "possible": bool(get("possible")),
        "historical": bool(get("historical")),
        "hypothetical": bool(get("hypothetical")),
        "family": get("subject") == "family",
        "other": get("subject") == "other",
    }


def run(cases: Sequence[Case], lexicon: Lexicon | None = None) -> list[Assertion]:
    """The engine's assertion of each case's target (one sentence at a time, as a note would be)."""
    return [assert_spans(case.text, [case.span], lexicon)[0] for case in cases]


def score(cases: Sequence[Case], got: Sequence[Assertion]) -> dict[str, Any]:
    """Per category precision, recall, F1, support and counts; ``relationship`` accuracy on true family mentions.

    A category with no predicted positive has precision 1.0 when it also has no support (nothing to find, nothing
    wrongly found), else 0.0; recall of a category without support is 1.0.
    """
    result: dict[str, Any] = {"sentences": len(cases)}
    for category in CATEGORIES:
        tp = fp = fn = 0
        for case, assertion in zip(cases, got, strict=True):
            want, have = labels(case.expected)[category], labels(assertion)[category]
            tp += want and have
            fp += have and not want
            fn += want and not have
        precision = tp / (tp + fp) if tp + fp else (1.0 if tp + fn == 0 else 0.0)
        recall = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[category] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": tp + fn,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
    family = [(c, a) for c, a in zip(cases, got, strict=True) if c.expected["subject"] == "family"]
    right = sum(a.relationship == c.expected["relationship"] for c, a in family)
    result["relationship"] = {"accuracy": round(right / len(family), 4) if family else 1.0, "support": len(family)}
    result["exact"] = (
        round(sum(labels(c.expected) == labels(a) for c, a in zip(cases, got, strict=True)) / len(cases), 4)
        if cases
        else 1.0
    )
    return result


def evaluate(cases: Sequence[Case], lexicon: Lexicon | None = None) -> dict[str, Any]:
    """Scores per split (``dev``, ``test``, ``all``) and the misclassified cases."""
    got = run(cases, lexicon)
    out: dict[str, Any] = {}
    for split in SPLITS:
        chosen = [(c, a) for c, a in zip(cases, got, strict=True) if split in ("all", c.split)]
        out[split] = score([c for c, _ in chosen], [a for _, a in chosen])
    out["errors"] = [
        {
            "line": c.line,
            "split": c.split,
            "category": c.category,
            "text": c.text,
            "target": c.text[c.span[0] : c.span[1]],
            "wrong": sorted(k for k, v in labels(c.expected).items() if labels(a)[k] != v),
            "relationship": [c.expected["relationship"], a.relationship]
            if c.expected["subject"] == "family" and a.relationship != c.expected["relationship"]
            else None,
            "triggers": list(a.triggers),
        }
        for c, a in zip(cases, got, strict=True)
        if labels(c.expected) != labels(a)
        or (c.expected["subject"] == "family" and a.relationship != c.expected["relationship"])
    ]
    return out


def _table(scores: Mapping[str, Any]) -> Iterable[str]:
    yield f"  {'category':<13}{'P':>7}{'R':>7}{'F1':>7}{'support':>9}{'fp':>5}{'fn':>5}"
    for category in CATEGORIES:
        s = scores[category]
        yield (
            f"  {category:<13}{s['precision']:>7.3f}{s['recall']:>7.3f}{s['f1']:>7.3f}"
            f"{s['support']:>9}{s['fp']:>5}{s['fn']:>5}"
        )
    rel = scores["relationship"]
    yield f"  relationship accuracy on family mentions {rel['accuracy']:.3f} (n={rel['support']})"
    yield f"  all six labels right {scores['exact']:.3f} of {scores['sentences']} sentences"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=DEFAULT_SET, help="the evaluation set (JSONL)")
    parser.add_argument("--lexicon", type=Path, help="an assertion lexicon JSON (default: fhirplug's)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the numbers and errors as JSON")
    args = parser.parse_args(argv)
    print("$ python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    lexicon = Lexicon.load(args.lexicon) if args.lexicon else Lexicon.default()
    cases = load_cases(args.set)
    result = evaluate(cases, lexicon)
    result["set"] = str(args.set)
    result["lexicon"] = lexicon.source
    for split in SPLITS:
        print(f"\n{split} ({result[split]['sentences']} sentences)")
        print("\n".join(_table(result[split])))
    print(f"\nmisclassified ({len(result['errors'])}):")
    for e in result["errors"]:
        extra = f" relationship expected {e['relationship'][0]} got {e['relationship'][1]}" if e["relationship"] else ""
        print(
            f"  [{e['split']}:{e['line']}] {e['category']}: {e['text']!r} / {e['target']!r}: "
            f"wrong {e['wrong']}{extra} triggers {e['triggers']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
