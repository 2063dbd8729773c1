"""The learning rate as a pure function of the optimizer step.

Linear warmup from 0 over `warmup_steps`, then one of:
- cosine:   min + 0.5 (max - min)(1 + cos(pi t / T)), t steps into the decay, whose first
            step (t = 0) has max and the run's last step (t = T) min
- linear:   straight from max down to min, reached at the last step as with cosine
- constant: max until the end (min_lr unused)
- wsd:      warmup-stable-decay: max, then a linear cooldown to min over the last
            `cooldown_fraction` of the run, min at the last step (lets one run be extended
            or stopped early)
- step:     max x step_factor^k after k x step_every decay steps, never below min (a floor,
            which the last step reaches only if the steps get there)

A pure function of the step makes resuming trivial: nothing to save but the step.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fasttrain.config import Config, ScheduleConfig


def lr_at(step: int, max_steps: int, lr: float, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps.

    Warmup gives step s the rate lr x (s + 1) / warmup_steps, so the first update
    is small but not zero and step warmup_steps - 1 reaches lr. The decay then
    follows the formulas above with t = step - start and T = max_steps - 1 - start,
    where start is warmup_steps (wsd: the first cooldown step): the last update
    (step max_steps - 1) uses min_lr exactly, as schedule.min_lr promises.
    """
    warmup = sched.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if sched.decay == "constant":
        return lr
    if sched.decay == "step":
        return max(sched.min_lr, lr * sched.step_factor ** ((step - warmup) // sched.step_every))
    start = warmup
    if sched.decay == "wsd":
        start = max_steps - max(1, round(sched.cooldown_fraction * (max_steps - warmup)))
    if step < start:
        return lr
    span = max_steps - 1 - start  # T; 0 when the decay is the last step alone, which gets min_lr
    progress = 1.0 if span <= 0 else min(1.0, (step - start) / span)
    if sched.decay == "cosine":
        return sched.min_lr + 0.5 * (lr - sched.min_lr) * (1 + math.cos(math.pi * progress))
    return sched.min_lr + (lr - sched.min_lr) * (1 - progress)  # linear, and wsd's cooldown: min_lr exactly at 1


def fit_warmup(sched: ScheduleConfig, max_steps: int) -> tuple[ScheduleConfig, str | None]:
    """`sched` for a run of `max_steps` steps. A warmup longer than the whole run (a smoke run of a real
    config) becomes the run's first tenth, with a note saying so; otherwise `sched` as it is and None.
    Warmup was asked for, so it stays one: at least 2 steps (one below the peak, as lr_at counts them:
    a 1-step warmup starts at the peak), as far as the run is long."""
    if sched.warmup_steps <= max_steps:
        return sched, None
    warmup = min(max_steps, max(2, max_steps // 10))
    return replace(sched, warmup_steps=warmup), (
        f"schedule.warmup_steps = {sched.warmup_steps} is longer than train.max_steps = {max_steps}: "
        f"warming up over {warmup} step{'s' * (warmup != 1)} instead")


def schedule_change(saved: Config, now: Config, step: int, lr_scale: float = 1.0) -> str | None:
    """What resuming at `step` does to the learning rate when the run's length, schedule or peak rate
    changed since the checkpoint (`saved`'s config), in one line; None when none did. The schedule is
    a function of the step and the run's length, so a longer run re-lays the decay over the new length,
    and a run past its warmup warms up again when the config's is longer (a smoke run, whose warmup
    fit_warmup shortened, extended with the config that asked for more): said, with how to keep the old."""
    before = (saved.train.max_steps, saved.optim.lr, saved.schedule)
    if before == (now.train.max_steps, now.optim.lr, now.schedule):
        return None
    old = lr_scale * lr_at(min(step, saved.train.max_steps - 1), saved.train.max_steps, saved.optim.lr, saved.schedule)
    new = lr_scale * lr_at(step, now.train.max_steps, now.optim.lr, now.schedule)
    length = (f"train.max_steps {saved.train.max_steps} -> {now.train.max_steps}: "
              if saved.train.max_steps != now.train.max_steps else "")
    was, warmup = saved.schedule.warmup_steps, now.schedule.warmup_steps
    again = "" if not was <= step < warmup else (
        f", back in a warmup until step {warmup} (schedule.warmup_steps = {warmup}; the saved run warmed up over "
        f"{was} step{'s' * (was != 1)}: --set schedule.warmup_steps={was} keeps that)")
    return (f"{length}the {now.schedule.decay} schedule now runs over {now.train.max_steps} steps, so the learning "
            f"rate at step {step} is {new:.3g} (the saved run's was {old:.3g}){again}; to go on at the rate it had "
            "instead, see docs/training.md (extending a run)")
