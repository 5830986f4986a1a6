"""One loaded ONNX model and its tokenizer: windowing, length-bucketed batching, dynamic padding.

Set up once per plugin (never per call): the InferenceSession, the tokenizer with its window size, the thread
settings. ``InferenceSession.run`` is thread-safe and the tokenizer is never reconfigured after load, so one
``ModelSession`` serves many threads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from fhirplug.errors import PluginError, ProviderError
from fhirplug.manifest import TokenizerSpec, VariantSpec

__all__ = ["ModelSession", "Window", "default_threads"]


@dataclass(frozen=True)
class Window:
    """One model input: a slice of one text, at most ``max_tokens`` tokens with special tokens."""

    text_index: int
    ids: Sequence[int]
    type_ids: Sequence[int]
    #: Character offsets of each token in the text; (0, 0) for special tokens.
    offsets: Sequence[tuple[int, int]]
    #: Character span of the text this window covers.
    start: int
    end: int


def default_threads() -> int:
    """Physical cores where known: onnxruntime's GEMMs gain nothing from hyper-threads."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _window(text_index: int, enc: Encoding) -> Window:
    spans = [o for o, special in zip(enc.offsets, enc.special_tokens_mask, strict=True) if not special]
    start = min((s for s, _ in spans), default=0)
    end = max((e for _, e in spans), default=0)
    return Window(text_index, enc.ids, enc.type_ids, enc.offsets, start, end)


class ModelSession:
    """An onnxruntime session plus the tokenizer that feeds it.

    Args:
        model: the ONNX model: its bytes (a verified bundle's, so nothing is re-read after it was hashed) or a path.
        tokenizer_json: a Hugging Face ``tokenizer.json``: its bytes or a path.
        variant: the manifest's variant entry (input and output names).
        tokenizer: the manifest's tokenizer entry (window size and stride).
        providers: onnxruntime providers, best first.
        threads: intra-op threads (default: the cores this process may use).
        batch_size: windows per ``run`` call.
    """

    def __init__(
        self,
        model: bytes | Path,
        tokenizer_json: bytes | Path,
        variant: VariantSpec,
        tokenizer: TokenizerSpec,
        providers: Sequence[str],
        threads: int | None = None,
        batch_size: int = 16,
        where: str | Path | None = None,
    ) -> None:
        model_name = str(where or (model if isinstance(model, Path) else "model"))
        tokenizer_name = str(tokenizer_json) if isinstance(tokenizer_json, Path) else f"{model_name}: tokenizer.json"
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.variant = variant
        self.batch_size = batch_size
        self.max_tokens = tokenizer.max_tokens
        try:
            raw = tokenizer_json.read_bytes() if isinstance(tokenizer_json, Path) else tokenizer_json
            self.tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise PluginError(f"{tokenizer_name}: not a usable tokenizer.json ({exc})") from exc
        # The bundle's tokenizer may carry fixed padding/truncation: windows are ours to make.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=tokenizer.max_tokens, stride=tokenizer.stride)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            source = str(model) if isinstance(model, Path) else model
            self.session = ort.InferenceSession(source, options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types and RuntimeError
            raise ProviderError(f"{model_name}: onnxruntime could not load the model ({exc})") from exc
        names = {i.name for i in self.session.get_inputs()}
        missing = [n for n in variant.input_names if n not in names]
        if missing:
            raise PluginError(
                f"{model_name}: the manifest names input(s) {missing} the model lacks; model inputs: {sorted(names)}"
            )
        self.input_names = [n for n in variant.input_names if n in names]
        self.provider = self.session.get_providers()[0]

    def windows(self, texts: Sequence[str]) -> list[Window]:
        """Tokenize ``texts`` into overlapping windows; no text is ever cut short."""
        out: list[Window] = []
        for index, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            out.append(_window(index, enc))
            out.extend(_window(index, o) for o in enc.overflowing)
        return out

    def run(self, windows: Sequence[Window]) -> list[np.ndarray]:
        """Run every window; returns each window's first output (float32), in input order.

        Windows are sorted by length and batched, each batch padded to its own longest window (dynamic
        padding): a batch of short sentences does not pay for one long note.
        """
        results: list[np.ndarray | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            width = max(len(windows[i].ids) for i in chunk)
            ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            types = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                n = len(windows[i].ids)
                ids[row, :n] = windows[i].ids
                mask[row, :n] = 1
                types[row, :n] = windows[i].type_ids
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            try:
                (logits,) = self.session.run([self.variant.output_names[0]], {n: feed[n] for n in self.input_names})
            except Exception as exc:  # onnxruntime's own exception types
                raise ProviderError(f"onnxruntime failed on a batch of {len(chunk)}×{width}: {exc}") from exc
            logits = np.asarray(logits, dtype=np.float32)
            for row, i in enumerate(chunk):
                results[i] = logits[row]
        return [r for r in results if r is not None]
