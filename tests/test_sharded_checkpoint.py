"""Checkpoints across worlds: a run saved by N processes resumes on M, in any parallel mode, and its data stream
goes on from the same global batch (fasttrain/data/loader.py's `reshard`, fasttrain/checkpoints/checkpoint.py)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from fasttrain import evaluate, export, sample, train
from fasttrain.data.loader import TokenLoader, reshard
from fasttrain.model.weights import read_safetensors
from fasttrain.system.errors import UsageError, run_cli
from tests.conftest import tiny_args, tiny_config, write_shard
from tests.test_distributed import RUN, adam_movement_bound, assert_weights_agree, single, torchrun, values


def stream(
    data, world: int, batches: int, start: list[dict] | None = None, rounds: int | None = None, mix=None
) -> tuple[list[torch.Tensor], list[dict]]:
    """The global stream of `world` ranks taking `batches` each, in rank order per round (the rows a step of
    that world trains on together), and every rank's state at the end; from `start` (another world's states,
    going on at batch `rounds`). `data`: a folder, or the sources of a mixture by `mix`."""
    loaders = [
        TokenLoader(data, "train", 2, 8, seed=3, rank=r, world_size=world, prefetch=0, mix=mix) for r in range(world)
    ]
    if start is not None:
        for r, loader in enumerate(loaders):
            loader.load_state_dict(reshard(start, r, world, rounds))
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


@pytest.fixture
def two_sources(counting_data, tmp_path_factory) -> list:
    """counting_data and a small second source (74 rows of 8 + 1 tokens, its own numbers): a mixture whose
    second source's epoch is 72 rows in rounds of 4 or 6 rows and 74 in rounds of 2."""
    small = tmp_path_factory.mktemp("small")
    write_shard(small / "train_000000.bin", np.arange(30_000, 30_000 + 74 * 8 + 1))
    return [counting_data, small]


MIX = [(0, (2.0, 1.0))]


@pytest.mark.parametrize("saved, resumed", [(2, 1), (2, 3), (1, 2), (3, 2), (2, 2)])
def test_a_mixture_goes_on_from_the_same_global_row_on_any_world(two_sources, saved, resumed):
    """The blend is the world's: after 12 rows on one world, another goes on with the 13th row of the one global
    sequence (the same rows, sources and shares as one process reading all 36; no source ends an epoch here)."""
    whole, _ = stream(two_sources, 1, 18, mix=MIX)
    before, states = stream(two_sources, saved, 6 // saved, mix=MIX)
    after, after_states = stream(two_sources, resumed, 12 // resumed, start=states, rounds=6 // resumed, mix=MIX)
    assert all(torch.equal(a, b) for a, b in zip(before + after, whole, strict=True))
    assert after_states[0]["batches"] == 18 // resumed and after_states[0]["positions"] == [24, 12]


def test_a_mixtures_positions_are_counted_again_in_the_new_worlds_epochs(two_sources):
    """Source 1 has 74 rows: one process reads all 74 an epoch, 2 ranks (rounds of 4 rows) 72. A position in its
    second epoch keeps its place there; one in the rows 2 ranks drop moves to their next epoch's start."""
    _, states = stream(two_sources, 1, 1, mix=MIX)
    for saved, expected in ((74 + 6, 72 + 6), (74 + 73, 2 * 72), (5, 5)):
        moved = reshard([{**states[0], "positions": [4, saved], "deficits": [0.25, -0.25]}], 1, 2, rounds=7)
        assert moved["positions"] == [4, expected] and moved["deficits"] == [0.25, -0.25]
        assert (moved["batches"], moved["rank"], moved["world_size"]) == (7, 1, 2)
    assert reshard(states, 0, 1)["batches"] == states[0]["batches"]  # no rounds given: the count saved


def test_tokens_per_source_carry_over_exactly_to_another_world(two_sources):
    """Source 1's epoch is 74 rows for one process and 72 for 2 ranks: after 2 epochs of it and some, the
    tokens read must carry over as read, not be counted again at the new world's epoch length."""
    _, states = stream(two_sources, 1, 120, mix=MIX)  # 240 rows: 80 of source 1, its second epoch and 6 more
    assert states[0]["positions"][1] == 80 and states[0]["tokens"][1] == 80 * 8
    _, moved = stream(two_sources, 2, 3, start=states, rounds=60, mix=MIX)  # 12 rows more, 4 of source 1
    assert [s["tokens"][1] for s in moved] == [84 * 8] * 2


# 6 micro-batches of 2 rows per update: 1 process accumulates 6, 2 accumulate 3, 3 accumulate 2; 4 (hsdp) need 12.
@pytest.mark.second_tier  # about 60 s of torchrun per case on 2 cores
@pytest.mark.parametrize(
    "saved, nproc, parallel, update, optimizer",
    [
        ((2, "fsdp"), 1, "none", 384, "muon"),
        ((2, "ddp"), 3, "fsdp", 384, "adamw"),
        ((2, "fsdp"), 4, "hsdp", 768, "muon"),
        ((1, "none"), 2, "fsdp", 384, "muon"),
    ],
    ids=["fsdp2-to-1", "ddp2-to-fsdp3", "fsdp2-to-hsdp4", "1-to-fsdp2"],
)
def test_a_run_saved_by_one_world_resumes_on_another_with_the_same_losses_and_weights(
    pydoc_data, tmp_path, saved, nproc, parallel, update, optimizer
):
    """A run stopped at step 2 and resumed by another world (sharded folders read as a file's whole tensors, a
    file's cut into shards) ends with the losses and final weights of the saving world trained straight through,
    up to fp32 rounding. With Muon, base.toml's optimizer, but for the DDP file cut into FSDP shards, which
    trains AdamW alone: Muon's momentum is resharded with the matrices (a resume that lost it was 3e-4 off at
    the last step), and AdamW's state with the norms and tables Muon leaves it."""
    common = [*RUN, "train.batch_size=2", f"train.tokens_per_update={update}", f'optim.name="{optimizer}"']

    def run(out: str, world: int, mode: str, *sets: str, flags: tuple[str, ...] = ()):
        shards = [f'train.parallel="{mode}"'] if world > 1 else []
        groups = ["train.shard_group_size=2"] if mode == "hsdp" else []
        args = tiny_args(pydoc_data, tmp_path / out, *common, *shards, *groups, *sets, flags=flags)
        done = torchrun(args, nproc=world) if world > 1 else single(args)
        assert done.returncode == 0, done.stderr
        return done

    run("straight", *saved)
    run("resumed", *saved, "train.max_steps=2")
    kept = tmp_path / "resumed" / "checkpoints" / "step_0000002"
    assert kept.is_dir() if saved[1] == "fsdp" else kept.with_suffix(".pt").is_file()  # "auto": FSDP saves folders
    resumed = run("resumed", nproc, parallel, flags=("--resume", "auto"))
    assert f"saved by {saved[0]} process(es) ({saved[1]}), continued by {nproc} ({parallel})" in resumed.stdout
    assert ("ranks 2-" in resumed.stdout) == (nproc > 2)  # the ranks with no saved random state are named
    assert values(tmp_path / "resumed", "train", "tokens") == values(tmp_path / "straight", "train", "tokens")
    assert values(tmp_path / "resumed", "train", "loss") == pytest.approx(
        values(tmp_path / "straight", "train", "loss"), rel=1e-5
    )
    ours, theirs = (read_safetensors(tmp_path / d / "final" / "model.safetensors") for d in ("resumed", "straight"))
    if optimizer == "adamw":  # its sums in another order may turn a few elements by up to a step (assert_weights_agree)
        assert_weights_agree(ours, theirs, adam_movement_bound(tmp_path / "straight"))
        return
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)


def cli(program, args: list[str]) -> None:
    with pytest.raises(SystemExit) as done:
        run_cli(program.main, args)
    assert done.value.code == 0


SHARDED = [*RUN, 'checkpoint.format="sharded"', "train.sample_tokens=0"]


def test_a_sharded_checkpoint_resumes_exactly_and_every_tool_reads_it(pydoc_data, tmp_path, capsys):
    cli(train, tiny_args(pydoc_data, tmp_path / "straight", *SHARDED, "model.dropout=0.1"))
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *SHARDED, "model.dropout=0.1", "train.max_steps=2"))
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *SHARDED, "model.dropout=0.1", flags=["--resume", "auto"]))
    assert values(tmp_path / "run", "train", "loss") == values(tmp_path / "straight", "train", "loss")  # bit for bit
    saved = tmp_path / "run" / "checkpoints" / "step_0000004"
    assert saved.is_dir() and {".metadata", "__0_0.distcp", "state.pt"} <= set(os.listdir(saved))
    assert (saved.parent / "latest").read_text() == "step_0000004"
    # The last save holds the final weights: export reads the folder directly, as sample and evaluate do.
    for spec in (saved, saved.parent, saved.parent / "latest"):
        cli(export, [str(spec), "--out", str(tmp_path / "export")])
        ours, final = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("export", "run/final"))
        assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in ours)
        shutil.rmtree(tmp_path / "export")
    cli(export, [str(saved), "--hf", "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file()
    cli(sample, [str(saved), "--max-new-tokens", "4", "--prompt", "The"])
    cli(evaluate, [str(saved), "--split", "val"])
    capsys.readouterr()


def test_an_old_checkpoint_file_resumes_into_sharded_saves(pydoc_data, tmp_path):
    cli(train, tiny_args(pydoc_data, tmp_path / "straight", *SHARDED))
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *RUN, 'checkpoint.format="file"', "train.max_steps=2"))
    assert (tmp_path / "run" / "checkpoints" / "step_0000002.pt").is_file()
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *SHARDED, flags=["--resume", "auto"]))
    assert values(tmp_path / "run", "train", "loss") == values(tmp_path / "straight", "train", "loss")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["best", "latest", "step_0000002.pt", "step_0000004"]


def test_muons_sharded_checkpoint_resumes_exactly(pydoc_data, tmp_path):
    """Muon and its AdamW half, saved as one sharded checkpoint (what FSDP saves), resume bit for bit. With the
    head tied to the embedding the AdamW half's group of decayed matrices is empty, and torch.distributed.checkpoint
    cannot load two optimizers together when one has such a group: each is saved and loaded alone (every such
    resume failed before)."""
    muon = [*SHARDED, "optim.name=muon"]
    cli(train, tiny_args(pydoc_data, tmp_path / "straight", *muon))
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *muon, "train.max_steps=2"))
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *muon, flags=["--resume", "auto"]))
    assert values(tmp_path / "run", "train", "loss") == values(tmp_path / "straight", "train", "loss")


def test_pruning_removes_old_folders_and_a_killed_save_stays_invisible(pydoc_data, tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    cli(train, tiny_args(pydoc_data, run, *SHARDED, "train.max_steps=6", "checkpoint.keep_last=1"))
    assert (checkpoints / "latest").read_text() == "step_0000006"
    assert "step_0000002" not in os.listdir(checkpoints)  # pruned: older than what latest, best and recovery keep
    # A save killed halfway leaves only its temporary folder: latest still names a complete save, and the next
    # save clears it away.
    shutil.copytree(checkpoints / "step_0000006", checkpoints / ".step_0000008.tmp")
    (checkpoints / ".step_0000008.tmp" / ".metadata").unlink()
    cli(
        train,
        tiny_args(pydoc_data, run, *SHARDED, "train.max_steps=8", "checkpoint.keep_last=1", flags=["--resume", "auto"]),
    )
    assert (checkpoints / "latest").read_text() == "step_0000008"
    assert not [name for name in os.listdir(checkpoints) if name.endswith(".tmp")]


def test_async_saves_resume_exactly_and_the_end_waits_for_the_last(pydoc_data, tmp_path):
    background = [*SHARDED, "checkpoint.async_save=true", "checkpoint.interval=1"]
    cli(train, tiny_args(pydoc_data, tmp_path / "straight", *SHARDED))
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *background, "train.max_steps=2"))  # the second waits
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000002"  # the run ended only once its last save was done
    assert {".metadata", "state.pt"} <= set(os.listdir(checkpoints / "step_0000002"))
    cli(train, tiny_args(pydoc_data, tmp_path / "run", *background, flags=["--resume", "auto"]))
    assert values(tmp_path / "run", "train", "loss") == values(tmp_path / "straight", "train", "loss")


def test_a_failed_background_write_is_one_line_and_latest_keeps_the_last_complete_save(
    pydoc_data, tmp_path, monkeypatch, capsys
):
    from concurrent.futures import Future

    from fasttrain.checkpoints import sharded_files
    from fasttrain.training.trainer import Trainer

    trainer = Trainer(tiny_config(pydoc_data, tmp_path, *SHARDED, "checkpoint.async_save=true"), quiet=True)
    trainer.step()
    first = trainer.save_checkpoint()
    assert trainer.checkpoints.latest() == first  # waited for, then published
    failed: Future = Future()
    failed.set_exception(OSError(28, "No space left on device"))
    monkeypatch.setattr(sharded_files, "write_async", lambda *args: failed)
    trainer.step()
    trainer.save_checkpoint()
    assert trainer.checkpoints.latest() == first
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_0000002: the background checkpoint write failed (OSError" in err, err
    assert "latest still names" in err and not list((tmp_path / "checkpoints").glob(".*.tmp"))
    trainer.close()


@pytest.mark.parametrize("fails", ["at once", "after step 5"])
def test_a_rollback_never_goes_to_a_save_whose_background_write_failed(
    pydoc_data, tmp_path, monkeypatch, capsys, fails
):
    """Saves at steps 2 and 6 written, step 4's background write fails (at once, or only after step 5, whose
    finite loss proved step 4's save), steps 7 and 8 diverge, keep_last=1. The rollback went to step 4's save
    and died ("missing"), and step 2's, the way back, was pruned by step 6's save: it goes back to step 2."""
    from concurrent.futures import Future

    from fasttrain.checkpoints import sharded_files
    from fasttrain.training.trainer import Trainer
    from tests.test_checkpoint import events, nan_losses, plant

    trainer = Trainer(
        tiny_config(
            pydoc_data,
            tmp_path,
            *SHARDED,
            "checkpoint.async_save=true",
            "train.max_steps=10",
            "checkpoint.interval=2",
            "checkpoint.keep_last=1",
            "recovery.max_skips=2",
            "train.log_interval=1",
            "train.eval_interval=10",
        ),
        quiet=True,
    )
    real, calls, failing = sharded_files.write_async, [], Future()

    def second_fails(*args):
        calls.append(args[0])
        return failing if len(calls) == 2 else real(*args)

    def fail(_: Trainer) -> None:
        if not failing.done():
            failing.set_exception(OSError(28, "No space left on device"))

    monkeypatch.setattr(sharded_files, "write_async", second_fails)
    plant(trainer, {4} if fails == "at once" else {5}, fail)
    nan_losses(trainer, {7, 8})
    summary = trainer.train()
    (rollback,) = events(tmp_path, "rollback")
    assert (rollback["from_step"], rollback["step"]) == (8, 2) and rollback["path"].endswith("step_0000002")
    assert summary["step"] == 10 and summary["rollbacks"] == 1
    assert "step_0000004: the background checkpoint write failed (OSError" in capsys.readouterr().err
    trainer.close()


@pytest.mark.second_tier  # about 20 s of torchrun on 2 cores
def test_an_early_stop_under_torchrun_with_async_saves_ends_on_every_rank(pydoc_data, tmp_path):
    """Rank 0 points `latest` at a background save once its own write and the checksums are done; rank 1, whose write
    ended first, read the pointer before it moved, took the step as unsaved and saved it again while rank 0 went on to
    final/: two collectives apart, the job hung and failed (exit 1). Every rank now reads rank 0's pointer."""
    stopping = [
        *RUN,
        "train.batch_size=2",
        'train.parallel="fsdp"',
        "checkpoint.async_save=true",
        "checkpoint.interval=1",
        "train.eval_interval=1",
        "train.eval_steps=1",
        "train.early_stop_patience=1",
        "train.early_stop_min_delta=100",  # no evaluation improves by that much: it stops at the second
    ]
    done = torchrun(tiny_args(pydoc_data, tmp_path / "run", *stopping))
    assert done.returncode == 0, done.stderr
    assert "stopping early at step 2" in done.stdout + done.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000002"
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.second_tier  # about 60 s of torchrun on 2 cores
def test_async_saves_under_torchrun_resume_exactly(pydoc_data, tmp_path):
    """Two FSDP ranks saving in the background every step, stopped at step 2 and resumed: the same losses
    exactly, so each rank's sharded model and optimizer state, loader position and random state (dropout) came
    back. (DDP's exact resume with dropout: test_elastic.py; a 2-rank save continued by one process:
    test_a_run_saved_by_one_world_resumes_on_another_with_the_same_losses_and_weights and test_mixture.py.)"""
    background = [
        *RUN,
        "train.batch_size=2",
        "model.dropout=0.1",
        'train.parallel="fsdp"',
        "checkpoint.async_save=true",
        "checkpoint.interval=1",
    ]
    straight = torchrun(tiny_args(pydoc_data, tmp_path / "straight", *background))
    assert straight.returncode == 0, straight.stderr
    first = torchrun(tiny_args(pydoc_data, tmp_path / "run", *background, "train.max_steps=2"))
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000002"
    resumed = torchrun(tiny_args(pydoc_data, tmp_path / "run", *background, flags=["--resume", "auto"]))
    assert resumed.returncode == 0, resumed.stderr
    assert values(tmp_path / "run", "train", "loss") == values(tmp_path / "straight", "train", "loss")
    assert (
        sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]
        == "step_0000004"
    )
    last = tmp_path / "run" / "checkpoints" / "step_0000004"  # rank 0 read back both ranks' files in the background
    assert set(torch.load(last / "state.pt", weights_only=True)["checksums"]) == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    }
