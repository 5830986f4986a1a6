"""OperationOutcome issues: how every FHIR-facing problem is reported, the way FHIR servers answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Issue", "operation_outcome"]

Severity = Literal["fatal", "error", "warning", "information"]


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue.

    Attributes:
        severity: fatal | error | warning | information.
        code: an IssueType code (http://hl7.org/fhir/issue-type): invalid, structure, required, value,
            not-supported, too-costly, not-found, incomplete, processing, informational ...
        diagnostics: what failed, what was expected, what came, and the fix.
        expression: FHIRPath of the offending element(s), e.g. ``Bundle.entry[3].resource.content[0]``.
        source: where the input came from (a file name and, for NDJSON, ``:line``), for humans.
    """

    severity: Severity
    code: str
    diagnostics: str
    expression: tuple[str, ...] = field(default_factory=tuple)
    source: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity in ("fatal", "error")

    def to_fhir(self) -> dict[str, Any]:
        diagnostics = f"{self.source}: {self.diagnostics}" if self.source else self.diagnostics
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": diagnostics}
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource (R4 JSON) holding ``issues``; an all-clear one if there are none."""
    items = [i.to_fhir() for i in issues]
    if not items:
        items = [{"severity": "information", "code": "informational", "diagnostics": "no issues"}]
    return {"resourceType": "OperationOutcome", "issue": items}
