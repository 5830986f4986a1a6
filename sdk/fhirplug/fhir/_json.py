"""JSON as FHIR defines it: no duplicate names, no numbers FHIR cannot hold, no absurd nesting.

FHIR JSON (http://hl7.org/fhir/R4/json.html) is stricter than :func:`json.loads`: an object SHALL NOT repeat a
name (Python keeps the last silently), FHIR ``integer`` is 32-bit and ``decimal`` has no NaN or Infinity
(Python reads a 5,000-digit integer as a ``ValueError`` for the whole document and ``NaN`` as a float), and no
resource is a hundred levels deep (Python raises ``RecursionError`` for the whole document near a thousand).

The design: each of these is an error for the *resource that holds it*, not for the file, so parsing never
refuses a syntactically valid document for them. The parse hooks *mark* instead of raising:

* a repeated name makes the object a :class:`Marked` dict (last value wins, as before) that says which name;
* a number longer than :data:`MAX_NUMBER_CHARS`, a non-finite one or ``NaN``/``Infinity`` becomes a
  :class:`BadValue` in place of the number;
* a document too deep for Python's parser is scanned once (linear, brackets counted outside strings) and every
  container that opens deeper than :data:`MAX_DEPTH` is replaced by a one-name placeholder object that the hook
  turns into a :class:`Marked` dict, so the rest of the document parses. This costs nothing for normal input:
  the scan runs only after the C parser raised ``RecursionError``.

:func:`problems` then finds the marks (and nesting beyond :data:`MAX_DEPTH`) under one resource, iteratively,
so the walker can report and skip that resource alone. Python objects given directly (a dict nested 600 deep)
go through the same :func:`problems` check, which never recurses.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_NUMBER_CHARS", "BadValue", "Marked", "is_text", "loads", "problems"]

#: Deepest nesting of JSON objects and arrays accepted, counted from the document root (a resource at the top
#: is depth 1; a resource in a Bundle entry is depth 4). Real FHIR stays under 20 even in nested Bundles.
MAX_DEPTH = 100
#: Longest number literal accepted. FHIR ``integer`` is 32-bit (10 digits), ``integer64`` 19 digits, and a
#: ``decimal`` rarely carries more than 18 significant digits; 32 characters leave room for sign, point and
#: exponent while keeping every value far from Python's 4,300-digit ``int`` limit.
MAX_NUMBER_CHARS = 32
#: Most problems listed for one resource; a resource this broken is not worth more lines.
MAX_PROBLEMS = 10

# A name no FHIR element has (FHIR names are [A-Za-z][A-Za-z0-9_]*); input that spells it only marks itself.
_TOO_DEEP = "\x00fhirplug:too-deep"
_TOO_DEEP_TEXT = f"nested more than {MAX_DEPTH} levels deep: it is nested too deeply for a FHIR resource"
_PLACEHOLDER = json.dumps({_TOO_DEEP: 0})
# A JSON string (the unrolled form is linear even for megabyte base64 strings) or one bracket.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


class Marked(dict[str, Any]):
    """A JSON object the parser found a problem in; ``marks`` are ``(path suffix, issue code, what)``."""

    marks: tuple[tuple[str, str, str], ...] = ()


class BadValue:
    """Stands in for a JSON value FHIR cannot hold (a 5,000-digit number, NaN); ``why`` says what it was."""

    __slots__ = ("code", "why")

    def __init__(self, code: str, why: str) -> None:
        self.code = code
        self.why = why

    def __repr__(self) -> str:
        return f"<not a FHIR value: {self.why}>"


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        if len(pairs) == 1 and pairs[0][0] == _TOO_DEEP:
            marked = Marked()
            marked.marks = (("", "structure", _TOO_DEEP_TEXT),)
            return marked
        return obj
    marked = Marked(obj)
    repeated = [(name, n) for name, n in Counter(name for name, _ in pairs).items() if n > 1]
    marked.marks = tuple(
        (
            f".{name}" if is_text(name) else "",
            "structure",
            f"the name {name!r} appears {n} times in one object; FHIR JSON forbids repeated names "
            "(a reader would silently keep only the last value)",
        )
        for name, n in repeated
    )
    return marked


def _number(literal: str, kind: type[int] | type[float]) -> int | float | BadValue:
    if len(literal) > MAX_NUMBER_CHARS:
        return BadValue(
            "value",
            f"a number of {len(literal):,} characters ({literal[:12]}...); FHIR numbers have at most "
            f"{MAX_NUMBER_CHARS} (integer is 32-bit, decimal about 18 significant digits)",
        )
    value = kind(literal)
    if isinstance(value, float) and not math.isfinite(value):
        return BadValue("value", f"the number {literal} is out of range for a FHIR decimal")
    return value


def _int(literal: str) -> int | float | BadValue:
    return _number(literal, int)


def _float(literal: str) -> int | float | BadValue:
    return _number(literal, float)


def _constant(name: str) -> BadValue:
    return BadValue("structure", f"{name} is not JSON (Python's json reads it; FHIR has no such number)")


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant)


def _cut_deep(text: str) -> str:
    """``text`` with every container that opens deeper than MAX_DEPTH replaced by the placeholder object."""
    parts: list[str] = []
    depth = 0
    kept = 0  # text[:kept] is already in parts
    start = -1  # where the container being cut opened, -1 when none
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth == MAX_DEPTH + 1:
                start = match.start()
        elif token in ("]", "}"):
            if depth == MAX_DEPTH + 1 and start >= 0:
                parts += [text[kept:start], _PLACEHOLDER]
                kept, start = match.end(), -1
            depth -= 1
    if start >= 0:  # never closed: the document is broken anyway; the reparse will say where
        parts += [text[kept:start], _PLACEHOLDER]
        kept = len(text)
    parts.append(text[kept:])
    return "".join(parts)


def loads(text: str) -> Any:
    """Parse one JSON document, marking (not raising for) what FHIR forbids.

    Raises:
        ValueError: ``text`` is not JSON (a :class:`json.JSONDecodeError` with its line and column; when the
            document was too deep to parse directly, positions refer to it with its deepest parts cut).
    """
    try:
        return _DECODER.decode(text)
    except RecursionError:
        return _DECODER.decode(_cut_deep(text))


def is_text(value: str) -> bool:
    """True when ``value`` is Unicode text: no lone surrogates (which JSON ``\\ud800`` escapes produce).

    A lone surrogate is not a Unicode scalar value: it cannot be written as UTF-8, and Rust-backed tokenizers
    refuse it with a ``TypeError``. NUL and noncharacters (U+FFFE) are scalar values and are left to the model.
    """
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SCALARS = (str, int, float, bool, type(None))


def _name(key: Any) -> str:
    # A key that is not a FHIR name (a surrogate, a Python int key) is shown escaped: issues must stay text.
    return f".{key}" if isinstance(key, str) and is_text(key) else f".{key!a}"


def problems(value: Any, path: str, depth: int = 1) -> list[tuple[str, str, str]]:
    """Every mark under ``value`` and nesting beyond MAX_DEPTH, as ``(FHIRPath, issue code, what)``.

    Iterative, so a Python dict nested thousands deep is reported, not a ``RecursionError``; a container met
    twice (a shared or cyclic Python object) is examined once. At most MAX_PROBLEMS are returned.

    Args:
        value: a resource (or any JSON value) as parsed by :func:`loads` or given as Python objects.
        path: its FHIRPath, the prefix of the paths returned.
        depth: its nesting depth in the document (1 at the root).
    """
    found: list[tuple[str, str, str]] = []
    seen: set[int] = set()
    # (value, path) with the path as a linked (parent, part) chain, joined only for a problem.
    stack: list[tuple[Any, Any, int]] = [(value, (None, path), depth)]

    def where(chain: Any) -> str:
        parts: list[str] = []
        while chain is not None:
            chain, part = chain
            parts.append(part)
        return "".join(reversed(parts))

    while stack and len(found) < MAX_PROBLEMS:
        item, chain, level = stack.pop()
        if isinstance(item, _SCALARS):
            continue
        if isinstance(item, BadValue):
            found.append((where(chain), item.code, item.why))
            continue
        is_map = isinstance(item, Mapping)
        if not is_map and not isinstance(item, Sequence | set | frozenset):
            continue  # not JSON at all; the model validation reports it
        if id(item) in seen:
            continue
        seen.add(id(item))
        if level > MAX_DEPTH:
            found.append((where(chain), "structure", _TOO_DEEP_TEXT))
            continue
        if isinstance(item, Marked):
            found.extend((where(chain) + suffix, code, why) for suffix, code, why in item.marks)
        if is_map:
            children = [(v, (chain, _name(k))) for k, v in item.items() if not isinstance(v, _SCALARS)]
        else:
            children = [(v, (chain, f"[{i}]")) for i, v in enumerate(item) if not isinstance(v, _SCALARS)]
        stack.extend((v, c, level + 1) for v, c in reversed(children))
    return found[:MAX_PROBLEMS]
