"""The training loop's policies on their own: recovery from non-finite steps, and early stopping."""

from __future__ import annotations

import math
from pathlib import Path

from fasttrain.checkpoints.run_state import RunState
from fasttrain.config import RecoveryConfig
from fasttrain.training.policies import EarlyStopping, Recovery


def test_recovery_counts_skips_in_a_row_and_rolls_back_within_its_allowance():
    recovery = Recovery(RecoveryConfig(max_skips=2, lr_factor=0.5, max_rollbacks=1))
    assert [recovery.after_step(skipped) for skipped in (True, False, True)] == [False, False, False]
    assert recovery.after_step(True) and recovery.in_a_row == 2  # a good step in between restarts the count
    assert not recovery.can_roll_back(RunState())  # no save to return to yet
    recovery.safe = Path("step_0000006.pt")
    diverged = RunState(step=9, tokens_seen=900, lr_scale=0.5, skipped_steps=4, rollbacks=0)
    restored = RunState(step=6, tokens_seen=600, best_val_loss=2.5, stale_evals=1, skipped_steps=1)
    state = recovery.rolled_back(diverged, restored)
    assert state == RunState(
        step=6, tokens_seen=600, best_val_loss=2.5, stale_evals=1, lr_scale=0.25, skipped_steps=4, rollbacks=1
    )
    assert recovery.in_a_row == 0 and not recovery.can_roll_back(state) and recovery.can_roll_back(restored)


def test_recovery_returns_only_to_a_save_whose_next_step_was_finite():
    recovery = Recovery(RecoveryConfig(max_skips=2, lr_factor=0.5, max_rollbacks=3), saves=[Path("step_2.pt")])
    assert recovery.safe is None  # a resumed run's checkpoint is proven by its first step
    recovery.after_step(False)
    assert recovery.safe == Path("step_2.pt") and recovery.may_save()
    recovery.saved(Path("step_4.pt"))
    recovery.after_step(True)  # the step after step 4's save diverged: its weights are suspect
    assert recovery.safe == Path("step_2.pt") and recovery.unproven == Path("step_4.pt")
    assert not recovery.may_save()  # no save during the streak
    recovery.rolled_back(RunState(step=6), RunState(step=2))
    assert recovery.unproven is None and recovery.safe == Path("step_2.pt") and recovery.may_save()
    recovery.saved(Path("step_4.pt"))
    recovery.after_step(False)
    assert recovery.safe == Path("step_4.pt") and recovery.unproven is None


def test_a_resumed_run_whose_checkpoint_diverges_goes_back_to_its_earlier_saves():
    """A resumed checkpoint may hold the weights that diverge (NaN weights, say): with nothing proven,
    the run goes back to its earlier saves, newest first, each unproven until a step after it is finite."""
    saves = [Path("step_2.pt"), Path("step_4.pt"), Path("step_6.pt")]
    recovery = Recovery(RecoveryConfig(max_skips=1, lr_factor=0.5, max_rollbacks=3), saves=saves)
    assert recovery.after_step(True) and recovery.target() == Path("step_4.pt")
    recovery.rolled_back(RunState(step=7), RunState(step=4))
    assert recovery.unproven == Path("step_4.pt") and recovery.target() == Path("step_2.pt")
    recovery.after_step(False)  # step 5 was finite: step 4's save is proven, the older ones no longer matter
    assert recovery.safe == Path("step_4.pt") and recovery.target() == Path("step_4.pt") and recovery.earlier == []


def test_early_stopping_counts_evaluations_that_miss_the_best_by_min_delta():
    stopping = EarlyStopping(patience=2, min_delta=0.1)
    assert stopping.stale_evals(0, 3.0, math.inf) == 0
    assert stopping.stale_evals(0, 2.95, 3.0) == 1  # better, but by less than min_delta
    assert stopping.stale_evals(1, 2.8, 3.0) == 0
    assert [stopping.should_stop(n) for n in (0, 1, 2)] == [False, False, True]
    assert not EarlyStopping(patience=0, min_delta=0.0).should_stop(100)  # patience 0: never


def test_run_state_round_trips_through_a_checkpoint_dict():
    state = RunState(
        step=3, tokens_seen=384, best_val_loss=4.2, stale_evals=1, lr_scale=0.5, skipped_steps=2, rollbacks=1
    )
    saved = {"model": {}, **state.state_dict()}  # a checkpoint holds other keys beside them
    assert RunState.from_state_dict(saved) == state
