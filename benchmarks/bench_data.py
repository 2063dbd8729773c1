"""Data pipeline throughput: the loader (tokens/s delivered) and prepare (tokens/s written).

Goal for the loader: >= 100M tokens/s host-side at B=64, T=1024, far above what
a GPU step consumes (a GPT-2-small step on an H100 takes ~0.5M tokens/s).
"""

from __future__ import annotations

import numpy as np
import pytest

from fasttrain.data import TokenLoader
from fasttrain.prepare import prepare
from fasttrain.shards import ShardWriter

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
        return prepare([str(d / "*.txt")], tmp_path / f"out{next(outs)}", vocab_size=4096,
                       tokenizer_path=None if train_tokenizer else str(tokenizer), quiet=True)

    meta = benchmark.pedantic(run, rounds=3, iterations=1)
    tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
    record(per_call=tokens, input_bytes=sum(p.stat().st_size for p in d.glob("*.txt")), tokens=tokens,
           train_tokenizer=train_tokenizer)
