"""The learning rate as a pure function of the optimizer step, or of a time-budgeted run's progress.

Imports from fasttrain: checkpoints.run_state, config, system.errors.

Linear warmup from 0 over `warmup_steps`, then one of:
- cosine: min + 0.5 (max - min)(1 + cos(pi t / T)), t steps into the decay (max at t = 0, min at the last step, t = T)
- linear: straight from max down to min, reached at the last step
- constant: max until the end (min_lr unused)
- wsd: warmup-stable-decay: max, then a linear cooldown to min over the last `cooldown_fraction` of the run
- step: max x step_factor^k after k x step_every decay steps, never below min (a floor)

A pure function of the step makes resuming trivial: nothing to save but the step. Under a time budget (train.max_time)
it runs on the run's progress instead, the larger of steps / max_steps and seconds / max_time (Budget), so the decay
finishes within the budget on any machine (lr_on_progress); a resume then needs the seconds too (RunState), a replay
each update's progress from metrics.jsonl (recorded_progress), and a run resumed with another budget goes on from the
progress it reached (carried_rest_scale).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Sequence

from fasttrain.checkpoints.run_state import RunState
from fasttrain.config import Config, ScheduleConfig, TrainConfig, format_duration
from fasttrain.system.errors import UsageError

# Under a budget, warmup ends at this progress at the latest (fit_warmup's tenth: the run's steps are not known ahead)
WARMUP_SHARE = 0.1


def lr_at(step: int, max_steps: int, lr: float, sched: ScheduleConfig) -> float:
    """Learning rate of step `step` (0-based) of `max_steps`: warmup gives step s lr x (s + 1) / warmup_steps, then the
    decay above with t = step - start, T = max_steps - 1 - start, so the last step is at min_lr."""
    warmup = sched.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if sched.decay in ("constant", "step"):
        return _by_step(step, lr, sched)
    start = warmup
    if sched.decay == "wsd":
        start = max_steps - max(1, round(sched.cooldown_fraction * (max_steps - warmup)))
    if step < start:
        return lr
    span = max_steps - 1 - start  # T; 0 when the decay is the last step alone, which gets min_lr
    return _decayed(1.0 if span <= 0 else min(1.0, (step - start) / span), lr, sched)


def _by_step(step: int, lr: float, sched: ScheduleConfig) -> float:
    """constant's and step's rate after warmup: functions of the step alone, in a budgeted run too."""
    if sched.decay == "constant":
        return lr
    return max(sched.min_lr, lr * sched.step_factor ** (max(0, step - sched.warmup_steps) // sched.step_every))


def _decayed(fraction: float, lr: float, sched: ScheduleConfig) -> float:
    """cosine's, linear's or wsd's cooldown rate `fraction` (0 to 1) of the way through the decay."""
    if sched.decay == "cosine":
        return sched.min_lr + 0.5 * (lr - sched.min_lr) * (1 + math.cos(math.pi * fraction))
    return sched.min_lr + (lr - sched.min_lr) * (1 - fraction)  # linear, and wsd's cooldown: min_lr exactly at 1


def lr_on_progress(
    step: int, progress: float, decay_from: float | None, lr: float, sched: ScheduleConfig
) -> tuple[float, float | None]:
    """Learning rate of update `step` (0-based) of a budgeted run at `progress` (projected for the update's end; 1 is
    the budget's end), and the run's `decay_from` after it. Warmup ramps as in lr_at and ends by WARMUP_SHARE of the
    budget at the latest (lr x max((step + 1) / warmup_steps, progress / WARMUP_SHARE)); the first update after it
    records its progress as `decay_from`. cosine and linear then decay over the progress from decay_from to 1, wsd over
    the last cooldown_fraction of that span, min_lr from 1 on; constant and step count steps."""
    warmup = sched.warmup_steps
    if decay_from is None and step < warmup and progress <= WARMUP_SHARE:
        return lr * max((step + 1) / warmup, progress / WARMUP_SHARE), None
    start = decay_from = progress if decay_from is None else decay_from
    if sched.decay in ("constant", "step"):
        return _by_step(step, lr, sched), decay_from
    if sched.decay == "wsd":
        start = 1 - sched.cooldown_fraction * (1 - decay_from)
    fraction = 1.0 if progress >= 1 or start >= 1 else max(0.0, (progress - start) / (1 - start))
    return _decayed(fraction, lr, sched), decay_from


@dataclass(frozen=True)
class Budget:
    """When a run ends: after `max_steps` updates or `max_time` seconds of training, whichever comes first
    (0: no such limit; at least one is set)."""

    max_steps: int
    max_time: float

    @classmethod
    def of(cls, t: TrainConfig) -> Budget:
        return cls(t.max_steps, t.max_time)

    def progress(self, steps: int, seconds: float) -> float:
        """How far a run is after `steps` updates and `seconds` of training: 0 to 1, and 1 or more at its end."""
        return max(steps / self.max_steps if self.max_steps else 0.0, seconds / self.max_time if self.max_time else 0.0)

    def next_progress(self, steps: int, seconds: float) -> float:
        """The progress projected for the end of the next update: one step more, and as many seconds more as
        an update has taken on average (the first update: none)."""
        return self.progress(steps + 1, seconds + (seconds / steps if steps else 0.0))

    def reached(self, steps: int, seconds: float) -> bool:
        return self.progress(steps, seconds) >= 1

    def standing(self, steps: int, seconds: float) -> Standing:
        """Where a run is, for its logs: its progress, the step it will end at (at the speed so far) and its seconds of
        training left under a time budget (None without one)."""
        progress = self.progress(steps, seconds)
        final = self.max_steps if not progress else round(steps / progress)
        if self.max_steps:
            final = min(final, self.max_steps)
        left = None
        if self.max_time:
            left = max(0.0, self.max_time - seconds)
            if self.max_steps and steps:
                left = min(left, (self.max_steps - steps) * seconds / steps)
        return Standing(progress, max(final, steps), left)

    def horizon(self, steps: int, seconds: float) -> tuple[int | None, str]:
        """The step a run's plans are laid out to, and the words saying so: max_steps without a clock; under one, the
        end projected at the speed so far, else max_steps (None without it)."""
        if not self.max_time:
            return self.max_steps, "by this run"
        if steps and seconds:
            final = self.standing(steps, seconds).final_step
            if final == self.max_steps:  # the speed so far reaches max_steps before the clock runs out
                return final, f"in {final} steps, before train.max_time would end the run"
            return final, f"by step ~{final}, where train.max_time is projected to end the run"
        if self.max_steps:
            return self.max_steps, f"in {self.max_steps} steps, if train.max_time lets the run get that far"
        return None, "in as many steps as train.max_time allows"

    def describe(self) -> str:
        """The budget in words: "200 steps", "3m of training" or "3m of training, at most 200 steps"."""
        time = f"{format_duration(self.max_time)} of training" if self.max_time else ""
        steps = f"{self.max_steps} steps" if self.max_steps else ""
        return f"{time}, at most {steps}" if time and steps else time or steps


class Standing(NamedTuple):
    progress: float  # 0 to 1
    final_step: int  # the step the run is projected to end at
    seconds_left: float | None  # of training under a time budget (max_steps may end it sooner); None without one


def budget_note(s: ScheduleConfig, max_time: float) -> str | None:
    """One line on a time budget (train.max_time `max_time`) with a decay that does not run on progress (constant,
    step); else None."""
    decay = s.decay
    if not max_time or decay not in ("constant", "step"):
        return None
    if decay == "constant":
        return 'schedule.decay = "constant" has no decay to finish: train.max_time only ends the run'
    return (
        'schedule.decay = "step" counts steps, not time: under train.max_time how far it decays depends on '
        "the machine's speed"
    )


class Update(NamedTuple):
    """The learning rate of a run's next update (without the run's lr_scale), the progress it is at (None in
    a step run, whose schedule counts steps) and the run's decay_from after it (see lr_on_progress)."""

    lr: float
    progress: float | None
    decay_from: float | None


def next_update(cfg: Config, run: RunState, recorded: Sequence[float] = ()) -> Update:
    """The next update of `run` under `cfg`: by lr_at in a step run, by lr_on_progress in a budgeted run at Budget's
    projected progress, or a replay's `recorded` progress."""
    t, step = cfg.train, run.step
    if not t.max_time and not recorded:
        return Update(lr_at(step, t.max_steps, cfg.optim.lr, cfg.schedule), None, None)
    if recorded:  # past the updates it records (a finished replay, resumed), the run is at its end
        progress = recorded[step] if step < len(recorded) else 1.0
    else:
        progress = scheduled(Budget.of(t).next_progress(step, run.train_seconds), run.rest_scale)
    rate, decay_from = lr_on_progress(step, progress, run.decay_from, cfg.optim.lr, cfg.schedule)
    return Update(rate, progress, decay_from)


def scheduled(progress: float, rest_scale: float) -> float:
    """The progress a budgeted run's schedule is at where its budget's is `progress` (RunState.rest_scale): exactly the
    budget's own for a run that kept its budget, so its resume is bit for bit the run never stopped."""
    return progress if rest_scale == 1 else 1 - rest_scale * (1 - progress)


def carried_rest_scale(saved: Config, now: Config, run: RunState) -> float | None:
    """The RunState.rest_scale carrying `run`'s schedule (saved under `saved`) on under `now`'s other budget, from the
    progress it reached, so its rate goes on where it was; None where the rate is unchanged anyway."""
    t0, t1 = saved.train, now.train
    if not (t0.max_time and t1.max_time) or Budget.of(t0) == Budget.of(t1):
        return None
    if next_update(now, run).lr == next_update(saved, run).lr:
        return None
    reached = scheduled(Budget.of(t0).progress(run.step, run.train_seconds), run.rest_scale)
    left = 1 - Budget.of(t1).progress(run.step, run.train_seconds)
    return max(0.0, 1 - reached) / left if left > 0 else 0.0


PROGRESS_EVENT = "progress"  # metrics.jsonl: {"step": s, "progress": p, "seconds": t} after each budgeted update


def recorded_progress(spec: str, steps: int) -> list[float]:
    """The progress of the first `steps` updates of the budgeted run of metrics.jsonl (or run directory) `spec`, the
    last recorded for each; UsageError if unreadable or short of `steps`."""
    path = Path(spec) / "metrics.jsonl" if Path(spec).is_dir() else Path(spec)
    where = f"schedule.progress_from = {spec}"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    progress: dict[int, float] = {}
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
            if event.get("event") != PROGRESS_EVENT:
                continue
            step, value = int(event["step"]), float(event["progress"])
        except (ValueError, TypeError, KeyError, AttributeError):
            raise UsageError(f"{where}: {path} line {number} is not a metrics.jsonl event") from None
        if not (math.isfinite(value) and value >= 0):  # NaN would hold the rate at its peak for good
            raise UsageError(f"{where}: {path} line {number}: progress {value} is not a finite number >= 0")
        progress[step] = value
    if not progress:
        raise UsageError(
            f"{where}: {path} records no progress: it is not the metrics.jsonl of a run with "
            "train.max_time (a step run is replayed by its config alone)"
        )
    missing = next((s for s in range(1, steps + 1) if s not in progress), None)
    if missing is not None:
        reached = max(progress)
        raise UsageError(
            f"{where}: {path} records the progress of {reached} steps"
            + (f" but not of step {missing}" if missing <= reached else "")
            + f"; train.max_steps = {steps} needs every one up to {steps}"
        )
    return [progress[s] for s in range(1, steps + 1)]


def fit_warmup(sched: ScheduleConfig, max_steps: int) -> tuple[ScheduleConfig, str | None]:
    """`sched` for a run of `max_steps` steps: a warmup longer than the run (a smoke run) becomes its first tenth (at
    least 2 steps), with a note; otherwise `sched` and None."""
    if not max_steps or sched.warmup_steps <= max_steps:  # 0: a time budget, whose warmup ends by WARMUP_SHARE
        return sched, None
    warmup = min(max_steps, max(2, max_steps // 10))
    return replace(sched, warmup_steps=warmup), (
        f"schedule.warmup_steps = {sched.warmup_steps} is longer than train.max_steps = {max_steps}: "
        f"warming up over {warmup} step{'s' * (warmup != 1)} instead"
    )


def schedule_change(saved: Config, now: Config, run: RunState, recorded: Sequence[float] = ()) -> str | None:
    """What resuming `run` (as saved) does to the learning rate when the run's length, schedule or peak rate changed
    since `saved`, in one line; None when none did. A longer run re-lays the decay over the new length, and a run past
    its warmup warms up again when the config's is longer: said, with how to keep the old. A budgeted run given another
    budget goes on at the rate it had (carried_rest_scale), and trains on at min_lr where its schedule had finished.
    `recorded`: the progress `now` replays."""

    def plan(c: Config) -> tuple:
        return c.train.max_steps, c.train.max_time, c.optim.lr, c.schedule

    if plan(saved) == plan(now):
        return None
    step, t0, t1 = run.step, saved.train, now.train
    ended = replace(run, step=min(step, t0.max_steps - 1)) if not t0.max_time else run  # a step run's last rate
    carried = carried_rest_scale(saved, now, run)
    old = run.lr_scale * next_update(saved, ended).lr
    new = run.lr_scale * next_update(now, run if carried is None else replace(run, rest_scale=carried), recorded).lr
    times = (format_duration(t0.max_time), format_duration(t1.max_time))
    changes = [f"train.max_steps {t0.max_steps} -> {t1.max_steps}"] * (t0.max_steps != t1.max_steps)
    changes += [f"train.max_time {times[0]} -> {times[1]}"] * (t0.max_time != t1.max_time)
    said = ", ".join(changes) + ": " if changes else ""
    if carried is not None and Budget.of(t0).reached(step, run.train_seconds):
        return (
            f"{said}the saved run had finished its {now.schedule.decay} schedule, so it trains on at its last "
            f"learning rate, {new:.3g}, to the end of {Budget.of(t1).describe()}; to decay anew, see "
            "docs/training.md (extending a run)"
        )
    was, warmup = saved.schedule.warmup_steps, now.schedule.warmup_steps
    again = ""
    if was <= step < warmup:
        again = (
            f", back in a warmup until step {warmup} (schedule.warmup_steps = {warmup}; the saved run warmed up over "
            f"{was} step{'s' * (was != 1)}: --set schedule.warmup_steps={was} keeps that)"
        )
    if carried is not None:
        return (
            f"{said}the {now.schedule.decay} schedule goes on from where it stood, the rest of it spread over what "
            f"is left of {Budget.of(t1).describe()}, so the learning rate at step {step} is {new:.3g} (the saved "
            f"run's next was {old:.3g}){again}"
        )
    return (
        f"{said}the {now.schedule.decay} schedule now runs over {Budget.of(t1).describe()}, so the learning "
        f"rate at step {step} is {new:.3g} (the saved run's was {old:.3g}){again}; to go on at the rate it had "
        "instead, see docs/training.md (extending a run)"
    )
