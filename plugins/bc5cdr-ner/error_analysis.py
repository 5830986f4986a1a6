"""Where bc5cdr-ner's strict mention errors come from, and what two post-processing rules would do to them.

    python plugins/bc5cdr-ner/error_analysis.py [--bundle plugins/bc5cdr-ner/bundle] [--json FILE]

Scores the BC5CDR test set through the runtime exactly as evaluate.py does, then sorts every strict-F1 error:

- a false positive is ``boundary`` (it overlaps a gold mention of its type), ``type`` (it overlaps only gold
  mentions of the other type) or ``spurious`` (it overlaps none); a false negative is ``boundary``, ``type`` or
  ``missed`` the same way;
- the most frequent surface forms of spurious FPs and missed FNs.

And re-scores the same predictions under two common NER post-processing rules, to see whether either is worth
shipping: ``expand`` (grow each span to whole whitespace-delimited words, trimming trailing punctuation and
unbalanced brackets) and ``propagate`` (within each abstract, tag every other whole-word occurrence of a
predicted surface form with its majority type). Neither is applied by the plugin.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluate as ev  # noqa: E402  (this folder's evaluate.py: the corpus reader, the runtime call)

Span = tuple[int, int, str]
TYPES = ("Disease", "Chemical")


def strict_f1(gold: list[ev.Doc], predicted: Callable[[ev.Doc], list[Span]]) -> dict[str, dict[str, float]]:
    out = {}
    for kind in TYPES:
        g = {(d["id"], m[0], m[1]) for d in gold for m in d["mentions"] if m[2] == kind}
        p = {(d["id"], s, e) for d in gold for s, e, t in predicted(d) if t == kind}
        out[kind] = ev.prf(g, p)
    return out


def categories(gold: list[ev.Doc], pred: dict[str, list[Span]]) -> tuple[Counter[str], dict[str, Counter[str]]]:
    counts: Counter[str] = Counter()
    forms: dict[str, Counter[str]] = {}
    for doc in gold:
        text = doc["text"]
        g = {(m[0], m[1], m[2]) for m in doc["mentions"]}
        p = set(pred[doc["id"]])
        for side, mine, other, alone in (("FP", p - g, g, "spurious"), ("FN", g - p, p, "missed")):
            for s, e, kind in mine:
                overlapping = [o for o in other if o[0] < e and s < o[1]]
                why = alone if not overlapping else "boundary" if any(o[2] == kind for o in overlapping) else "type"
                key = f"{kind} {side} {why}"
                counts[key] += 1
                forms.setdefault(key, Counter())[text[s:e].lower()] += 1
    return counts, forms


def expand(doc: ev.Doc, spans: list[Span]) -> list[Span]:
    text, out = doc["text"], []
    for s, e, kind in spans:
        a, b = s, e
        while a > 0 and not text[a - 1].isspace():
            a -= 1
        while b < len(text) and not text[b].isspace():
            b += 1
        changed = True
        while changed and a < b:
            changed, seg = False, text[a:b]
            for opening, closing in ("()", "[]", "{}"):
                if a < s and seg[0] == opening and seg.count(opening) > seg.count(closing):
                    a, changed = a + 1, True
                elif b > e and seg[-1] == closing and seg.count(closing) > seg.count(opening):
                    b, changed = b - 1, True
            if not changed and b > e and text[b - 1] in ".,;:":
                b, changed = b - 1, True
        out.append((a, b, kind))
    merged: list[Span] = []
    for s, e, kind in sorted(out):
        if merged and s < merged[-1][1] and merged[-1][2] == kind:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]), kind)
        else:
            merged.append((s, e, kind))
    return merged


def propagate(doc: ev.Doc, spans: list[Span]) -> list[Span]:
    text = doc["text"]
    votes: dict[str, Counter[str]] = {}
    for s, e, kind in spans:
        votes.setdefault(text[s:e], Counter())[kind] += 1
    out, taken = set(spans), [(s, e) for s, e, _ in spans]
    for form, counter in votes.items():
        if len(form) < 2:
            continue
        kind = counter.most_common(1)[0][0]
        for match in re.finditer(re.escape(form), text):
            s, e = match.span()
            whole_word = (s == 0 or not text[s - 1].isalnum()) and (e == len(text) or not text[e].isalnum())
            if whole_word and not any(a < e and s < b for a, b in taken):
                out.add((s, e, kind))
                taken.append((s, e))
    return sorted(out)


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it (no machine paths)."""
    resolved, repo = path.resolve(), HERE.parents[1]
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else str(path)


def main(argv: list[str] | None = None) -> int:
    import fhirplug

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=HERE / "bundle")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--data", type=Path, default=ev.DATA)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    plugin = fhirplug.load_plugin(args.bundle, allow_unsigned=True, variant=args.variant, provider="cpu")
    test = args.data / "bc5cdr" / "pubtator" / "CDR_TestSet.PubTator.txt"
    gold = ev.read_pubtator(test, {k: k for k in TYPES})
    raw, _ = ev.run_plugin(plugin, gold)
    pred = {doc: [(s, e, t) for s, e, t, _ in spans] for doc, spans in raw.items()}
    counts, forms = categories(gold, pred)
    report: dict[str, Any] = {
        "bundle": _shown(args.bundle),
        "variant": plugin.variant,
        "manifest_sha256": plugin.manifest_sha256,
        "errors": dict(sorted(counts.items())),
        "frequent_forms": {
            key: forms[key].most_common(15)
            for key in ("Disease FP spurious", "Disease FN missed", "Chemical FP spurious", "Chemical FN missed")
            if key in forms
        },
        "strict_f1": {
            "as shipped": strict_f1(gold, lambda d: pred[d["id"]]),
            "expand": strict_f1(gold, lambda d: expand(d, pred[d["id"]])),
            "propagate": strict_f1(gold, lambda d: propagate(d, pred[d["id"]])),
        },
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
