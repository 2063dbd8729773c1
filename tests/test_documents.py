"""Document-aware batching: the document index, padded and aligned rows, padding, bucketing, resume, ranks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fasttrain.data.documents import IGNORE_INDEX, Rows, document_starts, index_path
from fasttrain.data.loader import TokenLoader
from fasttrain.formats.shards import read_header
from tests.conftest import write_shard

EOT = 0
T = 32
MODES = [
    ("padded", "fixed"),
    ("padded", "longest"),
    ("padded", "bucketed"),
    ("aligned", "fixed"),
    ("aligned", "longest"),
]


def documents(rng: np.random.Generator, count: int) -> list[int]:
    """`count` document lengths (text tokens, end-of-text not counted), skewed: most short, a few past T."""
    return (rng.pareto(1.2, count) * 6 + 1).astype(int).clip(1, 4 * T).tolist()


def shard_of(lengths: list[int], first: int, leading: int = 0) -> np.ndarray:
    """Each document as an end-of-text token then its text; a text token's value is its position + `first`
    (so every token names where it came from). `leading` tokens before the first document continue one
    from the shard before."""
    tokens = np.arange(first, first + leading + sum(lengths) + len(lengths))
    starts = leading + np.cumsum([0] + [n + 1 for n in lengths[:-1]])
    tokens[starts] = EOT
    return tokens


@pytest.fixture
def document_data(tmp_path):
    """Two train shards (the second opening mid-document) and a val shard of skewed-length documents."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train_000000.bin", shard_of(documents(rng, 300), 1))
    write_shard(tmp_path / "train_000001.bin", shard_of(documents(rng, 200), 30_001, leading=5))
    write_shard(tmp_path / "val_000000.bin", shard_of(documents(rng, 80), 60_001))
    return tmp_path


def loader(directory, batching, padding="fixed", **kw) -> TokenLoader:
    kw = {"batch_size": 4, "seed": 3, "prefetch": 0, **kw}
    return TokenLoader(
        directory, "train", seq_len=T, batching=batching, padding=padding, eot_id=EOT, pad_multiple=4, **kw
    )


def real_lengths(y: torch.Tensor) -> list[int]:
    """Counted targets of each row; they come first, pads after."""
    counted = y != IGNORE_INDEX
    n = counted.sum(1)
    assert all(counted[i, :k].all() for i, k in enumerate(n.tolist()))
    return n.tolist()


def starts_of(shard: np.ndarray) -> np.ndarray:
    """Where rows may start: every end-of-text token, and a shard's first token."""
    return np.union1d([0], np.flatnonzero(shard == EOT))


def test_document_index_is_every_end_of_text_and_cached(document_data):
    shard = read_header(document_data / "train_000001.bin")
    tokens = np.fromfile(shard.path, dtype=shard.dtype, offset=1024)
    starts = document_starts(shard, EOT)
    assert np.array_equal(starts, np.flatnonzero(tokens == EOT)) and starts[0] == 5
    assert os.path.exists(index_path(shard))
    assert np.array_equal(document_starts(shard, EOT), starts)
    assert len(document_starts(shard, 7)) == 0  # another end-of-text id is another index

    write_shard(document_data / "train_000001.bin", shard_of([3, 4], 30_001))  # rewritten: the cache is stale
    assert document_starts(read_header(shard.path), EOT).tolist() == [0, 4]


def test_padded_rows_are_whole_documents_each_once_an_epoch(document_data):
    L = loader(document_data, "padded", sampling="sequential", batch_size=5)
    shards = [np.fromfile(s.path, dtype=s.dtype, offset=1024) for s in L.reader.shards]
    expected = {}  # first token of each document's row -> its tokens (end-of-text, text, next end-of-text)
    for tokens in shards:
        starts = starts_of(tokens)
        for s, e in zip(starts, [*starts[1:] + 1, len(tokens)]):
            expected[(int(tokens[s]), int(tokens[s + 1]))] = tokens[s : min(e, s + T + 1)]
    seen = []
    for _ in range(L.reader.batches_per_epoch):
        x, y = next(L)
        assert x.shape == y.shape == (5, T)
        for row_x, row_y, n in zip(x, y, real_lengths(y)):
            want = expected[(int(row_x[0]), int(row_x[1]))]
            assert n == len(want) - 1
            assert np.array_equal(row_x[:n].numpy(), want[:-1]) and np.array_equal(row_y[:n].numpy(), want[1:])
            if n < T:  # the last token is only a target, but sits in x too; pads follow
                assert row_x[n] == want[-1] and (row_x[n + 1 :] == EOT).all()
            seen.append((int(row_x[0]), int(row_x[1])))
    assert len(seen) == len(set(seen)) == L.reader.batches_per_epoch * 5 > len(expected) - 5
    assert L.reader.rows.num_rows == len(expected)


def test_aligned_rows_pack_whole_documents_and_skip_nothing(document_data):
    rows = Rows([read_header(document_data / "train_000000.bin")], T, "aligned", EOT)
    tokens = np.fromfile(document_data / "train_000000.bin", dtype=np.uint16, offset=1024)
    _, offset, length = rows.lookup(np.arange(rows.num_rows))
    end = offset + length - 1  # a row's last token, its last target
    bounds = np.append(starts_of(tokens), len(tokens) - 1)  # where a row may end
    assert offset[0] == 0 and (offset[1:] == end[:-1]).all() and end[-1] == len(tokens) - 1  # every token used
    assert (length <= T + 1).all() and (length >= 2).all()
    long_piece = ~np.isin(end, bounds)  # a piece of a document longer than a row: a full row
    assert (length[long_piece] == T + 1).all() and long_piece.any()
    for o, e in zip(offset, end):  # a row takes every whole document that fits, and cuts none
        assert not ((bounds > e) & (bounds <= o + T)).any()
        if not np.isin(o, bounds):  # starting mid-document only to continue one longer than a row
            assert not ((bounds > o - T) & (bounds < o)).any()

    L = loader(document_data, "aligned", sampling="sequential", batch_size=rows.num_rows // 2)
    x, y = next(L)  # the loader's rows are these, padded
    n = real_lengths(y)
    assert n == (length[: len(n)] - 1).tolist() and x[:, 0].tolist() == tokens[offset[: len(n)]].tolist()


@pytest.mark.parametrize("batching", ["padded", "aligned"])
def test_longest_padding_cuts_each_batch_to_its_longest_row(document_data, batching):
    fixed, longest = loader(document_data, batching), loader(document_data, batching, "longest")
    cut = 0
    for _ in range(40):
        (fx, fy), (lx, ly) = next(fixed), next(longest)
        n = max(real_lengths(fy))
        assert lx.shape[1] == min(T, -(-n // 4) * 4)  # rounded up to pad_multiple=4
        assert torch.equal(fx[:, : lx.shape[1]], lx) and torch.equal(fy[:, : ly.shape[1]], ly)
        assert (fy[:, ly.shape[1] :] == IGNORE_INDEX).all()
        cut += lx.shape[1] < T
    assert cut > 0


def pad_fraction(L: TokenLoader) -> tuple[float, list]:
    slots = real = 0
    rows = []
    for _ in range(L.reader.batches_per_epoch):
        x, y = next(L)
        slots += y.numel()
        real += (y != IGNORE_INDEX).sum().item()
        rows += [(int(a), int(b)) for a, b in x[:, :2].tolist()]
    return 1 - real / slots, sorted(rows)


def test_bucketing_wastes_less_on_pads_over_the_same_documents(document_data):
    fixed, fixed_rows = pad_fraction(loader(document_data, "padded", "fixed"))
    longest, longest_rows = pad_fraction(loader(document_data, "padded", "longest"))
    bucketed, bucketed_rows = pad_fraction(loader(document_data, "padded", "bucketed"))
    assert fixed_rows == longest_rows == bucketed_rows  # the same rows, only grouped differently
    assert bucketed < 0.5 * longest and longest < fixed
    assert bucketed < 0.15 < 0.5 < fixed


def test_bucketed_batches_are_shuffled_and_differ_by_epoch(document_data):
    L = loader(document_data, "padded", "bucketed")
    n = L.reader.batches_per_epoch
    widths = [next(L)[0].shape[1] for _ in range(2 * n)]
    assert widths[:n] != sorted(widths[:n], reverse=True)  # not longest first
    assert widths[:n] != widths[n:]


@pytest.mark.parametrize("batching,padding", MODES)
def test_resume_is_exact(document_data, batching, padding):
    uninterrupted = loader(document_data, batching, padding, prefetch=2)
    per_epoch = uninterrupted.reader.batches_per_epoch
    for _ in range(per_epoch - 2):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    expected = [next(uninterrupted) for _ in range(per_epoch)]
    resumed = loader(document_data, batching, padding, prefetch=2)
    next(resumed)
    resumed.load_state_dict(state)
    for (a, b), (c, d) in zip(expected, (next(resumed) for _ in range(per_epoch))):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("batching,padding", MODES)
def test_ranks_read_disjoint_rows(document_data, batching, padding):
    world = 3
    loaders = [loader(document_data, batching, padding, rank=r, world_size=world) for r in range(world)]
    per_epoch = loaders[0].reader.batches_per_epoch
    assert per_epoch == loaders[0].reader.rows.num_rows // (4 * world)
    seen = [{(int(a), int(b)) for _ in range(per_epoch) for a, b in next(L)[0][:, :2].tolist()} for L in loaders]
    assert all(len(s) == per_epoch * 4 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_another_batching_state_is_refused(document_data):
    state = loader(document_data, "padded").state_dict()
    with pytest.raises(Exception, match="batching='padded' \\(now 'aligned'\\)"):
        loader(document_data, "aligned").load_state_dict(state)


def test_documents_need_the_end_of_text_id(document_data):
    with pytest.raises(ValueError, match="needs the end-of-text token id"):
        TokenLoader(document_data, "train", 4, T, batching="padded")
