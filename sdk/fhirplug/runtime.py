"""Execution provider and model variant choice.

Order of preference: TensorRT → CUDA → CPU, as onnxruntime offers them, each with the variant the manifest
offers for it: fp16 first on a GPU, int8 first on the CPU, fp32 as the fallback everywhere. The choice is
reported (``Plugin.provider``, ``Plugin.variant``) so a caller never has to guess what ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

from fhirplug.errors import ProviderError
from fhirplug.manifest import Manifest, VariantSpec

__all__ = ["PROVIDERS", "Choice", "available_providers", "choose_variant", "provider_name"]

#: Short names accepted by the API and the CLI, in order of preference.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_PRECISION_ORDER = {
    "TensorrtExecutionProvider": ("fp16", "fp32", "int8"),
    "CUDAExecutionProvider": ("fp16", "fp32", "int8"),
    "CPUExecutionProvider": ("int8", "fp32", "fp16"),
}


@dataclass(frozen=True)
class Choice:
    variant: VariantSpec
    #: Providers handed to the InferenceSession, best first (CPU last, as onnxruntime's own fallback).
    providers: tuple[str, ...]

    @property
    def provider(self) -> str:
        return self.providers[0]


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def provider_name(name: str) -> str:
    """``cuda`` → ``CUDAExecutionProvider``; full onnxruntime names pass through."""
    if name in PROVIDERS:
        return PROVIDERS[name]
    if name in PROVIDERS.values():
        return name
    raise ProviderError(f"unknown provider {name!r}; expected auto, {', '.join(PROVIDERS)}")


def _offers(spec: VariantSpec, provider: str) -> bool:
    # int8 (dynamic quantization) is a CPU format; a variant that names no provider runs anywhere.
    return provider in spec.providers


def choose_variant(
    manifest: Manifest,
    provider: str = "auto",
    variant: str = "auto",
    available: list[str] | None = None,
) -> Choice:
    """Pick the provider and variant to run.

    Args:
        manifest: the plugin's manifest.
        provider: ``auto``, ``tensorrt``, ``cuda``, ``cpu`` (or a full onnxruntime provider name).
        variant: ``auto``, ``fp32``, ``int8`` or ``fp16``.
        available: providers onnxruntime offers (default: ask onnxruntime).

    Raises:
        ProviderError: the provider is not available, or the plugin has no variant for it.
    """
    have = available if available is not None else available_providers()
    offered = [v.precision for v in manifest.variants]
    if variant != "auto" and variant not in offered:
        raise ProviderError(f"plugin {manifest.name!r} has no {variant!r} variant; it offers {', '.join(offered)}")
    if provider == "auto":
        candidates = [p for p in PROVIDERS.values() if p in have]
    else:
        wanted = provider_name(provider)
        if wanted not in have:
            hint = " (install fhirplug[gpu] on a machine with a GPU)" if wanted != PROVIDERS["cpu"] else ""
            raise ProviderError(
                f"execution provider {wanted} is not available; onnxruntime offers {', '.join(have)}{hint}"
            )
        candidates = [wanted]
    for prov in candidates:
        order = _PRECISION_ORDER.get(prov, ("fp32", "int8", "fp16"))
        precisions = [variant] if variant != "auto" else list(order)
        for precision in precisions:
            spec = next((v for v in manifest.variants if v.precision == precision), None)
            if spec is not None and _offers(spec, prov):
                fallback = () if prov == PROVIDERS["cpu"] else (PROVIDERS["cpu"],)
                return Choice(spec, (prov, *fallback))
    raise ProviderError(
        f"plugin {manifest.name!r}: no variant (asked {variant}) runs on {', '.join(candidates) or 'no provider'}; "
        f"variants: {', '.join(f'{v.precision}→{list(v.providers)}' for v in manifest.variants)}"
    )
