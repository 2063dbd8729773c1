"""The token loader: windows, shift, epochs, ranks, resume, prefetch, validation, memory."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.data.loader import TokenLoader
from fasttrain.formats.shards import HEADER_BYTES, MAGIC, ShardWriter
from fasttrain.system.errors import UsageError
from tests.conftest import HANG_SECONDS, write_shard

T = 16
ROOT = Path(__file__).resolve().parents[1]


def window_starts(x: torch.Tensor) -> list[int]:
    """In `counting_data` a token is its own position, so a row's first token names its window."""
    return x[:, 0].tolist()


def test_shapes_shift_and_window_contents(counting_data):
    loader = TokenLoader(counting_data, "train", 8, T, seed=3)
    for _ in range(20):
        x, y = next(loader)
        assert x.shape == y.shape == (8, T) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):
            start = int(row_x[0])
            # a whole window from one shard: consecutive positions, aligned to the stride, y one ahead
            assert torch.equal(row_x, torch.arange(start, start + T))
            assert torch.equal(row_y, torch.arange(start + 1, start + T + 1))
            assert (start % 10_000) % T == 0
    loader.close()


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_an_epoch_visits_windows_once(counting_data, sampling):
    loader = TokenLoader(counting_data, "train", 5, T, sampling=sampling, seed=0, prefetch=0)
    per_epoch = loader.reader.batches_per_epoch
    total = loader.reader.rows.num_rows
    assert total == (3000 - 1) // T + (2500 - 1) // T
    seen = [s for _ in range(per_epoch) for s in window_starts(next(loader)[0])]
    assert len(seen) == len(set(seen)) == per_epoch * 5 > total - 5
    if sampling == "sequential":
        assert seen == sorted(seen)
    else:
        assert seen != sorted(seen)
        next_epoch = [s for _ in range(per_epoch) for s in window_starts(next(loader)[0])]
        assert next_epoch != seen  # a fresh order every epoch


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_ranks_read_disjoint_windows(counting_data, sampling):
    world = 3
    loaders = [
        TokenLoader(counting_data, "train", 4, T, sampling=sampling, rank=r, world_size=world, seed=7)
        for r in range(world)
    ]
    per_epoch = loaders[0].reader.batches_per_epoch
    assert per_epoch == loaders[0].reader.rows.num_rows // (4 * world)
    seen = [set(s for _ in range(per_epoch) for s in window_starts(next(L)[0])) for L in loaders]
    assert all(len(s) == per_epoch * 4 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_seed_changes_random_order(counting_data):
    a = next(TokenLoader(counting_data, "train", 8, T, seed=1))[0]
    b = next(TokenLoader(counting_data, "train", 8, T, seed=1))[0]
    c = next(TokenLoader(counting_data, "train", 8, T, seed=2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampling", ["random", "sequential"])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_is_exact(pydoc_data, sampling, prefetch):
    def make():
        return TokenLoader(pydoc_data, "train", 8, 64, sampling=sampling, seed=11, prefetch=prefetch)

    uninterrupted = make()
    per_epoch = uninterrupted.reader.batches_per_epoch
    stop = per_epoch - 3  # resume shortly before an epoch boundary, and read well past it
    for _ in range(stop):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # survives serialisation
    expected = [next(uninterrupted) for _ in range(2 * per_epoch)]

    resumed = make()
    next(resumed)  # a loader that already ran ahead (and prefetched) must still land exactly
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(2 * per_epoch)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_prefetch_matches_synchronous_loading(pydoc_data):
    sync = TokenLoader(pydoc_data, "train", 4, 32, seed=5, prefetch=0)
    ahead = TokenLoader(pydoc_data, "train", 4, 32, seed=5, prefetch=4)
    for _ in range(60):
        a, b = next(sync), next(ahead)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ahead.wait_seconds >= 0 and sync.wait_seconds > 0


def test_state_of_a_different_loader_is_refused(counting_data):
    state = TokenLoader(counting_data, "train", 4, T).state_dict()
    other = TokenLoader(counting_data, "train", 8, T)
    with pytest.raises(UsageError, match="batch_size=4"):
        other.load_state_dict(state)


def test_dropped_loader_stops_its_thread(counting_data):
    import threading

    loader = TokenLoader(counting_data, "train", 4, T, prefetch=2)
    next(loader)
    del loader
    gc.collect()
    assert not any(t.name == "fasttrain-prefetch" for t in threading.enumerate())


def test_llmc_shard_without_width_field(tmp_path):
    """llm.c's shards set only magic, version and count: uint16 tokens, bound found by scanning."""
    tokens = np.random.default_rng().integers(0, 50257, 4000).astype(np.uint16)
    header = np.zeros(256, dtype="<i4")
    header[:3] = [MAGIC, 1, tokens.size]
    (tmp_path / "fineweb_train_000001.bin").write_bytes(header.tobytes() + tokens.tobytes())
    x, y = next(TokenLoader(tmp_path, "train", 2, 100, sampling="sequential", vocab_size=50257))
    assert torch.equal(x[0], torch.from_numpy(tokens[:100].astype(np.int64)))
    assert torch.equal(y[1], torch.from_numpy(tokens[101:201].astype(np.int64)))
    with pytest.raises(UsageError, match=r"fineweb_train_000001.bin: token id \d+ is outside the vocabulary"):
        TokenLoader(tmp_path, "train", 2, 100, vocab_size=int(tokens.max()))


def test_uint32_shards(tmp_path):
    tokens = np.random.default_rng().integers(0, 100_000, 3000)
    write_shard(tmp_path / "train_000000.bin", tokens, vocab_size=100_000)
    x, y = next(TokenLoader(tmp_path, "train", 3, 50, sampling="sequential"))
    assert torch.equal(x.flatten()[:50], torch.from_numpy(tokens[:50]))
    assert torch.equal(y[2], torch.from_numpy(tokens[101:151]))


def _bad_magic(d):
    write_shard(d / "train_000000.bin", np.arange(500))
    raw = bytearray((d / "train_000000.bin").read_bytes())
    raw[:4] = (1234).to_bytes(4, "little")
    (d / "train_000000.bin").write_bytes(bytes(raw))


def _truncated(d):
    write_shard(d / "train_000000.bin", np.arange(500))
    raw = (d / "train_000000.bin").read_bytes()
    (d / "train_000000.bin").write_bytes(raw[:-7])


def _short_header(d):
    (d / "train_000000.bin").write_bytes(b"\x00" * 100)


def _id_beyond_vocab(d):
    write_shard(d / "train_000000.bin", np.arange(500))
    (d / "meta.json").write_text(json.dumps({"vocab_size": 300}))


def _too_little_data(d):
    write_shard(d / "train_000000.bin", np.arange(40))


def _mixed_widths(d):
    write_shard(d / "train_000000.bin", np.arange(500))
    write_shard(d / "train_000001.bin", np.arange(500), vocab_size=70_000)


@pytest.mark.parametrize(
    "make, message",
    [
        (_bad_magic, r"train_000000.bin: not a token shard \(magic 1234"),
        (_truncated, r"train_000000.bin: truncated shard: header says 500 tokens \(2024 bytes\), file has 2017 bytes"),
        (_short_header, r"train_000000.bin: truncated shard: 100 bytes"),
        (_id_beyond_vocab, r"train_000000.bin: token id 499 is outside the vocabulary \(300 tokens\)"),
        (_too_little_data, r"the train split has 2 windows of 17 tokens, fewer than one batch of 4"),
        (_mixed_widths, r"train_000001.bin: uint32 tokens, but .*train_000000.bin has uint16"),
        (lambda d: None, r"no train shards"),
    ],
)
def test_bad_data_is_a_one_line_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UsageError, match=message) as e:
        TokenLoader(tmp_path, "train", 4, T)
    assert "\n" not in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="nope: no such data directory"):
        TokenLoader(tmp_path / "nope", "train", 4, T)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_resident_memory_does_not_grow_with_the_corpus(tmp_path):
    """Reading a 64 MB shard end to end must not leave it resident (the memory-map pitfall)."""
    with ShardWriter(tmp_path / "train_000000.bin", 1 << 16) as w:
        for i in range(8):
            w.write(np.full(4_000_000, i, dtype=np.uint16))
    loader = TokenLoader(tmp_path, "train", 32, 1024, sampling="sequential", prefetch=2)
    for _ in range(20):
        next(loader)
    gc.collect()
    before = _rss_bytes()
    for _ in range(loader.reader.batches_per_epoch - 20):
        next(loader)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 16 << 20, f"resident memory grew by {grown / 2**20:.0f} MiB over a 64 MB shard"
    assert (tmp_path / "train_000000.bin").stat().st_size > HEADER_BYTES + 60_000_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_cuda_batches_equal_cpu_batches(pydoc_data, prefetch):
    cpu = TokenLoader(pydoc_data, "train", 8, 64, seed=2, prefetch=0)
    gpu = TokenLoader(pydoc_data, "train", 8, 64, seed=2, prefetch=prefetch, device="cuda")
    for _ in range(50):
        (a, b), (c, d) = next(cpu), next(gpu)
        assert c.is_cuda and d.is_cuda
        assert torch.equal(a, c.cpu()) and torch.equal(b, d.cpu())


def test_a_failing_read_is_raised_again_not_hung(counting_data, monkeypatch):
    loader = TokenLoader(counting_data, "train", 4, T, prefetch=2)
    first = next(loader)
    original = loader.reader.read

    def broken(g):
        raise UsageError("disk went away")

    monkeypatch.setattr(loader.reader, "read", broken)
    loader.load_state_dict(loader.state_dict())  # drop the batches already prefetched
    for _ in range(2):  # each call reports the failure; none waits forever on a dead thread
        with pytest.raises(UsageError, match="disk went away"):
            next(loader)
    monkeypatch.setattr(loader.reader, "read", original)
    assert loader.batches == 1
    assert not torch.equal(next(loader)[0], first[0])


@pytest.mark.subprocess
def test_a_process_that_exits_while_its_loader_reads_ahead_exits_cleanly(counting_data):
    """The prefetch thread is stopped at exit, not torn down inside a torch op, which aborted the process
    ("terminate called without an active exception") in about 7 of 10 such exits before."""
    script = (
        "import sys; from fasttrain.data.loader import TokenLoader; "  # a queue that never fills: always reading
        "loader = TokenLoader(sys.argv[1], 'train', 1, 8, prefetch=10**6); next(loader)"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(counting_data)], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for run in runs:
        err = run.communicate(timeout=HANG_SECONDS)[1]
        assert run.returncode == 0, err


@pytest.mark.parametrize("vocab_size, shown", [(512.5, "512.5"), ("512", '"512"'), (True, "true"), (None, "null")])
def test_meta_json_vocab_size_of_the_wrong_type_is_refused_where_it_is_read(counting_data, vocab_size, shown):
    """meta.json's vocab_size was taken through int(): 512.5 as 512, "512" and true as numbers, null a traceback."""
    (counting_data / "meta.json").write_text(json.dumps({"vocab_size": vocab_size}))
    message = f"{counting_data / 'meta.json'}: vocab_size = {shown}, expected an integer > 0"
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        TokenLoader(counting_data, "train", 4, 16, seed=0)
