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
from fhirplug.fhir.extract import TEXT_ELEMENTS, check_codes, entered_in_error, extract_texts, has_text_elements
from fhirplug.fhir.outcome import Issue
from fhirplug.predictions import TextSource

__all__ = ["ReadResult", "iter_resources", "read_fhir", "read_fhir_files"]

FhirInput = bytes | str | Mapping[str, Any] | Sequence[Mapping[str, Any]]

#: Validation issues reported per resource; a resource this broken is not worth more lines.
_MAX_VALIDATION_ISSUES = 10
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def _validate(found: Found) -> list[Issue]:
    """Issues for a resource its R4B model rejects; [] when it is valid."""
    try:
        _model(found.resource["resourceType"]).model_validate(found.resource)
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
    return []


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
) -> ReadResult:
    """Read every text of the accepted resource types from FHIR R4 input.

    Args:
        data: one resource, a Bundle (any type), a JSON array of resources or NDJSON, as bytes, text or
            already-decoded objects.
        resource_types: the types to read (a subset of DocumentReference, DiagnosticReport, Observation,
            Condition, Procedure); other resources in a Bundle are skipped.
        max_chars: longest text read from one element.
        source_name: how issues name this input (a file name); NDJSON issues add ``:line``.

    Returns:
        A :class:`ReadResult`. Problems are issues, never exceptions. A lone resource of a type not read is
        an ``error``/``not-supported``; an input holding no resource of an accepted type is an
        ``error``/``not-found``. Inside a collection, a resource with no text element at all (a numeric
        Observation, a Condition without a note) is normal: such resources are listed in one ``information``
        issue, not reported as errors (a lone one is an ``error``/``required``, see extract_texts).

    Raises:
        UsageError: ``resource_types`` names a type text cannot be read from (a programming error).
    """
    accepted = _check_types(resource_types)
    issues: list[Issue] = []
    sources: list[TextSource] = []
    seen: Counter[str] = Counter()
    no_text: list[Found] = []
    read = 0
    walk = Walk(source_name, issues, check=accepted)

    def usable(found: Found) -> bool:
        """Validate, check bindings and status; False (with issues) when the resource is not to be read."""
        problems = _validate(found) or [
            replace(i, source=found.source) for i in check_codes(found.resource, found.path)
        ]
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
        if rt in accepted:
            if not has_text_elements(found.resource) and (found.in_collection or inner):
                no_text.append(found)
            else:
                got, found_issues = extract_texts(
                    found.resource, reference=found.reference, path=found.path, max_chars=max_chars
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
            )
            sources.extend(got)
            issues.extend(replace(issue, source=part.source) for issue in found_issues)

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
    return ReadResult(sources, issues, read, walk.unsent, walk.unsent_requests)


def read_fhir_files(
    paths: Sequence[str | Path],
    *,
    resource_types: Sequence[str],
    max_chars: int = 1_000_000,
) -> ReadResult:
    """Read several FHIR files (JSON or NDJSON) as one input; each file's issues are named by its path.

    A file that cannot be opened is an ``error``/``not-found`` issue. Reading stdin (``-``) is left to the
    caller.
    """
    sources: list[TextSource] = []
    issues: list[Issue] = []
    unsent: dict[str, dict[str, Any]] = {}
    requests: dict[str, dict[str, Any]] = {}
    read = 0
    for path in paths:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            issues.append(Issue("error", "not-found", f"cannot read the file ({exc.strerror})", (), str(path)))
            continue
        result = read_fhir(raw, resource_types=resource_types, max_chars=max_chars, source_name=str(path))
        sources.extend(result.sources)
        issues.extend(result.issues)
        read += result.resources_read
        for url, resource in result.unsent.items():
            unsent.setdefault(url, resource)
        for url, request in result.unsent_requests.items():
            requests.setdefault(url, request)
    return ReadResult(sources, issues, read, unsent, requests)


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
