"""One loaded ONNX model and its tokenizer: windowing, length-bucketed batching, dynamic padding.

Set up once per plugin (never per call): the InferenceSession, the tokenizer with its window size, the thread
settings. ``InferenceSession.run`` is thread-safe and the tokenizers are never reconfigured after load, so one
``ModelSession`` serves many threads.

Windows are streamed (:meth:`ModelSession.iter_windows`): a long text is tokenized in character segments cut
where a whitespace run starts (no token spans one, so the tokens are those of the whole text) and windows are
cut from that token stream as the tokenizer's own truncation with stride would cut them, one at a time, each
as compact arrays. Memory then stays flat however long the note, where :meth:`ModelSession.windows`
materializes every overflowing encoding at once (about 100 KB per window). Load checks that both give the
same windows for this tokenizer; where they would not, a text is encoded whole (still without overflows).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from fhirplug.errors import PluginError, ProviderError, UsageError
from fhirplug.manifest import TokenizerSpec, VariantSpec

__all__ = ["SEGMENT_CHARS", "ModelSession", "Window", "default_threads"]

#: Characters tokenized per step of a long text (about 8k tokens of prose: a few hundred KB in flight).
SEGMENT_CHARS = 32_768
#: Where a segment may end: a space or newline that starts a whitespace run. Tokenizers split words at
#: whitespace (WordPiece drops it, byte-level BPE and Metaspace attach it to the next word), so cutting there
#: leaves every token as it is in the whole text.
_CUT = re.compile(r"(?<=\S)[ \n]")
_SEGMENTS_PER_CALL = 8
_Ints = Sequence[int] | npt.NDArray[np.int32]
_Offsets = Sequence[tuple[int, int]] | npt.NDArray[np.int32]


@dataclass(frozen=True)
class Window:
    """One model input: a slice of one text, at most ``max_tokens`` tokens with special tokens."""

    text_index: int
    #: Token ids (a list, or a compact int32 array when streamed).
    ids: _Ints
    type_ids: _Ints
    #: Character offsets of each token in the text; (0, 0) for special tokens (``[n, 2]`` when streamed).
    offsets: _Offsets
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
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
        # A second tokenizer that never truncates: the token stream windows are cut from (one object per
        # setting, so neither is reconfigured while another thread encodes).
        self._stream = Tokenizer.from_str(self.tokenizer.to_str())
        self._stream.no_truncation()
        self._stream.no_padding()
        self.stride = tokenizer.stride
        self._content = tokenizer.max_tokens - int(self.tokenizer.num_special_tokens_to_add(False))
        if not 0 <= self.stride < self._content:
            raise PluginError(
                f"{tokenizer_name}: stride {self.stride} must be under the {self._content} content tokens of a "
                f"{tokenizer.max_tokens}-token window"
            )
        self._template(tokenizer_name)
        #: Characters per tokenizer call for long texts; None: encode each text whole (see module docs).
        self.segment_chars: int | None = SEGMENT_CHARS
        if not self._streams_exactly():
            self.segment_chars = None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The memory pattern plans one allocation per input shape, and with dynamic padding nearly every batch is
        # a new shape: off, one synthea-conditions worker peaks at about a third less memory at the same speed
        # (benchmarks/ort_memory.py, benchmarks/results/ort_memory.json).
        options.enable_mem_pattern = False
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
        outputs = {o.name for o in self.session.get_outputs()}
        absent = [n for n in variant.output_names if n not in outputs]
        if absent:
            raise PluginError(
                f"{model_name}: the manifest names output(s) {absent} the model lacks; model outputs: {sorted(outputs)}"
            )
        self.output_names = list(variant.output_names)
        self.provider = self.session.get_providers()[0]

    def _template(self, where: str) -> None:
        """The special tokens the post-processor puts around one sequence (BERT: ``[CLS] … [SEP]``)."""
        probe = self.tokenizer.encode("a")
        mask = probe.special_tokens_mask
        content = [i for i, special in enumerate(mask) if not special]
        if not content:
            raise PluginError(f"{where}: the tokenizer gives no token for the text 'a'")
        first, last = content[0], content[-1]
        self._prefix = (np.asarray(probe.ids[:first], np.int32), np.asarray(probe.type_ids[:first], np.int32))
        self._suffix = (
            np.asarray(probe.ids[last + 1 :], np.int32),
            np.asarray(probe.type_ids[last + 1 :], np.int32),
        )
        self._content_type = int(probe.type_ids[first])

    def _streams_exactly(self) -> bool:
        """Whether streamed windows equal the tokenizer's own overflowing windows, on a probe text cut into
        many small segments (a tokenizer whose words span whitespace would fail here, at load)."""
        words = "Pt c/o chest-pain (3/10),  radiating\n\nto L arm; HbA1c 7.2%  — denies fever. Café naïve 東京."
        text = " ".join([words] * (1 + 4 * self._content // 20))
        segment, self.segment_chars = self.segment_chars, 40
        try:
            streamed = list(self.iter_windows([text]))
        finally:
            self.segment_chars = segment
        whole = self.windows([text])
        return len(streamed) == len(whole) and all(
            list(a.ids) == list(b.ids)
            and list(a.type_ids) == list(b.type_ids)
            and [tuple(o) for o in a.offsets] == [tuple(o) for o in b.offsets]
            and (a.start, a.end) == (b.start, b.end)
            for a, b in zip(streamed, whole, strict=True)
        )

    def _segments(self, text: str) -> Iterator[tuple[int, str]]:
        size = self.segment_chars
        if size is None or len(text) <= size:
            yield 0, text
            return
        start = 0
        while start < len(text):
            stop = len(text)
            if start + size < len(text):
                cut = _CUT.search(text, start + size, start + 4 * size)
                # No whitespace in 4 segments (one enormous "word"): cut anyway; memory matters more here than
                # matching the one-shot encoding of a text that is no prose.
                stop = cut.start() if cut else start + 4 * size
            yield start, text[start:stop]
            start = stop

    def _tokens(self, text: str) -> Iterator[tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]]:
        """The text's content tokens (no special tokens), a few segments per tokenizer call: ids and offsets."""
        segments = self._segments(text)
        while True:
            group = [item for _, item in zip(range(_SEGMENTS_PER_CALL), segments, strict=False)]
            if not group:
                return
            encodings = self._stream.encode_batch([seg for _, seg in group], add_special_tokens=False)
            for (start, _), enc in zip(group, encodings, strict=True):
                ids = np.asarray(enc.ids, np.int32)
                offsets = np.asarray(enc.offsets, np.int32).reshape(-1, 2) + start
                yield ids, offsets

    def count_windows(self, text: str) -> int:
        """How many windows ``text`` gives, without making any (for budgets: checked before the work)."""
        tokens = 0
        for _, segment in self._segments(text):
            tokens += len(self._stream.encode(segment, add_special_tokens=False))
        return self._window_count(tokens)

    def _window_count(self, tokens: int) -> int:
        if tokens <= self._content:
            return 1
        step = self._content - self.stride
        return 1 + -(-(tokens - self._content) // step)

    def iter_windows(self, texts: Sequence[str], indices: Sequence[int] | None = None) -> Iterator[Window]:
        """The windows of ``texts``, one at a time, equal to :meth:`windows`' but never all held at once.

        ``indices`` (default ``0, 1, …``) are the ``text_index`` each text's windows carry.
        """
        for index, text in zip(range(len(texts)) if indices is None else indices, texts, strict=True):
            yield from self._text_windows(index, text)

    def _text_windows(self, index: int, text: str) -> Iterator[Window]:
        # The tokenizer's truncation with stride: windows of `size` content tokens starting every `step`
        # tokens, the last one the first that reaches the end. A window is cut once a token past it is seen.
        size, step = self._content, self._content - self.stride
        ids = np.empty(0, np.int32)
        offsets = np.empty((0, 2), np.int32)
        base = start = 0  # token index of ids[0]; first token of the next window
        for seg_ids, seg_offsets in self._tokens(text):
            ids = np.concatenate((ids, seg_ids))
            offsets = np.concatenate((offsets, seg_offsets))
            while base + len(ids) > start + size:
                cut = start - base
                yield self._make(index, ids[cut : cut + size], offsets[cut : cut + size])
                start += step
            if start > base:  # tokens before the next window are no longer needed
                ids, offsets, base = ids[start - base :], offsets[start - base :], start
        yield self._make(index, ids[start - base :], offsets[start - base :])

    def _make(self, index: int, ids: npt.NDArray[np.int32], offsets: npt.NDArray[np.int32]) -> Window:
        (pre_ids, pre_types), (post_ids, post_types) = self._prefix, self._suffix
        all_ids = np.concatenate((pre_ids, ids, post_ids))
        types = np.concatenate((pre_types, np.full(len(ids), self._content_type, np.int32), post_types))
        zeros = np.zeros((len(pre_ids), 2), np.int32), np.zeros((len(post_ids), 2), np.int32)
        all_offsets = np.concatenate((zeros[0], offsets, zeros[1]))
        start = int(offsets[:, 0].min()) if len(offsets) else 0
        end = int(offsets[:, 1].max()) if len(offsets) else 0
        return Window(index, all_ids, types, all_offsets, start, end)

    def windows(self, texts: Sequence[str]) -> list[Window]:
        """Tokenize ``texts`` into overlapping windows; no text is ever cut short.

        Every window of every text is materialized at once, as the tokenizer's overflowing encodings: fine for
        short texts and as the reference :meth:`iter_windows` is checked against; prefer that for long notes.
        """
        out: list[Window] = []
        for index, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            out.append(_window(index, enc))
            out.extend(_window(index, o) for o in enc.overflowing)
        return out

    def run(self, windows: Sequence[Window]) -> list[np.ndarray]:
        """Run every window; returns each window's outputs (float32), in input order.

        A variant with one output (``logits``) gives each window's row of it. A variant that names more outputs
        (a text classifier's ``logits`` and its pooled ``embedding``, which abstention reads) gives each window
        its rows joined along the last axis — ``logits ‖ embedding`` — and the task splits them by its label
        count.

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
                got = self.session.run(self.output_names, {n: feed[n] for n in self.input_names})
            except Exception as exc:  # onnxruntime's own exception types
                raise ProviderError(f"onnxruntime failed on a batch of {len(chunk)}×{width}: {exc}") from exc
            parts = [np.asarray(g, dtype=np.float32) for g in got]
            logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
            for row, i in enumerate(chunk):
                results[i] = logits[row]
        return [r for r in results if r is not None]
