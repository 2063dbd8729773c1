"""RunState: the counters of a run, which a checkpoint saves and loads as a whole.

Imports from fasttrain: nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class RunState:
    """Where a run stands; the rest is in the model, optimizer, loader and random states. The learning rate is a
    function of `step` (times `lr_scale`), or of the progress (`train_seconds`, `decay_from`, `rest_scale`)."""

    step: int = 0  # optimizer updates done, skipped ones included
    tokens_seen: int = 0  # real (counted) target tokens trained on, over all ranks; pads do not count
    best_val_loss: float = math.inf
    best_step: int | None = None  # the step whose evaluation set best_val_loss (None: none yet, or started anew)
    stale_evals: int = 0  # evaluations in a row without lowering the best by train.early_stop_min_delta
    lr_scale: float = 1.0  # multiplies the schedule; each rollback after divergence lowers it
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm, in all
    rollbacks: int = 0  # reloads of the latest checkpoint after repeated non-finite steps
    # Seconds of training the run has counted, over all its resumes: the updates, their data waits included,
    # but not a compiled run's first step (mostly compiling), evaluating, checkpointing or sampling.
    train_seconds: float = 0.0
    decay_from: float | None = None  # a budgeted run's progress when its decay began; None: still warming up
    # A budgeted run resumed with another budget: its schedule's progress is 1 - rest_scale x (1 - the budget's),
    # the schedule going on from where it stood over what is left of the new budget (schedule.carried_rest_scale).
    rest_scale: float = 1.0
    eval_due: bool = False  # this step's evaluation was cut short by a signal: a resumed run does it first

    def state_dict(self) -> dict[str, int | float | None]:
        """The fields by name: top-level keys of a checkpoint (so tools read `state["step"]` directly)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> RunState:
        """The RunState in `state` (a checkpoint, which holds other keys too); KeyError if `step` is
        missing. Another missing field (a checkpoint saved before it existed) takes its default."""
        return cls(
            step=state["step"], **{f.name: state.get(f.name, f.default) for f in fields(cls) if f.name != "step"}
        )
