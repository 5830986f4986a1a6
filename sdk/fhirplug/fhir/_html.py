"""HTML to plain text with a character map back to the HTML, for attachments of type text/html.

What counts as text follows the HTML5 tokenizer (WHATWG HTML, "Tokenization"), so a note reads the way a
browser shows it:

- Tags are dropped; an unterminated tag at the end (``<a href="x``) is dropped too (eof-in-tag). A ``<`` not
  followed by an ASCII letter, ``/``, ``!`` or ``?`` is text. A quoted attribute value may hold ``>``; a quote
  only opens a value right after ``=``.
- Comments run from ``<!--`` to the first ``-->`` or ``--!>``; ``<!-->`` and ``<!--->`` close at once; an
  unterminated comment runs to the end. ``<!DOCTYPE ...>``, ``<![CDATA[...]]>``, ``<?...>``, ``</ ...>`` and
  other ``<!...>`` are bogus comments that end at the first ``>``. ``</>`` is dropped.
- ``script`` (with the script-data escape rules: inside ``<!-- <script>`` a ``</script>`` does not end it),
  ``style``, ``iframe``, ``noembed`` and ``noframes`` are raw text and dropped: nothing in them is markup up to
  the matching end tag, ``</name`` followed by whitespace, ``/`` or ``>``, which may carry attributes.
- ``title`` is RCDATA and dropped (a heading for the browser tab, not body text); ``textarea`` is RCDATA and kept:
  tags in it are text, character references are decoded. ``xmp`` is raw text and kept verbatim;
  ``plaintext`` makes the rest of the input verbatim text.
- ``template`` content is dropped (nested ones too): it is an inert fragment no reader sees. ``<head>`` is not
  dropped as a whole: HTML5 moves text found in the head into the body, and what the head legitimately holds
  (title, style, script) is dropped above. ``noscript`` is kept: this reader runs no scripts.
- Character references are decoded in text and in textarea: numeric ones with or without ``;`` (0, surrogates
  and values past U+10FFFF become U+FFFD; 0x80-0x9F go through the Windows-1252 table), named ones by the longest
  prefix in the HTML5 table (``&notit;`` is ``¬it;``; ``&amp`` and ``&nbsp`` decode without ``;``). A no-break
  space a reference decodes to becomes a plain space. An unknown reference is text.
- Tree-building rules that matter for text: a newline right after ``<pre>``, ``<listing>`` or ``<textarea>`` is
  dropped; a self-closing ``/>`` on ``script``, ``style``, ``title`` ... is ignored, as browsers ignore it.
- Block tags (start or end) become one newline and ``td``/``th`` a space, mapped to the whole tag.

Known limits: SVG/MathML content is tokenized as HTML (a CDATA section there is text to a browser, a bogus
comment here); carriage returns and NUL characters are copied as they are, not normalized.

Why the time is linear in ``len(markup)`` (quadratic scans froze a server thread per request before):

1. Two indices only move forward: ``done`` (everything before it is emitted or dropped) and ``scan``. Each round
   of the main loop is one search of ``_markup()`` from ``scan``. Every alternative of that pattern reads a
   bounded number of characters from where it starts (a ``<`` and one more, or a reference: at most 32
   characters walked down a trie of the HTML5 names, whose branches at each node begin with different
   characters, so nothing backtracks further than that), and the next round starts past the hit.
2. At a hit the work is proportional to what is consumed. A tag is one anchored match of ``_TAG``: its name is
   possessive and its attribute loop possessive (``*+``) over atomic pieces, so every character is taken by one
   piece, and the only backtracking is over a run of spaces before a ``=`` that does not come, which the next
   piece then takes. The loop can only stop at ``>`` or at the end of the input, so a failed match means
   eof-in-tag and the function ends: the rest of the input is never scanned again.
3. Comments, bogus comments, raw text, RCDATA and script data are forward searches for short fixed patterns
   from just past what was consumed (a script-data escape restarts two characters back, a constant); a miss
   means the construct runs to the end of the input and the function ends.
4. A numeric reference consumes all its digits, which then belong to it, and reads its value from at most 8
   significant digits, so a million-digit reference costs one scan, not a big-integer conversion.

So each character is looked at a bounded number of times, and the output arrays grow by one entry per output
character.
"""

from __future__ import annotations

import re
from array import array
from functools import cache
from html.entities import html5
from typing import Any

__all__ = ["html_to_text"]

# Tags whose start or end separates words: each becomes one newline (td/th a space) mapped to the whole tag.
_BLOCK = frozenset(
    """address article aside blockquote br caption center dd details dialog div dl dt fieldset figcaption figure
    footer form h1 h2 h3 h4 h5 h6 header hr legend li listing main menu nav ol p plaintext pre search section
    summary table tbody tfoot thead tr ul xmp""".split()  # noqa: SIM905 - a word list reads better than 46 quotes
)
_CELL = frozenset({"td", "th"})
# Raw text whose content is code, styling or fallback for features every browser has: never shown.
_RAWTEXT_DROPPED = frozenset({"style", "iframe", "noembed", "noframes"})
# A newline right after these start tags is not content (HTML5 tree construction).
_LEADING_NEWLINE = frozenset({"pre", "listing", "textarea"})
# Start tags after which the tokenizer leaves the data state (raw text, RCDATA, script data).
_CONTENT = frozenset({"script", "title", "textarea", "xmp", *_RAWTEXT_DROPPED})
# What ends a tag name: HTML whitespace (with carriage return, as the input is not CR-normalized), '/' or '>'.
_SEPARATOR = "[\t\n\f\r />]"


def _trie(words: list[str]) -> str:
    """A regex matching the longest of ``words`` that starts at a position, in bounded steps.

    Each node's branches begin with different characters, so at most one is followed; a word that is a prefix
    of others makes the rest optional, and greedy matching takes the longest.
    """
    root: dict[str, dict[str, Any]] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(root)


@cache
def _reference() -> str:
    """What starts a character reference that decodes: a numeric one, or a name of the HTML5 table.

    The name is matched against all 2,231 names at once (longest prefix, so ``&notit;`` finds ``not``), so an
    ``&`` that starts no reference is skipped inside the regex engine. Built on first use (about 0.1 s).
    """
    return rf"&(?:(?P<name>{_trie(list(html5))})|(?P<numeric>\#)(?=[0-9]|[xX][0-9A-Fa-f]))"


@cache
def _markup() -> re.Pattern[str]:
    # What can start markup: a '<' that opens a tag, end tag, comment or bogus comment, or a reference. Anything
    # else ('<' before a digit, '&' before a space or an unknown name) is text and is never stopped at.
    return re.compile(rf"<(?P<start>[A-Za-z])|</(?P<end>[A-Za-z])|<(?P<other>[!?/])|{_reference()}")


@cache
def _rcdata_stop(name: str) -> re.Pattern[str]:
    # Case-insensitive for the end tag only: the names of references are case-sensitive.
    return re.compile(rf"{_reference()}|(?i:</{name}){_SEPARATOR}", re.ASCII)


@cache
def _end_tag(name: str) -> re.Pattern[str]:
    # re.ASCII: HTML lowercases ASCII only; Unicode case folding would let '</ſtyle>' (long s) close <style>.
    return re.compile(rf"</{name}{_SEPARATOR}", re.IGNORECASE | re.ASCII)


# A tag from its name to its '>'. The name is possessive and the attribute loop possessive over atomic pieces
# (see the module docstring). A quote opens a value only right after '='; an unclosed quoted value runs to the
# end of the input (\Z), where the missing '>' fails the match.
_TAG = re.compile(
    r"""([A-Za-z][^\t\n\f\r />]*+)
        (?:
          [\t\n\f\r /]+
        | (?>[^\t\n\f\r />][^\t\n\f\r />=]*
             (?:[\t\n\f\r ]*=[\t\n\f\r ]*(?:"[^"]*(?:"|\Z)|'[^']*(?:'|\Z)|[^\t\n\f\r >]*))?)
        )*+>""",
    re.VERBOSE,
)
_COMMENT_END = re.compile(r"--!?>")
# Script data (HTML5 13.2.5.4 and the escaped states): '<!--' enters the escaped state, where '<script' enters
# the double-escaped one; there '</script' leads back, and '-->' returns to plain script data.
_SCRIPT_DATA = re.compile(rf"<!--|</script{_SEPARATOR}", re.IGNORECASE | re.ASCII)
_SCRIPT_ESCAPED = re.compile(rf"-->|</script{_SEPARATOR}|<script{_SEPARATOR}", re.IGNORECASE | re.ASCII)
_SCRIPT_DOUBLE_ESCAPED = re.compile(rf"-->|</script{_SEPARATOR}", re.IGNORECASE | re.ASCII)

_NUMERIC = re.compile(r"&\#(?:[xX]([0-9A-Fa-f]+)|([0-9]+));?")
# Numeric references to C1 controls mean what Windows-1252 puts there (HTML5 "numeric character reference end");
# the five codes Windows-1252 leaves undefined stay as they are.
_WINDOWS_1252 = {code: char for code in range(0x80, 0xA0) if (char := bytes([code]).decode("cp1252", "ignore"))}


class _Text:
    """The text being built and, per character, the span of the markup it comes from."""

    __slots__ = ("ends", "last", "markup", "offsets", "parts")

    def __init__(self, markup: str) -> None:
        self.markup = markup
        self.parts: list[str] = []
        self.offsets: array[int] = array("q")
        self.ends: array[int] = array("q")
        self.last = "\n"  # so that a leading block tag adds no blank line

    def copy(self, start: int, stop: int) -> None:
        """Copy ``markup[start:stop]`` as is: each character comes from itself."""
        if start < stop:
            self.parts.append(self.markup[start:stop])
            self.offsets.extend(range(start, stop))
            self.ends.extend(range(start + 1, stop + 1))
            self.last = self.markup[stop - 1]

    def put(self, chars: str, start: int, stop: int) -> None:
        """Add ``chars``, each coming from the whole of ``markup[start:stop]`` (a reference or a tag)."""
        self.parts.append(chars)
        if len(chars) == 1:  # nearly always; append is cheaper than building a list
            self.offsets.append(start)
            self.ends.append(stop)
        else:
            self.offsets.extend([start] * len(chars))
            self.ends.extend([stop] * len(chars))
        self.last = chars[-1]

    def separate(self, name: str, start: int, stop: int) -> None:
        """Add the word break a block or cell tag stands for, unless one is already there."""
        if name in _BLOCK:
            if self.last != "\n":
                self.put("\n", start, stop)
        elif name in _CELL and not self.last.isspace():
            self.put(" ", start, stop)


def _decode(markup: str, hit: re.Match[str]) -> tuple[str, int]:
    """The characters and end of the reference found by ``hit`` (a name, or the ``&#`` of a numeric one)."""
    name = hit.group("name")
    if name is not None:
        return html5[name].replace("\xa0", " "), hit.end()
    numeric = _NUMERIC.match(markup, hit.start())
    if numeric is None:  # pragma: no cover - _reference() only stops at '&#' before a digit
        raise AssertionError(hit)
    hexadecimal, decimal = numeric.groups()
    digits = (hexadecimal or decimal).lstrip("0")
    # More than 8 significant digits is past U+10FFFF in either base: no big-integer conversion needed.
    code = int(digits or "0", 16 if hexadecimal else 10) if len(digits) <= 8 else 0x110000
    invalid = code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF
    chars = "\ufffd" if invalid else _WINDOWS_1252.get(code) or chr(code)
    return chars.replace("\xa0", " "), numeric.end()


def _bogus_comment_end(markup: str, start: int) -> int:
    close = markup.find(">", start)
    return len(markup) if close < 0 else close + 1


def _declaration_end(markup: str, at: int) -> int:
    """End of the comment or bogus comment opened by ``<!`` at ``at``."""
    if not markup.startswith("--", at + 2):
        return _bogus_comment_end(markup, at + 2)  # <!DOCTYPE>, <![CDATA[...]]> in HTML content, <!x>
    content = at + 4
    if markup.startswith(">", content):  # <!--> : abrupt closing of an empty comment
        return content + 1
    if markup.startswith("->", content):  # <!--->
        return content + 2
    close = _COMMENT_END.search(markup, content)
    return close.end() if close else len(markup)


def _script_end(markup: str, start: int) -> int:
    """Where the ``</script`` end tag of script data starting at ``start`` begins (the end if none)."""
    state, pos = _SCRIPT_DATA, start
    while (hit := state.search(markup, pos)) is not None:
        token = hit.group()
        if token[1] == "/":  # </script + separator
            if state is not _SCRIPT_DOUBLE_ESCAPED:
                return hit.start()
            state, pos = _SCRIPT_ESCAPED, hit.end()
        elif token == "<!--":
            # Its own dashes count towards '-->': '<!-->' goes straight back to script data.
            state, pos = _SCRIPT_ESCAPED, hit.start() + 2
        elif token == "-->":
            state, pos = _SCRIPT_DATA, hit.end()
        else:  # <script + separator inside the escaped state
            state, pos = _SCRIPT_DOUBLE_ESCAPED, hit.end()
    return len(markup)


def _textarea_end(markup: str, start: int, out: _Text | None) -> int:
    """Copy (into ``out``, unless None) the RCDATA of a textarea; return where its end tag begins."""
    if out is None:
        close = _end_tag("textarea").search(markup, start)
        return close.start() if close else len(markup)
    stop = _rcdata_stop("textarea")
    scan = start
    while (hit := stop.search(markup, scan)) is not None:
        at = hit.start()
        if markup[at] == "<":
            out.copy(scan, at)
            return at
        chars, done = _decode(markup, hit)
        out.copy(scan, at)
        out.put(chars, at, done)
        scan = done
    out.copy(scan, len(markup))
    return len(markup)


def _content_end(markup: str, name: str, start: int, out: _Text | None) -> int:
    """After the start tag ``name`` ending at ``start``: where tokenizing as markup resumes.

    Raw text and RCDATA run to their end tag, whose ``<`` is returned so that the caller handles that tag;
    what is kept of them goes to ``out`` (None: inside a template, nothing is kept).
    """
    if name == "script":
        return _script_end(markup, start)
    if name in _RAWTEXT_DROPPED or name == "title" or name == "xmp":
        close = _end_tag(name).search(markup, start)
        end = close.start() if close else len(markup)
        if name == "xmp" and out is not None:
            out.copy(start, end)
        return end
    if name == "textarea":
        return _textarea_end(markup, start, out)
    return start


def html_to_text(markup: str, *, xhtml: bool = False) -> tuple[str, array[int], array[int]]:
    """Strip tags, drop what a reader does not see and decode character references, as HTML5 does.

    Args:
        markup: the decoded HTML document or fragment.
        xhtml: the markup is XHTML (``application/xhtml+xml``), where ``<script/>`` or ``<title/>`` is an empty
            element: a self-closing start tag then opens no raw text, RCDATA or script data (HTML ignores the
            ``/``, and would swallow the rest of the note).

    Returns:
        ``(text, offsets, ends)``: ``text[i]`` comes from ``markup[offsets[i]:ends[i]]``. A copied character
        comes from itself; a character that stands for a tag (a newline for a block tag) comes from the whole
        tag; a character a reference decodes to comes from the whole reference (``&eacute;``). Both arrays are
        non-decreasing. Time and memory are linear in ``len(markup)``.
    """
    out = _Text(markup)
    n = len(markup)
    done = scan = 0  # markup[:done] is emitted or dropped; the next search starts at scan
    inert = 0  # depth of open <template> elements: their content is dropped
    search, tag_at = _markup().search, _TAG.match
    while (hit := search(markup, scan)) is not None:
        at = hit.start()
        if not inert:
            out.copy(done, at)
        done = at
        kind = hit.lastgroup
        if kind == "start" or kind == "end":
            tag = tag_at(markup, hit.end() - 1)
            if tag is None:  # eof-in-tag: the tag is dropped, and so is the rest
                done = n
                break
            done = scan = tag.end()
            name = tag.group(1)
            # Only ASCII letters fold: the Kelvin sign must not make a known tag name.
            name = name.lower() if name.isascii() else name
            if name == "template":
                inert = inert + 1 if kind == "start" else max(inert - 1, 0)
            elif not inert:
                out.separate(name, at, done)
            if kind == "end":
                continue
            if name == "plaintext":
                break  # the rest is text
            if name in _LEADING_NEWLINE:
                if markup.startswith("\r\n", done):
                    done += 2
                elif markup.startswith(("\n", "\r"), done):
                    done += 1
            if name in _CONTENT and not (xhtml and markup[done - 2 : done] == "/>"):
                done = _content_end(markup, name, done, None if inert else out)
            scan = done
        elif kind == "other":
            second = markup[at + 1]
            if second == "!":
                done = scan = _declaration_end(markup, at)
            elif second == "?":
                done = scan = _bogus_comment_end(markup, at + 2)
            elif at + 2 == n:  # '</' at the end is text
                scan = n
            elif markup[at + 2] == ">":  # '</>' is dropped
                done = scan = at + 3
            else:  # '</' before anything but a letter or '>'
                done = scan = _bogus_comment_end(markup, at + 2)
        else:
            chars, done = _decode(markup, hit)
            if not inert:
                out.put(chars, at, done)
            scan = done
    if not inert:
        out.copy(done, n)
    return "".join(out.parts), out.offsets, out.ends
