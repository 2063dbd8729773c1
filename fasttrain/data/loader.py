"""The token loader: (x, y) batches of rows from token shards, prefetched, exactly resumable.

A batch is `batch_size` rows (fasttrain/data/documents.py: packed windows, one document
each, or document-aligned), x = row[:-1] and y = row[1:], both int64 of shape
(B, L). L is seq_len, except that with `padding` "longest" or "bucketed" a batch
is cut to its longest row. Rows shorter than L + 1 are padded: x with the
end-of-text id, y with IGNORE_INDEX, so pads add nothing to the loss; with causal
attention and the padding on the right, no real token ever attends to a pad.
Rows never cross a shard boundary.

An epoch visits every row once, in a seeded random order (a permutation that
depends only on (seed, epoch)) or in file order ("sequential"). Bucketing sorts
pools of rows by length so a batch holds rows of similar lengths and wastes less
on pads. Rank r of a data-parallel job of world_size ranks takes batches r,
r + world_size, ... of the epoch, so ranks never share a row within an epoch.
Whatever does not fill a whole round of ranks at the end of an epoch is dropped;
the next epoch's order is different, so nothing is dropped for good. A loader made
with `whole=True` (for evaluation) instead makes one pass over every row, the last
round partial (and B at most a rank's share of the rows): its empty slots are filler
rows of one token, no target, so every batch keeps its shape (B, L) (no recompilation)
and every rank runs the same number of batches (sharded models need every rank in each
forward), while nothing is counted twice. Packed rows then include each shard's final,
shorter window, so every token is scored.

The position in the stream is one integer, the number of batches this rank has
consumed; with the seed it determines everything else, so `state_dict()` is a
few integers and a reloaded loader yields exactly the batches an uninterrupted
one would have.

Rows are read with `os.preadv` straight into a staging buffer, never through a
memory map: a long run over a memory-mapped corpus keeps every page it has
touched resident, and the process's memory grows with the corpus.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Literal, get_args

import numpy as np
import torch

from fasttrain.data.documents import IGNORE_INDEX, Batching, Rows
from fasttrain.data.shards import HEADER_BYTES, ShardInfo, find_shards, out_of_vocabulary, read_meta, scan_id_bound
from fasttrain.system.errors import UsageError

Sampling = Literal["random", "sequential"]
Padding = Literal["fixed", "longest", "bucketed"]
BUCKET_POOL = 64  # batches whose rows are sorted by length together: wider pools waste less, shuffle less
FILLER = -1  # the row id of an empty slot in the last round of a `whole` pass


class RowReader:
    """Reads batch number g of one rank's stream from the rows of one split; stateless between calls.

    Kept apart from `TokenLoader` so the prefetch thread holds only this, and a
    loader that is dropped without `close()` can still be collected.
    """

    def __init__(
        self, shards: list[ShardInfo], rows: Rows, batch_size: int, sampling: Sampling, padding: Padding,
        seed: int, rank: int, world_size: int, pad_id: int, pad_multiple: int, pin_memory: bool, vocab_size: int,
        whole: bool = False,
    ):
        self.shards, self.rows, self.whole = shards, rows, whole
        self.vocab_size = vocab_size  # every id read is checked against it; 0: unknown, not checked
        self.dtype = shards[0].dtype
        self.batch_size, self.seq_len = batch_size, rows.seq_len
        self.sampling, self.padding, self.seed = sampling, padding, seed
        self.rank, self.world_size = rank, world_size
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self.pin_memory = pin_memory
        per_round = batch_size * world_size
        self.batches_per_epoch = -(-rows.num_rows // per_round) if whole else rows.num_rows // per_round
        self._fds = [os.open(s.path, os.O_RDONLY) for s in shards]
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its batches of rows) of the last epoch used

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """Row ids of every batch of `epoch`, (batches, batch_size); rank r takes batches r, r + world_size, ...

        Random sampling permutes the rows with a generator seeded by (seed, epoch).
        Bucketed padding then sorts each pool of BUCKET_POOL batches' rows by length,
        cuts the pool into batches of similar lengths, and (random sampling) shuffles the batches.
        A `whole` reader keeps every row and fills the last round with FILLER ids.
        """
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        B = self.batch_size
        n = self.rows.num_rows if self.whole else self.rows.num_rows // B * B
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        order = np.arange(n) if self.sampling == "sequential" else rng.permutation(self.rows.num_rows)[:n]
        bucketed = self.padding == "bucketed" and self.rows.batching != "packed"  # packed rows are all full
        if bucketed:
            lengths = self.rows.lengths()
            pools = [order[i:i + BUCKET_POOL * B] for i in range(0, n, BUCKET_POOL * B)]
            order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in pools])
        if self.whole:
            order = np.append(order, np.full(self.batches_per_epoch * B * self.world_size - n, FILLER))
        batches = order.reshape(-1, B)
        if bucketed and self.sampling == "random":
            batches = batches[rng.permutation(len(batches))]
        self._order = (epoch, batches)
        return batches

    def rows_of_batch(self, g: int) -> np.ndarray:
        """Row ids of this rank's batch number `g` (counting across epochs)."""
        epoch, i = divmod(g, self.batches_per_epoch)
        return self.epoch_batches(epoch)[i * self.world_size + self.rank]

    def read(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `g` as host tensors x, y of shape (B, L), int64 (pinned when `pin_memory`).

        L is seq_len, or with padding "longest"/"bucketed" the longest row's inputs rounded
        up to pad_multiple (at most seq_len). Past a row's end x holds pad_id and y IGNORE_INDEX.
        """
        ids = self.rows_of_batch(g)
        filler = ids == FILLER
        # A filler slot reads the first token of row 0: one token, so no target, and it never widens L.
        shard, offset, length = self.rows.lookup(np.where(filler, 0, ids))
        length = np.where(filler, 1, length)
        B, itemsize = self.batch_size, self.dtype.itemsize
        L = self.seq_len
        if self.padding != "fixed":
            L = min(L, -(-(int(length.max()) - 1) // self.pad_multiple) * self.pad_multiple)
        rows = np.empty((B, L + 1), dtype=self.dtype)
        lengths = length.tolist()
        for row, (s, o, n) in enumerate(zip(shard.tolist(), offset.tolist(), lengths)):
            at = HEADER_BYTES + o * itemsize
            if os.preadv(self._fds[s], [rows[row, :n]], at) != n * itemsize:
                raise UsageError(f"{self.shards[s].path}: short read at byte {at} (truncated while in use?)")
            rows[row, n:] = self.pad_id
        # A header's largest id can lie (or be absent); an id beyond the vocabulary would index past the
        # embedding (an IndexError, or silent garbage on a GPU), so check what was read, on the host.
        if self.vocab_size and int(rows.max()) >= self.vocab_size:
            row, col = (int(i) for i in np.argwhere(rows >= self.vocab_size)[0])
            raise UsageError(out_of_vocabulary(self.shards[shard[row]].path, int(rows[row, col]),
                                               int(offset[row]) + col, self.vocab_size))
        x = torch.empty((B, L), dtype=torch.int64, pin_memory=self.pin_memory)
        y = torch.empty((B, L), dtype=torch.int64, pin_memory=self.pin_memory)
        np.copyto(x.numpy(), rows[:, :-1])
        targets = y.numpy()
        np.copyto(targets, rows[:, 1:])
        for row, n in enumerate(lengths):  # a row of n tokens has n - 1 targets
            targets[row, n - 1:] = IGNORE_INDEX
        return x, y

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    __del__ = close


class TokenLoader:
    """Infinite iterator of (x, y) batches, shape (B, L) int64 on `device`, y = x shifted by one token.

    `batching` picks the rows (fasttrain/data/documents.py); "padded" and "aligned" need
    `eot_id`, the end-of-text token that starts each document (also the pad input).
    `padding` "fixed" makes every batch (B, seq_len); "longest" cuts each batch to its
    longest row, rounded up to `pad_multiple`; "bucketed" also batches rows of similar
    lengths together. Packed rows are always full, so there padding changes nothing.

    `whole=True` makes the loader finite, for evaluation: one pass over every row of
    the split, in `sampling` order, the last round partial (see the module docstring);
    only an empty split is then an error.

    `prefetch` > 0 reads that many batches ahead on a background thread (into
    pinned buffers, copied to the GPU on a side stream when `device` is CUDA);
    0 reads in the calling thread. Both give the same batches. `wait_seconds`
    is the total time `next()` has spent waiting for data.

    Every shard's header and size are checked at construction, and so is its
    largest token id against `vocab_size` (default: meta.json's, else the
    shards' own); since a header can lie, every batch's ids are checked again
    as they are read. Problems are `UsageError`s naming the file.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
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
    ):
        if batch_size <= 0 or seq_len <= 0 or prefetch < 0 or pad_multiple <= 0:
            raise ValueError(f"batch_size, seq_len and pad_multiple must be > 0 and prefetch >= 0, got "
                             f"{batch_size}, {seq_len}, {pad_multiple}, {prefetch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        for name, value, choices in (("sampling", sampling, Sampling), ("batching", batching, Batching),
                                     ("padding", padding, Padding)):
            if value not in get_args(choices):
                raise ValueError(f"{name} must be one of {get_args(choices)}, got {value!r}")
        shards = find_shards(directory, split)
        self.vocab_size = vocab_size or _vocab_size_of(Path(directory), shards)
        if self.vocab_size:
            for s in shards:
                bound = s.id_bound or scan_id_bound(s)
                if bound > self.vocab_size:
                    raise UsageError(f"{s.path}: token id {bound - 1} is outside the vocabulary ({self.vocab_size} tokens)")
        self.device = torch.device(device)
        self.prefetch = prefetch
        rows = Rows(shards, seq_len, batching, eot_id, tails=whole)
        if whole:  # a batch wider than a rank's share of the rows would be filler, costing memory for nothing
            batch_size = min(batch_size, max(1, -(-rows.num_rows // world_size)))
        self.reader = RowReader(shards, rows, batch_size, sampling, padding, seed, rank, world_size,
                                pad_id=eot_id or 0, pad_multiple=pad_multiple, pin_memory=self.device.type == "cuda",
                                vocab_size=self.vocab_size, whole=whole)
        if self.reader.batches_per_epoch == 0:
            self.reader.close()
            if whole:
                raise UsageError(f"{directory}: the {split} split is empty (no row of two tokens or more)")
            what = f"windows of {seq_len + 1} tokens" if batching == "packed" else f"{batching} rows"
            raise UsageError(
                f"{directory}: the {split} split has {rows.num_rows} {what}, "
                f"fewer than one batch of {batch_size} x {world_size} rank(s); lower batch_size or seq_len, or add data"
            )
        self.batches = 0  # consumed by the caller: the whole resumable state, with the seed
        self.wait_seconds = 0.0
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Not a bound method: the prefetch thread must not keep the loader alive.
        self._load = functools.partial(_load_batch, self.reader, self.device, stream)
        self._worker: _Prefetcher | None = None

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
                self._worker = _Prefetcher(self._load, self.batches, self.prefetch)
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

    def state_dict(self) -> dict[str, int | str]:
        r = self.reader
        return {
            "batches": self.batches, "seed": r.seed, "sampling": r.sampling, "batch_size": r.batch_size,
            "seq_len": r.seq_len, "rank": r.rank, "world_size": r.world_size, "batching": r.rows.batching,
            "padding": r.padding, "pad_multiple": r.pad_multiple, "num_rows": r.rows.num_rows,
        }

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Continue from `state`; the data and every setting but the position must match."""
        mine = self.state_dict()
        differ = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in mine.items() if k != "batches" and state.get(k) != v]
        if differ:
            raise UsageError(f"loader state does not match this loader: {', '.join(differ)}")
        self._stop_worker()
        self.batches = int(state["batches"])

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def close(self) -> None:
        self._stop_worker()
        self.reader.close()

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_worker", None) is not None:
            self._stop_worker()


def _load_batch(
    reader: RowReader, device: torch.device, stream: torch.cuda.Stream | None, g: int
) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
    """Batch `g` on `device`; on CUDA, copied on `stream` with an event that marks the copy done."""
    x, y = reader.read(g)
    if stream is None:
        return x, y, None
    with torch.cuda.stream(stream):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return x, y, ready


class _Prefetcher:
    """A daemon thread that calls load(g), load(g + 1), ... and queues the results, `depth` ahead.

    A prefetcher still running when the interpreter exits is stopped by an atexit hook. Left
    running, the thread would be torn down wherever it stands, and inside a torch op (which
    releases the GIL) that aborts the process ("terminate called without an active exception").
    """

    def __init__(self, load, first: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(load, first), daemon=True, name="fasttrain-prefetch")
        self._thread.start()
        atexit.register(self.stop)

    def _run(self, load, g: int) -> None:
        while not self._stopped.is_set():
            try:
                item = load(g)
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:  # the consumer is behind; look at the stop flag, then try again
                    continue
            if isinstance(item, BaseException):
                return
            g += 1

    def get(self):
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:  # never wait on a thread that is gone
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._stopped.set()
        self._thread.join()


def _vocab_size_of(directory: Path, shards: list[ShardInfo]) -> int:
    """The vocabulary size recorded by prepare (meta.json), else by the shards (0 if none records it)."""
    meta = read_meta(directory)
    return int(meta["vocab_size"]) if meta else max(s.vocab_size for s in shards)


def reshard(saved: list[dict], rank: int, world_size: int) -> dict:
    """The state for `rank` of `world_size` that continues the stream where `saved` (every rank's state_dict,
    from a world of len(saved) ranks at the same batch count) stopped: the global position carries over.

    An epoch's batches do not depend on the world: rank r of W takes batches r, r + W, ..., so after b
    batches per rank the world has consumed global batches 0 .. i * W - 1 of epoch e (divmod(b, per-rank
    batches per epoch) = (e, i)). A world of M continues at i * W / M batches per rank, the same rows next.
    Each epoch's tail that fills no whole round of M ranks is dropped, as in any epoch. UsageError if i * W
    is not a multiple of M: no per-rank count starts there."""
    state = saved[0]
    counts = {s["batches"] for s in saved}
    if len(counts) != 1:
        raise UsageError(f"the saved ranks stopped at different loader positions ({sorted(counts)} batches)")
    rows_per_batch, num_rows = state["batch_size"], state["num_rows"]
    epoch, i = divmod(state["batches"], num_rows // (rows_per_batch * len(saved)))
    done = i * len(saved)  # global batches of this epoch consumed
    per_rank = num_rows // (rows_per_batch * world_size)
    if done >= per_rank * world_size:  # in the tail this world drops: its next epoch comes next
        epoch, done = epoch + 1, 0
    if done % world_size:
        raise UsageError(f"the run stopped after {done} batches of {rows_per_batch} rows into epoch {epoch}, which "
                         f"{world_size} processes cannot split evenly (each takes one batch in {world_size}); resume "
                         f"with a number of processes that divides {done}, or with the {len(saved)} it was saved with")
    return {**state, "batches": epoch * per_rank + done // world_size, "rank": rank, "world_size": world_size}
