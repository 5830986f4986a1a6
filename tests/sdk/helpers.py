"""Small builders for FHIR test inputs (written here, not copied from anywhere)."""

from __future__ import annotations

import base64
from typing import Any


def document_reference(
    text: str,
    id_: str = "note-1",
    content_type: str = "text/plain; charset=utf-8",
    patient: str = "Patient/p1",
    encounter: str | None = "Encounter/e1",
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": id_,
        "status": "current",
        "subject": {"reference": patient},
        "content": [
            {
                "attachment": {
                    "contentType": content_type,
                    "data": base64.b64encode(text.encode("utf-8")).decode(),
                }
            }
        ],
    }
    if encounter:
        resource["context"] = {"encounter": [{"reference": encounter}]}
    return resource


def collection(*resources: dict[str, Any], kind: str = "collection") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"fullUrl": f"urn:uuid:00000000-0000-0000-0000-{i:012d}", "resource": r} for i, r in enumerate(resources)
        ],
    }
