"""Abbreviations defined in a text: "Parkinson's disease (PD)" → ``{"PD": "Parkinson's disease"}``.

The Schwartz & Hearst (2003) algorithm ("A simple algorithm for identifying abbreviation definitions in
biomedical text", PSB 2003), in plain Python:

1. Every ``long form (short form)`` in a sentence is a candidate; text after ``;`` or ``,`` inside the parentheses
   is dropped ("(PD; n = 20)"). When the parentheses hold more than two words (or more text than the sentence
   before them), the pattern may be the other way round, ``SF (long form)``: the word before the parenthesis is
   the short form then, and it must hold a capital.
2. A short form has 2 to 10 characters, at most two words, at least one letter and starts with a letter or a
   digit. Statistical and reference asides ("(p < 0.05)", "(n = 12)", "(Figure 2)") fail these or step 3.
3. The long form is the shortest suffix of the words before the parenthesis (at most min(|SF| + 5, 2 |SF|) words)
   in which the short form's letters and digits are found in order, matched right to left, the first one at the
   start of a word. A long form no longer than the short form, or one that contains the short form as a word or
   in parentheses ("word (xy) word (xy)" defines nothing), is no definition.

Only the first definition of a short form in a text counts (later ones are usually re-uses). This module is
stdlib-only; :class:`fhirplug.tasks.token_classification.TokenClassification` uses it to code a mention that is a
short form defined in its own note as the long form's concept.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

__all__ = ["Abbreviation", "abbreviations", "find_abbreviations"]

#: Where a sentence ends: the long form never reaches across one.
_SENTENCE_END = re.compile(r"[.!?;]\s|\n")
#: Characters that make a parenthetical an expression, not a short form ("p=0.05", "n>10").
_EXPRESSION = frozenset("=<>±≤≥")
#: The most characters before a parenthesis a long form is looked for in (at most 15 words of it are read; a
#: longer reach only made every parenthesis of a long sentence cost the whole sentence: quadratic time).
_LONG_FORM_CHARS = 400
_NON_SPACE = re.compile(r"\S")
_SHORT_FORM_CHARS = 10


@dataclass(frozen=True)
class Abbreviation:
    """One definition: ``text[long_start : long_start + len(long_form)] == long_form``, likewise the short form."""

    short_form: str
    long_form: str
    short_start: int
    long_start: int


def _valid_short_form(short: str) -> bool:
    return (
        2 <= len(short) <= 10
        and len(short.split()) <= 2
        and any(c.isalpha() for c in short)
        and short[0].isalnum()
        and not _EXPRESSION.intersection(short)
    )


def _best_long_form(short: str, long: str) -> int:
    """Where (in ``long``) the shortest matching long form starts, or -1 (Schwartz & Hearst's ``findBestLongForm``)."""
    s, li = len(short) - 1, len(long) - 1
    while s >= 0:
        char = short[s].lower()
        if not char.isalnum():
            s -= 1
            continue
        # The first character of the short form must begin a word of the long form.
        while li >= 0 and (long[li].lower() != char or (s == 0 and li > 0 and long[li - 1].isalnum())):
            li -= 1
        if li < 0:
            return -1
        li -= 1
        s -= 1
    # Back to the start of the word holding the first matched character.
    while li >= 0 and not long[li].isspace():
        li -= 1
    return li + 1


def _pair(text: str, short: str, short_start: int, window_start: int, window_end: int) -> Abbreviation | None:
    """The definition of ``short`` by the words in ``text[window_start:window_end]``, if they define it."""
    if not _valid_short_form(short):
        return None
    letters = sum(c.isalnum() for c in short)
    if window_end - window_start > _LONG_FORM_CHARS:  # read only the end, from a word's start
        cut = window_end - _LONG_FORM_CHARS
        while cut < window_end and not text[cut - 1].isspace():
            cut += 1
        window_start = cut
    words = list(re.finditer(r"\S+", text[window_start:window_end]))
    if not words:
        return None
    # At most min(|SF| + 5, 2 |SF|) words before the parenthesis, as they stand in the text.
    first = words[-min(letters + 5, letters * 2, len(words))]
    window_start += first.start()
    candidate = text[window_start : window_start + words[-1].end() - first.start()]
    begin = _best_long_form(short, candidate)
    if begin < 0:
        return None
    long = candidate[begin:]
    long_words = len(long.split())
    if (
        len(long) <= len(short)
        or f"{short} " in long
        or f"({short}" in long  # "word (xy) word (xy)": the first use is no part of a definition of the second
        or long.endswith(short)
        or long_words > letters * 2
        or long_words > letters + 5
    ):
        return None
    return Abbreviation(short, long, short_start, window_start + begin)


def find_abbreviations(text: str) -> list[Abbreviation]:
    """Every abbreviation definition in ``text``, in order (a short form may appear more than once here).

    Linear in the text's length (each parenthesis looks at a bounded stretch before it), whatever it holds.
    """
    found: list[Abbreviation] = []
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    heads: dict[int, int] = {}  # sentence start → its first non-space character (found once per sentence)
    position = 0
    while True:
        opened = text.find("(", position)
        if opened < 0:
            return found
        closed = text.find(")", opened + 1)
        if closed < 0:
            return found
        inner = text[opened + 1 : closed]
        nested = inner.rfind("(")
        if nested >= 0:  # nested: look again from the innermost parenthesis before this ")"
            position = opened + 1 + nested
            continue
        position = opened + 1
        at = bisect.bisect_right(ends, opened) - 1
        sentence = ends[at] if at >= 0 else 0
        cut = min((i for i in (inner.find(";"), inner.find(",")) if i >= 0), default=len(inner))
        short = inner[:cut].strip()
        short_start = opened + 1 + (len(inner[:cut]) - len(inner[:cut].lstrip()))
        pair = _pair(text, short, short_start, sentence, opened)
        stop = opened  # the end of the text before the parenthesis, without trailing whitespace
        while stop > sentence and text[stop - 1].isspace():
            stop -= 1
        if pair is None and sentence not in heads:
            head = _NON_SPACE.search(text, sentence)
            heads[sentence] = head.start() if head else len(text)
        before = max(stop - heads.get(sentence, stop), 0)  # len(text[sentence:opened].strip())
        if pair is None and (len(inner.split()) > 2 or len(inner.strip()) > before):
            # "SF (long form)": the word before the parenthesis is the short form, and it holds a capital.
            word_start = stop
            while word_start > sentence and text[word_start - 1] != " " and stop - word_start <= _SHORT_FORM_CHARS:
                word_start -= 1
            word = text[word_start:stop]
            if (word_start == sentence or text[word_start - 1] == " ") and any(c.isupper() for c in word):
                pair = _pair(text, word, word_start, opened + 1, closed)
        if pair is not None:
            found.append(pair)
            position = closed + 1


def abbreviations(text: str) -> dict[str, str]:
    """Short form → long form for each abbreviation defined in ``text`` (the first definition of a short form)."""
    out: dict[str, str] = {}
    for pair in find_abbreviations(text):
        out.setdefault(pair.short_form, pair.long_form)
    return out
