"""Tokenize notes into windows and score them in padded batches, exactly as the runtime does.

The runtime (``fhirplug.session.ModelSession``) turns padding off, truncates at ``max_tokens`` with ``stride``
shared tokens and keeps every overflowing window; batches are padded with the ``[PAD]`` id and a zero mask. Doing
the same here is what makes the converter's metrics the runtime's metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

#: Runs one padded batch (input_ids, attention_mask, token_type_ids as int64) and returns [batch, labels] logits.
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Windows:
    note: list[int]
    ids: list[list[int]]
    type_ids: list[list[int]]


def window_tokenizer(tokenizer: Tokenizer, max_tokens: int, stride: int) -> Tokenizer:
    """A private copy set up as the runtime sets up the bundle's tokenizer.json."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length=max_tokens, stride=stride)
    return copy


def pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id("[PAD]") or 0


def encode_windows(tokenizer: Tokenizer, texts: Sequence[str]) -> Windows:
    """Every window of every text (``tokenizer`` from :func:`window_tokenizer`)."""
    note: list[int] = []
    ids: list[list[int]] = []
    types: list[list[int]] = []
    for index, enc in enumerate(tokenizer.encode_batch(list(texts))):
        for part in [enc, *enc.overflowing]:
            note.append(index)
            ids.append(list(part.ids))
            types.append(list(part.type_ids))
    return Windows(note, ids, types)


def first_windows(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """The first window of each text (what training sees)."""
    encodings = tokenizer.encode_batch(list(texts))
    return [list(e.ids) for e in encodings], [list(e.type_ids) for e in encodings]


def pad_batch(ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]], pad: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest row: the runtime's dynamic padding."""
    width = max(len(row) for row in ids)
    out_ids = np.full((len(ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    out_types = np.zeros((len(ids), width), dtype=np.int64)
    for row, (i, t) in enumerate(zip(ids, types, strict=True)):
        out_ids[row, : len(i)] = i
        mask[row, : len(i)] = 1
        out_types[row, : len(t)] = t
    return {"input_ids": out_ids, "attention_mask": mask, "token_type_ids": out_types}


def batches(windows: Windows, batch_size: int, pad: int) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Length-sorted padded batches with the window indices they hold (as the runtime batches)."""
    order = sorted(range(len(windows.ids)), key=lambda i: len(windows.ids[i]))
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        yield chunk, pad_batch([windows.ids[i] for i in chunk], [windows.type_ids[i] for i in chunk], pad)


def score_notes(run: Runner, windows: Windows, n_notes: int, batch_size: int, pad: int) -> list[np.ndarray]:
    """Per-note ``[windows, labels]`` float32 logits, windows in text order."""
    logits: list[np.ndarray | None] = [None] * len(windows.ids)
    for chunk, feed in batches(windows, batch_size, pad):
        out = np.asarray(run(feed), dtype=np.float32)
        for row, i in enumerate(chunk):
            logits[i] = out[row]
    per_note: list[list[np.ndarray]] = [[] for _ in range(n_notes)]
    for i, note in enumerate(windows.note):
        value = logits[i]
        assert value is not None
        per_note[note].append(value)
    return [np.stack(rows) for rows in per_note]
