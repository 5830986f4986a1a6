"""The one inference core: the converter scores every variant through the runtime's own ``ModelSession``.

Validation, calibration, the parity gate, the int8 calibration data and the test metrics all come from
:class:`fhirplug.session.ModelSession` built from the ONNX file and ``tokenizer.json`` that go into the bundle, at
the batch size ``fhirplug.load_plugin`` uses by default. The windows, the length-sorted batches, the padding and the
onnxruntime settings are therefore the runtime's by construction, not a copy of them that could drift: a model
card's numbers are what ``load_plugin(...).predict_texts`` computes.

The torch reference of the parity gate runs on the same windows and batches: :func:`torch_session` puts the torch
module where the session's onnxruntime ``InferenceSession`` sits (it only needs ``run``), so both see identical
padded arrays.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fhirplug.manifest import TokenizerSpec, VariantSpec
from fhirplug.plugin import load_plugin
from fhirplug.session import ModelSession, Window

__all__ = ["RUNTIME_BATCH_SIZE", "calibration_feeds", "note_logits", "open_session", "torch_session", "window_outputs"]

#: Windows per onnxruntime call in the runtime (``load_plugin``'s default), read from it so the two cannot drift.
RUNTIME_BATCH_SIZE: int = inspect.signature(load_plugin).parameters["batch_size"].default
_GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _providers(precision: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    # fp16 is a GPU format: verify it there when a GPU is present; everything else is judged where it ships (CPU).
    gpu = [p for p in _GPU if p in available] if precision == "fp16" else []
    return [*gpu, "CPUExecutionProvider"]


def open_session(
    model: Path,
    tokenizer_json: Path,
    *,
    max_tokens: int,
    stride: int,
    precision: str,
    opset: int = 17,
    threads: int | None = None,
    batch_size: int = RUNTIME_BATCH_SIZE,
) -> ModelSession:
    """The runtime's session for one variant, exactly as ``Plugin`` builds it from a bundle (``batch_size``: the
    runtime's default; change it only to study batching).

    Raises:
        ProviderError: onnxruntime cannot load the model on the providers present.
    """
    data = model.read_bytes()
    variant = VariantSpec(
        file=model.name,
        precision=precision,
        providers=tuple(_providers(precision)),
        input_names=_INPUTS,
        output_names=("logits",),
        opset=opset,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    spec = TokenizerSpec(file=tokenizer_json.name, max_tokens=max_tokens, stride=stride)
    return ModelSession(
        data,
        tokenizer_json.read_bytes(),
        variant,
        spec,
        list(variant.providers),
        threads=threads,
        batch_size=batch_size,
        where=model,
    )


class _TorchRunner:
    """The part of ``onnxruntime.InferenceSession`` that ``ModelSession.run`` uses, backed by a torch module."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def run(self, output_names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        self.module.eval()
        with torch.inference_mode():
            logits = self.module(*(torch.from_numpy(feed[name]) for name in _INPUTS))
        return [logits.float().numpy()]


def torch_session(module: Any, like: ModelSession) -> ModelSession:
    """``like`` with the torch module in place of onnxruntime: the same tokenizer, windows and batches.

    The copy shares ``like``'s tokenizers (never reconfigured after load, so sharing is safe).
    """
    session = copy.copy(like)
    session.session = _TorchRunner(module)
    session.input_names = list(_INPUTS)
    session.provider = "torch"
    return session


def window_outputs(session: ModelSession, texts: Sequence[str]) -> tuple[list[Window], list[np.ndarray]]:
    """Every window of every text and its first model output, as ``Plugin`` produces them for a task."""
    windows = list(session.iter_windows(texts))
    return windows, session.run(windows)


def note_logits(session: ModelSession, texts: Sequence[str]) -> list[np.ndarray]:
    """Per text its ``[windows, labels]`` float32 logits, windows in text order (text-classification)."""
    windows, outputs = window_outputs(session, texts)
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for window, logits in zip(windows, outputs, strict=True):
        per_text[window.text_index].append(logits)
    return [np.stack(rows) for rows in per_text]


def calibration_feeds(session: ModelSession, texts: Sequence[str], limit: int) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` real windows of ``texts`` (in order), one unpadded int64 feed each, for static int8.

    These are the windows the runtime makes of the training texts, every overflowing one included, so the
    calibrated ranges are those of what the model will see.
    """
    feeds: list[dict[str, np.ndarray]] = []
    for window in session.iter_windows(texts):
        if len(feeds) >= limit:
            break
        ids = np.asarray(window.ids, dtype=np.int64)[None, :]
        feeds.append(
            {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": np.asarray(window.type_ids, dtype=np.int64)[None, :],
            }
        )
    return feeds
