"""Decode one FHIR Attachment (inline base64 ``data`` + ``contentType``) into text, reporting each problem.

The charset is looked up in an allow-list, never handed to :func:`codecs.lookup`: Python's codec registry also
holds codecs that are not text encodings at all (``undefined`` raises on use, ``punycode``, ``idna``,
``unicode_escape`` and ``raw_unicode_escape`` interpret their input as escapes and yield lone surrogates,
``rot13``/``base64``/``zlib``/``hex``/``bz2``/``uu``/``quopri`` are transforms, ``mbcs``/``oem`` exist on
Windows only). The allow-list is the WHATWG Encoding Standard's labels (https://encoding.spec.whatwg.org/),
the set of encodings real text is found in, matched as WHATWG does (ASCII whitespace trimmed, case folded).

Deliberate differences from WHATWG, because a FHIR ``contentType`` is a MIME type whose charset names an IANA
character set, not a browser's guess: ``us-ascii``/``ascii`` decode as ASCII and ``iso-8859-1``/``latin1`` as
ISO-8859-1 (``iso-8859-9`` as ISO-8859-9), not as windows-1252/1254; bytes outside them are an error to fix,
not silently different text. ``utf-7`` is refused (WHATWG and HTML forbid it: it smuggles markup past
filters as ``+ADw-script+AD4-`` and Python's decoder yields lone surrogates), and so are WHATWG's
"replacement" labels (``iso-2022-kr``, ``hz-gb-2312``...) and ``x-user-defined``. UTF-32 is not in WHATWG and
is not read.
"""

from __future__ import annotations

import base64
import binascii
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhirplug.fhir._html import html_to_text
from fhirplug.fhir._json import is_text
from fhirplug.fhir.outcome import Issue

__all__ = ["CHARSETS", "DecodedText", "decode_attachment", "not_text", "too_long"]

# WHATWG encoding name -> (Python codec, its WHATWG labels). GBK labels decode as gb18030, Big5 as big5hkscs,
# Shift_JIS as cp932 and EUC-KR as cp949: the supersets WHATWG's decoders implement. "utf-16" honours a byte
# order mark and is little-endian without one, as WHATWG decodes it.
_ENCODINGS: dict[str, tuple[str, str]] = {
    "UTF-8": ("utf-8", "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8"),
    "IBM866": ("cp866", "866 cp866 csibm866 ibm866"),
    "ISO-8859-1": ("latin-1", "cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 iso8859-1 iso88591 iso_8859-1 l1 latin1"),
    "US-ASCII": ("ascii", "ansi_x3.4-1968 ascii us-ascii"),
    "ISO-8859-2": ("iso8859_2", "csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2 l2 latin2"),
    "ISO-8859-3": ("iso8859_3", "csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3 l3 latin3"),
    "ISO-8859-4": ("iso8859_4", "csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4 l4 latin4"),
    "ISO-8859-5": ("iso8859_5", "csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595 iso_8859-5"),
    "ISO-8859-6": (
        "iso8859_6",
        "arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114 iso-8859-6 iso-8859-6-e iso-8859-6-i "
        "iso-ir-127 iso8859-6 iso88596 iso_8859-6",
    ),
    "ISO-8859-7": (
        "iso8859_7",
        "csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 iso8859-7 iso88597 iso_8859-7 "
        "sun_eu_greek",
    ),
    "ISO-8859-8": (
        "iso8859_8",
        "csiso88598e csisolatinhebrew hebrew iso-8859-8 iso-8859-8-e iso-ir-138 iso8859-8 iso88598 iso_8859-8 "
        "visual csiso88598i iso-8859-8-i logical",
    ),
    "ISO-8859-9": ("iso8859_9", "csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9 l5 latin5"),
    "ISO-8859-10": ("iso8859_10", "csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6"),
    "ISO-8859-13": ("iso8859_13", "iso-8859-13 iso8859-13 iso885913"),
    "ISO-8859-14": ("iso8859_14", "iso-8859-14 iso8859-14 iso885914"),
    "ISO-8859-15": ("iso8859_15", "csisolatin9 iso-8859-15 iso8859-15 iso885915 iso_8859-15 l9"),
    "ISO-8859-16": ("iso8859_16", "iso-8859-16"),
    "KOI8-R": ("koi8_r", "cskoi8r koi koi8 koi8-r koi8_r"),
    "KOI8-U": ("koi8_u", "koi8-ru koi8-u"),
    "macintosh": ("mac_roman", "csmacintosh mac macintosh x-mac-roman"),
    "x-mac-cyrillic": ("mac_cyrillic", "x-mac-cyrillic x-mac-ukrainian"),
    "windows-874": ("cp874", "dos-874 iso-8859-11 iso8859-11 iso885911 tis-620 windows-874"),
    **{f"windows-{n}": (f"cp{n}", f"cp{n} windows-{n} x-cp{n}") for n in range(1250, 1259)},
    "GBK": ("gb18030", "chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk"),
    "gb18030": ("gb18030", "gb18030"),
    "Big5": ("big5hkscs", "big5 big5-hkscs cn-big5 csbig5 x-x-big5"),
    "EUC-JP": ("euc_jp", "cseucpkdfmtjapanese euc-jp x-euc-jp"),
    "ISO-2022-JP": ("iso2022_jp", "csiso2022jp iso-2022-jp"),
    "Shift_JIS": ("cp932", "csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis"),
    "EUC-KR": (
        "cp949",
        "cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 ksc5601 ksc_5601 windows-949",
    ),
    "UTF-16": ("utf-16", "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16"),
    "UTF-16LE": ("utf-16-le", "utf-16le"),
    "UTF-16BE": ("utf-16-be", "unicodefffe utf-16be"),
}
# WHATWG labels with a colon (iso_8859-1:1987 ...) are kept out of the strings above to stay readable.
_DATED = {
    "iso_8859-1:1987": "latin-1",
    "iso_8859-2:1987": "iso8859_2",
    "iso_8859-3:1988": "iso8859_3",
    "iso_8859-4:1988": "iso8859_4",
    "iso_8859-5:1988": "iso8859_5",
    "iso_8859-6:1987": "iso8859_6",
    "iso_8859-7:1987": "iso8859_7",
    "iso_8859-8:1988": "iso8859_8",
    "iso_8859-9:1989": "iso8859_9",
}
#: Every charset label read (lower case) -> the Python codec that decodes it.
CHARSETS: dict[str, str] = {
    **{label: codec for codec, labels in _ENCODINGS.values() for label in labels.split()},
    **_DATED,
}

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
        "Split the note, or raise the limit: load_plugin(..., budget=Budget(max_chars=N)) or --max-chars N "
        "(read_fhir(..., max_chars=N))",
        (expression,),
    )


def not_text(text: str, expression: str) -> Issue:
    """The issue for text holding a lone surrogate, which is not Unicode and no tokenizer takes."""
    at = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)
    return Issue(
        "error",
        "invalid",
        f"the text is not valid Unicode: a lone surrogate U+{ord(text[at]):04X} at character {at} (a JSON "
        "\\ud800-style escape or a decoder that yields one); it was not read. Send the text as UTF-8",
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

    # WHATWG label matching: ASCII whitespace trimmed, ASCII case folded.
    charset = params.get("charset", "").strip(" \t\n\f\r") or "utf-8"
    codec = CHARSETS.get(charset.lower())
    if codec is None:
        issues.append(
            Issue(
                "error",
                "not-supported",
                f"charset {charset!a:.80} in contentType {declared!a:.120} is not a text encoding read here; use "
                f"one of {', '.join(_ENCODINGS)} (WHATWG Encoding Standard labels such as utf-8, iso-8859-1, "
                "windows-1252, shift_jis)",
                (f"{expression}.contentType",),
            )
        )
        return None, issues

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

    # A UTF-8 byte order mark is not text: dropped before decoding (not by utf-8-sig, whose error offsets would
    # count from after it), so an error names the byte and offset of the data as sent.
    skipped = 3 if codec == "utf-8" and raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        original = raw[skipped:].decode(codec)
        if codec in ("utf-16-le", "utf-16-be"):
            original = original.removeprefix("\ufeff")  # a byte order mark, as for UTF-8
    except UnicodeDecodeError as exc:
        at = exc.start + skipped
        issues.append(
            Issue(
                "error",
                "invalid",
                f"attachment bytes are not valid {charset}: byte 0x{raw[at]:02x} at byte offset "
                f"{at} ({exc.reason}); fix the data or declare its real charset in contentType",
                (f"{expression}.data",),
            )
        )
        return None, issues
    if len(original) > max_chars:
        issues.append(too_long(len(original), max_chars, expression))
        return None, issues
    if not is_text(original):  # no allow-listed codec yields one today; the tokenizer must never meet one
        issues.append(not_text(original, f"{expression}.data"))
        return None, issues
    if is_html:
        text, offsets, ends = html_to_text(original, xhtml=mime == "application/xhtml+xml")
        return DecodedText(text, original, offsets, ends), issues
    return DecodedText(original, original, None, None), issues
