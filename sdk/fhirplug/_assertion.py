"""Assertion of entity mentions: negated, possible, historical, hypothetical, and whose condition it is
(ConText/NegEx style).

The algorithm (after NegEx, Chapman et al. 2001, and ConText, Harkema et al. 2009), on character offsets:

1. Split the text into sentences (``.``, ``!``, ``?``, ``;`` before whitespace, and line breaks).
2. In each sentence, find the lexicon's phrases (case-insensitive, on word boundaries, longest match first, no
   overlaps): triggers, pseudo-triggers (phrases that contain a trigger but are none: "no change", "gram
   negative", "even if") and terminators ("but", "however", "except"...), some of which end only the scopes of
   certain categories (ConText's termination terms are per category: "diagnosed with" ends a negation or a
   history, not "mother ... diagnosed with"). Phrases inside an entity mention are ignored.
3. A *forward* trigger's scope runs from its end to the next terminator (of all categories, or of the one in
   question), pseudo-trigger or trigger, or the end of the sentence. Triggers right next to it, or with only
   ``a``/``an``/``any``/``the`` between ("has no history of", "denies any history of"), are passed over and
   chained to it. A *backward* trigger's scope runs back to the previous such phrase, or the sentence start.
   A hypothetical scope also runs over experiencer triggers ("if her mother's test shows ..."): a condition
   may name anyone, and the experiencer trigger says whose it is. ``max_scope_words`` (0: unlimited) caps a
   scope's length in words.
4. A mention whose start lies in a scope takes the trigger's categories. A negation chained with a history
   ("no prior history of", "denies history of") says the condition never was: negated, not historical.

The categories: *negated* (absent: "no fever"), *possible* (the note's own uncertainty: "possible pneumonia",
"rule out", "cannot be excluded"), *historical* (a past condition: "history of", "years ago"; history is not
absence, so never negated by itself), *hypothetical* (ConText's hypothetical temporality: a condition, an
instruction or a plan, no fact: "return if chest pain recurs", "should she develop a rash", "watch for
bleeding", "as needed for pain") and the experiencer, *family* (a relative's, with its HL7 v3 RoleCode) or
*other* (someone else's: "her roommate has influenza"). Uncertainty about what is there now is *possible*;
something that may or may not happen later is *hypothetical*.

The lexicon is a JSON file (``fhirplug/data/assertion.json`` by default; a plugin ships its own, and a caller can
pass another): ``triggers`` by category (``negated``, ``possible``, ``historical``, ``hypothetical``, ``family``,
``other``; ``a+b`` names a trigger with two categories) and direction (``forward``, ``backward``), ``pseudo``,
``terminators`` (ending every scope), ``category_terminators`` (category → phrases ending that category's scopes
only), ``max_scope_words`` and ``family_relationships`` (trigger → HL7 v3 RoleCode).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fhirplug._safe_read import load_json
from fhirplug.errors import FhirplugError, TaskError, UsageError

__all__ = ["DEFAULT_LEXICON", "Assertion", "Lexicon", "assert_spans", "sentences"]

DEFAULT_LEXICON = Path(__file__).parent / "data" / "assertion.json"
CATEGORIES = ("negated", "possible", "historical", "hypothetical", "family", "other")
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)|\n")
_WORD = re.compile(r"\w+")
#: What may stand between two chained triggers: "denies any history of", "has no history of".
_CHAIN_GAP = re.compile(r"\s*(?:(?:a|an|any|the)\s+)*", re.IGNORECASE)
#: Experiencer categories, which a hypothetical scope runs over.
_EXPERIENCER = frozenset({"family", "other"})


@dataclass(frozen=True)
class Assertion:
    """What the context says about one mention."""

    negated: bool = False
    possible: bool = False
    historical: bool = False
    #: ``patient``, ``family`` (a relative's condition) or ``other`` (someone else's).
    subject: str = "patient"
    #: HL7 v3 RoleCode of the relative (``MTH``, ``FAMMEMB`` ...) when ``subject`` is ``family``.
    relationship: str | None = None
    #: A condition, instruction or plan rather than a fact ("return if chest pain recurs"): nothing is asserted.
    hypothetical: bool = False
    #: The trigger phrases that applied, as ``category:phrase``.
    triggers: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "negated": self.negated,
            "possible": self.possible,
            "historical": self.historical,
            "hypothetical": self.hypothetical,
            "subject": self.subject,
            "relationship": self.relationship,
            "triggers": list(self.triggers),
        }


@dataclass(frozen=True)
class _Phrase:
    text: str
    kind: str  # trigger | pseudo | terminator (every category) | category-terminator (``categories`` only)
    categories: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()


def _pattern(phrase: str) -> str:
    words = [re.escape(w) for w in phrase.split()]
    body = r"\s+".join(words)
    before = r"(?<!\w)" if phrase[:1].isalnum() else ""
    after = r"(?!\w)" if phrase[-1:].isalnum() else ""
    return before + body + after


@dataclass(frozen=True)
class Lexicon:
    """A parsed trigger lexicon. Build it with :meth:`load`, :meth:`default` or :meth:`from_dict`."""

    phrases: tuple[_Phrase, ...]
    max_scope_words: int = 0
    relationships: Mapping[str, str] = field(default_factory=dict)
    source: str = "inline"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "inline") -> Lexicon:
        """Parse a lexicon mapping (the JSON file's content), checked against the lexicon schema.

        Raises:
            UsageError: (also a ``ValueError``) an unknown key, category or direction, a wrong type, no
                ``negated`` trigger, or a phrase that is not a non-empty string; the message names the key.
        """
        return _parse(data, source, UsageError)

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        """Read and parse a lexicon JSON file.

        Raises:
            TaskError: the file cannot be read, is not JSON or is not a lexicon (the message names the key).
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TaskError(f"{path}: cannot read the assertion lexicon ({exc.strerror})") from exc
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "inline") -> Lexicon:
        """Parse a lexicon JSON file's bytes (a verified bundle's ``assertion.json``).

        Raises:
            TaskError: not JSON (or over the JSON limits), or not a lexicon; the message names ``source`` and
                the key.
        """
        return _parse(load_json(data, source, TaskError), source, TaskError)

    @classmethod
    def default(cls) -> Lexicon:
        return _default()

    @property
    def cues(self) -> frozenset[str]:
        """Every phrase of the lexicon (lowercase, single-spaced)."""
        return frozenset(" ".join(p.text.split()) for p in self.phrases)

    @property
    def regex(self) -> re.Pattern[str]:
        return _compile(self.phrases)


#: Every top-level key a lexicon file may have; anything else is a typo that would silently change nothing.
LEXICON_KEYS = (
    "version",
    "description",
    "triggers",
    "pseudo",
    "terminators",
    "category_terminators",
    "max_scope_words",
    "family_relationships",
)


def _phrases(value: Any, where: str, error: type[FhirplugError]) -> list[str]:
    if not isinstance(value, list):
        raise error(f"{where}: expected a list of phrases, got {type(value).__name__}")
    for phrase in value:
        if not isinstance(phrase, str) or not phrase.strip():
            raise error(f"{where}: {str(phrase)[:80]!r} is not a phrase (a non-empty string)")
    return [p.lower().strip() for p in value]


def _parse(data: Any, source: str, error: type[FhirplugError]) -> Lexicon:
    """Validate a lexicon mapping against its schema and build the :class:`Lexicon`; ``error`` names ``source``."""
    if not isinstance(data, Mapping):
        raise error(f"{source}: an assertion lexicon is a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in LEXICON_KEYS)
    if unknown:
        raise error(f"{source}: unknown key(s) {unknown}; a lexicon has {list(LEXICON_KEYS)}")
    version = data.get("version", 1)
    if type(version) is not int or version != 1:
        raise error(f"{source}: version is {str(version)[:20]!r}; this fhirplug reads lexicon version 1")
    if not isinstance(data.get("description", ""), str):
        raise error(f"{source}: description must be a string")
    if "triggers" not in data:
        raise error(f"{source}: missing key 'triggers' (at least negated triggers); without it nothing is negated")
    triggers = data["triggers"]
    if not isinstance(triggers, Mapping):
        raise error(f"{source}: triggers: expected an object of category → direction → phrases")
    merged: dict[str, tuple[set[str], set[str]]] = {}
    negated = 0
    for name, by_direction in triggers.items():
        categories = tuple(str(name).split("+"))
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise error(f"{source}: triggers.{name}: unknown assertion category {unknown}; known: {list(CATEGORIES)}")
        if not isinstance(by_direction, Mapping):
            raise error(f"{source}: triggers.{name}: expected an object of forward/backward phrase lists")
        for direction, listed in by_direction.items():
            if direction not in ("forward", "backward"):
                raise error(f"{source}: triggers.{name}.{direction}: expected forward or backward")
            for phrase in _phrases(listed, f"{source}: triggers.{name}.{direction}", error):
                # One phrase may be listed under several categories or directions: gather them.
                cats, dirs = merged.setdefault(phrase, (set(), set()))
                cats.update(categories)
                dirs.add(direction)
                negated += "negated" in categories
    if not negated:
        raise error(f"{source}: triggers has no negated phrase; a lexicon without one silently turns negation off")
    scope = data.get("max_scope_words", 0)
    if type(scope) is not int or scope < 0:
        raise error(f"{source}: max_scope_words must be a whole number ≥ 0 (0: unlimited), got {str(scope)[:20]!r}")
    relationships = data.get("family_relationships", {})
    if not isinstance(relationships, Mapping) or not all(
        isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in relationships.items()
    ):
        raise error(f"{source}: family_relationships: expected an object of trigger phrase → HL7 v3 RoleCode")
    phrases = [
        _Phrase(text, "trigger", tuple(sorted(cats)), tuple(sorted(dirs))) for text, (cats, dirs) in merged.items()
    ]
    phrases += [_Phrase(p, "pseudo") for p in _phrases(data.get("pseudo", []), f"{source}: pseudo", error)]
    terminators = _phrases(data.get("terminators", []), f"{source}: terminators", error)
    phrases += [_Phrase(p, "terminator") for p in terminators]
    by_category = data.get("category_terminators", {})
    if not isinstance(by_category, Mapping):
        raise error(f"{source}: category_terminators: expected an object of category → phrases")
    scoped: dict[str, set[str]] = {}
    for name, listed in by_category.items():
        if name not in CATEGORIES:
            raise error(f"{source}: category_terminators.{name}: unknown assertion category; known: {list(CATEGORIES)}")
        for phrase in _phrases(listed, f"{source}: category_terminators.{name}", error):
            scoped.setdefault(phrase, set()).add(str(name))
    taken = {p.text for p in phrases}
    clash = sorted(p for p in scoped if p in taken)
    if clash:
        raise error(
            f"{source}: category_terminators: {clash} already listed as a trigger, pseudo-trigger or terminator; "
            "a phrase has one role"
        )
    phrases += [_Phrase(p, "category-terminator", tuple(sorted(cats))) for p, cats in scoped.items()]
    return Lexicon(tuple(phrases), scope, {k.lower(): v for k, v in relationships.items()}, source)


@cache
def _default() -> Lexicon:
    return Lexicon.load(DEFAULT_LEXICON)


@cache
def _compile(phrases: tuple[_Phrase, ...]) -> re.Pattern[str]:
    # Longest first, so "no history of" beats "no" and "history of" at the same place.
    ordered = sorted({p.text for p in phrases}, key=lambda t: (-len(t), t))
    return re.compile("|".join(f"(?:{_pattern(t)})" for t in ordered), re.IGNORECASE)


def sentences(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` character spans of the sentences of ``text`` (the delimiter stays with its sentence)."""
    spans = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _limit(text: str, start: int, end: int, words: int, forward: bool) -> tuple[int, int]:
    if words <= 0:
        return start, end
    found = list(_WORD.finditer(text, start, end))
    if len(found) <= words:
        return start, end
    return (start, found[words - 1].end()) if forward else (found[-words].start(), end)


def _ends(phrase: _Phrase, category: str) -> bool:
    """Whether ``phrase`` ends a scope of ``category``."""
    if phrase.kind == "category-terminator":
        return category in phrase.categories
    if phrase.kind == "trigger" and category == "hypothetical":
        return not set(phrase.categories) <= _EXPERIENCER
    return True


def assert_spans(text: str, spans: Sequence[tuple[int, int]], lexicon: Lexicon | None = None) -> list[Assertion]:
    """The assertion of each ``[start, end)`` mention of ``text``, in input order.

    Args:
        text: the note.
        spans: character spans of the mentions (offsets into ``text``).
        lexicon: the trigger lexicon (default: fhirplug's).
    """
    lexicon = lexicon or Lexicon.default()
    by_text = {p.text: p for p in lexicon.phrases}
    pattern = lexicon.regex
    results: list[Assertion] = [Assertion() for _ in spans]
    if not spans or not text.strip():
        return results
    bounds = sentences(text)
    for s_start, s_end in bounds:
        members = [i for i, (a, _) in enumerate(spans) if s_start <= a < s_end]
        if not members:
            continue
        inside = [spans[i] for i in members]
        found: list[tuple[int, int, _Phrase]] = []
        for match in pattern.finditer(text, s_start, s_end):
            a, b = match.span()
            if any(a < e and s < b for s, e in inside):
                continue  # a trigger word inside a mention ("no-reflow") is part of the mention
            phrase = by_text.get(" ".join(match.group(0).lower().split()))
            if phrase is not None:
                found.append((a, b, phrase))
        if not any(p.kind == "trigger" for _, _, p in found):
            continue
        cats: dict[int, dict[str, str]] = {i: {} for i in members}
        never: set[int] = set()  # history triggers chained after a negation: "no prior history of"
        for k, (a, b, phrase) in enumerate(found):
            if phrase.kind != "trigger":
                continue
            # The scope runs on through triggers that follow with (almost) nothing between ("has no history of").
            chained, edge = k + 1, b
            while (
                chained < len(found)
                and found[chained][2].kind == "trigger"
                and _CHAIN_GAP.fullmatch(text, edge, found[chained][0])
            ):
                if "negated" in phrase.categories and "forward" in phrase.directions:
                    never.add(chained)
                edge = found[chained][1]
                chained += 1
            for category in phrase.categories:
                if category == "historical" and k in never:
                    continue
                scopes = []
                if "forward" in phrase.directions:
                    nxt = chained
                    while nxt < len(found) and not _ends(found[nxt][2], category):
                        nxt += 1
                    stop = found[nxt][0] if nxt < len(found) else s_end
                    scopes.append(_limit(text, b, stop, lexicon.max_scope_words, True))
                if "backward" in phrase.directions:
                    prev = k - 1
                    while prev >= 0 and not _ends(found[prev][2], category):
                        prev -= 1
                    begin = found[prev][1] if prev >= 0 else s_start
                    scopes.append(_limit(text, begin, a, lexicon.max_scope_words, False))
                for i in members:
                    start = spans[i][0]
                    if any(lo <= start < hi for lo, hi in scopes):
                        cats[i].setdefault(category, phrase.text)
        for i in members:
            got = cats[i]
            if not got:
                continue
            subject = "family" if "family" in got else "other" if "other" in got else "patient"
            relationship = None
            if subject == "family":
                relationship = lexicon.relationships.get(got["family"], "FAMMEMB")
            results[i] = Assertion(
                negated="negated" in got,
                possible="possible" in got,
                historical="historical" in got,
                subject=subject,
                relationship=relationship,
                hypothetical="hypothetical" in got,
                triggers=tuple(f"{c}:{p}" for c, p in sorted(got.items())),
            )
    return results
