"""Shared fixtures: a prepared copy of the embedded corpus, and shards with known contents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fasttrain.prepare import prepare
from fasttrain.shards import ShardWriter


@pytest.fixture(scope="session")
def pydoc_data(tmp_path_factory) -> Path:
    """The embedded corpus prepared with a small vocabulary (shared, treat as read-only)."""
    out = tmp_path_factory.mktemp("pydoc")
    prepare(["builtin:pydoc"], out, vocab_size=512, quiet=True)
    return out


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int = 1 << 16) -> Path:
    with ShardWriter(path, vocab_size) as w:
        w.write(np.asarray(tokens))
    return path


@pytest.fixture
def counting_data(tmp_path) -> Path:
    """Two train shards whose tokens are their own positions (all distinct), and a val shard."""
    write_shard(tmp_path / "train_000000.bin", np.arange(0, 3000))
    write_shard(tmp_path / "train_000001.bin", np.arange(10_000, 12_500))
    write_shard(tmp_path / "val_000000.bin", np.arange(20_000, 21_000))
    return tmp_path
