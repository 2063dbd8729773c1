"""Data pipeline throughput: the loader (tokens/s delivered) and prepare (tokens/s written); padding waste.

Goal for the loader: >= 100M tokens/s host-side at B=64, T=1024, far above what
a GPU step consumes (a GPT-2-small step on an H100 takes ~0.5M tokens/s).

`test_padded_batches` measures how much of a padded run's compute goes to pads on
a corpus of skewed document lengths: `pad_fraction` is the share of token slots
over a whole epoch that hold pads (each slot costs the same in every matmul;
attention's cost grows faster with the row, so there the waste of fixed padding is
larger still). Its tokens/s counts real tokens only.
"""

from __future__ import annotations

import numpy as np
import pytest

from fasttrain.data.documents import IGNORE_INDEX
from fasttrain.data.loader import TokenLoader
from fasttrain.formats.shards import ShardWriter
from fasttrain.preparation.preparation import prepare

B, T = 64, 1024


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
    """32M random GPT-2-vocabulary tokens (64 MB) in two shards."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i in range(2):
        with ShardWriter(d / f"train_{i:06d}.bin", 50257) as w:
            for _ in range(4):
                w.write(rng.integers(0, 50257, 4_000_000))
    return d


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_loader_throughput(benchmark, record, corpus_shards, sampling, prefetch):
    loader = TokenLoader(corpus_shards, "train", B, T, sampling=sampling, prefetch=prefetch, vocab_size=50257)
    next(loader)  # start the prefetch thread outside the timing
    benchmark(next, loader)
    record(per_call=B * T, batch_size=B, seq_len=T, sampling=sampling, prefetch=prefetch)
    loader.close()


@pytest.fixture(scope="module")
def source_shards(tmp_path_factory):
    """The same 32M random GPT-2-vocabulary tokens as `corpus_shards`, as 8 prepared sources of 4M each."""
    d = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    for i in range(8):
        with ShardWriter((d / f"s{i}").mkdir() or d / f"s{i}" / "train_000000.bin", 50257) as w:
            w.write(rng.integers(0, 50257, 4_000_000))
    return d


@pytest.mark.parametrize("sources", [1, 2, 8])
def test_mixture_throughput(benchmark, record, source_shards, sources):
    """A mixture of `sources` sources of 32M tokens in all (weights 1, 2, ..., so every row is blended),
    random sampling, prefetch 2: the blend's cost beside test_loader_throughput's one folder."""
    per_source = 8 // sources
    dirs = []
    for i in range(sources):  # each source: the shards of 8 / sources of the 8 folders, linked together
        d = source_shards / f"mix{sources}-{i}"
        d.mkdir(exist_ok=True)
        for k in range(per_source):
            target = d / f"train_{k:06d}.bin"
            if not target.exists():
                target.symlink_to(source_shards / f"s{i * per_source + k}" / "train_000000.bin")
        dirs.append(d)
    loader = TokenLoader(dirs, "train", B, T, prefetch=2, vocab_size=50257, mix=[(0, list(range(1, sources + 1)))])
    next(loader)  # start the prefetch thread outside the timing
    benchmark(next, loader)
    record(per_call=B * T, batch_size=B, seq_len=T, sources=sources, prefetch=2)
    loader.close()


GPT2_EOT = 50256


@pytest.fixture(scope="module")
def document_shards(tmp_path_factory):
    """~4.9M GPT-2-vocabulary tokens of documents whose lengths are log-normal: median 200 tokens, a
    tenth past 1,000 (web text looks like this), each after an end-of-text token."""
    d = tmp_path_factory.mktemp("documents")
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(np.log(200), 1.2, 12_000).astype(int) + 1
    tokens = rng.integers(0, GPT2_EOT, int(lengths.sum() + len(lengths)))
    tokens[np.cumsum(np.concatenate([[0], lengths[:-1] + 1]))] = GPT2_EOT
    with ShardWriter(d / "train_000000.bin", 50257) as w:
        w.write(tokens)
    return d


@pytest.mark.parametrize("padding", ["fixed", "longest", "bucketed"])
def test_padded_batches(benchmark, record, document_shards, padding):
    def loader():
        return TokenLoader(
            document_shards,
            "train",
            16,
            T,
            batching="padded",
            padding=padding,
            eot_id=GPT2_EOT,
            prefetch=0,
            vocab_size=50257,
        )

    epoch = loader()
    slots = real = 0
    for _ in range(epoch.reader.batches_per_epoch):
        _, y = next(epoch)
        slots += y.numel()
        real += int((y != IGNORE_INDEX).sum())
    timed = loader()
    benchmark(next, timed)
    record(
        per_call=real / epoch.reader.batches_per_epoch,
        pad_fraction=round(1 - real / slots, 4),
        batch_size=16,
        seq_len=T,
        documents=epoch.reader.rows.num_rows,
        padding=padding,
    )


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """The embedded corpus written 8 times over (~3.7 MB) as 632 text files, and a tokenizer for it."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("text")
    for copy in range(8):
        for name, text in topics.items():
            (d / f"{copy}-{name}.txt").write_text(text)
    first = prepare(["builtin:pydoc"], d / "tokenized-once", vocab_size=4096, quiet=True)
    return d, d / "tokenized-once" / "tokenizer.json", first


@pytest.mark.parametrize("train_tokenizer", [False, True], ids=["given-tokenizer", "train-tokenizer"])
def test_prepare_throughput(benchmark, record, text_corpus, tmp_path, train_tokenizer):
    d, tokenizer, _ = text_corpus
    outs = iter(range(10**6))

    def run():
        return prepare(
            [str(d / "*.txt")],
            tmp_path / f"out{next(outs)}",
            vocab_size=4096,
            tokenizer_path=None if train_tokenizer else str(tokenizer),
            quiet=True,
        )

    meta = benchmark.pedantic(run, rounds=3, iterations=1)
    tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
    record(
        per_call=tokens,
        input_bytes=sum(p.stat().st_size for p in d.glob("*.txt")),
        tokens=tokens,
        train_tokenizer=train_tokenizer,
    )


def test_prepare_parquet_throughput(benchmark, record, text_corpus, tmp_path):
    """The same documents as test_prepare_throughput[given-tokenizer], as rows of one Parquet file
    (row groups of 64 rows): the cost of reading Parquet next to reading text files."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d, tokenizer, _ = text_corpus
    texts = [p.read_text() for p in sorted(d.glob("*.txt"))]  # the text files' order, so the same split
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet", row_group_size=64)
    outs = iter(range(10**6))

    def run():
        return prepare(
            [str(tmp_path / "docs.parquet")], tmp_path / f"out{next(outs)}", tokenizer_path=str(tokenizer), quiet=True
        )

    meta = benchmark.pedantic(run, rounds=3, iterations=1)
    tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
    record(per_call=tokens, input_bytes=(tmp_path / "docs.parquet").stat().st_size, tokens=tokens)
