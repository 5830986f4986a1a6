"""Entity coding: a mention's text → a concept of the plugin's terminology, with a score, or no code at all.

Three steps, first hit wins:

1. **exact**: the casefolded mention is a name in the dictionary (score 1.0);
2. **normalized**: the mention after :func:`normalize` (NFKC, casefold, punctuation → space, collapsed whitespace,
   plurals singularised) is a normalized name in the dictionary (score 1.0);
3. **nearest**: cosine similarity of character 3-gram TF-IDF vectors (built in numpy at convert time, over every
   name and synonym, shipped in the bundle) to the closest name; its concept is returned when the similarity is
   at or above the plugin's threshold, else the mention stays **uncoded** (``code is None``), never mis-coded.

Between 2 and 3, with the note's abbreviations (:func:`fhirplug._abbrev.abbreviations`): a mention that is a short
form defined in its own note ("Parkinson's disease (PD)" … "PD") and that no dictionary name matches takes the
concept of its long form, coded by the same steps (method **abbreviation**, the long form's score). A short form
is too short for n-grams to mean much, and its meaning is local to the note, so this comes before step 3.

Why character n-grams and not the bundle's encoder: the NER model's hidden states are trained to tag tokens, not
to place synonyms near each other, and a second ONNX output would cost every window a pooled copy. Character
n-grams are what unseen surface forms of a known concept (spelling, word order, inflection, hyphens) share; they
cannot bridge true synonyms with no letters in common ("heart attack" / "myocardial infarction"), which is why the
threshold abstains instead of guessing. Where two concepts share a name, the one seen more often wins.
"""

from __future__ import annotations

import io
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from fhirplug._safe_read import load_json
from fhirplug.errors import TaskError

__all__ = ["Coding", "ConceptIndex", "build_index", "normalize"]

NGRAM = 3
_PUNCT = re.compile(r"[\W_]+", re.UNICODE)
#: Words whose final "s" is not a plural (singularising them would merge unrelated names).
_KEEP_S = ("ss", "us", "is", "ys", "as", "os")


def _singular(word: str) -> str:
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(_KEEP_S):
        return word[:-1]
    return word


def normalize(text: str) -> str:
    """Lowercase, punctuation-free, whitespace-collapsed, plural-normalized form of a name."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_singular(w) for w in _PUNCT.sub(" ", folded).split())


def _exact(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def ngrams(text: str, n: int = NGRAM) -> list[str]:
    """Character n-grams of the normalized text, each word padded with spaces so word edges count."""
    padded = f" {normalize(text)} "
    if len(padded.strip()) == 0:
        return []
    return [padded[i : i + n] for i in range(max(len(padded) - n + 1, 1))]


@dataclass(frozen=True)
class Coding:
    """How a mention was coded. ``code`` is None when the best match scored below the threshold."""

    code: str | None
    display: str | None
    #: exact | normalized | abbreviation | nearest | none
    method: str
    score: float
    #: The dictionary name that matched (nearest neighbour: the closest name, even when below threshold).
    matched: str | None = None
    #: abbreviation: the long form, defined in the same text, that was coded in the mention's place.
    long_form: str | None = None


class ConceptIndex:
    """The dictionary and the n-gram vectors of a plugin's terminology.

    Args:
        concepts: ``{"system", "ngram", "concepts": [{"code", "display", "type", "names": [...]}, ...]}``
            (``concepts.json`` of a bundle).
        vectors: ``{"ngrams", "idf", "indptr", "indices", "data", "row_concept"}`` (``concept_vectors.npz``):
            a CSR matrix, one L2-normalised TF-IDF row per (concept, name) pair.
        threshold: the least cosine similarity a nearest-neighbour code needs.
    """

    def __init__(self, concepts: Mapping[str, Any], vectors: Mapping[str, np.ndarray], threshold: float) -> None:
        self.system: str = str(concepts.get("system", ""))
        self.n = int(concepts.get("ngram", NGRAM))
        self.threshold = float(threshold)
        self.concepts: list[dict[str, Any]] = list(concepts.get("concepts", []))
        self.exact: dict[tuple[str, str], int] = {}
        self.normalized: dict[tuple[str, str], int] = {}
        # First listed wins: the converter lists concepts by descending frequency.
        for index, concept in enumerate(self.concepts):
            kind = str(concept.get("type", ""))
            for name in concept.get("names", []):
                self.exact.setdefault((kind, _exact(name)), index)
                self.normalized.setdefault((kind, normalize(name)), index)
        self.vocab = {str(g): i for i, g in enumerate(vectors["ngrams"].tolist())}
        self.idf = np.asarray(vectors["idf"], dtype=np.float32)
        self.row_concept = np.asarray(vectors["row_concept"], dtype=np.int64)
        self.row_names: list[str] = [n for c in self.concepts for n in c.get("names", [])]
        # CSR (rows = names) → per n-gram posting lists (CSC), so a query touches only its own n-grams.
        indptr = np.asarray(vectors["indptr"], dtype=np.int64)
        indices = np.asarray(vectors["indices"], dtype=np.int64)
        data = np.asarray(vectors["data"], dtype=np.float32)
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        order = np.argsort(indices, kind="stable")
        self._post_rows = rows[order]
        self._post_data = data[order]
        self._post_ptr = np.searchsorted(indices[order], np.arange(len(self.vocab) + 1))
        self.types = np.array([str(c.get("type", "")) for c in self.concepts])
        self._row_types = self.types[self.row_concept] if len(self.row_concept) else np.array([], dtype=str)
        self._cache: dict[tuple[str, str | None], Coding] = {}

    @classmethod
    def load(cls, concepts_path: Path, vectors_path: Path, threshold: float) -> ConceptIndex:
        """Read and validate ``concepts.json`` and ``concept_vectors.npz`` from disk.

        Raises:
            TaskError: a file cannot be read or breaks its schema (the message names the file and key).
        """
        try:
            concepts, vectors = concepts_path.read_bytes(), vectors_path.read_bytes()
        except OSError as exc:
            raise TaskError(f"{exc.filename}: the terminology files cannot be read ({exc.strerror})") from exc
        return cls.from_bytes(
            concepts, vectors, threshold, concepts_source=str(concepts_path), vectors_source=str(vectors_path)
        )

    @classmethod
    def from_bytes(
        cls,
        concepts_json: bytes,
        vectors_npz: bytes,
        threshold: float,
        *,
        concepts_source: str = "concepts.json",
        vectors_source: str = "concept_vectors.npz",
    ) -> ConceptIndex:
        """Build the index from the bytes of ``concepts.json`` and ``concept_vectors.npz`` (a verified bundle's).

        Both are checked against their schema first (see :func:`check_terminology`), so a bad file fails the
        plugin's load, never a later lookup.

        Raises:
            TaskError: a file is not JSON / not an .npz of plain arrays, or breaks its schema; the message names
                the file and the key.
        """
        concepts = load_json(concepts_json, concepts_source, TaskError)
        vectors = _load_npz(vectors_npz, vectors_source)
        check_terminology(concepts, vectors, concepts_source, vectors_source)
        return cls(concepts, vectors, threshold)

    def vector(self, text: str) -> dict[int, float]:
        """The L2-normalised TF-IDF vector of ``text`` as {column: weight} (unknown n-grams are dropped)."""
        counts: dict[int, float] = {}
        for gram in ngrams(text, self.n):
            column = self.vocab.get(gram)
            if column is not None:
                counts[column] = counts.get(column, 0.0) + 1.0
        weights = {c: v * float(self.idf[c]) for c, v in counts.items()}
        norm = float(np.sqrt(sum(w * w for w in weights.values())))
        return {c: w / norm for c, w in weights.items()} if norm > 0 else {}

    def nearest(self, text: str, kind: str | None = None) -> tuple[int, float]:
        """Row and cosine similarity of the closest name (of concepts of ``kind`` when given); (-1, 0) if none."""
        query = self.vector(text)
        if not query:
            return -1, 0.0
        scores = np.zeros(len(self.row_concept), dtype=np.float32)
        for column, weight in query.items():
            lo, hi = self._post_ptr[column], self._post_ptr[column + 1]
            np.add.at(scores, self._post_rows[lo:hi], self._post_data[lo:hi] * weight)
        if kind is not None:
            scores[self._row_types != kind] = 0.0
        row = int(np.argmax(scores))
        return row, float(scores[row])

    def code(self, text: str, kind: str | None = None, abbreviations: Mapping[str, str] | None = None) -> Coding:
        """Code one mention (of entity type ``kind``, when the terminology is typed).

        Args:
            abbreviations: short form → long form defined in the mention's text (see :mod:`fhirplug._abbrev`); a
                mention that is one of these short forms and matches no dictionary name is coded as its long form.
        """
        coding = self._code_cached(text, kind)
        if not abbreviations or coding.method in ("exact", "normalized"):
            return coding
        long_form = abbreviations.get(text.strip())
        if long_form is None or long_form.strip() == text.strip():
            return coding
        expanded = self._code_cached(long_form, kind)
        if expanded.code is None:
            return coding
        return Coding(expanded.code, expanded.display, "abbreviation", expanded.score, expanded.matched, long_form)

    def _code_cached(self, text: str, kind: str | None) -> Coding:
        cached = self._cache.get((text, kind))
        if cached is None:
            cached = self._code(text, kind)
            if len(self._cache) < 100_000:  # mentions repeat across notes; bound the memory all the same
                self._cache[(text, kind)] = cached
        return cached

    def _code(self, text: str, kind: str | None) -> Coding:
        key = kind or ""
        for method, table, form in (
            ("exact", self.exact, _exact(text)),
            ("normalized", self.normalized, normalize(text)),
        ):
            index = table.get((key, form))
            if index is not None and form:
                concept = self.concepts[index]
                return Coding(str(concept["code"]), str(concept.get("display", "")), method, 1.0, form)
        row, score = self.nearest(text, kind)
        if row < 0:
            return Coding(None, None, "none", 0.0)
        concept = self.concepts[int(self.row_concept[row])]
        name = self.row_names[row] if row < len(self.row_names) else None
        if score < self.threshold:
            return Coding(None, None, "none", round(score, 6), name)
        return Coding(str(concept["code"]), str(concept.get("display", "")), "nearest", round(score, 6), name)


#: concepts.json's keys, and each concept's.
CONCEPTS_KEYS = frozenset({"system", "ngram", "concepts"})
CONCEPT_KEYS = frozenset({"code", "display", "type", "names"})
#: concept_vectors.npz's arrays → the dtype kind each must have (U: text, f: float, i/u: integer).
VECTOR_KINDS = {"ngrams": "U", "idf": "f", "indptr": "iu", "indices": "iu", "data": "f", "row_concept": "iu"}
#: Largest uncompressed concept_vectors.npz accepted (the first-party one is about 1 MiB): no zip bomb.
MAX_VECTORS_BYTES = 1 << 28


def _bad(where: str, detail: str) -> TaskError:
    return TaskError(f"{where}: the terminology files cannot be read: {detail}")


def _load_npz(data: bytes, source: str, what: str = "the terminology files cannot be read") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive of plain arrays (no pickles), refused before numpy allocates anything when
    its members' uncompressed sizes or their ``.npy`` headers declare more than :data:`MAX_VECTORS_BYTES` (``np.load``
    sizes an array from its header, whatever bytes follow it: a 100-byte member can ask for terabytes).

    Raises:
        TaskError: ``"{source}: {what}: {detail}"``.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len({info.filename for info in members}) != len(members):
                # np.load reads the last of a repeated name: every member checked must be the one loaded.
                raise TaskError(f"{source}: {what}: the archive repeats a member name")
            total = sum(info.file_size for info in members)
            if total > MAX_VECTORS_BYTES:
                raise TaskError(
                    f"{source}: {what}: {total} bytes uncompressed, more than the {MAX_VECTORS_BYTES} allowed"
                )
            declared = 0
            for info in members:
                with archive.open(info) as member:
                    version = npy_format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = npy_format.read_array_header_1_0(member)
                    else:
                        shape, _, dtype = npy_format.read_array_header_2_0(member)
                if dtype.hasobject:
                    raise TaskError(
                        f"{source}: {what}: not an .npz archive of plain arrays (member {info.filename!r} holds "
                        "Python objects, which would need pickle)"
                    )
                if any(not isinstance(n, int) or n < 0 for n in shape) or dtype.itemsize <= 0:
                    raise TaskError(f"{source}: {what}: member {info.filename!r} declares shape {shape} of {dtype}")
                declared += int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > MAX_VECTORS_BYTES:
                    raise TaskError(
                        f"{source}: {what}: its arrays declare more than the {MAX_VECTORS_BYTES:,} bytes allowed"
                    )
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, TypeError, MemoryError) as exc:
        raise TaskError(f"{source}: {what}: not an .npz archive of plain arrays ({exc})") from exc


def check_terminology(
    concepts: Any, vectors: Mapping[str, np.ndarray], concepts_source: str, vectors_source: str
) -> None:
    """Check ``concepts.json`` content and ``concept_vectors.npz`` arrays against their schema and each other.

    ``concepts``: ``{"system": URI, "ngram": 1..8, "concepts": [{"code", "display", "type": str, "names": [str]}]}``.
    ``vectors``: exactly the arrays of :data:`VECTOR_KINDS`, one-dimensional, of those dtype kinds; ``idf`` as
    long as ``ngrams``; a CSR matrix with one row per name (``indptr`` = rows + 1 entries, from 0, non-decreasing,
    ending at ``len(indices)``; ``indices`` < ``len(ngrams)``; ``data`` as long as ``indices``, finite) and
    ``row_concept`` naming, row by row, the concept each name belongs to.

    Raises:
        TaskError: naming the file and the key that is wrong.
    """
    if not isinstance(concepts, dict):
        raise _bad(concepts_source, f"expected a JSON object, got {type(concepts).__name__}")
    unknown = sorted(set(concepts) - CONCEPTS_KEYS)
    missing = sorted(CONCEPTS_KEYS - set(concepts))
    if unknown or missing:
        raise _bad(
            concepts_source, f"unknown key(s) {unknown}, missing key(s) {missing}; expected {sorted(CONCEPTS_KEYS)}"
        )
    if not isinstance(concepts["system"], str) or not concepts["system"].startswith(("http://", "https://", "urn:")):
        raise _bad(concepts_source, "system: expected the code system's canonical URI")
    if type(concepts["ngram"]) is not int or not 1 <= concepts["ngram"] <= 8:
        raise _bad(concepts_source, f"ngram: expected an integer 1..8, got {str(concepts['ngram'])[:20]!r}")
    listed = concepts["concepts"]
    if not isinstance(listed, list):
        raise _bad(concepts_source, "concepts: expected a list of {code, display, type, names}")
    names_per_concept = []
    for i, concept in enumerate(listed):
        where = f"concepts[{i}]"
        if not isinstance(concept, dict) or set(concept) != CONCEPT_KEYS:
            got = sorted(concept) if isinstance(concept, dict) else type(concept).__name__
            raise _bad(concepts_source, f"{where}: expected exactly the keys {sorted(CONCEPT_KEYS)}, got {got}")
        for key in ("code", "display", "type"):
            if not isinstance(concept[key], str) or not concept[key]:
                raise _bad(concepts_source, f"{where}.{key}: expected a non-empty string")
        names = concept["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise _bad(concepts_source, f"{where}.names: expected a list of non-empty strings")
        names_per_concept.append(len(names))
    unknown = sorted(set(vectors) - set(VECTOR_KINDS))
    missing = sorted(set(VECTOR_KINDS) - set(vectors))
    if unknown or missing:
        raise _bad(vectors_source, f"unknown array(s) {unknown}, missing array(s) {missing}")
    for key, kinds in VECTOR_KINDS.items():
        array = vectors[key]
        if array.ndim != 1 or array.dtype.kind not in kinds:
            raise _bad(
                vectors_source, f"{key}: expected a 1-d array of kind {kinds!r}, got {array.dtype} {array.shape}"
            )
    ngram_count = len(vectors["ngrams"])
    rows = sum(names_per_concept)
    if len(vectors["idf"]) != ngram_count:
        raise _bad(vectors_source, f"idf has {len(vectors['idf'])} entries, ngrams {ngram_count}")
    indptr, indices, data = vectors["indptr"], vectors["indices"], vectors["data"]
    if len(indptr) != rows + 1:
        raise _bad(
            vectors_source, f"indptr has {len(indptr)} entries, expected rows + 1 = {rows + 1} (one row per name)"
        )
    if indptr[0] != 0 or np.any(np.diff(indptr.astype(np.int64)) < 0) or indptr[-1] != len(indices):
        raise _bad(vectors_source, f"indptr must rise from 0 to len(indices) = {len(indices)}")
    if len(data) != len(indices):
        raise _bad(vectors_source, f"data has {len(data)} entries, indices {len(indices)}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= ngram_count):
        raise _bad(vectors_source, f"indices must lie in 0..{ngram_count - 1} (len(ngrams) = {ngram_count})")
    if not np.all(np.isfinite(data)) or not np.all(np.isfinite(vectors["idf"])):
        raise _bad(vectors_source, "data and idf must be finite numbers")
    expected = np.repeat(np.arange(len(listed)), names_per_concept)
    row_concept = vectors["row_concept"]
    if len(row_concept) != rows or not np.array_equal(row_concept.astype(np.int64), expected):
        bad = "" if len(row_concept) != rows else f" (first wrong row {int(np.argmax(row_concept != expected))})"
        raise _bad(
            vectors_source,
            f"row_concept must name each row's concept < len(concepts) = {len(listed)}, in the order of "
            f"concepts.json's names ({rows} rows){bad}",
        )


def build_index(
    concepts: Sequence[Mapping[str, Any]], system: str, n: int = NGRAM
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``concepts.json`` content and ``concept_vectors.npz`` arrays for a list of concepts (convert time).

    Args:
        concepts: ``{"code", "display", "type", "names"}`` dicts, most frequent first (ties in the dictionary go to
            the earlier concept).
        system: the code system URI.
    """
    rows: list[list[str]] = []
    row_concept: list[int] = []
    cleaned = []
    for index, concept in enumerate(concepts):
        names = list(dict.fromkeys(str(x) for x in concept.get("names", []) if str(x).strip()))
        cleaned.append({**concept, "names": names})
        for name in names:
            rows.append(ngrams(name, n))
            row_concept.append(index)
    vocab: dict[str, int] = {}
    for grams in rows:
        for gram in grams:
            vocab.setdefault(gram, len(vocab))
    df = np.zeros(len(vocab), dtype=np.float64)
    for grams in rows:
        for column in {vocab[g] for g in grams}:
            df[column] += 1
    idf = (np.log((1 + len(rows)) / (1 + df)) + 1.0).astype(np.float32)
    indptr = [0]
    indices: list[int] = []
    data: list[float] = []
    for grams in rows:
        counts: dict[int, float] = {}
        for gram in grams:
            counts[vocab[gram]] = counts.get(vocab[gram], 0.0) + 1.0
        weights = {c: v * float(idf[c]) for c, v in counts.items()}
        norm = float(np.sqrt(sum(w * w for w in weights.values()))) or 1.0
        for column in sorted(weights):
            indices.append(column)
            data.append(weights[column] / norm)
        indptr.append(len(indices))
    arrays = {
        "ngrams": np.array(list(vocab), dtype=np.str_),
        "idf": idf,
        "indptr": np.array(indptr, dtype=np.int32),
        "indices": np.array(indices, dtype=np.int32),
        "data": np.array(data, dtype=np.float32),
        "row_concept": np.array(row_concept, dtype=np.int32),
    }
    return {"system": system, "ngram": n, "concepts": cleaned}, arrays


def merge_names(items: Iterable[tuple[str, str, str, str]]) -> list[dict[str, Any]]:
    """Concepts from (type, code, name, display-or-"") observations, most frequent concept first.

    A concept's display is the given display, else its most frequent name.
    """
    counts: dict[tuple[str, str], dict[str, int]] = {}
    displays: dict[tuple[str, str], str] = {}
    for kind, code, name, display in items:
        key = (kind, code)
        names = counts.setdefault(key, {})
        names[name] = names.get(name, 0) + 1
        if display:
            displays.setdefault(key, display)
    ordered = sorted(counts.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    out = []
    for (kind, code), names in ordered:
        ranked = sorted(names, key=lambda n: (-names[n], n))
        out.append({"code": code, "type": kind, "display": displays.get((kind, code), ranked[0]), "names": ranked})
    return out
