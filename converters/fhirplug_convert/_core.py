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

from fhirplug.errors import ConvertError
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
        output_names=model_outputs(data),
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


def model_outputs(model: bytes) -> tuple[str, ...]:
    """The outputs the runtime reads from an exported model: ``logits``, and ``embedding`` when it has one."""
    import onnx

    names = {o.name for o in onnx.load_model_from_string(model).graph.output}
    return ("logits", "embedding") if "embedding" in names else ("logits",)


class _TorchRunner:
    """The part of ``onnxruntime.InferenceSession`` that ``ModelSession.run`` uses, backed by a torch module."""

    def __init__(self, module: Any, width: int | None = None) -> None:
        self.module = module
        #: The logits' width when the session also reads the embedding (see :func:`logit_width`).
        self.width = width

    def run(self, output_names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        from fhirplug_convert.abstention import WithEmbedding

        self.module.eval()
        args = [torch.from_numpy(feed[name]) for name in _INPUTS]
        with torch.inference_mode():
            logits = self.module(*args)
            if "embedding" not in output_names:
                return [logits.float().numpy()]
            _, embedding = WithEmbedding(self.module, int(logits.shape[-1]))(*args)
        return [logits.float().numpy(), embedding.float().numpy()]


def torch_session(module: Any, like: ModelSession) -> ModelSession:
    """``like`` with the torch module in place of onnxruntime: the same tokenizer, windows and batches.

    The copy shares ``like``'s tokenizers (never reconfigured after load, so sharing is safe).
    """
    session = copy.copy(like)
    session.session = _TorchRunner(module, logit_width(like))
    session.input_names = list(_INPUTS)
    session.provider = "torch"
    return session


def window_outputs(session: ModelSession, texts: Sequence[str]) -> tuple[list[Window], list[np.ndarray]]:
    """Every window of every text and its first model output, as ``Plugin`` produces them for a task."""
    windows = list(session.iter_windows(texts))
    return windows, session.run(windows)


def logit_width(session: ModelSession) -> int | None:
    """How many of a window's values are logits (the rest, if any, is the ``embedding`` output)."""
    if len(session.output_names) == 1:
        return None
    runner = session.session
    if isinstance(runner, _TorchRunner):
        return runner.width
    width = runner.get_outputs()[0].shape[-1]
    if not isinstance(width, int):
        raise ConvertError(f"the logits output has no fixed width ({width!r}): cannot split off the embedding")
    return width


def note_logits(session: ModelSession, texts: Sequence[str]) -> list[np.ndarray]:
    """Per text its ``[windows, labels]`` float32 logits, windows in text order (text-classification).

    A model with an ``embedding`` output gives ``logits ‖ embedding`` per window; only the logits are kept here.
    """
    windows, outputs = window_outputs(session, texts)
    width = logit_width(session)
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for window, logits in zip(windows, outputs, strict=True):
        per_text[window.text_index].append(logits if width is None else logits[:width])
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
