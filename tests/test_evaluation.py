"""Validation reads every row of the val split, a final partial batch included, and weighs every token the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttrain.compute.distributed import World
from fasttrain.config import ModelConfig
from fasttrain.data.documents import IGNORE_INDEX
from fasttrain.data.loader import TokenLoader
from fasttrain.evaluation.validation import validate
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.objective import NextTokenLoss
from fasttrain.system.errors import UsageError
from tests.conftest import write_shard

EOT, VOCAB, T, B = 0, 97, 16, 4


@pytest.fixture
def val_data(tmp_path):
    """Two val shards of documents (each after an end-of-text token) of 3 to 40 tokens: 7 + 6 documents,
    and token counts that leave each shard a short last window; a row count that is no multiple of B."""
    rng = np.random.default_rng(0)
    shards = []
    for i, docs in enumerate((7, 6)):
        tokens = np.concatenate(
            [np.concatenate([[EOT], rng.integers(1, VOCAB, rng.integers(3, 41))]) for _ in range(docs)]
        )
        write_shard(tmp_path / f"val_{i:06d}.bin", tokens, VOCAB)
        shards.append(tokens)
    return tmp_path, shards


def reference_rows(shards: list[np.ndarray], batching: str) -> list[np.ndarray]:
    """Every row, written out plainly: packed windows (the last one short), or one per document."""
    rows = []
    for tokens in shards:
        if batching == "packed":
            rows += [tokens[s : s + T + 1] for s in range(0, len(tokens) - 1, T)]
        else:
            starts = np.flatnonzero(tokens == EOT)
            ends = np.append(starts[1:] + 1, len(tokens))  # the next document's end-of-text is the last target
            rows += [tokens[s : min(e, s + T + 1)] for s, e in zip(starts, ends)]
    return rows


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_val_loss_covers_every_row_with_a_partial_last_batch(val_data, batching):
    directory, shards = val_data
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, max_seq_len=T, d_model=32, n_layers=1, n_heads=4))
    objective = NextTokenLoss(model)
    rows = reference_rows(shards, batching)
    assert len(rows) % B != 0
    with torch.no_grad():  # the mean over all targets of all rows, one row at a time
        losses = [
            F.cross_entropy(
                model(torch.as_tensor(r[None, :-1], dtype=torch.int64))[0],
                torch.as_tensor(r[1:], dtype=torch.int64),
                reduction="sum",
            )
            for r in rows
        ]
    expected = float(sum(losses)) / sum(len(r) - 1 for r in rows)

    loader = TokenLoader(
        directory,
        "val",
        B,
        T,
        sampling="sequential",
        batching=batching,
        padding="longest",
        eot_id=EOT,
        vocab_size=VOCAB,
        prefetch=0,
        whole=True,
    )
    assert loader.reader.batches_per_epoch == -(-len(rows) // B)
    metrics = validate(objective, model, loader, 100, "fp32", World(), 1.0)
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert list(loader) == []  # one pass: the loader is finite


def test_ranks_share_the_rows_and_run_the_same_number_of_batches(val_data):
    directory, shards = val_data
    rows = reference_rows(shards, "padded")
    seen, batches = [], []
    for rank in range(3):
        with TokenLoader(
            directory,
            "val",
            B,
            T,
            sampling="sequential",
            batching="padded",
            eot_id=EOT,
            vocab_size=VOCAB,
            prefetch=0,
            rank=rank,
            world_size=3,
            whole=True,
        ) as loader:
            got = list(loader)
        batches.append(len(got))
        for x, y in got:
            assert x.shape == (B, T)  # filler rows keep the shape
            for row_x, row_y in zip(x, y):
                if (row_y != IGNORE_INDEX).any():  # a filler row has no target
                    seen.append(row_x[0].item())
    assert batches == [2, 2, 2] and len(seen) == len(rows) == 13  # 13 rows: 12 in round one, 1 and fillers after
    assert all(first == EOT for first in seen)


def test_only_an_empty_split_is_refused(tmp_path):
    write_shard(tmp_path / "val_000000.bin", np.array([EOT, 5]), VOCAB)  # one row of one target: enough
    with TokenLoader(tmp_path, "val", B, T, batching="padded", eot_id=EOT, prefetch=0, whole=True) as loader:
        assert len(list(loader)) == 1
    write_shard(tmp_path / "val_000000.bin", np.array([EOT]), VOCAB)
    with pytest.raises(UsageError, match="the val split is empty"):
        TokenLoader(tmp_path, "val", B, T, eot_id=EOT, prefetch=0, whole=True)
