"""Read FHIR R4 input into :class:`~fhirplug.predictions.TextSource` objects and OperationOutcome issues.

Input may be one resource, a Bundle of any type (nested Bundles too), a JSON array of resources or NDJSON,
as bytes, text or decoded objects. Bad input never raises: each problem is an :class:`Issue` whose expression
is the FHIRPath of the offending element (``Bundle.entry[2].resource.content[0].attachment.data``), and every
good resource next to a bad one is still read.

Only resources of the types a plugin reads are validated against the fhir.resources R4B models: a Synthea
bundle's thousands of Claim and ExplanationOfBenefit entries are skipped unparsed, which keeps reading fast.

FHIR JSON rules Python's json does not keep (no repeated names, numbers FHIR can hold, bounded nesting) are
errors for the resource holding the offence, never for the file: see :mod:`fhirplug.fhir._json`. The required
code bindings fhir.resources does not enforce (``status`` and friends) are checked here, see
:func:`~fhirplug.fhir.extract.check_codes`; an ``entered-in-error`` resource is skipped with an ``information``
issue, since a record marked as made in error is not clinical truth to predict from.

``contained`` resources of an accepted type are read too: a DiagnosticReport may carry its narrative as a
contained DocumentReference or Observation, and dropping that text silently would hide it. They have no
identity outside their container (FHIR ref-1: ``#id`` resolves only inside it), so their texts carry the
container's ``reference`` and an ``element`` rooted at the container
(``DiagnosticReport.contained[0].content[0].attachment``); outputs point at the container and the element
says where inside it the text was.

**Identity.** A resource is named ``Type/id`` (else its entry's fullUrl, else a placeholder ``urn:uuid:`` that
is the same on every run). When two resources of one input share a ``Type/id`` but their absolute fullUrls
differ (two servers' ``DocumentReference/1``), each is named by its fullUrl, which is its identity in FHIR;
when nothing tells them apart, a ``warning``/``duplicate`` issue says that their findings of one code merge.

**Unsent transactions.** Resources of an unsent input transaction that the outputs will carry (the notes read,
and what they reference, transitively) are checked like the notes: R4B model validation, required bindings,
the id's form, and no control characters a FHIR string cannot hold. One that fails is left out of
``ReadResult.unsent`` with its ``error`` issues; outputs then drop references to it, with a warning.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fhirplug.errors import InputError, UsageError
from fhirplug.fhir._walk import Found, Walk
from fhirplug.fhir.extract import (
    TEXT_ELEMENTS,
    TextAllowance,
    check_codes,
    entered_in_error,
    extract_texts,
    has_text_elements,
)
from fhirplug.fhir.outcome import Issue
from fhirplug.predictions import TextSource

__all__ = ["ReadResult", "iter_resources", "read_fhir", "read_fhir_files"]

FhirInput = bytes | str | Mapping[str, Any] | Sequence[Mapping[str, Any]]

#: Validation issues reported per resource; a resource this broken is not worth more lines.
_MAX_VALIDATION_ISSUES = 10
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What a FHIR string cannot hold (http://hl7.org/fhir/R4/datatypes.html#string: nothing below U+0020 but tab,
# LF and CR; Medplum checks [\r\n\t\u0020-\uFFFF]).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# An absolute fullUrl on a RESTful server (http://hl7.org/fhir/R4/bundle.html#references): [base]/Type/id, in
# printable ASCII so that outputs can carry it as a reference.
_SERVER_URL = re.compile(r"https?://[!-~]+/[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True)
class ReadResult:
    """What reading FHIR input gave.

    Attributes:
        sources: every text read, in input order.
        issues: every problem met; an ``error`` means some input could not be used.
        resources_read: resources of an accepted type that were examined (valid or not).
        unsent: resources of unsent transaction/batch Bundles in the input, by their ``urn:uuid:`` fullUrl
            (the writer adds those the outputs reference to an output transaction).
    """

    sources: list[TextSource]
    issues: list[Issue]
    resources_read: int
    unsent: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The input's own ``entry.request`` of each ``unsent`` resource, by the same key.
    unsent_requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: True when ``max_total_chars`` refused a text: every later text of the same run is to be refused too, so
    #: a caller reading several inputs passes ``max_total_chars=0`` to the ones after this.
    chars_spent: bool = False


@functools.cache
def _model(resource_type: str) -> type[BaseModel]:
    # Imported on first use: fhir.resources takes ~0.1 s to import, which `fhirplug --help` need not pay.
    from fhir.resources.R4B import get_fhir_model_class

    model: type[BaseModel] = get_fhir_model_class(resource_type)
    return model


def _fhirpath(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _NAME.match(part):  # skips pydantic's union/function tags such as "function-after[...]"
            path += f".{part}"
    return path


def _issue_code(pydantic_type: str) -> str:
    if pydantic_type == "missing":
        return "required"
    if pydantic_type.endswith(("_type", "_forbidden")):  # a wrong JSON type, an unknown element
        return "structure"
    return "invalid"


def _validate(found: Found, *, bindings: bool = False) -> list[Issue]:
    """Issues for a resource its R4B model rejects; [] when it is valid.

    ``bindings``: also check every code element with a required binding against its codes, which the models
    list but do not enforce (a Patient's ``gender: "bogus"`` passes R4B).
    """
    try:
        model = _model(found.resource["resourceType"]).model_validate(found.resource)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        issues = []
        for error in errors[:_MAX_VALIDATION_ISSUES]:
            message = error["msg"]
            if error["type"] != "missing" and not isinstance(error.get("input"), Mapping | list):
                message += f"; got {error.get('input')!r:.80}"
            where = (_fhirpath(found.path, error["loc"]),)
            issues.append(Issue("error", _issue_code(error["type"]), message, where, found.source))
        if len(errors) > _MAX_VALIDATION_ISSUES:
            more = f"... and {len(errors) - _MAX_VALIDATION_ISSUES} more validation error(s)"
            issues.append(Issue("error", "invalid", more, (found.path,), found.source))
        return issues
    except Exception as exc:
        # fhir.resources recurses once per nesting level and some of its validators fail outright on JSON
        # types they never expected (AttributeError on a number for a url); the input is at fault, not the
        # caller, so every failure here is reported as an issue, never raised.
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        message = f"the resource cannot be validated: {reason}"
        return [Issue("error", "structure", message, (found.path,), found.source)]
    return [replace(i, source=found.source) for i in _required_bindings(model, found.path)] if bindings else []


def _required_bindings(model: BaseModel, path: str) -> list[Issue]:
    """An issue per code outside its required binding, from the ``enum_values`` the R4B models carry."""
    issues: list[Issue] = []
    stack: list[tuple[BaseModel, str]] = [(model, path)]
    while stack and len(issues) < _MAX_VALIDATION_ISSUES:
        item, where = stack.pop()
        for name, info in type(item).model_fields.items():
            value = getattr(item, name, None)
            if value is None:
                continue
            here = f"{where}.{info.alias or name}"
            extra = info.json_schema_extra
            codes = extra.get("enum_values") if isinstance(extra, dict) else None
            values = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
            for i, v in values:
                at = here if i is None else f"{here}[{i}]"
                if isinstance(codes, list) and isinstance(v, str) and v not in codes:
                    issues.append(
                        Issue(
                            "error",
                            "code-invalid",
                            f"{v!a:.80} is not in the required value set of {at.rsplit('.', 1)[-1]} "
                            f"({' | '.join(str(c) for c in codes)})",
                            (at,),
                        )
                    )
                elif isinstance(v, BaseModel):
                    stack.append((v, at))
    return issues[:_MAX_VALIDATION_ISSUES]


def _control_characters(resource: Mapping[str, Any], path: str) -> list[Issue]:
    """An issue for the first string under ``resource`` holding a character a FHIR string cannot hold."""
    stack: list[tuple[Any, str]] = [(resource, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            bad = _CONTROL.search(value)
            if bad:
                message = (
                    f"the string holds the control character U+{ord(bad.group()):04X} at character {bad.start()}; "
                    "FHIR strings hold none below U+0020 but tab, LF and CR"
                )
                return [Issue("error", "invalid", message, (where,))]
        elif isinstance(value, Mapping):
            stack.extend((v, f"{where}.{k}") for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return []


def _references(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            target = item.get("reference")
            if isinstance(target, str):
                yield target
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_unsent(walk: Walk, seeds: list[str], checked: Mapping[tuple[str, str], bool], issues: list[Issue]) -> None:
    """Validate the unsent resources the outputs will carry; drop from ``walk.unsent`` those that fail.

    ``seeds`` are the references the outputs hold (the notes read, what they reference); the writer carries the
    unsent resources they name and, in turn, what those reference. ``checked``: resources already validated
    (by path and source), with the result.
    """
    names: dict[str, str] = {}
    for key, resource in walk.unsent.items():
        names[key] = key
        rid, rt = resource.get("id"), resource.get("resourceType")
        if isinstance(rid, str) and rid:
            names.setdefault(f"{rt}/{rid}", key)
    done: set[str] = set()
    pending = list(seeds)
    while pending:
        name = names.get(pending.pop())
        if name is None or name in done:
            continue
        done.add(name)
        resource = walk.unsent[name]
        path, source = walk.unsent_paths[name]
        ok = checked.get((path, source))  # a note read is validated already; what it references is not
        problems: list[Issue] = []
        if ok is None:
            found = Found(resource, name, path, source, True)
            problems = _validate(found, bindings=True) or [
                replace(i, source=source) for i in check_codes(resource, path)
            ]
        if ok is not False and not problems:
            # R4B lets them through, but no FHIR server takes them (a note's text is base64 and may hold them).
            problems = [replace(i, source=source) for i in _control_characters(resource, path)]
        rid = resource.get("id")
        called = (
            f"{resource['resourceType']}/{rid}" if isinstance(rid, str) and rid else f"the {resource['resourceType']}"
        )
        for issue in problems:
            what = (
                f"{issue.diagnostics}; {called:.140} of the input transaction cannot travel with the output "
                "transaction and was left out of it (references to it are dropped, with a warning)"
            )
            issues.append(replace(issue, diagnostics=what))
        ok = ok is not False and not problems
        if ok:
            pending.extend(_references(resource))
        else:
            del walk.unsent[name], walk.unsent_requests[name], walk.unsent_paths[name]


def _disambiguate(
    named: dict[str, list[tuple[Found, int, int]]], sources: list[TextSource], issues: list[Issue]
) -> None:
    """Two resources of one input with one ``Type/id``: named by their absolute fullUrls, else reported.

    ``named``: per reference, the resources holding it and the range of ``sources`` each gave.
    """
    for reference, holders in named.items():
        if len(holders) < 2:
            continue
        urls = [f.full_url for f, _, _ in holders]
        if all(u and _SERVER_URL.fullmatch(u) for u in urls) and len(set(urls)) == len(urls):
            # The fullUrl is the resource's identity (FHIR Bundle.entry.fullUrl): two servers' DocumentReference/1
            # are two documents, and each output must point at its own.
            for found, start, end in holders:
                sources[start:end] = [replace(s, reference=str(found.full_url)) for s in sources[start:end]]
            continue
        first = holders[0][0]
        if all(f.resource == first.resource for f, _, _ in holders[1:]):
            continue  # the same resource twice: its findings are the same findings
        where = ", ".join(f"{f.source} {f.path}" for f, _, _ in holders)
        issues.append(
            Issue(
                "warning",
                "duplicate",
                f"{len(holders)} different resources of this input are all {reference} ({where}) and nothing "
                "tells them apart (no distinct absolute fullUrl): outputs name each of them by it, so a code "
                "predicted from several of them is written once. Give each resource its own id",
                tuple(f.path for f, _, _ in holders),
                first.source,
            )
        )


def _check_types(resource_types: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(resource_types) - set(TEXT_ELEMENTS))
    if unknown or not resource_types:
        raise UsageError(
            f"resource_types={list(resource_types)!r}: cannot read text from {unknown or 'no types'}; "
            f"readable types are {list(TEXT_ELEMENTS)}"
        )
    return tuple(resource_types)


def _named(found: Found) -> str:
    rt = found.resource["resourceType"]
    if ".contained[" in found.path:  # its reference is its container's; say which contained resource it is
        return f"the {rt} contained at {found.path} (in {found.reference})"
    return found.reference


def _counted(counts: Counter[str]) -> str:
    return ", ".join(f"{rt} ×{n}" for rt, n in sorted(counts.items())) or "no resources"


def read_fhir(
    data: FhirInput,
    *,
    resource_types: Sequence[str],
    max_chars: int = 1_000_000,
    source_name: str = "input",
    max_total_chars: int | None = None,
) -> ReadResult:
    """Read every text of the accepted resource types from FHIR R4 input.

    Args:
        data: one resource, a Bundle (any type), a JSON array of resources or NDJSON, as bytes, text or
            already-decoded objects.
        resource_types: the types to read (a subset of DocumentReference, DiagnosticReport, Observation,
            Condition, Procedure); other resources in a Bundle are skipped.
        max_chars: longest text read from one element.
        source_name: how issues name this input (a file name); NDJSON issues add ``:line``.
        max_total_chars: most characters all texts read may have together (None: no limit). Texts are taken
            in input order; the first that would pass it and every later one are ``too-costly`` issues, and
            once it is reached nothing more is decoded (the plugin passes what is left of ``max_input_chars``).

    Returns:
        A :class:`ReadResult`. Problems are issues, never exceptions. A lone resource of a type not read is
        an ``error``/``not-supported``; an input holding no resource of an accepted type is an
        ``error``/``not-found``. Inside a collection, a resource with no text element at all (a numeric
        Observation, a Condition without a note) is normal: such resources are listed in one ``information``
        issue, not reported as errors (a lone one is an ``error``/``required``, see extract_texts).

    Raises:
        UsageError: ``resource_types`` names a type text cannot be read from (a programming error).
    """
    return _read(data, _check_types(resource_types), max_chars, source_name, _allowance(max_total_chars))


def _allowance(max_total_chars: int | None) -> TextAllowance | None:
    if max_total_chars is None:
        return None
    if isinstance(max_total_chars, bool) or not isinstance(max_total_chars, int):
        raise UsageError(f"max_total_chars must be an integer or None, got {max_total_chars!r}")
    return TextAllowance(max(max_total_chars, 0))


def _read(
    data: FhirInput, accepted: tuple[str, ...], max_chars: int, source_name: str, allowance: TextAllowance | None
) -> ReadResult:
    """:func:`read_fhir` with its arguments checked; ``allowance`` may be shared by several inputs."""
    issues: list[Issue] = []
    sources: list[TextSource] = []
    seen: Counter[str] = Counter()
    no_text: list[Found] = []
    read = 0
    walk = Walk(source_name, issues, check=accepted)
    #: Per reference, the resources that hold it and the range of ``sources`` each gave (finding 5).
    named: dict[str, list[tuple[Found, int, int]]] = {}
    #: Validation result of every resource validated, by (path, source); the references the outputs will hold.
    checked: dict[tuple[str, str], bool] = {}
    seeds: list[str] = []

    def usable(found: Found) -> bool:
        """Validate, check bindings and status; False (with issues) when the resource is not to be read."""
        problems = _validate(found) or [
            replace(i, source=found.source) for i in check_codes(found.resource, found.path)
        ]
        checked[found.path, found.source] = not problems
        if problems:
            issues.extend(problems)
            return False
        element = entered_in_error(found.resource)
        if element:
            issues.append(
                Issue(
                    "information",
                    "informational",
                    f"{_named(found)} is marked entered-in-error ({element}); it is not clinical truth and "
                    "was not read",
                    (f"{found.path}.{element}",),
                    found.source,
                )
            )
            return False
        return True

    for found in walk.run(data):
        rt = found.resource["resourceType"]
        seen[rt] += 1
        if rt in accepted:
            read += 1
            if not usable(found):
                continue
        inner = list(walk.contained(found, accepted))
        first = len(sources)
        if rt in accepted:
            if not has_text_elements(found.resource) and (found.in_collection or inner):
                no_text.append(found)
            else:
                got, found_issues = extract_texts(
                    found.resource,
                    reference=found.reference,
                    path=found.path,
                    max_chars=max_chars,
                    allowance=allowance,
                )
                sources.extend(got)
                issues.extend(replace(issue, source=found.source) for issue in found_issues)
        elif not found.in_collection and not inner:
            issues.append(
                Issue(
                    "error",
                    "not-supported",
                    f"{rt} is not read by this plugin; it reads {', '.join(accepted)}",
                    (found.path,),
                    found.source,
                )
            )
        for part in inner:
            seen[part.resource["resourceType"]] += 1
            read += 1
            if not usable(part):
                continue
            if not has_text_elements(part.resource):
                no_text.append(part)
                continue
            got, found_issues = extract_texts(
                part.resource,
                reference=part.reference,
                path=part.path,
                max_chars=max_chars,
                element=rt + part.path[len(found.path) :],
                context=found.resource,
                allowance=allowance,
            )
            sources.extend(got)
            issues.extend(replace(issue, source=part.source) for issue in found_issues)
        if len(sources) > first:
            named.setdefault(found.reference, []).append((found, first, len(sources)))
            seeds.append(found.reference)
            seeds.extend(_references(found.resource))

    _disambiguate(named, sources, issues)
    if walk.unsent:
        _check_unsent(walk, seeds, checked, issues)

    if read == 0 and walk.containers:
        issues.append(
            Issue(
                "error",
                "not-found",
                f"the input holds no resource of the types this plugin reads ({', '.join(accepted)}); "
                f"it holds {_counted(seen)}",
                (),
                source_name,
            )
        )
    if no_text:
        lines = sorted({f.source for f in no_text} - {source_name})
        where = f" (at {', '.join(lines)})" if lines else ""
        issues.append(
            Issue(
                "information",
                "informational",
                f"{len(no_text)} resource(s) have no element text is read from and were skipped: "
                f"{_counted(Counter(f.resource['resourceType'] for f in no_text))}{where}",
                tuple(f.path for f in no_text),
                source_name,
            )
        )
        if not sources and not any(i.is_error for i in issues):
            issues.append(
                Issue(
                    "error",
                    "required",
                    "no text to read: none of the resources has an element text is read from ("
                    + ", ".join(f"{rt}.{e}" for rt in accepted for e in TEXT_ELEMENTS[rt])
                    + ")",
                    (),
                    source_name,
                )
            )
    spent = allowance is not None and allowance.spent
    return ReadResult(sources, issues, read, walk.unsent, walk.unsent_requests, spent)


def read_fhir_files(
    paths: Sequence[str | Path],
    *,
    resource_types: Sequence[str],
    max_chars: int = 1_000_000,
    max_total_chars: int | None = None,
    max_bytes: int = 50 * 1024 * 1024,
) -> ReadResult:
    """Read several FHIR files (JSON or NDJSON) as one input; each file's issues are named by its path.

    A file that cannot be opened, or is not a regular file (a FIFO is never waited on), is an
    ``error``/``not-found`` issue; one larger than ``max_bytes`` (``Budget.max_request_bytes``'s default) is
    ``too-costly`` and not read. Reading stdin (``-``) is left to the caller. ``max_total_chars`` holds for all
    files together, in the order given (see :func:`read_fhir`).
    """
    from fhirplug._inputs import read_input_file  # here, not at the top: fhirplug._inputs imports fhirplug.fhir

    sources: list[TextSource] = []
    issues: list[Issue] = []
    unsent: dict[str, dict[str, Any]] = {}
    requests: dict[str, dict[str, Any]] = {}
    read = 0
    accepted = _check_types(resource_types)
    allowance = _allowance(max_total_chars)  # one for all files: the first text over it stops the rest
    for path in paths:
        raw, problem = read_input_file(path, max_bytes)
        if raw is None:
            if problem is not None:
                issues.append(problem)
            continue
        result = _read(raw, accepted, max_chars, str(path), allowance)
        sources.extend(result.sources)
        issues.extend(result.issues)
        read += result.resources_read
        for url, resource in result.unsent.items():
            unsent.setdefault(url, resource)
        for url, request in result.unsent_requests.items():
            requests.setdefault(url, request)
    return ReadResult(sources, issues, read, unsent, requests, allowance is not None and allowance.spent)


def iter_resources(
    data: FhirInput, *, source_name: str = "input", issues: list[Issue] | None = None
) -> Iterator[tuple[dict[str, Any], str, str]]:
    """Every resource in ``data`` (Bundles opened, nested ones too), unvalidated, of every type.

    Args:
        data: as for :func:`read_fhir`.
        source_name: how issues name this input.
        issues: where parse problems go (a bad NDJSON line, an entry without resourceType). When None, the
            first problem raises :class:`~fhirplug.errors.InputError`.

    Yields:
        ``(resource, reference, path)``: the resource JSON, ``ResourceType/id`` (else the entry's fullUrl,
        else a fresh ``urn:uuid:``), and its FHIRPath in the input (``Bundle.entry[3].resource``).

    Raises:
        InputError: only when ``issues`` is None and the input has a problem.
    """
    sink: list[Issue] = [] if issues is None else issues

    def check() -> None:
        if issues is None and sink:
            first = sink[0]
            raise InputError(f"{first.source}: {first.diagnostics}", sink)

    for found in Walk(source_name, sink).run(data):
        check()
        yield found.resource, found.reference, found.path
    check()
