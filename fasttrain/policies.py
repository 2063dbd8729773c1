"""The training loop's policies: what to do after non-finite steps, and when to stop early.

Each is a small object the loop asks after a step or an evaluation; the loop carries
out the answer (rolls back, stops) and reporting tells the user.
"""

from __future__ import annotations

import dataclasses

from fasttrain.config import RecoveryConfig
from fasttrain.run_state import RunState


class Recovery:
    """[recovery]: a step whose loss or gradient norm is not finite is skipped (no update); after
    `max_skips` in a row the run rolls back to its latest checkpoint with the learning rate times
    `lr_factor`, at most `max_rollbacks` times, then stops.

    The count of skips in a row lives here, not in RunState: a resumed or rolled-back run starts
    with none.
    """

    def __init__(self, cfg: RecoveryConfig):
        self.cfg = cfg
        self.in_a_row = 0

    def after_step(self, skipped: bool) -> bool:
        """Count a step, `skipped` or not; True once `max_skips` in a row were skipped: roll back or stop now."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        return self.in_a_row >= self.cfg.max_skips

    def can_roll_back(self, run: RunState) -> bool:
        return run.rollbacks < self.cfg.max_rollbacks

    def rolled_back(self, diverged: RunState, restored: RunState) -> RunState:
        """The state to continue from: the checkpoint's (`restored`), with the learning rate lowered,
        the rollback counted, and the skipped steps of the `diverged` run kept."""
        self.in_a_row = 0
        return dataclasses.replace(restored, lr_scale=diverged.lr_scale * self.cfg.lr_factor,
                                   rollbacks=diverged.rollbacks + 1, skipped_steps=diverged.skipped_steps)


class EarlyStopping:
    """train.early_stop_patience evaluations in a row without lowering the best validation loss by
    at least train.early_stop_min_delta end the run (patience 0: never). The count is RunState's
    `stale_evals`, so it resumes with the checkpoint."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta

    def stale_evals(self, before: int, val_loss: float, best_before: float) -> int:
        """The count after an evaluation of `val_loss`, when it was `before` and the best loss `best_before`."""
        return 0 if val_loss < best_before - self.min_delta else before + 1

    def should_stop(self, stale_evals: int) -> bool:
        return self.patience > 0 and stale_evals >= self.patience
