"""Decode one FHIR Attachment (inline base64 ``data`` + ``contentType``) into text, reporting each problem."""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhirplug.fhir._html import html_to_text
from fhirplug.fhir.outcome import Issue

__all__ = ["DecodedText", "decode_attachment", "too_long"]

_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# text/* that is markup for a word processor, not prose: reading it raw would feed the model control words.
_NOT_PROSE = frozenset({"text/rtf"})
_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")
_BASE64_ALPHABET = re.compile(r"[^A-Za-z0-9+/=]")


@dataclass(frozen=True)
class DecodedText:
    text: str
    original: str
    offsets: array[int] | None
    ends: array[int] | None


def too_long(chars: int, max_chars: int, expression: str, *, data_bytes: int | None = None) -> Issue:
    """The too-costly issue for a text longer than ``max_chars`` (``data_bytes``: known only as bytes)."""
    size = f"{data_bytes:,} bytes of data (at least {chars:,} characters)" if data_bytes else f"{chars:,} characters"
    return Issue(
        "error",
        "too-costly",
        f"the text is too long: {size}, more than the limit of {max_chars:,} characters; it was not read. "
        "Split the note, or raise the limit (load_plugin(..., max_chars=N) / read_fhir(..., max_chars=N))",
        (expression,),
    )


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    mime, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        key, sep, val = item.partition("=")
        if sep:
            params[key.strip().lower()] = val.strip().strip('"').strip()
    return mime.strip().lower(), params


def decode_attachment(
    attachment: Mapping[str, Any], expression: str, max_chars: int
) -> tuple[DecodedText | None, list[Issue]]:
    """Decode an Attachment's inline text.

    Args:
        attachment: the Attachment JSON object.
        expression: FHIRPath of the attachment, for issues (``....content[0].attachment``).
        max_chars: longest text accepted.

    Returns:
        ``(decoded, issues)``; ``decoded`` is None when nothing could be read.
    """
    data = attachment.get("data")
    declared = attachment.get("contentType")
    if data is None:
        url = attachment.get("url")
        if isinstance(url, str):
            return None, [
                Issue(
                    "warning",
                    "not-supported",
                    f"attachment is given by url ({url}) and is not fetched; inline the text as base64 data",
                    (f"{expression}.url",),
                )
            ]
        return None, [Issue("warning", "required", "attachment has neither data nor url", (expression,))]
    if not isinstance(data, str):
        return None, [Issue("error", "structure", "attachment data must be a base64 string", (f"{expression}.data",))]

    issues: list[Issue] = []
    if isinstance(declared, str) and declared.strip():
        mime, params = _content_type(declared)
    else:
        # att-1 says contentType SHALL accompany data; plain UTF-8 text is the only safe guess.
        mime, params = "text/plain", {}
        issues.append(
            Issue(
                "warning",
                "required",
                "attachment has data but no contentType; it was read as text/plain; charset=utf-8",
                (f"{expression}.contentType",),
            )
        )
    is_html = mime in _HTML_TYPES
    if not (is_html or mime.startswith("text/")) or mime in _NOT_PROSE:
        issues.append(
            Issue(
                "warning",
                "not-supported",
                f"contentType {declared!r} is not text; only text/plain and text/html attachments are read",
                (f"{expression}.contentType",),
            )
        )
        return None, issues

    charset = params.get("charset", "utf-8") or "utf-8"
    try:
        codec = codecs.lookup(charset).name
        # Rejects bytes-to-bytes codecs ("base64", "zlib"); b"" would not, it is never looked up.
        b"a".decode(codec)
    except LookupError:
        issues.append(
            Issue(
                "error",
                "not-supported",
                f"unknown charset {charset!r} in contentType {declared!r}; use a standard name such as utf-8 "
                "or ISO-8859-1",
                (f"{expression}.contentType",),
            )
        )
        return None, issues
    except UnicodeDecodeError:
        pass  # a text codec that needs more than one byte (utf-16, utf-32)

    clean = data.translate(_WHITESPACE)
    # No charset in use spends over 4 bytes a character: a larger payload cannot fit, so it is not decoded.
    approx_bytes = len(clean) // 4 * 3 - clean[-2:].count("=")
    if approx_bytes > 4 * max_chars + 4:
        issues.append(too_long(approx_bytes // 4, max_chars, expression, data_bytes=approx_bytes))
        return None, issues
    try:
        raw = base64.b64decode(clean, validate=True)
    except (binascii.Error, ValueError) as exc:
        bad = _BASE64_ALPHABET.search(clean)
        where = f"character {bad.group(0)!r} at offset {bad.start()}" if bad else str(exc)
        issues.append(
            Issue("error", "invalid", f"attachment data is not valid base64: {where}", (f"{expression}.data",))
        )
        return None, issues

    try:
        # A UTF-8 byte order mark is not text; utf-8-sig drops it.
        original = raw.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as exc:
        issues.append(
            Issue(
                "error",
                "invalid",
                f"attachment bytes are not valid {charset}: byte 0x{raw[exc.start]:02x} at byte offset "
                f"{exc.start} ({exc.reason}); fix the data or declare its real charset in contentType",
                (f"{expression}.data",),
            )
        )
        return None, issues
    if len(original) > max_chars:
        issues.append(too_long(len(original), max_chars, expression))
        return None, issues
    if is_html:
        text, offsets, ends = html_to_text(original)
        return DecodedText(text, original, offsets, ends), issues
    return DecodedText(original, original, None, None), issues
