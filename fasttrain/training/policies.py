"""The training loop's policies: what to do after non-finite steps, when to stop early, and which weights a run ends
with.

Imports from fasttrain: checkpoints.resume, checkpoints.run_state, checkpoints.saves, config, data.mixture,
optimization.schedule.

Each is a small object the loop asks after a step or an evaluation; the loop carries out the answer and reporting tells
the user. A restored save that monitored another loss starts early stopping's count anew (monitor_anew); a resumed run
takes what its config changed (resumed_under).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

from fasttrain.checkpoints.resume import check_not_past_end
from fasttrain.checkpoints.run_state import RunState
from fasttrain.checkpoints.saves import step_of
from fasttrain.config import Config, RecoveryConfig, format_duration
from fasttrain.data.mixture import normalized
from fasttrain.optimization.schedule import carried_rest_scale, schedule_change


class Recovery:
    """[recovery]: a step whose loss or gradient norm is not finite is skipped (no update); after `max_skips` in a row
    the run rolls back with the learning rate times `lr_factor`, at most `max_rollbacks` times, then stops. It goes back
    to the newest save whose next step was finite (`safe`): the save just before a streak holds the weights that
    diverged. A save stays `unproven` until the step after it is finite, none is made during a streak, and the way back
    (`target`) is kept from pruning; a resumed run has proven nothing yet, so the run's earlier saves are the way back,
    newest first, and a save whose background write failed is `lost`. The count of skips in a row lives here, not in
    RunState: a resumed or rolled-back run starts with none."""

    def __init__(self, cfg: RecoveryConfig, saves: Sequence[Path] = ()):
        """`saves`: the run's checkpoints so far, oldest first (a resumed run's; none for a new run)."""
        self.cfg = cfg
        self.in_a_row = 0
        self.safe: Path | None = None
        self.unproven = saves[-1] if saves else None  # a resumed run's checkpoint: proven by its first step
        self.earlier = list(saves[:-1])  # where to go back to while nothing is proven

    def after_step(self, skipped: bool) -> bool:
        """Count a step, `skipped` or not; True once `max_skips` in a row were skipped: roll back or stop now."""
        if skipped:
            self.in_a_row += 1
        else:
            self.in_a_row = 0
            if self.unproven is not None:  # the safe save before it stays as the way back if this one is lost
                self.earlier = [self.safe] if self.safe is not None else []
                self.safe, self.unproven = self.unproven, None
        return self.in_a_row >= self.cfg.max_skips

    def may_save(self) -> bool:
        """No save in the middle of a streak of skipped steps."""
        return self.in_a_row == 0

    def saved(self, path: Path) -> None:
        self.unproven = path

    def lost(self, path: Path) -> None:
        """`path` is not on disk (its background write failed, or it was pruned): never a target again."""
        if self.safe == path:
            self.safe = None
        if self.unproven == path:
            self.unproven = None
        self.earlier = [p for p in self.earlier if p != path]

    def target(self) -> Path | None:
        """Where a rollback goes: the safe save, else the newest earlier save of a resumed run."""
        return self.safe if self.safe is not None else (self.earlier[-1] if self.earlier else None)

    def can_roll_back(self, run: RunState) -> bool:
        return self.target() is not None and run.rollbacks < self.cfg.max_rollbacks

    def rolled_back(self, diverged: RunState, restored: RunState) -> RunState:
        """The state to continue from: the target save's (`restored`), the rate lowered, the rollback counted,
        `diverged`'s skipped steps kept; an earlier save is unproven until a step after it is finite."""
        self.in_a_row, self.unproven = 0, None
        if self.safe is None:
            self.unproven = self.earlier.pop()
        return dataclasses.replace(
            restored,
            lr_scale=diverged.lr_scale * self.cfg.lr_factor,
            rollbacks=diverged.rollbacks + 1,
            skipped_steps=diverged.skipped_steps,
        )


class EarlyStopping:
    """train.early_stop_patience evaluations in a row not lowering the best loss by train.early_stop_min_delta end the
    run (0: never); the count, `stale_evals`, resumes with the checkpoint."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta

    def stale_evals(self, before: int, val_loss: float, best_before: float) -> int:
        """The count after an evaluation of `val_loss`, when it was `before` and the best loss `best_before`."""
        return 0 if val_loss < best_before - self.min_delta else before + 1

    def should_stop(self, stale_evals: int) -> bool:
        return self.patience > 0 and stale_evals >= self.patience


def monitor_anew(run: RunState, saved: Config, cfg: Config, rows: tuple[int, int] | None = None) -> str | None:
    """If `saved` (the config `run` was saved with) monitored another loss than `cfg`'s train.monitor, or its
    evaluations scored other validation rows (`rows`: their count under `saved`, under `cfg`; train.eval_steps), the
    best loss and early stopping's count start anew in `run` (they measured another loss); says so."""
    if saved.train.monitor != cfg.train.monitor:
        what = f"train.monitor is {cfg.train.monitor}, not {saved.train.monitor}"
    elif rows is not None and rows[0] != rows[1]:
        what = f"evaluations score {rows[1]:,} validation rows, not the save's {rows[0]:,} (train.eval_steps)"
    else:
        return None
    run.best_val_loss, run.best_step, run.stale_evals = math.inf, None, 0
    return f"{what}: the best validation loss and early stopping's count start anew"


def weights_anew(run: RunState, saved: Config, cfg: Config) -> str | None:
    """If `cfg` gives the [[data.sources]] other shares than `saved` (the config `run` was saved with), the sources are
    read in the new shares from the saved position on, and a weighted validation loss (train.monitor = "val_loss")
    is another loss: its best and early stopping's count start anew in `run`. Says so; None where nothing changed."""
    old, new = [s.weight for s in saved.data.sources], [s.weight for s in cfg.data.sources]
    if not old or len(old) != len(new) or normalized(old) == normalized(new):  # another set of sources is refused
        return None
    weighted = cfg.train.monitor == "val_loss"
    if weighted:
        run.best_val_loss, run.best_step, run.stale_evals = math.inf, None, 0
    now, then = (", ".join(f"{w:g}" for w in weights) for weights in (new, old))
    said = f"data.sources' weights are {now} (saved with {then}): read in the new shares from here"
    return said + (
        ", and the weighted validation loss with them, so its best and early stopping's count start anew"
        if weighted
        else ""
    )


def resumed_under(
    path: Path, run: RunState, saved: Config, cfg: Config, rows: tuple[int, int] | None, recorded: Sequence[float] = ()
) -> list[str]:
    """The `run` saved at `path` under `saved`, continued under `cfg`: UsageError if past the run's end; else its
    schedule re-laid or carried on (carried_rest_scale), its monitor restarted if changed, or if the validation rows
    its evaluations score changed (`rows`: under `saved`, under `cfg`; None: the same), as it is where the sources'
    weights changed.
    Lines saying what changed."""
    check_not_past_end(path, run, saved, cfg)
    lines = (
        ended(run, cfg),
        schedule_change(saved, cfg, run, recorded),
        monitor_anew(run, saved, cfg, rows),
        weights_anew(run, saved, cfg),
        settings_changed(saved, cfg),
    )
    carried = carried_rest_scale(saved, cfg, run)  # after the line that says what it does
    if carried is not None:
        run.rest_scale = carried
    return [line for line in lines if line]


def settings_changed(saved: Config, cfg: Config) -> str | None:
    """The line for settings that change how a resumed run trains from the save on and that nothing else reports
    (the clip, the precision, the tokens an update), where `cfg` changed them from `saved`; None where none changed."""
    pairs: list[tuple[str, object, object]] = [
        ("optim.max_grad_norm", saved.optim.max_grad_norm, cfg.optim.max_grad_norm),
        ("train.tokens_per_update", saved.train.tokens_per_update, cfg.train.tokens_per_update),
    ]
    if "auto" not in (saved.train.precision, cfg.train.precision):  # "auto" may well be the other's choice
        pairs.append(("train.precision", saved.train.precision, cfg.train.precision))
    changed = [f"{key} is {now!r} (saved with {then!r})" for key, then, now in pairs if then != now]
    return f"{'; '.join(changed)}: the run trains so from here" if changed else None


def ended(run: RunState, cfg: Config) -> str:
    """The line of a resumed `run` already at `cfg`'s end, which trains nothing (its end is no past:
    resume.check_not_past_end); "" for one with steps to train."""
    t = cfg.train
    if t.max_steps and run.step >= t.max_steps:
        key, reached = "train.max_steps", f"train.max_steps = {t.max_steps}"
    elif t.max_time and run.train_seconds >= t.max_time:
        spent, budget = format_duration(run.train_seconds), format_duration(t.max_time)
        key, reached = "train.max_time", f"{spent} trained, train.max_time = {budget}"
    elif EarlyStopping(t.early_stop_patience, t.early_stop_min_delta).should_stop(run.stale_evals):
        stale = f"{run.stale_evals} evaluations without a better {t.monitor}"
        key, reached = (
            "train.early_stop_patience",
            f"it stopped early: {stale}, train.early_stop_patience = {t.early_stop_patience}",
        )
    else:
        return ""
    return (
        f"the run is at its end (step {run.step}, {reached}): nothing to train, it only evaluates and reports "
        f"again; a larger {key} trains on"
    )


def better_save(cfg: Config, run: RunState, last_eval: dict[str, float], best: Path | None) -> Path | None:
    """The save whose weights final/ gets instead of the last step's: `best` where checkpoint.final_weights = "best" and
    its loss is below the last evaluation's; else None."""
    if cfg.checkpoint.final_weights != "best" or not last_eval or best is None or step_of(best) == run.step:
        return None
    return best if run.best_val_loss < last_eval[cfg.train.monitor] else None
