"""fhirplug: edge-deployable clinical NLP plugins. FHIR R4 in, coded FHIR out, ONNX Runtime underneath.

>>> import fhirplug
>>> plugin = fhirplug.load_plugin("path/to/bundle", allow_unsigned=True)
>>> result = plugin.predict(fhir_json)            # a resource, a Bundle, or NDJSON
>>> [(p.code, p.display, round(p.probability, 2)) for p in result.predictions]
>>> result.to_fhir("transaction")                 # RiskAssessment/Condition + Device + Provenance

The runtime imports numpy, onnxruntime, tokenizers and fhir.resources — never torch. Names below are loaded
on first use, so ``import fhirplug`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fhirplug.errors import (
    ConvertError,
    FhirplugError,
    InputError,
    IntegrityError,
    ManifestError,
    MissingExtraError,
    PluginError,
    PluginNotFoundError,
    ProviderError,
    SignatureError,
    TaskError,
    UsageError,
)

__version__ = "0.1.0"

_LAZY = {
    "Budget": "fhirplug._budget",
    "load_plugin": "fhirplug.plugin",
    "Plugin": "fhirplug.plugin",
    "PredictionResult": "fhirplug.plugin",
    "Prediction": "fhirplug.predictions",
    "Evidence": "fhirplug.predictions",
    "TextSource": "fhirplug.predictions",
    "Manifest": "fhirplug.manifest",
    "parse_manifest": "fhirplug.manifest",
    "verify_bundle": "fhirplug.bundle",
    "read_fhir": "fhirplug.fhir.reader",
    "Issue": "fhirplug.fhir.outcome",
    "operation_outcome": "fhirplug.fhir.outcome",
    "discover_plugins": "fhirplug.registry",
    "available_providers": "fhirplug.runtime",
}

__all__ = [
    "Budget",
    "ConvertError",
    "Evidence",
    "FhirplugError",
    "InputError",
    "IntegrityError",
    "Issue",
    "Manifest",
    "ManifestError",
    "MissingExtraError",
    "Plugin",
    "PluginError",
    "PluginNotFoundError",
    "Prediction",
    "PredictionResult",
    "ProviderError",
    "SignatureError",
    "TaskError",
    "TextSource",
    "UsageError",
    "__version__",
    "available_providers",
    "discover_plugins",
    "load_plugin",
    "operation_outcome",
    "parse_manifest",
    "read_fhir",
    "verify_bundle",
]

if TYPE_CHECKING:
    from fhirplug._budget import Budget
    from fhirplug.bundle import verify_bundle
    from fhirplug.fhir.outcome import Issue, operation_outcome
    from fhirplug.fhir.reader import read_fhir
    from fhirplug.manifest import Manifest, parse_manifest
    from fhirplug.plugin import Plugin, PredictionResult, load_plugin
    from fhirplug.predictions import Evidence, Prediction, TextSource
    from fhirplug.registry import discover_plugins
    from fhirplug.runtime import available_providers


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fhirplug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
