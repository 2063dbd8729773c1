"""An ensemble where one model would read a small corpus out early (model.members = 0), and the time a distilled
ensemble's student takes (train.distill).

Imports from fasttrain: config, planning.sizing, planning.speed.

A budget under train.max_time whose model stops at the epoch limit (repeats.epoch_cap) well before the
budget ends has time for more models of that shape, side by side, each from its own initialization: their mean
probabilities score better than one (docs/performance.md, "An ensemble where the corpus runs out"). With
train.distill the budget also holds one model of their shape taught by them, which exports (fasttrain/training/phases.py).
"""

from __future__ import annotations

from fasttrain.config import ModelConfig, TrainConfig
from fasttrain.planning.sizing import tokens_per_s
from fasttrain.planning.speed import Speed

# An ensemble's members where one model reaches the epoch limit early: on 254K tokens of held-out code (3 x 192 read
# 4 times, bits per byte) one scored 1.465, two 1.420, four 1.390, eight 1.373 (docs/performance.md); each doubling
# gains less, and costs as much.
MAX_MEMBERS = 8
# A distilled ensemble's student (train.distill) runs its teacher's forward on every batch, no backward: each member
# taught costs this share of one model's training step: a third of its FLOPs, and the soft targets' softmax over the
# vocabulary. Measured 0.51 on a CPU (3 x 192, bf16, 2-core AVX-512 BF16 EPYC: a student of three 2.52x one model's
# step; `pytest benchmarks/bench_train_step.py -k student --benchmark-only`, docs/performance.md).
TEACHER_COST = 0.5
# The share of train.max_time that, left when a round of members reaches its epoch limit, is worth more members
# (training/phases.py): less goes to the student, or ends the run with the one model it has.
MIN_LEFT = 0.1
# After a lone member, the least share of what a member read that a student of it and one more must have time to
# read for the more to train: any student of two beats the lone model where the alternative is the budget unused.
# With two members or more the student must have the time to read all of it (what the plan weighed K by).
LONE_STUDENT_SHARE = 0.5
# How much slower than the machine a timing can read it: a 10-minute budget timed on a busy machine read it ~2x slow
# and planned one model that reached the epoch limit at 146 s; two processes spinning on 2 cores while it timed read
# it 14x slow (OpenMP's threads wait on each other where every core is taken), on held-out code 2 x 128 planned to
# read it 1.2 times in 600 s reached its limit of 4.3 at 156 s. 10 keeps the main job (its limit 20x its budget
# away) an ordinary run. A single model planned to reach the limit within the
# budget at this many times the speed timed trains as a first round of members (`distilled`), so that the run can go
# on to more when it ends early.
MIS_TIMED = 10.0


def ensemble_members(
    shape: ModelConfig, t: TrainConfig, tokens_per_step: int, speed: Speed | None, most: int
) -> tuple[int, str]:
    """How many models of `shape` (model.members = 0) a budget trains side by side when it stops one at train.max_steps
    (repeats.epoch_cap) before train.max_time: the budget over one's time to the limit at `speed`, rounded (1.9: 2,
    each at 95% of it, not 1 and half the budget unused), at most MAX_MEMBERS and `most` (memory); 1 untimed. With
    train.distill the budget holds the student too: K members and then one model taught by them, which reads what a
    member reads at 1 + K x TEACHER_COST of its time (`ensemble_share`). With a note."""
    if not (t.max_time and t.max_steps and speed):
        return 1, ""
    seconds = t.max_steps * tokens_per_step / tokens_per_s(speed, shape, t.seq_len)
    budgets = t.max_time / seconds  # one model's time to the limit, this many times over
    wanted = (budgets - 1) / (1 + TEACHER_COST) if t.distill else budgets
    members = min(int(wanted + 0.5), MAX_MEMBERS, most)
    if members < 2:
        return 1, ""
    return members, (
        f"model.members = {members}: one model reaches the epoch limit in about {seconds:.0f} s of the "
        f"{t.max_time:g} s, so {members} train side by side, each from its own initialization, to the limit or as "
        "near as the budget allows"
        + ("" if t.distill else "; final/ scores the mean of their probabilities (an ensemble)")
    )


def distilled(shape: ModelConfig, t: TrainConfig, tokens_per_step: int, speed: Speed | None) -> bool:
    """Whether a new run with train.distill trains its `shape.members` as a distilled run's first round: several, or one
    that reaches train.max_steps (the epoch limit, where `speed` is given: the speed timed) with more than MIN_LEFT of
    train.max_time left at MIS_TIMED times that speed, so that the time it leaves goes to more members and their
    student (training/phases.py)."""
    if shape.members > 1:
        return True
    if not (t.max_time and t.max_steps and speed):
        return False
    seconds = t.max_steps * tokens_per_step / tokens_per_s(speed, shape, t.seq_len)
    return seconds / MIS_TIMED < (1 - MIN_LEFT) * t.max_time


def ensemble_share(members: int) -> float:
    """The share of a distilled run's train.max_time its `members` train in (the rest is the student's): each
    member's time to the limit, K of them, against the student's 1 + K x TEACHER_COST of it."""
    return members / (members + 1 + members * TEACHER_COST)


def distill_note(members: int, t: TrainConfig) -> str:
    """The plan's words on an ensemble of `members` distilled under `t` (train.distill)."""
    if members == 1:
        return (
            "train.distill: one model may reach the epoch limit well before train.max_time: it trains into "
            "ensemble/, and where it leaves more than a tenth of the budget, more members follow and one model "
            "learns from them all; else final/ holds it"
        )
    if t.max_time:
        first = t.max_time * ensemble_share(members)
        when = (
            f"the {members} members train for {first:.0f} s of train.max_time into ensemble/, then one model of "
            f"their shape for the remaining {t.max_time - first:.0f} s"
        )
    else:
        when = f"the {members} members train {t.max_steps} steps into ensemble/, then one model of their shape as many"
    return (
        f"train.distill: {when}, learning their mean probabilities (a step costs it 1 + {members} x "
        f"{TEACHER_COST:.2f} of a member's); final/ holds that one model, ensemble/final/ the members"
    )
