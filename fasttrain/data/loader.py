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
shorter window, so every token is scored. `first_rows` cuts such a pass to the split's
first rows in its order: a set of rows that does not depend on the world, which only
decides each rank's share of it (validation: the same rows, so the same loss, on any
number of processes).

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
from typing import Iterator, Literal, Sequence, get_args

import numpy as np
import torch

from fasttrain.data.documents import IGNORE_INDEX, Batching, Rows
from fasttrain.data.mixture import Blend
from fasttrain.data.shards import HEADER_BYTES, ShardInfo, find_shards, out_of_vocabulary, read_meta, scan_id_bound
from fasttrain.system.errors import UsageError

Sampling = Literal["random", "sequential"]
Padding = Literal["fixed", "longest", "bucketed"]
BUCKET_POOL = 64  # batches whose rows are sorted by length together: wider pools waste less, shuffle less
FILLER = -1  # the row id of an empty slot in the last round of a `whole` pass


class SourceRows:
    """The rows of one source's split in their order over epochs: its p-th row is `at(p)`; stateless.

    An epoch visits `rows_per_epoch` rows: all of them but what does not fill a whole round of
    batch_size x world_size rows (when `whole`: all of them, or the first `first_rows` in the epoch's order
    if fewer, the last round made whole with FILLER ids).
    """

    def __init__(self, shards: list[ShardInfo], rows: Rows, batch_size: int, world_size: int, sampling: Sampling,
                 padding: Padding, seed: int, whole: bool = False, first_rows: int = 0):
        self.shards, self.rows, self.whole = shards, rows, whole
        self.batch_size, self.world_size = batch_size, world_size
        self.sampling, self.padding, self.seed = sampling, padding, seed
        self.whole_rows = min(rows.num_rows, first_rows or rows.num_rows)  # the rows a `whole` pass reads
        per_round = batch_size * world_size
        self.rows_per_epoch = (-(-self.whole_rows // per_round) if whole else rows.num_rows // per_round) * per_round
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its rows in order) of the last epoch used

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row ids of `epoch`, in the order they are read (rows_per_epoch of them).

        Random sampling permutes the rows with a generator seeded by (seed, epoch).
        Bucketed padding then sorts each pool of BUCKET_POOL batches' rows by length,
        cuts the pool into batches of similar lengths, and (random sampling) shuffles the batches.
        A `whole` source keeps every row and fills the last round with FILLER ids.
        """
        cached = self._order
        if cached is not None and cached[0] == epoch:
            return cached[1]
        B = self.batch_size
        n = self.whole_rows if self.whole else self.rows.num_rows // B * B
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        order = np.arange(n) if self.sampling == "sequential" else rng.permutation(self.rows.num_rows)[:n]
        bucketed = self.padding == "bucketed" and self.rows.batching != "packed"  # packed rows are all full
        if bucketed:
            lengths = self.rows.lengths()
            pools = [order[i:i + BUCKET_POOL * B] for i in range(0, n, BUCKET_POOL * B)]
            order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in pools])
        if self.whole:
            order = np.append(order, np.full(self.rows_per_epoch - n, FILLER))
        if bucketed and self.sampling == "random":
            order = order.reshape(-1, B)[rng.permutation(len(order) // B)].reshape(-1)
        order = order[:self.rows_per_epoch]
        self._order = (epoch, order)
        return order

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
        per_epoch = int(targets[self.epoch_order(0)].sum()) if epochs else 0  # every epoch reads the same rows
        return epochs * per_epoch + int(targets[self.epoch_order(epochs)[:rest]].sum())


class RowReader:
    """Reads batch number g of one rank's stream from the rows of one split of its sources; stateless
    between calls (the blend's memory of recent rounds aside).

    Batch g is this rank's part of round g of the global row sequence, and which source's rows it
    holds is the blend's (fasttrain/data/mixture.py). Kept apart from `TokenLoader` so the prefetch
    thread holds only this, and a loader that is dropped without `close()` can still be collected.
    """

    def __init__(
        self, sources: list[SourceRows], blend: Blend, batch_size: int, padding: Padding, rank: int, world_size: int,
        pad_id: int, pad_multiple: int, pin_memory: bool, vocab_size: int,
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
        """Batch `g` as host tensors x, y of shape (B, L), int64 (pinned when `pin_memory`).

        L is seq_len, or with padding "longest"/"bucketed" the longest row's inputs rounded
        up to pad_multiple (at most seq_len). Past a row's end x holds pad_id and y IGNORE_INDEX.
        """
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
            rows[row, lengths[row]:] = self.pad_id
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
        for row in short:  # a row of n tokens has n - 1 targets
            targets[row, lengths[row] - 1:] = IGNORE_INDEX
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
    only an empty split is then an error. `first_rows` > 0 makes that pass read only the
    first `first_rows` rows (all of them if the split has fewer), whatever the world.

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
        first_rows: int = 0,
        mix: Sequence[tuple[int, Sequence[float]]] | None = None,
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
        directories = [directory] if isinstance(directory, (str, os.PathLike)) else list(directory)
        if whole and len(directories) > 1:
            raise ValueError("a `whole` pass reads one source; evaluate each source of a mixture on its own")
        found = [find_shards(d, split) for d in directories]
        self.vocab_size = vocab_size or _vocab_size_of(Path(directories[0]), found[0])
        if self.vocab_size:
            for s in (s for shards in found for s in shards):
                bound = s.id_bound or scan_id_bound(s)
                if bound > self.vocab_size:
                    raise UsageError(f"{s.path}: token id {bound - 1} is outside the vocabulary ({self.vocab_size} tokens)")
        self.device = torch.device(device)
        self.prefetch = prefetch
        rows = [Rows(shards, seq_len, batching, eot_id, tails=whole) for shards in found]
        if whole:  # a batch wider than a rank's share of the rows would be filler, costing memory for nothing
            read = min(rows[0].num_rows, first_rows or rows[0].num_rows)
            batch_size = min(batch_size, max(1, -(-read // world_size)))
        sources = [SourceRows(shards, r, batch_size, world_size, sampling, padding, seed, whole, first_rows)
                   for shards, r in zip(found, rows)]
        for d, r, source in zip(directories, rows, sources):
            if source.rows_per_epoch == 0:
                if whole:
                    raise UsageError(f"{d}: the {split} split is empty (no row of two tokens or more)")
                what = f"windows of {seq_len + 1} tokens" if batching == "packed" else f"{batching} rows"
                raise UsageError(
                    f"{d}: the {split} split has {r.num_rows} {what}, fewer than one batch of "
                    f"{batch_size} x {world_size} rank(s); lower batch_size or seq_len, or add data")
        self.blend = Blend(mix or [(0, [1.0] * len(sources))], batch_size * world_size)
        if self.blend.sources != len(sources):
            raise ValueError(f"a mix of {self.blend.sources} weights for {len(sources)} sources")
        self.sampling, self.seed = sampling, seed
        self.reader = RowReader(sources, self.blend, batch_size, padding, rank, world_size, pad_id=eot_id or 0,
                                pad_multiple=pad_multiple, pin_memory=self.device.type == "cuda",
                                vocab_size=self.vocab_size)
        self.batches = 0  # consumed by the caller: the whole resumable state, with the seed
        self._tokens_carried = [0] * len(sources)  # see load_state_dict
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

    def positions(self) -> tuple[int, ...]:
        """Rows taken from each source so far, over all ranks (up to the batch the caller has consumed)."""
        return self.blend.start(self.batches)[0]

    def source_tokens(self) -> list[int]:
        """Targets (real tokens) read from each source so far, over all ranks."""
        return [s.targets_before(p) + carried for s, p, carried in
                zip(self.reader.sources, self.positions(), self._tokens_carried)]

    def source_epochs(self) -> list[float]:
        """How many times over each source has been read so far (1.5: once, and half of it again)."""
        return [p / s.rows_per_epoch for s, p in zip(self.reader.sources, self.positions())]

    def planned_epochs(self, batches: int) -> list[float]:
        """How many times over each source the first `batches` batches read."""
        return [r / s.rows_per_epoch for r, s in zip(self.blend.planned_rows(batches), self.reader.sources)]

    def state_dict(self) -> dict[str, int | str | list]:
        r = self.reader
        positions, deficits = self.blend.start(self.batches)
        return {
            "batches": self.batches, "seed": self.seed, "sampling": self.sampling, "batch_size": r.batch_size,
            "seq_len": r.seq_len, "rank": r.rank, "world_size": r.world_size,
            "batching": r.sources[0].rows.batching, "padding": r.padding, "pad_multiple": r.pad_multiple,
            "num_rows": [s.rows.num_rows for s in r.sources],
            # every source's position and deficit (fasttrain/data/mixture.py): where the blend continues from
            "positions": list(positions), "deficits": list(deficits), "tokens": self.source_tokens(),
            "mix_rounds": self.blend.entered(self.batches),  # where each mix change in force began: it stays there
        }

    def load_state_dict(self, state: dict[str, int | str | list]) -> None:
        """Continue from `state`; the data and every setting but the position must match. The mix may differ:
        its weights apply from the saved position on, and the changes the saved run had entered stay where
        they began (Blend.restart). `blend.phases` then says where each phase begins."""
        mine = self.state_dict()
        state = dict(state)
        if isinstance(state.get("num_rows"), int):  # saved before mixtures: one source, its rows read in order
            state["num_rows"] = [state["num_rows"]]
            state.setdefault("positions", [int(state["batches"]) * self.blend.rows_per_round])
            state.setdefault("deficits", [0.0])
        position = ("batches", "positions", "deficits", "tokens", "mix_rounds")
        differ = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in mine.items()
                  if k not in position and state.get(k) != v]
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


def reshard(saved: list[dict], rank: int, world_size: int, rounds: int | None = None) -> dict:
    """The state for `rank` of `world_size` that continues the stream where `saved` (every rank's state_dict,
    from a world of len(saved) ranks at the same batch count) stopped: the global position carries over.

    One source's epoch does not depend on the world: rank r of W takes part r of each round of W batches, so
    after b batches per rank the world has consumed global batches 0 .. i * W - 1 of epoch e (divmod(b,
    per-rank batches per epoch) = (e, i)). A world of M continues at i * W / M batches per rank, the same rows
    next. Each epoch's tail that fills no whole round of M ranks is dropped, as in any epoch. UsageError if
    i * W is not a multiple of M (no per-rank count starts there).

    A mixture's blend state (each source's position and deficit) is the world's, not a rank's: the blend goes on
    from it in rounds of this world's rows. Each source's epochs are cut into rounds of the world's rows, so a
    position (e, i) of the saved world's epochs becomes (e, i) of this world's (the start of epoch e + 1 if i
    falls in the tail this world drops; the order of an epoch's rows does not depend on the world). `rounds` is
    the batch count the loader goes on from: the run's step times this world's accumulation, which its mix
    changes count in (None: the saved count). The tokens read from each source carry over as they were read
    (load_state_dict keeps what the new epochs' count misses)."""
    state = dict(saved[0])
    counts = {s["batches"] for s in saved}
    if len(counts) != 1:
        raise UsageError(f"the saved ranks stopped at different loader positions ({sorted(counts)} batches)")
    num_rows = state["num_rows"] if isinstance(state["num_rows"], list) else [state["num_rows"]]  # pre-mixture
    rows_per_batch = state["batch_size"]
    if len(num_rows) > 1:
        positions = [_renumbered(p, n, rows_per_batch, len(saved), world_size)
                     for p, n in zip(state["positions"], num_rows)]
        batches = state["batches"] if rounds is None else rounds
        if "mix_rounds" in state and state["batches"]:  # step x the saved accumulation -> step x this world's
            state["mix_rounds"] = [r * batches // state["batches"] for r in state["mix_rounds"]]
        return {**state, "batches": batches, "rank": rank, "world_size": world_size, "positions": positions}
    if len(saved) == world_size:
        return {**state, "rank": rank, "world_size": world_size}
    epoch, i = divmod(state["batches"], num_rows[0] // (rows_per_batch * len(saved)))
    done = i * len(saved)  # global batches of this epoch consumed
    per_rank = num_rows[0] // (rows_per_batch * world_size)
    if done >= per_rank * world_size:  # in the tail this world drops: its next epoch comes next
        epoch, done = epoch + 1, 0
    if done % world_size:
        raise UsageError(f"the run stopped after {done} batches of {rows_per_batch} rows into epoch {epoch}, which "
                         f"{world_size} processes cannot split evenly (each takes one batch in {world_size}); resume "
                         f"with a number of processes that divides {done}, or with the {len(saved)} it was saved with")
    batches = epoch * per_rank + done // world_size
    # the one source's position in rows, in this world's epochs (its deficit is always 0)
    position = epoch * per_rank * world_size * rows_per_batch + done * rows_per_batch
    return {**state, "batches": batches, "rank": rank, "world_size": world_size, "num_rows": num_rows,
            "positions": [position], "deficits": [0.0]}


def _renumbered(position: int, num_rows: int, batch_size: int, saved_world: int, world_size: int) -> int:
    """A source's `position` counted in the epochs of a world of `saved_world` ranks, counted in those of
    `world_size` ranks: the same row of the same epoch, or the next epoch's first if this world drops it."""
    saved_epoch, epoch = (num_rows // (batch_size * w) * batch_size * w for w in (saved_world, world_size))
    passed, index = divmod(position, saved_epoch)
    return passed * epoch + min(index, epoch)
