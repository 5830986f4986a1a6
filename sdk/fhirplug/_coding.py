"""Entity coding: a mention's text → a concept of the plugin's terminology, with a score, or no code at all.

Three steps, first hit wins:

1. **exact**: the casefolded mention is a name in the dictionary (score 1.0);
2. **normalized**: the mention after :func:`normalize` (NFKC, casefold, punctuation → space, collapsed whitespace,
   plurals singularised) is a normalized name in the dictionary (score 1.0);
3. **nearest**: cosine similarity of character 3-gram TF-IDF vectors (built in numpy at convert time, over every
   name and synonym, shipped in the bundle) to the closest name; its concept is returned when the similarity is
   at or above the plugin's threshold, else the mention stays **uncoded** (``code is None``), never mis-coded.

Why character n-grams and not the bundle's encoder: the NER model's hidden states are trained to tag tokens, not
to place synonyms near each other, and a second ONNX output would cost every window a pooled copy. Character
n-grams are what unseen surface forms of a known concept (spelling, word order, inflection, hyphens) share; they
cannot bridge true synonyms with no letters in common ("heart attack" / "myocardial infarction"), which is why the
threshold abstains instead of guessing. Where two concepts share a name, the one seen more often wins.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    #: exact | normalized | nearest | none
    method: str
    score: float
    #: The dictionary name that matched (nearest neighbour: the closest name, even when below threshold).
    matched: str | None = None


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
        return cls.from_bytes(concepts_path.read_bytes(), vectors_path.read_bytes(), threshold)

    @classmethod
    def from_bytes(cls, concepts_json: bytes, vectors_npz: bytes, threshold: float) -> ConceptIndex:
        """Build the index from the bytes of ``concepts.json`` and ``concept_vectors.npz`` (a verified bundle's)."""
        concepts = json.loads(concepts_json.decode("utf-8"))
        with np.load(io.BytesIO(vectors_npz), allow_pickle=False) as arrays:
            vectors = {k: arrays[k] for k in arrays.files}
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

    def code(self, text: str, kind: str | None = None) -> Coding:
        """Code one mention (of entity type ``kind``, when the terminology is typed)."""
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
