"""What several benchmark scripts read or show alike: the Synthea notes of ``../shared/data``, repository paths."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea-r4" / "bundles"


def synthea_resources() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The DocumentReferences that carry a note, and the Patients, of every Synthea bundle (file order)."""
    notes: list[dict[str, Any]] = []
    patients: list[dict[str, Any]] = []
    for path in sorted(SYNTHEA.glob("*.json")):
        for entry in json.loads(path.read_bytes()).get("entry", []):
            resource = entry.get("resource", {})
            if resource.get("resourceType") == "Patient":
                patients.append(resource)
            elif resource.get("resourceType") == "DocumentReference" and any(
                "data" in c.get("attachment", {}) for c in resource.get("content", [])
            ):
                notes.append(resource)
    return notes, patients


def synthea_note_texts() -> list[str]:
    """The text of every note attachment of those DocumentReferences (base64 ``data``, UTF-8), in order."""
    notes, _ = synthea_resources()
    return [
        base64.b64decode(c["attachment"]["data"]).decode("utf-8")
        for note in notes
        for c in note.get("content", [])
        if "data" in c.get("attachment", {})
    ]


def repo_relative(path: str | Path) -> str:
    """A path as a report shows it: relative to the repository when inside it (no machine paths in results)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)
