"""Issue 42, training for a time budget (train.max_time), through the Trainer and `python -m fasttrain.train`:
progress by time, the schedule finished at the budget, a resume counting the time already spent, and the
recorded progress replaying a budgeted run bit for bit. Time comes from a fake clock the test moves while
a step runs, so nothing sleeps and every figure is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from fasttrain.config import format_duration, load_config
from fasttrain.optimization.schedule import Budget, lr_at
from fasttrain.system.errors import run_cli
from fasttrain.train import main as train_main
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_args, tiny_config

QUIET_RUN = ("train.sample_tokens=0", "train.eval_interval=1000", "train.log_interval=1", "checkpoint.interval=1000")


class FakeClock:
    """Seconds that pass only when the test says: each step of a Trainer `timed` by it takes the next of its
    durations."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def timed(trainer: Trainer, durations: Iterable[float]) -> Trainer:
    """`trainer`, whose steps each move its fake clock on by the next of `durations` (then by the last)."""
    durations, last = iter(durations), [0.0]
    real = trainer.accumulate_gradients

    def accumulate(*batches):
        last[0] = next(durations, last[0])
        trainer.clock.now += last[0]
        return real(*batches)

    trainer.accumulate_gradients = accumulate
    return trainer


def budgeted(pydoc_data, out: Path, durations: Iterable[float], *overrides: str, quiet: bool = True) -> Trainer:
    """A Trainer whose steps take `durations` on a fake clock, planned untimed: a timing of the real machine (a set
    shape under a budget is timed, shape.set_shape_speed) would project another clock's steps."""
    with mock.patch("fasttrain.planning.shape.set_shape_speed", return_value=None):
        trainer = Trainer(tiny_config(pydoc_data, out, *QUIET_RUN, *overrides), quiet=quiet, clock=FakeClock())
    return timed(trainer, durations)


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def test_durations_parse_and_print_as_written():
    cfg = load_config(None, ["train.max_time=1h30m", "train.max_steps=0"])
    assert (cfg.train.max_time, cfg.train.max_steps) == (5400.0, 0)
    assert [load_config(None, [f"train.max_time={v}"]).train.max_time for v in ("90", '"3m"', "2.5", "1m30s")] == [
        90.0,
        180.0,
        2.5,
        90.0,
    ]
    assert [format_duration(s) for s in (2.5, 45, 180, 5400, 125)] == ["2.5s", "45s", "3m", "1h30m", "2m5s"]


def test_progress_is_the_larger_of_steps_and_time():
    budget = Budget(max_steps=100, max_time=60.0)
    assert budget.progress(10, 30.0) == 0.5 and budget.progress(80, 30.0) == 0.8
    assert not budget.reached(99, 59.9) and budget.reached(100, 1.0) and budget.reached(3, 60.0)
    assert Budget(0, 60.0).standing(10, 15.0) == (0.25, 40, 45.0)  # 4 times as many steps at that speed
    assert Budget(30, 60.0).standing(10, 15.0) == (1 / 3, 30, 30.0)  # the step limit comes first: 20 x 1.5 s left
    # What a run's plans are laid out to, and the words: the clock's projection, or the steps where they come first
    assert Budget(0, 60.0).horizon(10, 15.0) == (40, "by step ~40, where train.max_time is projected to end the run")
    assert Budget(30, 60.0).horizon(10, 15.0) == (30, "in 30 steps, before train.max_time would end the run")
    assert Budget(30, 60.0).horizon(0, 0.0) == (30, "in 30 steps, if train.max_time lets the run get that far")


def test_a_budgeted_run_ends_on_time_with_its_schedule_finished(pydoc_data, tmp_path):
    """Steps of 1 s against a 12 s budget, no step limit but the epoch limit's (the plan's train.max_steps, far
    beyond): 12 updates, each at the progress projected for its end (the first, with no step timed yet, at the
    epoch limit's share), the last at min_lr exactly; the warmup of 100 steps ended by a tenth of the budget."""
    trainer = budgeted(
        pydoc_data,
        tmp_path,
        [1.0],
        "train.max_steps=0",
        "train.max_time=12",
        "schedule.warmup_steps=100",
        "schedule.min_lr=1e-4",
    )
    summary = trainer.train()
    assert (summary["step"], summary["train_seconds"]) == (12, 12.0)
    progress = events(tmp_path, "progress")
    assert trainer.cfg.train.max_steps > 1000  # the epoch limit, which the clock ends the run well before
    assert [e["progress"] for e in progress] == [1 / trainer.cfg.train.max_steps] + [(s + 1) / 12 for s in range(1, 12)]
    lrs = [e["lr"] for e in events(tmp_path, "train")]
    assert lrs[0] == 1e-3 / 100  # warmup's first step
    assert lrs[1] == 1e-3  # decay_from: the first update past a tenth of the budget has the peak
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == 1e-4 and trainer.run.decay_from == 2 / 12
    train = events(tmp_path, "train")
    assert [(e["final_step"], e["seconds_left"]) for e in train[-2:]] == [(12, 1.0), (12, 0.0)]


def test_the_step_limit_ends_a_budgeted_run_on_a_fast_machine(pydoc_data, tmp_path):
    """Whichever comes first: 20 steps well within an hour's budget. The schedule then runs on the steps'
    progress, at a step run's rates (lr_at: its warmup is no more than a tenth), and ends at min_lr exactly."""
    trainer = budgeted(
        pydoc_data,
        tmp_path,
        [0.5],
        "train.max_steps=20",
        "train.max_time=1h",
        "schedule.warmup_steps=2",
        "schedule.decay=linear",
    )
    assert trainer.train()["step"] == 20
    lrs = [e["lr"] for e in events(tmp_path, "train")]
    assert lrs == pytest.approx([lr_at(s, 20, 1e-3, trainer.cfg.schedule) for s in range(20)], rel=1e-12)
    assert lrs[-1] == trainer.cfg.schedule.min_lr


def test_a_slow_step_moves_the_schedule_on(pydoc_data, tmp_path):
    """Progress is by time, not steps: a step that takes 3 s of a 10 s budget moves the schedule three
    times as far as one of 1 s, and the run stops when the 10 s are spent."""
    trainer = budgeted(
        pydoc_data,
        tmp_path,
        [1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        "train.max_steps=100",
        "train.max_time=10",
        "schedule.warmup_steps=0",
    )
    assert trainer.train()["step"] == 8
    assert [e["seconds"] for e in events(tmp_path, "progress")] == [1, 2, 5, 6, 7, 8, 9, 10]
    progress = [e["progress"] for e in events(tmp_path, "progress")]
    assert progress[3] == pytest.approx((5 + 5 / 3) / 10)  # 5 s trained, and one average step more
    assert progress[-2] < 1 <= progress[-1] and events(tmp_path, "train")[-1]["lr"] == 1e-4


def test_a_resumed_budgeted_run_counts_the_time_already_spent(pydoc_data, tmp_path):
    """Killed 4 s into a 10 s budget (a checkpoint at step 4), resumed: it trains the 6 s left, ends with the
    schedule finished, and its weights are those of the run that was never stopped."""
    args = ("train.max_steps=0", "train.max_time=10", "checkpoint.interval=2")
    straight = budgeted(pydoc_data, tmp_path / "straight", [1.0], *args).train()

    def killed_at_step_5(durations):
        for i, seconds in enumerate(durations):
            if i == 4:
                raise KeyboardInterrupt  # kill -9 as far as the run directory knows: nothing saved
            yield seconds

    first = budgeted(pydoc_data, tmp_path / "killed", killed_at_step_5([1.0] * 10), *args)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    first.close()
    resumed = budgeted(pydoc_data, tmp_path / "killed", [1.0], *args)
    resumed.resume("auto")
    assert (resumed.run.step, resumed.run.train_seconds) == (4, 4.0)
    summary = resumed.train()
    assert (summary["step"], summary["train_seconds"]) == (10, 10.0) == (straight["step"], straight["train_seconds"])
    assert events(tmp_path / "killed", "train")[-1]["lr"] == resumed.cfg.schedule.min_lr
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_budget_reports_and_a_longer_one_extends(pydoc_data, tmp_path, capsys):
    """A finished budgeted run resumed with its own budget trains nothing more (as a step run at its end);
    with a longer one it goes on at the rate it ended with (its schedule finished), said in one line."""
    budgeted(pydoc_data, tmp_path, [1.0], "train.max_steps=0", "train.max_time=4").train()
    again = budgeted(pydoc_data, tmp_path, [1.0], "train.max_steps=0", "train.max_time=4")
    again.resume("auto")
    assert again.train()["step"] == 4
    longer = budgeted(pydoc_data, tmp_path, [1.0], "train.max_steps=0", "train.max_time=8", quiet=False)
    longer.resume("auto")
    said = capsys.readouterr().out
    assert (
        "resume: train.max_time 4s -> 8s: the saved run had finished its cosine schedule, so it trains on at its "
        "last learning rate, 0.0001, to the end of 8s of training" in said
    )
    assert longer.train()["step"] == 8
    assert {e["lr"] for e in events(tmp_path, "train")[4:]} == {longer.cfg.schedule.min_lr}


def test_the_recorded_progress_replays_the_run_bit_for_bit(pydoc_data, tmp_path, capsys):
    """A budgeted run's steps of uneven length, then `--set train.max_steps=N train.max_time=0
    schedule.progress_from=...` from the command line: the same weights, bit for bit, on CPU in fp32. The
    step run of N steps without the record is not the same run (its rate differs at every step)."""
    run = tmp_path / "budgeted"
    budgeted(
        pydoc_data, run, [0.7, 1.3, 0.9, 2.1, 1.0, 0.8, 1.6], "train.max_steps=0", "train.max_time=9", quiet=False
    ).train()
    steps = events(run, "end")[-1]["step"]
    assert steps == 8
    said = capsys.readouterr().out
    assert f"replay      --set train.max_steps={steps} train.max_time=0 schedule.progress_from={run}/metrics" in said

    defaults = tmp_path / "defaults.toml"  # the command line on the Trainer's config: the defaults, then --set
    defaults.write_text("")

    def replay(out: Path, *sets: str) -> dict[str, torch.Tensor]:
        with pytest.raises(SystemExit) as done:
            run_cli(
                train_main,
                tiny_args(
                    pydoc_data,
                    out,
                    *QUIET_RUN,
                    f"train.max_steps={steps}",
                    "train.max_time=0",
                    *sets,
                    config=str(defaults),
                ),
            )
        assert done.value.code == 0
        return weights(out)

    original = weights(run)
    replayed = replay(tmp_path / "replay", f"schedule.progress_from={run / 'metrics.jsonl'}")
    assert all(torch.equal(original[k], replayed[k]) for k in original)
    assert [e["lr"] for e in events(tmp_path / "replay", "train")] == [e["lr"] for e in events(run, "train")]
    by_steps = replay(tmp_path / "steps")
    assert not all(torch.equal(original[k], by_steps[k]) for k in original)


def test_a_budget_shorter_than_one_step_makes_one_step_and_says_so(pydoc_data, tmp_path, capsys):
    trainer = budgeted(pydoc_data, tmp_path, [2.0], "train.max_steps=0", "train.max_time=0.5", quiet=False)
    assert trainer.train()["step"] == 1
    said = capsys.readouterr().out
    assert "note: train.max_time = 0.5s is shorter than one step (2s here): the run made that one step" in said


def test_a_constant_rate_under_a_budget_is_said_once(pydoc_data, tmp_path, capsys):
    trainer = budgeted(
        pydoc_data,
        tmp_path,
        [1.0],
        "train.max_steps=0",
        "train.max_time=3",
        "schedule.decay=constant",
        "schedule.warmup_steps=0",
        quiet=False,
    )
    assert trainer.train()["step"] == 3
    said = capsys.readouterr().out
    assert said.count('note: schedule.decay = "constant" has no decay to finish') == 1
    assert {e["lr"] for e in events(tmp_path, "train")} == {1e-3}


def test_the_summary_gives_training_and_wall_time(pydoc_data, tmp_path):
    """What counts: the steps only, not the evaluations, the sampling or the checkpoints between them."""
    trainer = budgeted(
        pydoc_data,
        tmp_path,
        [1.0],
        "train.max_steps=0",
        "train.max_time=3",
        "train.eval_interval=1",
        "checkpoint.interval=1",
    )
    real_evaluate = trainer.evaluate

    def slow_evaluate(stop=lambda: False):
        trainer.clock.now += 5.0  # an evaluation that takes 5 s: not training time
        return real_evaluate(stop)

    trainer.evaluate = slow_evaluate
    summary = trainer.train()
    assert (summary["step"], summary["train_seconds"]) == (3, 3.0)
    assert summary["wall_seconds"] == 3 * 1.0 + 3 * 5.0 and not math.isnan(summary["val_loss"])
