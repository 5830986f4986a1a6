"""Training data: CSV, JSONL or FHIR in; checked examples and a train/validation/test split out.

Every problem is found here, before any training, and named by place: the file, the row (CSV rows count the
header as row 1, JSONL lines count from 1), the label and the labels that are known.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhirplug.errors import ConvertError
from fhirplug_convert.recipe import Recipe

__all__ = [
    "Example",
    "Mention",
    "Splits",
    "load_splits",
    "merge_duplicates",
    "read_conll",
    "read_csv",
    "read_jsonl",
    "read_ncbi_disease",
    "read_pubtator",
    "split_examples",
]


@dataclass(frozen=True)
class Mention:
    """One annotated entity mention (token-classification data): ``[start, end)`` in the example's text.

    Attributes:
        codes: the concept ID(s); a composite mention ("breast and ovarian cancer") has several, ``-1`` (no concept
            in the terminology) none.
        components: a composite mention's individual mention strings, when the data gives them.
    """

    start: int
    end: int
    type: str
    text: str
    codes: tuple[str, ...] = ()
    components: tuple[str, ...] = ()


@dataclass(frozen=True)
class Example:
    """One training text and its labels.

    Attributes:
        text: what the model reads (for FHIR: the runtime's extracted text).
        labels: label names (exactly one for multi-class; any number, even none, for multi-label).
        group: splits never separate a group: the patient for FHIR data, the row otherwise.
        where: the place, for messages (``notes.csv row 7``, ``DocumentReference/12``).
    """

    text: str
    labels: tuple[str, ...]
    group: str
    where: str
    #: token-classification: the annotated mentions (labels is then empty).
    mentions: tuple[Mention, ...] = ()


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    #: How the data was read and split, for the manifest and the model card.
    description: str
    #: text-classification: the part of the validation data kept apart for calibration (see
    #: ``pipeline.set_calibration_split``); empty until then.
    calibration: list[Example] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}
        return {**counts, "calibration": len(self.calibration)} if self.calibration else counts


def _open(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvertError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: cannot read the data file ({exc})") from exc


def _labels_of(
    value: Any, where: str, known: Sequence[str], multi_label: bool, separator: str | None
) -> tuple[str, ...]:
    if value is None:
        values: list[str] = []
    elif isinstance(value, list):
        values = [str(v).strip() for v in value]
    elif isinstance(value, str):
        values = [v.strip() for v in value.split(separator)] if separator else [value.strip()]
    else:
        raise ConvertError(f"{where}: the label must be a string or a list of strings, got {value!r}")
    values = [v for v in values if v]
    for label in values:
        if label not in known:
            raise ConvertError(f"{where}: unknown label {label!r}; known labels: {', '.join(known)}")
    if not multi_label and len(values) != 1:
        found = "no label" if not values else f"{len(values)} labels {values}"
        raise ConvertError(
            f"{where}: {found}; a multi-class recipe needs exactly one label per row "
            "(set output.multi_label = true for several)"
        )
    return tuple(dict.fromkeys(values))


def _text_of(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConvertError(f"{where}: empty text; every example needs a note to learn from")
    return value


def read_csv(
    path: Path, *, text: str, label: str, known: Sequence[str], multi_label: bool, separator: str | None
) -> list[Example]:
    """Examples from a CSV file with a header row.

    Raises:
        ConvertError: missing file or column, empty text, unknown label, label count wrong for the task.
    """
    reader = csv.DictReader(_open(path).splitlines())
    columns = reader.fieldnames or []
    for column in (text, label):
        if column not in columns:
            raise ConvertError(f"{path}: no column {column!r}; the header has {columns}")
    examples = []
    for number, row in enumerate(reader, start=2):
        where = f"{path.name} row {number}"
        examples.append(
            Example(
                _text_of(row[text], where),
                _labels_of(row[label], where, known, multi_label, separator),
                group=where,
                where=where,
            )
        )
    if not examples:
        raise ConvertError(f"{path}: no rows under the header")
    return examples


def read_jsonl(
    path: Path, *, text: str, label: str, known: Sequence[str], multi_label: bool, separator: str | None
) -> list[Example]:
    """Examples from JSON Lines: one object a line, the label a string or a list of strings.

    Raises:
        ConvertError: missing file, bad JSON, missing key, empty text, unknown label.
    """
    examples = []
    for number, line in enumerate(_open(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConvertError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ConvertError(f"{where}: expected a JSON object")
        for key in (text, label):
            if key not in row:
                raise ConvertError(f"{where}: no key {key!r}; the object has {sorted(row)}")
        examples.append(
            Example(
                _text_of(row[text], where),
                _labels_of(row[label], where, known, multi_label, separator),
                group=where,
                where=where,
            )
        )
    if not examples:
        raise ConvertError(f"{path}: no examples")
    return examples


def read_pubtator(path: Path, *, known: Sequence[str]) -> list[Example]:
    """Documents from a PubTator file: ``PMID|t|title``, ``PMID|a|abstract``, then one tab-separated mention a line
    (``PMID start end text type IDs [components]``); relation lines (``PMID CID ...``) are skipped.

    The text is ``title + " " + abstract`` (PubTator's offsets count that way). IDs are ``|``-joined for composite
    mentions (their components, when given, in a 7th column); ``-1`` means no concept: the mention is kept as an
    entity, with no code. Mentions of types not in ``known`` are left out (a Disease-only recipe may read BC5CDR).

    Raises:
        ConvertError: a mention whose offsets do not select its text, a malformed line, no documents.
    """
    examples: list[Example] = []
    for block in _open(path).split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        title = abstract = None
        pmid = ""
        mentions: list[Mention] = []
        for line in lines:
            if "|t|" in line[:40] and title is None:
                pmid, _, title = line.partition("|t|")
                continue
            if "|a|" in line[:40] and abstract is None:
                abstract = line.partition("|a|")[2]
                continue
            cells = line.split("\t")
            if len(cells) >= 4 and cells[1] in ("CID",):
                continue
            if len(cells) < 6:
                raise ConvertError(f"{path.name} document {pmid or '?'}: cannot read line {line[:80]!r}")
            text = f"{title or ''} {abstract or ''}" if abstract is not None else title or ""
            try:
                start, end = int(cells[1]), int(cells[2])
            except ValueError:
                raise ConvertError(f"{path.name} document {pmid}: offsets {cells[1:3]} are not integers") from None
            if text[start:end] != cells[3]:
                raise ConvertError(
                    f"{path.name} document {pmid}: offsets {start}-{end} select {text[start:end]!r}, the line says "
                    f"{cells[3]!r}"
                )
            if cells[4] not in known:
                continue
            codes = tuple(c for c in cells[5].split("|") if c and c != "-1")
            components = tuple(cells[6].split("|")) if len(cells) > 6 else ()
            mentions.append(Mention(start, end, cells[4], cells[3], codes, components))
        if title is None:
            raise ConvertError(f"{path.name}: a document block without a |t| title line ({lines[0][:60]!r})")
        text = f"{title} {abstract}" if abstract is not None else title
        where = f"{path.name} document {pmid}"
        examples.append(Example(text, (), group=pmid, where=where, mentions=tuple(mentions)))
    if not examples:
        raise ConvertError(f"{path}: no PubTator documents")
    return examples


#: The NCBI Disease corpus' mention classes; all four are one disease mention type.
NCBI_DISEASE_CLASSES = ("SpecificDisease", "DiseaseClass", "Modifier", "CompositeMention")


def read_ncbi_disease(path: Path, *, entity_type: str = "Disease") -> list[Example]:
    """Documents of an NCBI Disease corpus file (Doğan et al. 2014: ``PMID|t|title``, ``PMID|a|abstract``, then
    ``PMID start end text class IDs`` lines), every mention as entity type ``entity_type``.

    IDs are normalised: whitespace and a ``MESH:`` prefix stripped, ``|`` (composite or alternative) and ``+``
    (a combination) both split into the mention's codes; ``OMIM:<number>`` IDs are kept as they are. A PMID that
    occurs twice (8528200 in the training file) is read once, the first time. The corpus pads a few mention
    strings with spaces the text does not have: offsets are checked against the stripped string.

    Raises:
        ConvertError: a mention whose offsets do not select its text, a malformed line, no documents.
    """
    examples: list[Example] = []
    seen: set[str] = set()
    for block in _open(path).split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        pmid, _, title = lines[0].partition("|t|")
        if not title and "|t|" not in lines[0]:
            raise ConvertError(f"{path.name}: a document block without a |t| title line ({lines[0][:60]!r})")
        rest = lines[1:]
        abstract = rest.pop(0).partition("|a|")[2] if rest and "|a|" in rest[0][:40] else None
        text = f"{title} {abstract}" if abstract is not None else title
        mentions: list[Mention] = []
        for line in rest:
            cells = line.split("\t")
            if len(cells) < 6 or cells[4] not in NCBI_DISEASE_CLASSES:
                raise ConvertError(f"{path.name} document {pmid}: cannot read line {line[:80]!r}")
            try:
                start, end = int(cells[1]), int(cells[2])
            except ValueError:
                raise ConvertError(f"{path.name} document {pmid}: offsets {cells[1:3]} are not integers") from None
            if text[start:end].strip() != cells[3].strip():
                raise ConvertError(
                    f"{path.name} document {pmid}: offsets {start}-{end} select {text[start:end]!r}, the line says "
                    f"{cells[3]!r}"
                )
            codes = [c.strip().removeprefix("MESH:") for part in cells[5].split("|") for c in part.split("+")]
            unique = tuple(dict.fromkeys(c for c in codes if c and c != "-1"))
            mentions.append(Mention(start, end, entity_type, text[start:end], unique))
        if pmid in seen:
            continue
        seen.add(pmid)
        examples.append(Example(text, (), group=pmid, where=f"{path.name} document {pmid}", mentions=tuple(mentions)))
    if not examples:
        raise ConvertError(f"{path}: no NCBI Disease documents")
    return examples


def read_conll(path: Path, *, known: Sequence[str]) -> list[Example]:
    """Sentences from CoNLL-style BIO data: ``token<TAB or space>…<TAB or space>tag`` a line (the tag last), a blank
    line between sentences, ``-DOCSTART-`` lines ignored. The text is the tokens joined by single spaces.

    Raises:
        ConvertError: a tag that is not O, B-type or I-type of a known type.
    """
    examples: list[Example] = []
    tokens: list[str] = []
    tags: list[str] = []
    first_line = 1

    def flush(number: int) -> None:
        nonlocal tokens, tags, first_line
        if tokens:
            text, mentions, position = "", [], 0
            open_: list[Any] | None = None
            for token, tag in zip(tokens, tags, strict=True):
                start = position + (1 if text else 0)
                text = f"{text} {token}" if text else token
                position = len(text)
                kind = tag[2:] if tag[:2] in ("B-", "I-") else None
                if kind is not None and (tag.startswith("B-") or open_ is None or open_[2] != kind):
                    if open_ is not None:
                        mentions.append(open_)
                    open_ = [start, position, kind]
                elif kind is not None and open_ is not None:
                    open_[1] = position
                else:
                    if open_ is not None:
                        mentions.append(open_)
                    open_ = None
            if open_ is not None:
                mentions.append(open_)
            where = f"{path.name} line {first_line}"
            spans = tuple(Mention(a, b, k, text[a:b]) for a, b, k in mentions)
            examples.append(Example(text, (), group=where, where=where, mentions=spans))
        tokens, tags, first_line = [], [], number + 1

    for number, line in enumerate(_open(path).splitlines(), start=1):
        cells = line.split()
        if not cells or cells[0] == "-DOCSTART-":
            flush(number)
            continue
        tag = cells[-1] if len(cells) > 1 else "O"
        if tag != "O" and not (tag[:2] in ("B-", "I-") and tag[2:] in known):
            raise ConvertError(
                f"{path.name} line {number}: tag {tag!r}; expected O, B-type or I-type with a type in {list(known)}"
            )
        tokens.append(cells[0])
        tags.append(tag)
    flush(number + 1 if examples or tokens else 1)
    if not examples:
        raise ConvertError(f"{path}: no sentences")
    return examples


def _read(recipe: Recipe, path: Path) -> list[Example]:
    data = recipe.data
    if data.format == "pubtator":
        return read_pubtator(path, known=recipe.label_names)
    if data.format == "conll":
        return read_conll(path, known=recipe.label_names)
    if data.format == "fhir":
        from fhirplug_convert._fhir import read_fhir_examples

        return read_fhir_examples(path, recipe)
    reader = read_csv if data.format == "csv" else read_jsonl
    return reader(
        path,
        text=data.text,
        label=data.label,
        known=recipe.label_names,
        multi_label=recipe.output.multi_label,
        separator=data.label_separator,
    )


def merge_duplicates(examples: Sequence[Example], *, multi_label: bool) -> tuple[list[Example], int]:
    """One example per distinct text, so a repeated note can never sit in train and test at once.

    The copies' labels are merged into one example. Multi-label: that is the document's label set (a corpus
    that repeats a document once per label is multi-label for it). Multi-class (the Medical Abstracts corpus files
    118 abstracts under two categories): the example carries every label it was filed under; it trains with soft
    targets (an equal share each) and the top class counts as right when it is any of them
    (:func:`fhirplug_convert.evaluate.classification_metrics`).

    Returns:
        The examples (first occurrence order) and how many rows were merged away.
    """
    del multi_label  # the same merge for both; kept so callers say which they read
    first: dict[str, int] = {}
    merged: list[Example] = []
    for example in examples:
        index = first.get(example.text)
        if index is None:
            first[example.text] = len(merged)
            merged.append(example)
            continue
        kept = merged[index]
        labels = tuple(dict.fromkeys(kept.labels + example.labels))
        merged[index] = Example(kept.text, labels, kept.group, kept.where)
    return merged, len(examples) - len(merged)


def _stratum(example: Example, frequency: Counter[str]) -> str:
    # Multi-label rows go with their rarest label, so rare codes reach every split.
    if not example.labels:
        return "(no label)"
    return min(example.labels, key=lambda label: (frequency[label], label))


def split_examples(
    examples: Sequence[Example],
    *,
    validation: float,
    test: float,
    seed: int,
    stratify: bool = True,
    labels: Sequence[str] = (),
) -> tuple[list[Example], list[Example], list[Example]]:
    """Split into train / validation / test, seeded; a group (patient) is never split.

    With ``stratify``, each label (multi-label: each row's rarest label) is split in the same proportions,
    which needs at least one group per split for every label. Without it (grouped FHIR data, where a
    patient carries several labels), whole groups are shuffled and dealt out.

    Raises:
        ConvertError: a label with too few examples to give each split one; fewer groups than splits.
    """
    groups: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        groups[example.group].append(example)
    frequency = Counter(label for e in examples for label in e.labels)
    strata: dict[str, list[str]] = defaultdict(list)
    if stratify:
        for label in labels:
            if frequency[label] == 0:
                raise ConvertError(
                    f"label {label!r} has 0 examples in the data; remove it from the labels or add examples"
                )
        for key, members in groups.items():
            strata[_stratum(members[0], frequency)].append(key)
    else:
        strata["all"] = list(groups)
    needed = 1 + (validation > 0) + (test > 0)
    rng = random.Random(seed)
    train: list[str] = []
    valid: list[str] = []
    held: list[str] = []
    for name in sorted(strata):
        keys = sorted(strata[name])
        if len(keys) < needed:
            what = f"label {name!r} has {len(keys)} example(s)" if stratify else f"only {len(keys)} group(s)"
            raise ConvertError(
                f"{what}; a stratified train/validation/test split needs at least {needed}: add examples, "
                "or give train/validation/test files"
            )
        rng.shuffle(keys)
        n_test = max(1, round(len(keys) * test)) if test > 0 else 0
        n_valid = max(1, round(len(keys) * validation)) if validation > 0 else 0
        n_test = min(n_test, len(keys) - n_valid - 1)
        held += keys[:n_test]
        valid += keys[n_test : n_test + n_valid]
        train += keys[n_test + n_valid :]

    def gather(keys: Iterable[str]) -> list[Example]:
        return [e for key in keys for e in groups[key]]

    return gather(train), gather(valid), gather(held)


def load_splits(recipe: Recipe) -> Splits:
    """Read the recipe's data and split it (or read its given train/validation/test files).

    Raises:
        ConvertError: any data problem, named by file and row, before anything trains.
    """
    data = recipe.data
    grouped = data.format in ("fhir", "pubtator", "conll")
    multi = recipe.output.multi_label
    spans = recipe.task == "token-classification"
    if spans and data.path is not None:
        examples = _read(recipe, data.path)
        train, valid, test = split_examples(
            examples, validation=data.split.validation, test=data.split.test, seed=data.split.seed, stratify=False
        )
        how = (
            f"{data.path.name}: {len(examples)} texts, split by document (validation {data.split.validation}, "
            f"test {data.split.test}, seed {data.split.seed})"
        )
    elif spans:
        assert data.train and data.validation and data.test
        train, valid, test = (_read(recipe, p) for p in (data.train, data.validation, data.test))
        how = f"given files {data.train.name}, {data.validation.name}, {data.test.name}"
    elif data.path is not None:
        examples, merged = merge_duplicates(_read(recipe, data.path), multi_label=multi)
        train, valid, test = split_examples(
            examples,
            validation=data.split.validation,
            test=data.split.test,
            seed=data.split.seed,
            stratify=not grouped,
            labels=recipe.label_names if not recipe.output.multi_label else (),
        )
        how = (
            f"{data.path.name}: {len(examples)} examples, split "
            f"{'by patient' if grouped else 'stratified by label'} "
            f"(validation {data.split.validation}, test {data.split.test}, seed {data.split.seed})"
        )
        if merged:
            how += f"; {merged} duplicate row(s) merged into the example with the same text"
    else:
        assert data.train and data.validation and data.test  # the recipe model guarantees all three
        train, valid, test = (
            merge_duplicates(_read(recipe, p), multi_label=multi)[0] for p in (data.train, data.validation, data.test)
        )
        seen = {e.text for e in train}
        overlap = sum(e.text in seen for e in [*valid, *test])
        how = f"given files {data.train.name}, {data.validation.name}, {data.test.name}"
        if overlap:
            how += f"; warning: {overlap} validation/test text(s) also occur in train"
    if data.validation_into_train and len(valid) > 1:
        order = list(range(len(valid)))
        random.Random(data.split.seed).shuffle(order)
        moved = min(round(len(valid) * data.validation_into_train), len(valid) - 1)
        chosen = set(order[:moved])
        train = train + [e for i, e in enumerate(valid) if i in chosen]
        valid = [e for i, e in enumerate(valid) if i not in chosen]
        how += f"; {moved} validation text(s) moved into training (validation_into_train {data.validation_into_train})"
    if recipe.training.max_train_examples is not None and len(train) > recipe.training.max_train_examples:
        keep = random.Random(recipe.training.seed).sample(range(len(train)), recipe.training.max_train_examples)
        train = [train[i] for i in sorted(keep)]
        how += f"; training capped at {len(train)} examples"
    for name, part in (("train", train), ("validation", valid), ("test", test)):
        if not part:
            raise ConvertError(f"{data.path or getattr(data, name)}: the {name} split is empty; add examples")
    return Splits(train, valid, test, how)
