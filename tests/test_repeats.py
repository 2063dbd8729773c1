"""A corpus read many times: the run raises its weight decay where validation stops improving after the first
epoch (optim.weight_decay_growth, policies.RepeatRegulariser), keeps it through a resume, and leaves a corpus read
once alone. Validation is made to stop improving by construction (spoil_after zeroes the weights), not by a
trajectory that may differ between machines."""

from __future__ import annotations

import math

import pytest

from fasttrain import Trainer
from fasttrain.plot import read_metrics
from tests.conftest import spoil_after, tiny_config

EVERY_STEP = ["train.eval_interval=1", "train.eval_steps=2", "train.sample_tokens=0"]
SAVE_EVERY_STEP = ["checkpoint.interval=1", "checkpoint.keep_last=1000"]
CODE = ["data.vocab_size=0"]  # code_data has pydoc_data's tokenizer, not a vocabulary size of its own
GROWING = ["optim.weight_decay=0.1", "optim.weight_decay_growth=4", "optim.max_weight_decay=0.8", "optim.lr=1e-2"]


def steps_per_epoch(data, tmp_path) -> int:
    trainer = Trainer(tiny_config(data, tmp_path / "probe", *CODE, "train.batch_size=16"), quiet=True)
    steps = trainer.plan.rows_per_epoch[0] // 16
    trainer.close()
    return steps


def decays(trainer: Trainer) -> list[float]:
    return sorted({g["weight_decay"] for g in trainer.updater.optimizer.param_groups})


def test_a_small_corpus_read_again_gets_more_weight_decay_once_validation_stalls(code_data, tmp_path, capsys):
    epoch = steps_per_epoch(code_data, tmp_path)
    spoilt = epoch + 1  # the evaluations after this step are the uniform guess: worse than the best, so stalled
    run = [*EVERY_STEP, *SAVE_EVERY_STEP, *GROWING, *CODE, "train.batch_size=16", f"train.max_steps={spoilt + 3}"]
    out = tmp_path / "run"
    trainer = spoil_after(Trainer(tiny_config(code_data, out, *run)), spoilt)
    trainer.train()
    events = read_metrics(out)
    raised = [e for e in events if e["event"] == "regularised"]
    # The rule replayed on the run's own evaluations: a rise at each one past the first epoch that did not lower the
    # best (the spoilt ones by construction, any earlier stall too), x4 each time up to the cap (0.8 = 8 x 0.1)
    best, stalled = math.inf, []
    for e in (e for e in events if e["event"] == "eval"):
        if e["val_loss"] >= best and e["step"] > epoch:
            stalled.append(e["step"])
        best = min(best, e["val_loss"])
    assert {spoilt + 1, spoilt + 2, spoilt + 3} <= set(stalled)
    assert [e["step"] for e in raised] == stalled[:2]  # the second rise reaches the cap: no third
    assert [e["weight_decay"] for e in raised] == [pytest.approx(0.4), pytest.approx(0.8)]
    assert all(e["epochs"] > 1 for e in raised)
    assert trainer.run.decay_scale == pytest.approx(8.0) and decays(trainer) == [0.0, pytest.approx(0.8)]
    assert "weight decay 0.1 -> 0.4 at step" in capsys.readouterr().out

    # resumed from the step the decay first rose, with the growth set another way: the decay it reached is kept
    # (a rise is what the run observed, not a setting), the new growth applies from there
    resumed = Trainer(tiny_config(code_data, out, *run, "optim.weight_decay_growth=2"), quiet=True)
    resumed.resume(str(out / "checkpoints" / f"step_{stalled[0]:07d}.pt"))
    assert resumed.run.decay_scale == pytest.approx(4.0)
    resumed.step()
    assert decays(resumed) == [0.0, pytest.approx(0.4)]


def test_a_corpus_read_once_keeps_its_weight_decay_through_a_stall(pydoc_data, tmp_path):
    out = tmp_path / "run"
    run = [*EVERY_STEP, *GROWING, "train.max_steps=8"]  # 8 x 128 tokens of 180K: far from a second epoch
    trainer = spoil_after(Trainer(tiny_config(pydoc_data, out, *run), quiet=True), 4)
    trainer.train()
    evals = [e["val_loss"] for e in read_metrics(out) if e["event"] == "eval"]
    assert evals[-1] == pytest.approx(math.log(512), rel=1e-6) and min(evals) < evals[-1]  # it did stall
    assert not [e for e in read_metrics(out) if e["event"] == "regularised"]
    assert trainer.run.decay_scale == 1.0 and decays(trainer) == [0.0, pytest.approx(0.1)]
