"""The coding dictionary of a token-classification plugin: ``concepts.json``, ``concept_vectors.npz`` and the
assertion lexicon, built at convert time for :class:`fhirplug._coding.ConceptIndex`.

Names come from three sources:

- every mention of the training and development data: the examples the pipeline passes (its train and validation
  splits) and, when the recipe gives train / validation files, every document of those files (so the part of the
  validation file that stays for validation, and examples left out by ``max_train_examples``, code too). The test
  file is never read for names;
- the recipe's ``entities.dictionaries`` name lists (``ncbi-disease`` or ``pubtator`` files). A document whose
  PMID or text is in the test split is dropped (counted), so a test abstract can never teach the dictionary its
  own answers. MeSH IDs (``D``/``C`` + digits) code; a mention with only OMIM IDs is left out (counted), since the
  plugin codes MeSH. A name that is a short form defined in its own document ("hereditary hemochromatosis (HH)"
  … "HH") is left out too (counted): its meaning is local to that document, and the runtime resolves such short
  forms in the note it reads (:mod:`fhirplug._abbrev`). A name the training data already has (normalized, same
  type) is left out as well: the in-domain annotation conventions decide its code and the concepts' order;
- the recipe's ``entities.concepts_file`` (code, display, type, names).

Single-concept mentions add their string; a composite mention ("breast and ovarian cancer", two IDs) adds its
component strings when they pair one to one with the IDs, otherwise nothing.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fhirplug._abbrev import abbreviations
from fhirplug._assertion import DEFAULT_LEXICON, Lexicon
from fhirplug._coding import ConceptIndex, build_index, merge_names, normalize
from fhirplug.errors import ConvertError
from fhirplug_convert.datasets import Example, Mention, load_splits, read_ncbi_disease, read_pubtator
from fhirplug_convert.datasets import _read as _read_data
from fhirplug_convert.recipe import DictionarySpec, Recipe

__all__ = ["build_terminology", "dictionary_examples", "held_out_examples", "read_dictionary"]

#: A MeSH descriptor (D…) or supplementary concept (C…) ID, the form the BC5CDR and NCBI corpora use.
MESH_ID = re.compile(r"^[CD]\d+$")
MESH_SYSTEM = "https://www.nlm.nih.gov/mesh"

Name = tuple[str, str, str, str]  # (type, code, name, display-or-"")


def dictionary_examples(recipe: Recipe, examples: Sequence[Example]) -> list[Example]:
    """``examples`` plus every document of the recipe's train and validation files not among them (by text)."""
    out = list(examples)
    texts = {e.text for e in out}
    data = recipe.data
    if data.path is None and data.train is not None and data.validation is not None:
        for path in (data.train, data.validation):
            for example in _read_data(recipe, path):
                if example.text not in texts:
                    texts.add(example.text)
                    out.append(example)
    return out


def held_out_examples(recipe: Recipe) -> list[Example]:
    """The recipe's test split: its test file, or the test part of its one data file as the pipeline splits it."""
    if recipe.data.test is not None:
        return _read_data(recipe, recipe.data.test)
    return list(load_splits(recipe).test)


def read_dictionary(entry: DictionarySpec, types: Sequence[str]) -> list[Example]:
    """The documents of one ``entities.dictionaries`` entry (mentions typed as the recipe's labels)."""
    if not entry.path.is_file():
        raise ConvertError(f"entities.dictionaries: {entry.path} is not a file (format {entry.format})")
    if entry.format == "ncbi-disease":
        assert entry.type is not None  # the recipe model guarantees it
        return read_ncbi_disease(entry.path, entity_type=entry.type)
    return read_pubtator(entry.path, known=[entry.type] if entry.type else list(types))


def _scratch() -> dict[str, int]:
    return {"composite_mentions": 0, "mentions_without_concept": 0}


def _mention_names(m: Mention, counts: dict[str, int]) -> list[Name]:
    if len(m.codes) == 1:
        return [(m.type, m.codes[0], m.text, "")]
    if len(m.codes) > 1:
        counts["composite_mentions"] += 1
        if len(m.components) == len(m.codes):
            return [(m.type, c, n, "") for c, n in zip(m.codes, m.components, strict=True)]
        return []
    counts["mentions_without_concept"] += 1
    return []


def _dictionary_names(
    entry: DictionarySpec, docs: Iterable[Example], held: Sequence[Example], pmids: bool, known: set[tuple[str, str]]
) -> tuple[list[Name], dict[str, Any]]:
    held_pmids = {e.group for e in held} if pmids else set()
    held_texts = {e.text for e in held}
    names: list[Name] = []
    facts: dict[str, Any] = {
        "format": entry.format,
        "file": entry.path.name,
        "documents": 0,
        "test_documents_dropped": 0,
        "names": 0,
        "omim_only_skipped": 0,
        "composite_mentions": 0,
        "mentions_without_concept": 0,
        "local_short_forms_skipped": 0,
        "names_known_from_training": 0,
    }
    for doc in docs:
        if doc.group in held_pmids or doc.text in held_texts:
            facts["test_documents_dropped"] += 1
            continue
        facts["documents"] += 1
        local = set(abbreviations(doc.text))
        for m in doc.mentions:
            if entry.format == "ncbi-disease":
                mesh = [c for c in m.codes if MESH_ID.match(c)]
                if m.codes and not mesh:
                    facts["omim_only_skipped"] += 1
                    continue
                if len(mesh) != len(m.codes):  # MeSH next to OMIM IDs: a composite the MeSH part alone misstates
                    facts["composite_mentions"] += 1
                    continue
            if m.text.strip() in local:
                facts["local_short_forms_skipped"] += 1
                continue
            found = [n for n in _mention_names(m, facts) if (n[0], normalize(n[2])) not in known]
            facts["names_known_from_training"] += len(_mention_names(m, _scratch())) - len(found)
            names += found
            facts["names"] += len(found)
    return names, facts


def build_terminology(
    recipe: Recipe, examples: Sequence[Example], work: Path, *, held_out: Sequence[Example] | None = None
) -> tuple[ConceptIndex, dict[str, Path], dict[str, Any]]:
    """The dictionary (see the module docstring), its n-gram vectors and the lexicon, written to ``work``.

    Args:
        examples: the training and validation examples.
        held_out: the test split; read from the recipe when not given. No dictionary document in it is used.

    Returns:
        The index, the bundle files it needs (name → path in ``work``) and facts for the model card.

    Raises:
        ConvertError: a dictionary file that cannot be read, an ncbi-disease list for a non-MeSH plugin, no name.
    """
    assert recipe.entities is not None
    spec = recipe.entities
    counts = {"composite_mentions": 0, "mentions_without_concept": 0}
    sources = dictionary_examples(recipe, examples)
    seen: list[Name] = [n for example in sources for m in example.mentions for n in _mention_names(m, counts)]
    training_names = len(seen)
    # The training data's own annotation conventions win: a list's name the training data already codes (under
    # whatever concept) is left out, so another corpus never re-codes, or re-orders, an in-domain name.
    known = {(kind, normalize(name)) for kind, _, name, _ in seen}
    dictionaries = []
    if spec.dictionaries:
        held = held_out if held_out is not None else held_out_examples(recipe)
        for entry in spec.dictionaries:
            if entry.format == "ncbi-disease" and spec.system != MESH_SYSTEM:
                raise ConvertError(
                    f"entities.dictionaries: {entry.path.name} (ncbi-disease) gives MeSH IDs, but entities.system "
                    f"is {spec.system!r}; use {MESH_SYSTEM!r} or drop the dictionary"
                )
            names, facts = _dictionary_names(
                entry, read_dictionary(entry, recipe.label_names), held, recipe.data.format == "pubtator", known
            )
            seen += names
            dictionaries.append(facts)
    extra = 0
    if spec.concepts_file is not None:
        for row in _read_concepts(spec.concepts_file):
            names = [row["display"], *row.get("names", [])]
            seen += [(row["type"], row["code"], n, row["display"]) for n in names]
            extra += 1
    if not seen:
        raise ConvertError("no coded mention in the training data and no concepts_file: nothing to code against")
    concepts, arrays = build_index(merge_names(seen), spec.system)
    files = {"concepts.json": work / "concepts.json", "concept_vectors.npz": work / "concept_vectors.npz"}
    files["concepts.json"].write_text(json.dumps(concepts, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    np.savez_compressed(files["concept_vectors.npz"], **arrays)
    lexicon = spec.assertion_lexicon or DEFAULT_LEXICON
    try:
        Lexicon.load(lexicon)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"entities.assertion_lexicon {lexicon}: not a usable lexicon ({exc})") from exc
    files["assertion.json"] = work / "assertion.json"
    shutil.copyfile(lexicon, files["assertion.json"])
    index = ConceptIndex.load(files["concepts.json"], files["concept_vectors.npz"], spec.coding_threshold)
    facts: dict[str, Any] = {
        "concepts": len(concepts["concepts"]),
        "names": len(arrays["row_concept"]),
        "composite_mentions": counts["composite_mentions"],
        "mentions_without_concept": counts["mentions_without_concept"],
        "concepts_file_entries": extra,
        "coding_threshold": spec.coding_threshold,
        "training_documents": len(sources),
        "training_names": training_names,
    }
    if dictionaries:
        facts["dictionaries"] = dictionaries
    return index, files, facts


def _read_concepts(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read the concepts file ({exc.strerror})") from exc
    try:
        rows = json.loads(text) if path.suffix == ".json" else list(csv.DictReader(text.splitlines()))
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(rows, list):
        raise ConvertError(f"{path}: expected a list of {{code, display, type, names}} entries")
    out = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not all(row.get(k) for k in ("code", "display", "type")):
            raise ConvertError(f"{path}: entry {number} needs code, display and type")
        names = row.get("names") or []
        if isinstance(names, str):
            names = [n for n in names.split("|") if n.strip()]
        out.append({"code": str(row["code"]), "display": str(row["display"]), "type": str(row["type"]), "names": names})
    return out
