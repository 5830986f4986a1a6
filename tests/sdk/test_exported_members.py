from __future__ import annotations

import fhirplug


def test_public_api_is_pinned() -> None:
    assert sorted(fhirplug.__all__) == [
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


def test_every_exported_name_resolves() -> None:
    for name in fhirplug.__all__:
        assert getattr(fhirplug, name) is not None, name


def test_errors_share_one_base() -> None:
    for name in fhirplug.__all__:
        obj = getattr(fhirplug, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, fhirplug.FhirplugError), name
