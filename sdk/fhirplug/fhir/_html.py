"""HTML to plain text with a character map back to the HTML, for attachments of type text/html.

A small scanner instead of :class:`html.parser.HTMLParser`: the parser reports (line, column) positions and
decodes entities inside text runs, which loses the exact offsets the evidence spans need.
"""

from __future__ import annotations

import html
import re
from array import array

__all__ = ["html_to_text"]

# Tags whose start or end separates words: each becomes one newline (td/th a space) mapped to the tag's '<'.
_BLOCK = frozenset(
    {
        *("address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "figure"),
        *(
            "footer",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "header",
            "hr",
            "li",
            "main",
            "nav",
            "ol",
            "p",
            "pre",
        ),
        *("section", "table", "tbody", "thead", "tfoot", "tr", "ul"),
    }
)
_CELL = frozenset({"td", "th"})
# Their content is code or styling, never text a reader sees.
_DROP = frozenset({"script", "style"})

_TOKEN = re.compile(
    r"""<!--.*?(?:-->|\Z)                                 # comment, possibly unterminated
      | <[!?][^>]*>                                       # doctype, CDATA, processing instruction
      | <(/?)([A-Za-z][A-Za-z0-9]*)(?:"[^"]*"|'[^']*'|[^'">])*>  # a tag; a quoted attribute may hold '>'
      | &(?:\#[0-9]{1,7};?|\#[xX][0-9A-Fa-f]{1,6};?|[A-Za-z][A-Za-z0-9]{1,31};)  # character reference
    """,
    re.DOTALL | re.VERBOSE,
)


def html_to_text(markup: str) -> tuple[str, array[int], array[int]]:
    """Strip tags, drop script/style content and decode character references.

    Args:
        markup: the decoded HTML document or fragment.

    Returns:
        ``(text, offsets, ends)``: ``text[i]`` comes from ``markup[offsets[i]:ends[i]]``. A character that
        stands for a tag (a newline for a block tag) comes from the whole tag; a character a character
        reference decodes to comes from the whole reference (``&eacute;``).
    """
    parts: list[str] = []
    offsets: array[int] = array("q")
    ends: array[int] = array("q")
    pos = 0
    last = "\n"  # so that a leading block tag adds no blank line

    def emit(chunk: str, start: int, end: int | None = None) -> None:
        nonlocal last
        parts.append(chunk)
        if end is None:  # copied as is: one character each
            offsets.extend(range(start, start + len(chunk)))
            ends.extend(range(start + 1, start + len(chunk) + 1))
        else:
            offsets.extend([start] * len(chunk))
            ends.extend([end] * len(chunk))
        last = chunk[-1]

    while (match := _TOKEN.search(markup, pos)) is not None:
        start = match.start()
        if start > pos:
            emit(markup[pos:start], pos)
        pos = match.end()
        token = match.group(0)
        name = match.group(2)
        if token[0] == "&":
            decoded = html.unescape(token)
            if decoded == token:  # not a known reference (&bogus;): it is text
                emit(token, start)
            else:
                emit(decoded.replace("\xa0", " "), start, pos)
        elif name is not None:
            lower = name.lower()
            if lower in _DROP and not match.group(1) and not token.endswith("/>"):
                close = re.compile(rf"</{lower}\s*>", re.IGNORECASE).search(markup, pos)
                pos = close.end() if close else len(markup)
            elif lower in _BLOCK and last != "\n":
                emit("\n", start, pos)
            elif lower in _CELL and not last.isspace():
                emit(" ", start, pos)
    if pos < len(markup):
        emit(markup[pos:], pos)
    return "".join(parts), offsets, ends
