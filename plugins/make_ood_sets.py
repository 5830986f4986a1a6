"""Write the out-of-domain (OOD) text sets that calibrate and check abstention for the text-classification plugins.

Each plugin abstains when a text lies far from its training distribution. Its threshold is calibrated on in-domain
validation data plus out-of-domain texts; these come from the generic English written by the project
(``converters/fhirplug_convert/data/ood_english_*.jsonl``) and from the OTHER shared corpora, sampled here:

- ``plugins/medical-abstracts-mesh/ood/synthea-notes.jsonl``: Synthea R4 encounter notes (MIT; synthetic).
- ``plugins/synthea-conditions/ood/medical-abstracts.jsonl``: Medical Abstracts TC abstracts (CC BY-SA 3.0).
- ``plugins/synthea-conditions/ood/bc5cdr-abstracts.jsonl``: BC5CDR training-set abstracts (public domain).

Every file is JSON Lines, one ``{"text": ..., "source": ...}`` object a line, UTF-8. Texts are deduplicated, sampled
with a fixed seed from inputs read in sorted order (the same data and seed give the same bytes), and cut to at most
``MAX_CHARS`` characters at a sentence boundary. Licenses and provenance: ``plugins/*/ood/README.md``.

Run from the repository root:  python plugins/make_ood_sets.py [--data ../shared/data] [--seed N]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import json
import random
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data"
SEED = 20260512
PER_SET = 300
#: Longer texts are cut at the last sentence end before this many characters (keeps each file well under 1 MB).
MAX_CHARS = 2000
#: A sentence ends at ., ! or ? followed by whitespace, or at a line break (Synthea notes are line-structured).
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")

Record = dict[str, str]


class SampledSet(NamedTuple):
    """A sampled set: its records and how many of their texts were cut to ``MAX_CHARS``."""

    records: list[Record]
    truncated: int


class OodSetError(Exception):
    """An input corpus is missing or malformed; the message names the file and what was expected."""


def truncate_at_sentence(text: str, limit: int = MAX_CHARS) -> str:
    """Return ``text`` if it fits in ``limit`` characters, else its longest prefix that ends a sentence.

    Falls back to the last whitespace before ``limit`` when no sentence ends in the first ``limit`` characters.
    """
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() <= limit]
    cut = ends[-1] if ends else head.rstrip().rfind(" ")
    if cut <= 0:
        cut = limit
    return text[:cut].rstrip()


def _sample(records: list[Record], n: int, seed: int, what: str) -> SampledSet:
    """Cut each text to ``MAX_CHARS``, deduplicate (first occurrence wins), draw ``n`` with ``random.Random(seed)``."""
    seen: set[str] = set()
    unique: list[tuple[Record, bool]] = []
    for record in records:
        text = truncate_at_sentence(record["text"])
        if text and text not in seen:
            seen.add(text)
            unique.append(({"text": text, "source": record["source"]}, len(text) < len(record["text"].strip())))
    if len(unique) < n:
        raise OodSetError(f"{what}: {len(unique)} distinct non-empty texts, {n} needed")
    drawn = random.Random(seed).sample(unique, n)
    return SampledSet([record for record, _ in drawn], sum(cut for _, cut in drawn))


def _note_attachments(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if resource.get("resourceType") == "DocumentReference":
        for content in resource.get("content") or []:
            yield content.get("attachment") or {}
    elif resource.get("resourceType") == "DiagnosticReport":
        yield from resource.get("presentedForm") or []


def read_synthea_notes(bundle_dir: Path) -> list[Record]:
    """All plain-text notes in the FHIR Bundles ``bundle_dir/*.json``, decoded from base64, in file order.

    Notes come from ``DocumentReference.content.attachment`` and ``DiagnosticReport.presentedForm``; Synthea writes
    each note in both, so the caller's deduplication keeps one copy.
    """
    files = sorted(bundle_dir.glob("*.json"))
    if not files:
        raise OodSetError(f"{bundle_dir}: no *.json FHIR bundles found (expected the synthea-r4 bundles folder)")
    records = []
    for path in files:
        try:
            bundle = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OodSetError(f"{path}: not a readable JSON bundle ({exc})") from exc
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise OodSetError(f"{path}: expected a FHIR Bundle, got {type(bundle).__name__}")
        for entry in bundle.get("entry") or []:
            for attachment in _note_attachments(entry.get("resource") or {}):
                if not str(attachment.get("contentType", "")).startswith("text/plain") or "data" not in attachment:
                    continue
                try:
                    text = base64.b64decode(attachment["data"], validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError) as exc:
                    raise OodSetError(f"{path}: a note attachment is not base64 UTF-8 text ({exc})") from exc
                records.append({"text": text, "source": f"synthea-r4 {path.name}"})
    return records


def read_medical_abstracts(csv_path: Path) -> list[Record]:
    """The ``medical_abstract`` column of the Medical Abstracts TC CSV; source names the 1-based data row."""
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "medical_abstract" not in (reader.fieldnames or []):
                raise OodSetError(f"{csv_path}: no 'medical_abstract' column (found {reader.fieldnames})")
            return [
                {"text": row["medical_abstract"], "source": f"medical-abstracts {csv_path.name} row {i}"}
                for i, row in enumerate(reader, start=1)
            ]
    except OSError as exc:
        raise OodSetError(f"{csv_path}: cannot read ({exc.strerror})") from exc


def read_pubtator(path: Path) -> list[Record]:
    """Title + " " + abstract of every document of a PubTator file; source names the PMID."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OodSetError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    titles: dict[str, str] = {}
    abstracts: dict[str, str] = {}
    for line in lines:
        pmid, sep, rest = line.partition("|")
        if sep and rest[:2] in ("t|", "a|") and pmid.isdigit():
            (titles if rest[0] == "t" else abstracts)[pmid] = rest[2:]
    if not titles:
        raise OodSetError(f"{path}: no '<PMID>|t|<title>' lines (expected a PubTator file)")
    return [
        {
            "text": f"{titles[pmid]} {abstracts.get(pmid, '')}",
            "source": f"bc5cdr {path.name} PMID {pmid}",
        }
        for pmid in titles
    ]


def sample_synthea_notes(bundle_dir: Path, n: int = PER_SET, seed: int = SEED) -> SampledSet:
    """``n`` distinct Synthea notes from ``bundle_dir``, seeded."""
    return _sample(read_synthea_notes(bundle_dir), n, seed, str(bundle_dir))


def sample_medical_abstracts(csv_path: Path, n: int = PER_SET, seed: int = SEED) -> SampledSet:
    """``n`` distinct Medical Abstracts TC abstracts from ``csv_path``, seeded."""
    return _sample(read_medical_abstracts(csv_path), n, seed, str(csv_path))


def sample_pubtator(path: Path, n: int = PER_SET, seed: int = SEED) -> SampledSet:
    """``n`` distinct PubTator documents (title + abstract) from ``path``, seeded."""
    return _sample(read_pubtator(path), n, seed, str(path))


def write_jsonl(path: Path, records: Iterable[Record]) -> int:
    """Write ``records`` as UTF-8 JSON Lines (non-ASCII kept as is); return the number of bytes written."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return len(body.encode("utf-8"))


def build(data: Path, plugins: Path, seed: int = SEED) -> dict[Path, SampledSet]:
    """Sample the three sets from the shared corpora in ``data``; return them by output path (not yet written)."""
    return {
        plugins / "medical-abstracts-mesh" / "ood" / "synthea-notes.jsonl": sample_synthea_notes(
            data / "synthea-r4" / "bundles", seed=seed
        ),
        plugins / "synthea-conditions" / "ood" / "medical-abstracts.jsonl": sample_medical_abstracts(
            data / "medical-abstracts" / "medical_tc_test.csv", seed=seed
        ),
        # Training split only: the plugins' test data must stay unseen by anything that sets a threshold.
        plugins / "synthea-conditions" / "ood" / "bc5cdr-abstracts.jsonl": sample_pubtator(
            data / "bc5cdr" / "pubtator" / "CDR_TrainingSet.PubTator.txt", seed=seed
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="sampling seed (default: %(default)s)")
    parser.add_argument(
        "--plugins", type=Path, default=HERE, help="write into <plugins>/<name>/ood/ (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        sets = build(args.data, args.plugins, args.seed)
    except OodSetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path, (records, truncated) in sets.items():
        size = write_jsonl(path, records)
        longest = max(len(r["text"]) for r in records)
        print(
            f"wrote {len(records)} texts ({truncated} cut to <= {MAX_CHARS} chars), {size:,} bytes,"
            f" longest {longest} chars: {path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
