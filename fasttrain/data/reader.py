"""Reading batch g of one rank's stream: the rows its blend of sources plans for it, read from the shards with
`os.preadv` into a staging buffer, padded, checked against the vocabulary, and split into x and y.

Imports from fasttrain: data.documents, data.mixture, data.sampling, formats.shards, system.errors.

Never through a memory map: a long run over a memory-mapped corpus keeps every page it has touched resident,
and the process's memory grows with the corpus.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fasttrain.data.documents import IGNORE_INDEX, Rows
from fasttrain.data.mixture import Blend
from fasttrain.data.sampling import FILLER, Padding, SourceRows
from fasttrain.formats.shards import HEADER_BYTES, out_of_vocabulary
from fasttrain.system.errors import UsageError


class RowReader:
    """Reads batch g of one rank's stream, its part of round g of the global rows (sources: the blend's). Apart from
    `TokenLoader`, so the prefetch thread holds only this and a dropped loader is collected."""

    def __init__(
        self,
        sources: list[SourceRows],
        blend: Blend,
        batch_size: int,
        padding: Padding,
        rank: int,
        world_size: int,
        pad_id: int,
        pad_multiple: int,
        pin_memory: bool,
        vocab_size: int,
    ):
        self.sources, self.blend = sources, blend
        self.shards = [s for source in sources for s in source.shards]
        self._first_shard = np.cumsum([0] + [len(source.shards) for source in sources])
        self.whole = sources[0].whole
        self.vocab_size = vocab_size  # every id read is checked against it; 0: unknown, not checked
        self.dtype = self.shards[0].dtype
        self.batch_size, self.seq_len = batch_size, sources[0].rows.seq_len
        self.padding = padding
        self.rank, self.world_size = rank, world_size
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self.pin_memory = pin_memory
        self.batches_per_epoch = sources[0].rows_per_epoch // (batch_size * world_size)  # of a `whole` pass
        self._fds = [os.open(s.path, os.O_RDONLY) for s in self.shards]

    @property
    def rows(self) -> Rows:
        """The rows of the first source (of the only one, but in a mixture)."""
        return self.sources[0].rows

    def spans(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index into self.shards, token offset, length) of each row of this rank's batch number `g` (counting
        across epochs); a FILLER slot is one token of row 0 (no target, and it never widens a batch)."""
        source, position = self.blend.plan(g)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        source, position = source[mine], position[mine]
        if len(self.sources) == 1:
            return self._spans_of(0, position)
        shard, offset, length = (np.empty(len(source), dtype=np.int64) for _ in range(3))
        order = np.argsort(source, kind="stable")  # this batch's rows grouped by source
        ends = np.cumsum(np.bincount(source, minlength=len(self.sources))).tolist()
        for j, (a, b) in enumerate(zip([0] + ends, ends)):
            if a < b:
                at = order[a:b]
                shard[at], offset[at], length[at] = self._spans_of(j, position[at])
                shard[at] += self._first_shard[j]
        return shard, offset, length

    def _spans_of(self, j: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`spans` of the rows at `positions` of source j, its shards counted from 0."""
        ids = self.sources[j].at(positions)
        if not self.whole:
            return self.sources[j].rows.lookup(ids)
        filler = ids == FILLER
        shard, offset, length = self.sources[j].rows.lookup(np.where(filler, 0, ids))
        return shard, offset, np.where(filler, 1, length)

    def read(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `g` as host tensors x, y (B, L) int64 (pinned if `pin_memory`): L is seq_len or the longest row rounded
        up to pad_multiple; past a row's end x is pad_id, y IGNORE_INDEX."""
        shard, offset, length = self.spans(g)
        B, itemsize = self.batch_size, self.dtype.itemsize
        L = self.seq_len
        if self.padding != "fixed":
            L = min(L, -(-(int(length.max()) - 1) // self.pad_multiple) * self.pad_multiple)
        rows = np.empty((B, L + 1), dtype=self.dtype)
        fds, lengths = self._fds, length.tolist()
        for row, s, start, n in zip(rows, shard.tolist(), (HEADER_BYTES + offset * itemsize).tolist(), lengths):
            if os.preadv(fds[s], [row if n == L + 1 else row[:n]], start) != n * itemsize:  # packed rows: all whole
                raise UsageError(f"{self.shards[s].path}: short read at byte {start} (truncated while in use?)")
        short = np.flatnonzero(length < L + 1).tolist()
        for row in short:  # past a row's end: pad inputs
            rows[row, lengths[row] :] = self.pad_id
        # A header's largest id can lie (or be absent); an id beyond the vocabulary would index past the
        # embedding (an IndexError, or silent garbage on a GPU), so check what was read, on the host.
        if self.vocab_size and int(rows.max()) >= self.vocab_size:
            row, col = (int(i) for i in np.argwhere(rows >= self.vocab_size)[0])
            raise UsageError(
                out_of_vocabulary(
                    self.shards[shard[row]].path, int(rows[row, col]), int(offset[row]) + col, self.vocab_size
                )
            )
        x = torch.empty((B, L), dtype=torch.int64, pin_memory=self.pin_memory)
        y = torch.empty((B, L), dtype=torch.int64, pin_memory=self.pin_memory)
        np.copyto(x.numpy(), rows[:, :-1])
        targets = y.numpy()
        np.copyto(targets, rows[:, 1:])
        for row in short:  # a row of n tokens has n - 1 targets
            targets[row, lengths[row] - 1 :] = IGNORE_INDEX
        return x, y

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    __del__ = close
