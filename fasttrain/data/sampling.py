"""Which rows a source's batches take, in what order, epoch after epoch: a seeded permutation per epoch (or
file order), pools of rows bucketed by length, the tail that fills no whole round of ranks dropped, and a
`whole` pass's last round made whole with filler (the epochs and passes of fasttrain/data/loader.py). How many
rows an epoch reads is `rows_per_epoch`'s, which the plan counts with too (planning/repeats.py).

Imports from fasttrain: data.documents, formats.shards, system.errors.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np

from fasttrain.data.documents import Rows
from fasttrain.formats.shards import ShardInfo
from fasttrain.system.errors import UsageError

Sampling = Literal["random", "sequential"]
Padding = Literal["fixed", "longest", "bucketed"]
BUCKET_POOL = 64  # batches whose rows are sorted by length together: wider pools waste less, shuffle less
FILLER = -1  # the row id of an empty slot in the last round of a `whole` pass


def rows_per_epoch(rows: Rows, batch_size: int, world_size: int, directory: str | os.PathLike, split: str) -> int:
    """The rows of `rows` (`directory`'s `split` split) one epoch reads: those that fill whole rounds of
    batch_size x world_size, the tail dropped. UsageError if they fill not even one round. The loader's epochs
    (SourceRows) and the plan's (planning/repeats.py) are this count."""
    per_round = batch_size * world_size
    if rows.num_rows < per_round:
        what = f"windows of {rows.seq_len + 1} tokens" if rows.batching == "packed" else f"{rows.batching} rows"
        raise UsageError(
            f"{directory}: the {split} split has {rows.num_rows} {what}, fewer than one batch of "
            f"{batch_size} x {world_size} rank(s); lower batch_size or seq_len, or add data"
        )
    return rows.num_rows // per_round * per_round


class SourceRows:
    """A source split's rows over epochs, the p-th `at(p)`; stateless. An epoch: all but the tail that fills no round of
    batch_size x world_size (`whole`: all, or `first_rows`, filled with FILLER). UsageError naming `directory`'s
    `split` split if an epoch would read no row: fewer rows than a round (`rows_per_epoch`), or a `whole` pass over
    an empty split."""

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str,
        shards: list[ShardInfo],
        rows: Rows,
        batch_size: int,
        world_size: int,
        sampling: Sampling,
        padding: Padding,
        seed: int,
        whole: bool = False,
        first_rows: int = 0,
    ):
        self.shards, self.rows, self.whole = shards, rows, whole
        self.batch_size, self.world_size = batch_size, world_size
        self.sampling, self.padding, self.seed = sampling, padding, seed
        self.whole_rows = min(rows.num_rows, first_rows or rows.num_rows)  # the rows a `whole` pass reads
        if whole:  # every row, the last round filled
            per_round = batch_size * world_size
            self.rows_per_epoch = -(-self.whole_rows // per_round) * per_round
            if self.rows_per_epoch == 0:
                raise UsageError(f"{directory}: the {split} split is empty (no row of two tokens or more)")
        else:
            self.rows_per_epoch = rows_per_epoch(rows, batch_size, world_size, directory, split)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its rows in order) of the last epoch used
        self._epoch_targets: list[int] = []  # the targets each whole epoch read, from the first (targets_before)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row ids of `epoch` in reading order: permuted by (seed, epoch) if random; bucketed padding sorts pools of
        BUCKET_POOL batches by length (shuffling the batches); `whole` fills with FILLER."""
        cached = self._order
        if cached is None or cached[0] != epoch:
            cached = self._order = (epoch, self._ordered(epoch))
        return cached[1]

    def _ordered(self, epoch: int) -> np.ndarray:
        """epoch_order's rows, made afresh (nothing cached)."""
        B = self.batch_size
        n = self.whole_rows if self.whole else self.rows.num_rows // B * B
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        order = np.arange(n) if self.sampling == "sequential" else rng.permutation(self.rows.num_rows)[:n]
        bucketed = self.padding == "bucketed" and self.rows.batching != "packed"  # packed rows are all full
        if bucketed:
            lengths = self.rows.lengths()
            pools = [order[i : i + BUCKET_POOL * B] for i in range(0, n, BUCKET_POOL * B)]
            order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in pools])
        if self.whole:
            order = np.append(order, np.full(self.rows_per_epoch - n, FILLER))
        if bucketed and self.sampling == "random":
            order = order.reshape(-1, B)[rng.permutation(len(order) // B)].reshape(-1)
        return order[: self.rows_per_epoch]

    def at(self, positions: np.ndarray) -> np.ndarray:
        """Row ids of the rows at `positions` (counting across epochs)."""
        epochs, index = np.divmod(positions, self.rows_per_epoch)
        if epochs.size and epochs.min() == epochs.max():
            return self.epoch_order(int(epochs[0]))[index]
        return np.array([self.epoch_order(int(e))[i] for e, i in zip(epochs.tolist(), index.tolist())], dtype=np.int64)

    def targets_before(self, position: int) -> int:
        """Targets (real tokens predicted) in the rows before `position`: what training on them has read."""
        if self.rows.batching == "packed":  # every training row is a full window
            return position * self.rows.seq_len
        epochs, rest = divmod(position, self.rows_per_epoch)
        targets = self.rows.lengths().astype(np.int64) - 1
        # Each epoch drops another tail of rows of other lengths (random sampling): its own sum, made once
        while len(self._epoch_targets) < epochs:
            self._epoch_targets.append(int(targets[self._ordered(len(self._epoch_targets))].sum()))
        return sum(self._epoch_targets[:epochs]) + int(targets[self.epoch_order(epochs)[:rest]].sum())
