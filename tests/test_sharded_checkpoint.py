"""Checkpoints across worlds: a run saved by N processes resumes on M, in any parallel mode, and its data stream
goes on from the same global batch (fasttrain/data/loader.py's `reshard`, fasttrain/training/checkpoint.py)."""

from __future__ import annotations

import pytest
import torch

from fasttrain.data.loader import TokenLoader, reshard
from fasttrain.system.errors import UsageError
from tests.conftest import tiny_args
from tests.test_distributed import RUN, single, torchrun, values


def stream(data, world: int, batches: int, start: list[dict] | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """The global stream of `world` ranks taking `batches` each, in rank order per round (the rows a step of
    that world trains on together), and every rank's state at the end; from `start` (another world's states)."""
    loaders = [TokenLoader(data, "train", 2, 8, seed=3, rank=r, world_size=world, prefetch=0) for r in range(world)]
    if start is not None:
        for r, loader in enumerate(loaders):
            loader.load_state_dict(reshard(start, r, world))
    rows = [next(loader)[0] for _ in range(batches) for loader in loaders]
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    return rows, states


@pytest.mark.parametrize("saved, resumed", [(2, 1), (2, 3), (1, 2), (3, 2), (2, 2)])
def test_the_stream_goes_on_from_the_same_global_batch_on_any_world(counting_data, saved, resumed):
    whole, _ = stream(counting_data, 1, 24)  # one process: the order every world splits
    before, states = stream(counting_data, saved, 6 // saved)
    after, _ = stream(counting_data, resumed, 18 // resumed, start=states)
    assert all(torch.equal(a, b) for a, b in zip(before + after, whole, strict=True))  # nothing twice, nothing skipped


def test_an_epoch_tail_another_world_drops_starts_the_next_epoch(counting_data):
    per_epoch = TokenLoader(counting_data, "train", 2, 8, world_size=1, prefetch=0).reader.batches_per_epoch
    assert per_epoch % 3 != 0  # so 3 ranks drop the epoch's last batch(es), which 1 process reads
    last = [{**TokenLoader(counting_data, "train", 2, 8, prefetch=0).state_dict(), "batches": per_epoch - 1}]
    assert reshard(last, 0, 3)["batches"] == per_epoch // 3  # the first batch of epoch 1


def test_a_position_the_new_world_cannot_split_is_refused(counting_data):
    _, states = stream(counting_data, 2, 1)  # 2 global batches done: 3 ranks cannot each start at the same count
    with pytest.raises(UsageError, match="after 2 batches of 2 rows into epoch 0, which 3 processes cannot split"):
        reshard(states, 0, 3)


# 6 micro-batches of 2 rows per update: 1 process accumulates 6, 2 accumulate 3, 3 accumulate 2; 4 (hsdp) need 12.
@pytest.mark.second_tier  # about 60 s of torchrun per case on 2 cores
@pytest.mark.parametrize("saved, nproc, parallel, update", [
    ("fsdp", 1, "ddp", 384), ("ddp", 3, "fsdp", 384), ("fsdp", 4, "hsdp", 768),
], ids=["fsdp2-to-1", "ddp2-to-fsdp3", "fsdp2-to-hsdp4"])
def test_a_run_saved_by_two_processes_resumes_on_another_world_with_the_same_losses(pydoc_data, tmp_path, saved, nproc,
                                                                                    parallel, update):
    common = [*RUN, "train.batch_size=2", f"train.tokens_per_update={update}"]
    straight = torchrun(tiny_args(pydoc_data, tmp_path / "straight", *common, f'train.parallel="{saved}"'))
    assert straight.returncode == 0, straight.stderr
    first = torchrun(tiny_args(pydoc_data, tmp_path / "resumed", *common, f'train.parallel="{saved}"',
                               "train.max_steps=2"))
    assert first.returncode == 0, first.stderr
    args = tiny_args(pydoc_data, tmp_path / "resumed", *common, f'train.parallel="{parallel}"',
                     *(["train.shard_group_size=2"] if parallel == "hsdp" else []), flags=["--resume", "auto"])
    resumed = single(args) if nproc == 1 else torchrun(args, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr
    assert f"saved by 2 process(es) ({saved}), continued by {nproc} ({'none' if nproc == 1 else parallel})" \
        in resumed.stdout
    assert ("ranks 2-" in resumed.stdout) == (nproc > 2)  # the ranks with no saved random state are named
    assert values(tmp_path / "resumed", "train", "tokens") == values(tmp_path / "straight", "train", "tokens")
    assert values(tmp_path / "resumed", "train", "loss") == pytest.approx(values(tmp_path / "straight", "train", "loss"),
                                                                        rel=1e-5)
