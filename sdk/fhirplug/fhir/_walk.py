"""Parse FHIR input (JSON, a JSON array, NDJSON or objects) and walk it down to single resources.

Bundles of any type are opened, nested ones too; the Bundles themselves are containers and are not yielded.
Every problem is appended to the caller's issue list; nothing here raises for bad data.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhirplug.fhir.outcome import Issue, Severity

__all__ = ["Found", "Walk"]


@dataclass(frozen=True)
class Found:
    """One resource met in the input."""

    resource: dict[str, Any]
    #: ``ResourceType/id``, else the Bundle entry's fullUrl, else a fresh ``urn:uuid:``.
    reference: str
    #: FHIRPath of the resource in its input: ``Bundle.entry[3].resource``, or the resourceType at the top.
    path: str
    #: The input's name; ``name:line`` for NDJSON, ``name[i]`` for an item of a JSON array.
    source: str
    #: False only for a lone top-level resource; True inside a Bundle, a JSON array or NDJSON.
    in_collection: bool


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


class Walk:
    """One pass over one input. ``containers`` counts the Bundles, arrays and NDJSON files opened."""

    def __init__(self, source_name: str, issues: list[Issue]) -> None:
        self.source_name = source_name
        self.issues = issues
        self.containers = 0

    def _issue(self, severity: Severity, code: str, text: str, expression: str | None, source: str) -> None:
        self.issues.append(Issue(severity, code, text, (expression,) if expression else (), source))

    def run(self, data: bytes | str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Iterator[Found]:
        """Yield every resource in ``data``."""
        if isinstance(data, Mapping):
            yield from self._value(data, None, self.source_name, False, None)
        elif isinstance(data, bytes | bytearray | memoryview):
            yield from self._bytes(bytes(data))
        elif isinstance(data, str):
            yield from self._text(data)
        elif isinstance(data, Sequence):
            yield from self._array(data)
        else:
            self._issue("error", "structure", f"cannot read FHIR from {_kind(data)}", None, self.source_name)

    def _bytes(self, data: bytes) -> Iterator[Found]:
        try:
            # FHIR JSON is UTF-8; a byte order mark is tolerated, as most servers do.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self._issue(
                "error",
                "invalid",
                f"the input is not UTF-8 (byte 0x{data[exc.start]:02x} at byte offset {exc.start}); "
                "FHIR JSON must be UTF-8 encoded",
                None,
                self.source_name,
            )
            return
        yield from self._text(text)

    def _text(self, text: str) -> Iterator[Found]:
        if not text.strip():
            self._issue("error", "structure", "the input is empty", None, self.source_name)
            return
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            # NDJSON is many JSON documents, one a line: a parse error after the first line is expected then.
            lines = text.split("\n")
            parsed: list[tuple[int, Any]] = []
            bad: list[tuple[int, str]] = []
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    parsed.append((number, json.loads(line)))
                except (ValueError, RecursionError) as line_exc:
                    bad.append((number, str(line_exc)))
            good = sum(isinstance(v, Mapping) for _, v in parsed)
            # Half the lines or more being objects tells NDJSON from a broken pretty-printed document, whose
            # lines ("{", '"id": "x",') almost never parse on their own.
            if len(parsed) + len(bad) >= 2 and 2 * good >= len(parsed) + len(bad):
                yield from self._ndjson(parsed, bad)
                return
            self._issue("error", "structure", f"the input is not valid JSON or NDJSON: {exc}", None, self.source_name)
            return
        if isinstance(value, list):
            yield from self._array(value)
        else:
            yield from self._value(value, None, self.source_name, False, None)

    def _ndjson(self, parsed: list[tuple[int, Any]], bad: list[tuple[int, str]]) -> Iterator[Found]:
        self.containers += 1
        for number, error in bad:
            self._issue(
                "error",
                "structure",
                f"line {number} is not valid JSON: {error}",
                None,
                f"{self.source_name}:{number}",
            )
        for number, value in parsed:
            yield from self._value(value, None, f"{self.source_name}:{number}", True, None)

    def _array(self, items: Sequence[Any]) -> Iterator[Found]:
        self.containers += 1
        for i, item in enumerate(items):
            yield from self._value(item, None, f"{self.source_name}[{i}]", True, None)

    def _value(
        self, value: Any, path: str | None, source: str, in_collection: bool, full_url: str | None
    ) -> Iterator[Found]:
        if not isinstance(value, Mapping):
            self._issue(
                "error",
                "structure",
                f"expected a FHIR resource (a JSON object), got {_kind(value)}",
                path,
                source,
            )
            return
        rt = value.get("resourceType")
        if not isinstance(rt, str) or not rt:
            self._issue("error", "required", "the resource has no resourceType", path, source)
            return
        here = path or rt
        if rt == "Bundle":
            yield from self._bundle(value, here, source)
            return
        rid = value.get("id")
        if isinstance(rid, str) and rid:
            reference = f"{rt}/{rid}"
        elif full_url:
            reference = full_url
        else:
            reference = f"urn:uuid:{uuid.uuid4()}"
        yield Found(dict(value), reference, here, source, in_collection)

    def _bundle(self, bundle: Mapping[str, Any], path: str, source: str) -> Iterator[Found]:
        self.containers += 1
        entries = bundle.get("entry", [])
        if not isinstance(entries, list):
            self._issue("error", "structure", f"Bundle.entry must be an array, got {_kind(entries)}", path, source)
            return
        for i, entry in enumerate(entries):
            here = f"{path}.entry[{i}]"
            if not isinstance(entry, Mapping):
                self._issue(
                    "error",
                    "structure",
                    f"a Bundle entry must be an object, got {_kind(entry)}",
                    here,
                    source,
                )
                continue
            resource = entry.get("resource")
            if resource is None:  # request-only (DELETE, GET) and response entries carry no resource
                continue
            full_url = entry.get("fullUrl")
            yield from self._value(
                resource, f"{here}.resource", source, True, full_url if isinstance(full_url, str) else None
            )
