"""Rows: the token spans a batch is made of, in each batching mode (`data.batching`).

Imports from fasttrain: formats.shards, system.atomic, system.errors.

A row is at most seq_len + 1 consecutive tokens of one shard: its first length - 1 are the inputs, the same shifted by
one the targets; a shorter row is padded by the loader and its missing targets ignored.

    packed   each shard cut into windows of seq_len + 1 tokens at stride seq_len, across documents (every row
             full); with `tails` (evaluation) each shard's shorter last window too, so every token is a target.
    padded   one row per document: its end-of-text token, its text and the next one (so the model learns where
             a document ends), truncated to seq_len + 1 tokens.
    aligned  whole documents packed into rows in file order, a row padded after the last that fits whole: a
             document is never cut to fill a row; only one longer than a row is split into row-sized pieces.

Documents are found from the end-of-text tokens prepare writes before each (llm.c's shards too); a shard's first token
also starts a row. Their positions are cached beside the shard (`<shard>.docs.npy`), keyed on its size, modification
time and the end-of-text id; a read-only directory is simply not cached.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import numpy as np

from fasttrain.formats.shards import ShardInfo, token_blocks
from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import UsageError

Batching = Literal["packed", "padded", "aligned"]
IGNORE_INDEX = -100  # the target of a pad: it adds nothing to the loss or its gradient


def index_path(shard: ShardInfo) -> str:
    return shard.path + ".docs.npy"


def document_starts(shard: ShardInfo, eot_id: int, cache: bool = True) -> np.ndarray:
    """Positions in `shard` of its end-of-text tokens (int64, ascending), read from the cache when it is current;
    a scan is cached unless not `cache` (a dry run writes nothing)."""
    stat = os.stat(shard.path)
    key = np.array([shard.num_tokens, eot_id, stat.st_mtime_ns], dtype=np.int64)
    path = index_path(shard)
    with contextlib.suppress(OSError, ValueError):  # missing or unreadable: scan the shard
        cached = np.load(path)
        if cached.dtype == np.int64 and np.array_equal(cached[:3], key):
            return cached[3:]
    found, base = [], 0
    for tokens in token_blocks(shard):
        found.append(np.flatnonzero(tokens == eot_id) + base)
        base += tokens.size
    starts = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if not cache:
        return starts
    with contextlib.suppress(UsageError):  # a cache is a convenience: a read-only directory means scanning again
        write_atomically(path, lambda f: np.save(f, np.concatenate([key, starts])), "cache the document index")
    return starts


class Rows:
    """The rows of one split in one batching mode: row i is tokens [offset[i], offset[i] + length[i]) of shard[i];
    packed rows are computed, the others held as arrays (`cache`: document_starts)."""

    def __init__(
        self,
        shards: list[ShardInfo],
        seq_len: int,
        batching: Batching,
        eot_id: int | None = None,
        tails: bool = False,
        cache: bool = True,
    ):
        self.seq_len = seq_len
        self.batching = batching
        if batching == "packed":
            self._num_tokens = np.array([s.num_tokens for s in shards], dtype=np.int64)
            targets = np.maximum(self._num_tokens - 1, 0)  # a window of n tokens has n - 1 targets
            windows = -(-targets // seq_len) if tails else targets // seq_len
            self._first_window = np.concatenate([[0], np.cumsum(windows)])  # shard i: rows [first[i], first[i+1])
            self.num_rows = int(self._first_window[-1])
            return
        if eot_id is None:
            raise ValueError(f"batching {batching!r} needs the end-of-text token id to find documents")
        per_shard = [_document_rows(s.num_tokens, document_starts(s, eot_id, cache), seq_len, batching) for s in shards]
        self._shard = np.concatenate([np.full(len(o), i, dtype=np.int32) for i, (o, _) in enumerate(per_shard)])
        self._offset = np.concatenate([o for o, _ in per_shard])
        self._length = np.concatenate([n for _, n in per_shard]).astype(np.int32)
        self.num_rows = len(self._offset)

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard index, token offset in the shard, length) of each row in `rows`."""
        if self.batching != "packed":
            return self._shard[rows], self._offset[rows], self._length[rows]
        shard = np.searchsorted(self._first_window, rows, side="right") - 1
        offset = (rows - self._first_window[shard]) * self.seq_len
        return shard, offset, np.minimum(self._num_tokens[shard] - offset, self.seq_len + 1)

    def lengths(self) -> np.ndarray:
        """Every row's length in tokens (for length bucketing)."""
        if self.batching == "packed":
            return self.lookup(np.arange(self.num_rows))[2]
        return self._length


def _document_rows(
    num_tokens: int, eots: np.ndarray, seq_len: int, batching: Batching
) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of one shard's rows, given the positions of its end-of-text tokens."""
    starts = eots if len(eots) and eots[0] == 0 else np.concatenate([[0], eots]).astype(np.int64)
    if batching == "padded":
        # A document ends with the next one's end-of-text token (its last target); the last runs to the shard's end.
        ends = np.append(starts[1:] + 1, num_tokens)
        lengths = np.minimum(ends - starts, seq_len + 1)
        keep = lengths >= 2  # at least one target
        return starts[keep], lengths[keep]
    # A row [p, q] ends at the last document boundary q <= p + seq_len (the next document's end-of-text
    # token is its last target, the shard's last token at the end), and the next row starts at q. With no
    # boundary in reach the document at p is longer than a row: the row is its next seq_len + 1 tokens.
    bounds = np.append(starts, num_tokens - 1)
    offsets, lengths = [], []
    p = 0
    while p < num_tokens - 1:
        q = int(bounds[np.searchsorted(bounds, p + seq_len, side="right") - 1])
        if q <= p:
            q = p + seq_len
        offsets.append(p)
        lengths.append(q - p + 1)
        p = q
    return np.array(offsets, dtype=np.int64), np.array(lengths, dtype=np.int64)
