from __future__ import annotations

import itertools

import numpy as np
import pytest

from fhirplug.bundle import verify_bundle
from fhirplug.errors import ProviderError
from fhirplug.runtime import choose_variant
from fhirplug.session import ModelSession
from fhirplug.tasks.text_classification import window_probabilities
from tests.conftest import TINY_PLUGIN

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture(scope="module")
def manifest():
    return verify_bundle(TINY_PLUGIN, allow_unsigned=True).manifest


def test_cpu_prefers_int8(manifest) -> None:
    choice = choose_variant(manifest, available=[CPU])
    assert (choice.provider, choice.variant.precision) == (CPU, "int8")


def test_gpu_prefers_the_gpu_and_its_variant(manifest) -> None:
    # The tiny plugin has no fp16: on CUDA the fp32 variant runs, with the CPU as onnxruntime's fallback.
    choice = choose_variant(manifest, available=[TRT, CUDA, CPU])
    assert choice.providers == (TRT, CPU)
    assert choice.variant.precision == "fp32"
    choice = choose_variant(manifest, available=[CUDA, CPU])
    assert choice.providers == (CUDA, CPU)


def test_explicit_variant(manifest) -> None:
    assert choose_variant(manifest, variant="fp32", available=[CPU]).variant.file == "model.fp32.onnx"


def test_missing_variant_names_what_is_offered(manifest) -> None:
    with pytest.raises(ProviderError, match="no 'fp16' variant; it offers fp32, int8"):
        choose_variant(manifest, variant="fp16", available=[CPU])


def test_unavailable_provider(manifest) -> None:
    with pytest.raises(ProviderError, match=r"CUDAExecutionProvider is not available.*fhirplug\[gpu\]"):
        choose_variant(manifest, provider="cuda", available=[CPU])


def test_unknown_provider(manifest) -> None:
    with pytest.raises(ProviderError, match="unknown provider 'rocm'"):
        choose_variant(manifest, provider="rocm", available=[CPU])


def test_int8_variant_is_cpu_only(manifest) -> None:
    with pytest.raises(ProviderError, match="no variant"):
        choose_variant(manifest, provider="cuda", variant="int8", available=[CUDA, CPU])


@pytest.fixture(scope="module")
def session(manifest) -> ModelSession:
    spec = manifest.variant("fp32")
    return ModelSession(
        TINY_PLUGIN / spec.file, TINY_PLUGIN / "tokenizer.json", spec, manifest.tokenizer, [CPU], threads=1
    )


def test_long_text_is_windowed_not_truncated(session: ModelSession) -> None:
    text = " ".join(f"word{i}" for i in range(300))
    windows = session.windows([text, "short note"])
    long = [w for w in windows if w.text_index == 0]
    assert len(long) > 3
    assert all(len(w.ids) <= session.max_tokens for w in windows)
    assert long[0].start == 0
    assert long[-1].end == len(text)  # the last word is read
    # Consecutive windows overlap by the stride: the next one starts before the previous one ends.
    assert all(b.start < a.end for a, b in itertools.pairwise(long))


def test_dynamic_padding_does_not_change_results(session: ModelSession) -> None:
    texts = ["asthma with wheezing", "type 2 diabetes. " * 20, "high blood pressure"]
    windows = session.windows(texts)
    together = session.run(windows)
    alone = [session.run([w])[0] for w in windows]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_batching_keeps_input_order(session: ModelSession) -> None:
    texts = ["x " * n for n in (30, 1, 12, 5, 22, 2)]
    windows = session.windows(texts)
    session.batch_size = 2
    try:
        batched = session.run(windows)
    finally:
        session.batch_size = 16
    assert [len(o) for o in batched] == [3] * len(windows)
    np.testing.assert_allclose(np.stack(batched), np.stack(session.run(windows)), atol=1e-5)


def test_window_probabilities() -> None:
    logits = np.array([[0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(window_probabilities(logits, 1.0, True)[0], [0.5, 1 / (1 + np.exp(-2))])
    soft = window_probabilities(logits, 2.0, False)
    np.testing.assert_allclose(soft.sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(soft[0, 1], np.exp(1) / (1 + np.exp(1)))
