"""A resume where checkpoints/ holds more than the save it goes on from (a review's findings): saves of later steps
(a continuation a resume from an earlier save left, or a save whose `latest` a kill never moved) are neither counted
nor pruned, a `best` naming one of them goes back to the restored run's best save, a run that stopped early stays
stopped, and a resume that changes the rows evaluations score, the clip or the precision says so."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from fasttrain import train
from fasttrain.checkpoints import saves
from fasttrain.model.weights import read_safetensors
from fasttrain.plot import read_metrics
from tests.conftest import tiny_args
from tests.test_checkpoint import run_cli_code


def trained(data: Path, run: Path, *sets: str, resume: str | None = None) -> int:
    flags = ["--resume", resume] if resume else []
    return run_cli_code(train.main, tiny_args(data, run, "train.sample_tokens=0", *sets, flags=flags))


def steps(run: Path) -> list[int]:
    return [saves.step_of(p) for p in saves.saved_steps(run / "checkpoints")]


def test_a_save_newer_than_latest_is_not_counted_when_pruning(pydoc_data, tmp_path, capsys):
    """A kill between writing step_10.pt and moving `latest` to it: the resumed run (from step 5) pruned its own newest
    save at once (keep_last 1 kept step 10), so `latest` named a missing file and the next resume was refused."""
    run = tmp_path / "run"
    assert trained(pydoc_data, run, "checkpoint.interval=5", "checkpoint.keep_last=2", "train.eval_interval=5") == 0
    saves.point(run / "checkpoints", "latest", saves.path_for(run / "checkpoints", 5))  # as if killed before it moved
    # At a learning rate far too high the evaluation at step 9 is worse than step 5's: `best` does not keep step 9 either
    resumed = [
        "checkpoint.interval=3",
        "checkpoint.keep_last=1",
        "train.max_steps=9",
        "optim.lr=30",
        "train.eval_interval=5",
    ]
    assert trained(pydoc_data, run, *resumed, resume="auto") == 0
    assert 9 in steps(run) and 10 in steps(run)
    assert saves.pointed(run / "checkpoints", "best").name == "step_0000005.pt"  # the restored run's best, kept
    assert saves.pointed(run / "checkpoints", "latest").name == "step_0000009.pt"
    assert "step_0000010.pt, saved after step 5 by a continuation this resume leaves" in capsys.readouterr().out
    assert trained(pydoc_data, run, "checkpoint.interval=3", "checkpoint.keep_last=1", resume="auto") == 0
    assert saves.pointed(run / "checkpoints", "latest").name == "step_0000010.pt"  # saved over by this run


def test_best_of_a_continuation_left_behind_is_not_final(pydoc_data, tmp_path, capsys):
    """A resume from an earlier save: `best` named the later continuation's save, and checkpoint.final_weights = "best"
    put those weights in final/ with the restored run's other best loss beside them."""
    run = tmp_path / "run"
    sets = [
        "train.eval_interval=2",
        "checkpoint.interval=2",
        "checkpoint.keep_last=10",
        "checkpoint.final_weights=best",
    ]
    assert trained(pydoc_data, run, *sets) == 0
    left = saves.pointed(run / "checkpoints", "best")
    assert left is not None and saves.step_of(left) > 4
    capsys.readouterr()
    assert trained(pydoc_data, run, *sets, "train.max_steps=6", resume=str(run / "checkpoints/step_0000004.pt")) == 0
    best = saves.pointed(run / "checkpoints", "best")
    assert best is None or saves.step_of(best) <= 6
    assert f"named {left.name}, of the continuation this resume leaves" in capsys.readouterr().out
    end = [e for e in read_metrics(run) if e["event"] == "end"][-1]
    assert end["weights_step"] <= 6 and end.get("weights_val_loss", end["best_val_loss"]) == end["best_val_loss"]
    final = read_safetensors(run / "final" / "model.safetensors")
    saved = torch.load(saves.path_for(run / "checkpoints", end["weights_step"]), weights_only=True)["model"]
    assert all(torch.equal(final[k], saved[k].to(final[k].dtype)) for k in final if k in saved)


def test_a_run_that_stopped_early_stays_stopped_when_resumed(pydoc_data, tmp_path, capsys):
    """It trained one more step at every resume and wrote final/ again."""
    run = tmp_path / "run"
    # No evaluation after the first is better by 100: two stale ones stop the run at step 6
    sets = [
        "train.max_steps=60",
        "train.eval_interval=2",
        "train.early_stop_patience=2",
        "train.early_stop_min_delta=100",
    ]
    assert trained(pydoc_data, run, *sets) == 0
    assert steps(run)[-1] == 6
    capsys.readouterr()
    assert trained(pydoc_data, run, *sets, resume="auto") == 0
    assert steps(run)[-1] == 6
    assert "it stopped early: 2 evaluations without a better val_loss" in capsys.readouterr().out
    assert trained(pydoc_data, run, *sets[:-2], "train.early_stop_patience=3", resume="auto") == 0
    assert steps(run)[-1] > 6  # a larger patience trains on


@pytest.mark.parametrize(
    "changed, said",
    [
        (["train.eval_steps=1"], "evaluations score 4 validation rows, not the save's"),
        (["optim.max_grad_norm=0.5"], "optim.max_grad_norm is 0.5 (saved with 1.0)"),
        (["train.precision=bf16"], "train.precision is 'bf16' (saved with 'fp32')"),
    ],
    ids=["eval_steps", "clip", "precision"],
)
def test_a_resume_says_what_it_changes(pydoc_data, tmp_path, capsys, changed, said):
    run = tmp_path / "run"
    assert trained(pydoc_data, run, "train.max_steps=4", "train.precision=fp32") == 0
    capsys.readouterr()
    assert trained(pydoc_data, run, "train.max_steps=6", "train.precision=fp32", *changed, resume="auto") == 0
    assert said in capsys.readouterr().out


def test_a_sharded_save_made_again_is_never_missing(pydoc_data, tmp_path, monkeypatch):
    """A step saved again (here by a resume from an earlier save) swaps folders in one rename: stopped right after the
    swap, `latest` names a whole save (it named a folder set aside as .step_N.old.tmp, which the next save removed)."""
    checkpoint = importlib.import_module("fasttrain.checkpoints.checkpoint")  # the package has a name of it too
    run = tmp_path / "run"
    sets = ["checkpoint.format=sharded", "checkpoint.interval=2", "checkpoint.keep_last=10", "train.max_steps=6"]
    assert trained(pydoc_data, run, *sets) == 0
    real, swapped = checkpoint.exchange, []

    def stopped_after(a: Path, b: Path) -> bool:
        if not real(a, b):
            pytest.skip("this file system cannot exchange two names")
        swapped.append(b.name)
        raise KeyboardInterrupt  # the run ends with exit 130, the old step_0000004 left as .step_0000004.tmp

    monkeypatch.setattr(checkpoint, "exchange", stopped_after)
    assert trained(pydoc_data, run, *sets, resume=str(run / "checkpoints/step_0000002")) != 0
    assert swapped == ["step_0000004"]
    monkeypatch.undo()
    latest = saves.pointed(run / "checkpoints", "latest")
    assert latest is not None and latest.is_dir()
    assert trained(pydoc_data, run, *sets, "train.max_steps=8", resume="auto") == 0
