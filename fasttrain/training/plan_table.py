"""A run's plan as `fasttrain train CONFIG --dry-run` prints it: the lines a run prints as it starts
(reporting.start_lines), then the schedule, the kernels and why, the parallel layout, memory and cadence.

Imports from fasttrain: config, optimization.optimizers, optimization.schedule, planning.plan, planning.preflight,
training.reporting.
"""

from __future__ import annotations

from fasttrain.config import Config, format_duration
from fasttrain.optimization.optimizers import untied_head_rate
from fasttrain.optimization.schedule import WARMUP_SHARE
from fasttrain.planning.plan import RunPlan
from fasttrain.planning.preflight import GIB
from fasttrain.training.reporting import start_lines


def own_rates(c: Config) -> str:
    """The peak rates of the lookup tables and an untied head where they have their own (optimizers.own_rate_groups),
    as the schedule line's words: the head's at the model's width (`untied_head_rate`)."""
    head = untied_head_rate(c.optim, c.model)
    rates = [f"the tables {c.optim.embedding_lr:g}"] if c.optim.embedding_lr else []
    rates += [f"the head {head:.3g}"] if head else []
    return f", {', '.join(rates)}" if rates else ""


def final_line(c: Config) -> str:
    """What final/ will hold (checkpoint.final_weights, checkpoint.fit_temperature): decided after the last step, so
    the plan says how, not what."""
    k = c.checkpoint
    weights = "the weights of the lowest validation loss" if k.final_weights == "best" else "the last step's weights"
    scaled = (
        ", its output layer x the factor that scores the validation rows best (checkpoint.fit_temperature; the "
        "checkpoints keep the weights as trained)"
        if k.fit_temperature
        else ""
    )
    return f"final/: {weights}{scaled}"


def plan_table(plan: RunPlan) -> str:
    """The plan of a new run, a line per decision, each "what: value"."""
    c, t = plan.cfg, plan.cfg.train
    reading = plan.reading()
    s = c.schedule
    budget = ", ".join(
        ([f"{t.max_steps} steps"] if t.max_steps else [])
        + ([f"{format_duration(t.max_time)} of training"] if t.max_time else [])
    )
    warmup = f"warmup {s.warmup_steps} steps" if s.warmup_steps else "no warmup"
    if s.warmup_steps and (t.max_time or s.progress_from):  # lr_on_progress (a budget, a replay): by WARMUP_SHARE
        warmup += f" or the first {WARMUP_SHARE:.0%} of the run, whichever ends first"
    end = f"; the data is laid out to step {reading.end} ({reading.words})" if reading.end is not None else ""
    need = sum(b for _, b in plan.memory)
    parts = ", ".join(f"{name} {b / GIB:.2f}" for name, b in plan.memory)
    lines = [
        *start_lines(plan, reading),
        f"schedule: {s.decay}, lr {c.optim.lr:g} (min {s.min_lr:g}){own_rates(c)}, {warmup}; ends after {budget}{end}",
        f"flops: {plan.flops_per_token / 1e6:,.1f} MFLOP per token, {plan.flops_per_token * plan.tokens_per_step / 1e12:,.3f}"
        " TFLOP per step",
        *(f"kernel: {why}" for why in plan.kernel_reasons),
        f"parallel: {plan.parallel}, world {plan.world.size}, parameters split over {plan.shard_group} rank(s); "
        f"checkpoints as {plan.checkpoint_format}",
        f"memory: about {need / GIB:.2f} GiB per rank ({parts} GiB) of {plan.available / GIB:.2f} GiB available "
        f"on {plan.device}",
        f"cadence: log every {t.log_interval} steps, evaluate every {t.eval_interval} ({t.eval_steps} batches), "
        f"save every {c.checkpoint.interval} (keep {c.checkpoint.keep_last}{', and the best' * c.checkpoint.keep_best})",
        final_line(c),
        *(f"note: {note}" for note in plan.notes),
    ]
    return "\n".join(lines)
