"""The token loader: (x, y) batches of rows from token shards, prefetched, exactly resumable.

Imports from fasttrain: data.documents, data.mixture, data.prefetch, data.reader, data.resharding, data.sampling,
formats.shards, system.errors.

A batch is `batch_size` rows (fasttrain/data/documents.py: packed windows, one document each, or document-aligned), x =
row[:-1] and y = row[1:], int64 (B, L): L is seq_len, or with `padding` "longest" or "bucketed" the batch's longest row.
Shorter rows are padded on the right, x with the end-of-text id and y with IGNORE_INDEX, so pads add nothing to the loss
and no real token attends to one. Rows never cross a shard boundary.

An epoch visits every row once, in a seeded order that depends only on (seed, epoch), or in file order ("sequential");
bucketing sorts pools of rows by length to waste less on pads. Rank r of world_size takes batches r, r + world_size, ...
of the epoch; what does not fill a whole round at the end of an epoch is dropped (the next epoch's order differs). A
`whole=True` loader (evaluation) makes one pass over every row instead: the last round's empty slots are filler rows of
one token and no target, so every batch keeps its shape and every rank runs the same number of batches (sharded models
need all in each forward), and packed rows include each shard's shorter last window. `first_rows` cuts that pass to the
split's first rows, the same rows in any world.

The position is one integer, the batches this rank has consumed; with the seed it determines everything else, so
`state_dict()` is a few integers and a reloaded loader yields exactly the batches an uninterrupted one would. The loader
is the front of sampling.py (row order), reader.py (a batch read with os.preadv, never a memory map), prefetch.py
(reading ahead on a thread) and resharding.py (a position carried to another world; `reshard` is importable from here
too).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, get_args

import torch

from fasttrain.data.documents import Batching, Rows
from fasttrain.data.mixture import Blend
from fasttrain.data.prefetch import Prefetcher, load_batch
from fasttrain.data.reader import RowReader
from fasttrain.data.resharding import reshard as reshard  # importable from here, as before the split
from fasttrain.data.sampling import Padding, Sampling, SourceRows
from fasttrain.formats.shards import ShardInfo, find_shards, read_meta, scan_id_bound
from fasttrain.system.errors import UsageError


class TokenLoader:
    """Infinite iterator of (x, y) batches, shape (B, L) int64 on `device`, y = x shifted by one token. `batching` picks
    the rows (documents.py); "padded" and "aligned" need `eot_id`, the end-of-text token that starts each document (also
    the pad input). `padding` "fixed" makes every batch (B, seq_len); "longest" cuts each to its longest row, rounded up
    to `pad_multiple`; "bucketed" also batches rows of similar lengths together. `whole=True`: one finite pass over the
    split, `first_rows` > 0 its first rows only. `prefetch` > 0 reads that many batches ahead on a thread (pinned,
    copied to a GPU on a side stream), 0 in the calling thread, the same batches. `wait_seconds`: the time `next()` has
    waited. Each shard's header, size and largest id (against `vocab_size`: meta.json's, else the shards') are checked
    at construction, every batch's ids as read: `UsageError`s naming the file."""

    def __init__(
        self,
        directory: str | os.PathLike | Sequence[str | os.PathLike],
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        sampling: Sampling = "random",
        batching: Batching = "packed",
        padding: Padding = "fixed",
        eot_id: int | None = None,
        pad_multiple: int = 16,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
        whole: bool = False,
        first_rows: int = 0,
        mix: Sequence[tuple[int, Sequence[float]]] | None = None,
    ):
        _check_sizes(batch_size, seq_len, pad_multiple, prefetch, rank, world_size)
        _check_modes(sampling, batching, padding)
        directories = [directory] if isinstance(directory, (str, os.PathLike)) else list(directory)
        if whole and len(directories) > 1:
            raise ValueError("a `whole` pass reads one source; evaluate each source of a mixture on its own")
        found = [find_shards(d, split) for d in directories]
        self.vocab_size = vocab_size or _vocab_size_of(Path(directories[0]), found[0])
        if self.vocab_size:
            _check_ids([s for shards in found for s in shards], self.vocab_size)
        self.device = torch.device(device)
        self.prefetch = prefetch
        rows = [Rows(shards, seq_len, batching, eot_id, tails=whole) for shards in found]
        if whole:  # a batch wider than a rank's share of the rows would be filler, costing memory for nothing
            read = min(rows[0].num_rows, first_rows or rows[0].num_rows)
            batch_size = min(batch_size, max(1, -(-read // world_size)))
        sources = [
            SourceRows(d, split, shards, r, batch_size, world_size, sampling, padding, seed, whole, first_rows)
            for d, shards, r in zip(directories, found, rows)
        ]
        self.blend = Blend(mix or [(0, [1.0] * len(sources))], batch_size * world_size)
        if self.blend.sources != len(sources):
            raise ValueError(f"a mix of {self.blend.sources} weights for {len(sources)} sources")
        self.sampling, self.seed = sampling, seed
        self.reader = RowReader(
            sources,
            self.blend,
            batch_size,
            padding,
            rank,
            world_size,
            pad_id=eot_id or 0,
            pad_multiple=pad_multiple,
            pin_memory=self.device.type == "cuda",
            vocab_size=self.vocab_size,
        )
        self.batches = 0  # consumed by the caller: the whole resumable state, with the seed
        self._tokens_carried = [0] * len(sources)  # see load_state_dict
        self.wait_seconds = 0.0
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Not a bound method: the prefetch thread must not keep the loader alive.
        self._load = functools.partial(load_batch, self.reader, self.device, stream)
        self._worker: Prefetcher | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reader.whole and self.batches >= self.reader.batches_per_epoch:
            raise StopIteration
        start = time.perf_counter()
        if self.prefetch == 0:
            x, y, ready = self._load(self.batches)
        else:
            if self._worker is None:
                self._worker = Prefetcher(self._load, self.batches, self.prefetch)
            try:
                x, y, ready = self._worker.get()
            except BaseException:  # the thread has stopped; the next call starts a new one at the same batch
                self._stop_worker()
                raise
        if ready is not None:  # make the compute stream wait for the copy, and keep the memory until it is done
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            x.record_stream(stream)
            y.record_stream(stream)
        self.wait_seconds += time.perf_counter() - start
        self.batches += 1
        return x, y

    def positions(self) -> tuple[int, ...]:
        """Rows taken from each source so far, over all ranks (up to the batch the caller has consumed)."""
        return self.blend.start(self.batches)[0]

    def source_tokens(self) -> list[int]:
        """Targets (real tokens) read from each source so far, over all ranks."""
        return [
            s.targets_before(p) + carried
            for s, p, carried in zip(self.reader.sources, self.positions(), self._tokens_carried)
        ]

    def source_epochs(self) -> list[float]:
        """How many times over each source has been read so far (1.5: once, and half of it again)."""
        return [p / s.rows_per_epoch for s, p in zip(self.reader.sources, self.positions())]

    def state_dict(self) -> dict[str, int | str | list]:
        r = self.reader
        positions, deficits = self.blend.start(self.batches)
        return {
            "batches": self.batches,
            "seed": self.seed,
            "sampling": self.sampling,
            "batch_size": r.batch_size,
            "seq_len": r.seq_len,
            "rank": r.rank,
            "world_size": r.world_size,
            "batching": r.sources[0].rows.batching,
            "padding": r.padding,
            "pad_multiple": r.pad_multiple,
            "num_rows": [s.rows.num_rows for s in r.sources],
            # every source's position and deficit (fasttrain/data/mixture.py): where the blend continues from
            "positions": list(positions),
            "deficits": list(deficits),
            "tokens": self.source_tokens(),
            "mix_rounds": self.blend.entered(self.batches),  # where each mix change in force began: it stays there
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the data and every setting but the position must match. A new mix applies from the
        saved position on; the changes the saved run had entered stay (Blend.restart)."""
        mine = self.state_dict()
        state = dict(state)
        if isinstance(state.get("num_rows"), int):  # saved before mixtures: one source, its rows read in order
            state["num_rows"] = [state["num_rows"]]
            state.setdefault("positions", [int(state["batches"]) * self.blend.rows_per_round])
            state.setdefault("deficits", [0.0])
        position = ("batches", "positions", "deficits", "tokens", "mix_rounds")
        differ = [
            f"{k}={state.get(k)!r} (now {v!r})" for k, v in mine.items() if k not in position and state.get(k) != v
        ]
        if differ:
            raise UsageError(f"loader state does not match this loader: {', '.join(differ)}")
        self._stop_worker()
        self.batches = int(state["batches"])
        self.blend.restart(self.batches, state["positions"], state["deficits"], state.get("mix_rounds"))
        # What the saved world read beyond what its positions count in this world's epochs (reshard): 0 but
        # after a resume on another number of processes, whose epochs are cut at other lengths.
        self._tokens_carried = [0] * len(self.reader.sources)
        if "tokens" in state:
            self._tokens_carried = [int(t) - n for t, n in zip(state["tokens"], self.source_tokens())]

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def close(self) -> None:
        self._stop_worker()
        self.reader.close()

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_worker", None) is not None:
            self._stop_worker()


def _check_sizes(batch_size: int, seq_len: int, pad_multiple: int, prefetch: int, rank: int, world_size: int) -> None:
    """ValueError for a batch, context or pad multiple not above 0, a negative prefetch, or a rank outside the world."""
    if batch_size <= 0 or seq_len <= 0 or prefetch < 0 or pad_multiple <= 0:
        raise ValueError(
            f"batch_size, seq_len and pad_multiple must be > 0 and prefetch >= 0, got "
            f"{batch_size}, {seq_len}, {pad_multiple}, {prefetch}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")


def _check_modes(sampling: str, batching: str, padding: str) -> None:
    """ValueError for the first of sampling, batching and padding that is not one of its choices."""
    for name, value, choices in (
        ("sampling", sampling, Sampling),
        ("batching", batching, Batching),
        ("padding", padding, Padding),
    ):
        if value not in get_args(choices):
            raise ValueError(f"{name} must be one of {get_args(choices)}, got {value!r}")


def _check_ids(shards: list[ShardInfo], vocab_size: int) -> None:
    """UsageError naming the first of `shards` holding an id outside a vocabulary of `vocab_size` (the largest
    id its header records, else found by reading it)."""
    for s in shards:
        bound = s.id_bound or scan_id_bound(s)
        if bound > vocab_size:
            raise UsageError(f"{s.path}: token id {bound - 1} is outside the vocabulary ({vocab_size} tokens)")


def _vocab_size_of(directory: Path, shards: list[ShardInfo]) -> int:
    """The vocabulary size recorded by prepare (meta.json), else by the shards (0 if none records it)."""
    meta = read_meta(directory)
    return int(meta["vocab_size"]) if meta else max(s.vocab_size for s in shards)
