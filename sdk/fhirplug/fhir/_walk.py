"""Parse FHIR input (JSON, a JSON array, NDJSON or objects) and walk it down to single resources.

Bundles of any type are opened, nested ones too; the Bundles themselves are containers and are not yielded.
Every problem is appended to the caller's issue list; nothing here raises for bad data.

JSON is parsed by :mod:`fhirplug.fhir._json`, which marks what FHIR JSON forbids (repeated names, numbers FHIR
cannot hold, nesting beyond ``MAX_DEPTH``) instead of refusing the document; the walker reports each mark for
the resource holding it and skips that resource alone. Marks are looked for in the resources of the types the
caller checks (``check``; all types when None): a Claim a plugin never reads is not worth a scan.

NDJSON is told from a broken JSON document line by line: two or more non-blank lines, at least one of them a
FHIR resource by itself (an object with a resourceType), and the first line either parsing alone or starting
with ``{``. A broken pretty-printed document fails that (none of its lines, ``{``, ``"id": "x",``, is a resource
alone), so it stays one "not valid JSON" error; in NDJSON each broken line is its own error named
``source:line``, however many lines are broken, and every good line is read.

A resource with neither an id nor a fullUrl gets a placeholder ``urn:uuid:`` derived (UUIDv5) from the input's
name, the resource's FHIRPath and the sha256 of its canonical JSON, so the same input names it the same way on
every run and the writer's ids stay deterministic.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhirplug.fhir._json import MAX_DEPTH, Marked, is_text, loads, problems
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
    #: Nesting depth of the resource in its document (1 at the top), for the depth limit of what it contains.
    depth: int = 1
    #: The Bundle entry's fullUrl, when it had one.
    full_url: str | None = None


# A FHIR resource type name (http://hl7.org/fhir/R4/resource.html): letters only, capital first.
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
#: Placeholder references (resources with neither id nor fullUrl) are UUIDv5 in this namespace.
_PLACEHOLDER = uuid.uuid5(uuid.NAMESPACE_URL, "https://fhirplug.dev/fhir/placeholder")


def _placeholder(source: str, path: str, resource: Mapping[str, Any]) -> str:
    """A ``urn:uuid:`` for a resource the input does not name: the same input gives the same one on every run.

    The content hash keeps two different id-less notes at the same place of two inputs apart; the source name
    and path keep two identical notes of one input apart.
    """
    try:
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=repr)
    except (TypeError, ValueError, RecursionError):
        # Python objects JSON cannot write (a non-string key, a cycle, absurd nesting): name and place alone
        # still identify the resource within this input.
        canonical = ""
    digest = hashlib.sha256(canonical.encode("ascii")).hexdigest()
    return f"urn:uuid:{uuid.uuid5(_PLACEHOLDER, chr(0x1F).join((source, path, digest)))}"


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


class Walk:
    """One pass over one input. ``containers`` counts the Bundles, arrays and NDJSON files opened.

    Args:
        source_name: how issues name the input.
        issues: where every problem goes.
        check: resource types whose content is examined for parse marks and depth (None: every type).
    """

    def __init__(self, source_name: str, issues: list[Issue], check: Collection[str] | None = None) -> None:
        self.source_name = source_name
        self.issues = issues
        self.check = check
        self.containers = 0
        #: Resources of unsent transaction/batch Bundles (entries POSTed under a ``urn:uuid:`` fullUrl), by
        #: fullUrl: the writer copies those an output references into an output transaction, so one POST stores
        #: the notes, their subject and the predictions together (see fhirplug.fhir.writer).
        self.unsent: dict[str, dict[str, Any]] = {}
        #: Their ``entry.request`` (the input's own method and ``ifNoneExist``), by the same key.
        self.unsent_requests: dict[str, dict[str, Any]] = {}
        #: Where each of them is in the input: ``(FHIRPath, source)``, by the same key (for the reader's checks).
        self.unsent_paths: dict[str, tuple[str, str]] = {}

    def _issue(self, severity: Severity, code: str, text: str, expression: str | None, source: str) -> None:
        self.issues.append(Issue(severity, code, text, (expression,) if expression else (), source))

    def run(self, data: bytes | str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Iterator[Found]:
        """Yield every resource in ``data``."""
        if isinstance(data, Mapping):
            yield from self._value(data, None, self.source_name, False, None, 1)
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
            value = loads(text)
        except ValueError as exc:
            lines = self._ndjson_lines(text)
            if lines is None:
                self._issue(
                    "error", "structure", f"the input is not valid JSON or NDJSON: {exc}", None, self.source_name
                )
                return
            yield from self._ndjson(lines)
            return
        if isinstance(value, list):
            yield from self._array(value)
        else:
            yield from self._value(value, None, self.source_name, False, None, 1)

    @staticmethod
    def _ndjson_lines(text: str) -> list[tuple[int, Any, str | None]] | None:
        """``(line number, value, error)`` per non-blank line when ``text`` is NDJSON, else None.

        Called only when ``text`` is not one JSON document. It is NDJSON when it has two or more non-blank lines,
        at least one line parses alone to a FHIR resource (an object with a resourceType), and the first line
        either parses alone or starts with ``{``: then a stray ``null``, ``42``, ``oops`` or truncated line is
        one bad line, not a reason to drop the good ones. A broken pretty-printed document fails this (none of
        its lines, ``{``, ``"id": "x",``, is a resource alone; a pretty-printed array opens with ``[``), so it
        stays one "not valid JSON" error.
        """
        numbered = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        if len(numbered) < 2:
            return None
        lines: list[tuple[int, Any, str | None]] = []
        for number, line in numbered:
            try:
                lines.append((number, loads(line), None))
            except json.JSONDecodeError as exc:
                lines.append((number, None, f"{exc.msg} at column {exc.colno}"))
            except ValueError as exc:
                lines.append((number, None, str(exc)))
        if lines[0][2] is not None and not numbered[0][1].lstrip().startswith("{"):
            return None
        parsed = (value for _, value, error in lines if error is None)
        if any(isinstance(v, Mapping) and isinstance(v.get("resourceType"), str) for v in parsed):
            return lines
        return None

    def _ndjson(self, lines: list[tuple[int, Any, str | None]]) -> Iterator[Found]:
        self.containers += 1
        for number, _, error in lines:
            if error is not None:
                self._issue(
                    "error",
                    "structure",
                    f"line {number} is not valid JSON: {error}; the other lines were read",
                    None,
                    f"{self.source_name}:{number}",
                )
        for number, value, error in lines:
            if error is None:
                yield from self._value(value, None, f"{self.source_name}:{number}", True, None, 1)

    def _array(self, items: Sequence[Any]) -> Iterator[Found]:
        self.containers += 1
        for i, item in enumerate(items):
            yield from self._value(item, None, f"{self.source_name}[{i}]", True, None, 2)

    def _marks(self, value: Any, path: str, source: str, depth: int, deep: bool) -> bool:
        """Report the parse marks on ``value`` itself (all of them under it when ``deep``); True if any."""
        if deep:
            found = problems(value, path, depth)
        elif isinstance(value, Marked):
            found = [(path + suffix, code, why) for suffix, code, why in value.marks]
        else:
            return False
        for where, code, why in found:
            self._issue("error", code, f"{why}; the resource was not read", where, source)
        return bool(found)

    def _value(
        self,
        value: Any,
        path: str | None,
        source: str,
        in_collection: bool,
        full_url: str | None,
        depth: int,
        container: Found | None = None,
    ) -> Iterator[Found]:
        if depth > MAX_DEPTH:
            # Checked before anything else: the walk itself recurses once per nested Bundle.
            self._issue(
                "error",
                "structure",
                f"the resource is nested more than {MAX_DEPTH} levels deep (Bundles within Bundles); not read",
                path,
                source,
            )
            return
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
            if not self._marks(value, path or "", source, depth, False):
                self._issue("error", "required", "the resource has no resourceType", path, source)
            return
        if not _RESOURCE_TYPE.fullmatch(rt):
            self._issue(
                "error",
                "invalid",
                f"resourceType {ascii(rt)[:80]} is not a FHIR resource type name (letters, a capital first)",
                f"{path}.resourceType" if path else "resourceType",
                source,
            )
            return
        here = path or rt
        # Repeated names on the resource object itself (even resourceType) are reported whatever its type:
        # which type it is cannot be trusted then.
        deep = self.check is None or rt in self.check
        if self._marks(value, here, source, depth, deep and rt != "Bundle"):
            return
        if rt == "Bundle":
            yield from self._bundle(value, here, source, depth)
            return
        rid = value.get("id")
        if isinstance(rid, str) and not is_text(rid):
            self._issue("error", "invalid", "the id is not text (it holds a lone surrogate)", f"{here}.id", source)
            return
        if container is not None:
            # Contained resources have no identity outside their container (FHIR ref-1): outputs point at it.
            reference = container.reference
        elif isinstance(rid, str) and rid:
            reference = f"{rt}/{rid}"
        elif full_url:
            reference = full_url
        else:
            reference = _placeholder(source, here, value)
        yield Found(dict(value), reference, here, source, in_collection, depth, full_url)

    def contained(self, found: Found, types: Collection[str]) -> Iterator[Found]:
        """The ``contained`` resources of ``found`` whose type is in ``types``, checked like any resource.

        Their ``reference`` is the container's and their ``path`` is ``<container path>.contained[i]``. A
        contained resource that itself contains resources breaks dom-2 (only the container may hold them): its
        own ``contained`` is an ``error``/``invalid`` issue and none of it is read.
        """
        items = found.resource.get("contained")
        if not isinstance(items, list):
            return
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                continue
            path = f"{found.path}.contained[{i}]"
            nested = item.get("contained")
            if isinstance(nested, list) and nested:
                kinds = [n.get("resourceType") for n in nested if isinstance(n, Mapping)]
                if item.get("resourceType") in types or any(k in types for k in kinds):
                    self._issue(
                        "error",
                        "invalid",
                        f"a contained resource holds {len(nested)} contained resource(s) of its own "
                        f"({', '.join(str(k) for k in kinds) or 'none readable'}); FHIR dom-2 forbids that (only "
                        "the container holds contained resources), so they were not read. Move them up into "
                        f"{found.resource['resourceType']}.contained",
                        f"{path}.contained",
                        found.source,
                    )
            if item.get("resourceType") in types:
                yield from self._value(item, path, found.source, True, None, found.depth + 2, found)

    def _writable(self, resource: Mapping[str, Any], path: str, source: str, depth: int) -> bool:
        """True when an unsent resource holds nothing JSON cannot write back (a 41-digit number, too deep).

        A resource of a checked type is reported by the walk itself; any other one is reported here, since it
        would otherwise travel into the output transaction (and ``json.dumps`` would fail on it).
        """
        if isinstance(resource, Marked):  # its own repeated names: the walk reports them and skips it
            return False
        found = problems(resource, path, depth)
        if not found:
            return True
        rt = resource["resourceType"]
        if rt == "Bundle" or not (self.check is None or rt in self.check):
            rid = resource.get("id")
            named = f"{rt}/{rid}" if isinstance(rid, str) and is_text(rid) else f"the {rt}"
            for where, code, why in found:
                self._issue(
                    "error",
                    code,
                    f"{why}; {named} of the input transaction cannot travel with the output transaction and was "
                    "left out of it (references to it are dropped, with a warning)",
                    where,
                    source,
                )
        return False

    def _bundle(self, bundle: Mapping[str, Any], path: str, source: str, depth: int) -> Iterator[Found]:
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
            if self._marks(entry, here, source, depth + 2, False):  # two "resource" or "fullUrl" names
                continue
            resource = entry.get("resource")
            if resource is None:  # request-only (DELETE, GET) and response entries carry no resource
                continue
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and not is_text(full_url):
                self._issue(
                    "error",
                    "invalid",
                    "the fullUrl is not a uri (it holds a lone surrogate)",
                    f"{here}.fullUrl",
                    source,
                )
                continue
            request = entry.get("request")
            if (
                bundle.get("type") in ("transaction", "batch")
                and isinstance(request, Mapping)
                and request.get("method") in ("POST", "PUT")
                and isinstance(resource, Mapping)
                and isinstance(resource.get("resourceType"), str)
            ):
                key: str | None = None
                if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                    key = full_url
                elif full_url is None and isinstance(resource.get("id"), str):
                    # Named only by Type/id: a placeholder of our own lets the writer carry it (PUT Type/id).
                    named = f"https://fhirplug.dev/fhir/unsent/{resource['resourceType']}/{resource['id']}"
                    key = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, named)}"
                if (
                    key is not None
                    and key not in self.unsent
                    and self._writable(resource, f"{here}.resource", source, depth + 3)
                ):
                    self.unsent[key] = dict(resource)
                    self.unsent_requests[key] = dict(request)
                    self.unsent_paths[key] = (f"{here}.resource", source)
            yield from self._value(
                resource,
                f"{here}.resource",
                source,
                True,
                full_url if isinstance(full_url, str) else None,
                depth + 3,
            )
