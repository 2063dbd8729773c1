"""`fasttrain train CONFIG --dry-run --measure N`: N real steps of a planned run, saved nowhere, timed.

Imports from fasttrain: compute.device, config, planning.plan, training.metrics, training.trainer.
"""

from __future__ import annotations

import time

from fasttrain.compute.device import compile_failures, synchronize
from fasttrain.config import format_duration
from fasttrain.planning.plan import RunPlan
from fasttrain.training.metrics import peak_flops
from fasttrain.training.trainer import Trainer


def measure(plan: RunPlan, steps: int) -> dict:
    """Seconds per step, tokens per second, MFU (None off the GPU table) and projected time of the run `plan`, from
    `steps` real steps after one untimed; nothing is saved or touched in train.out_dir."""
    trainer = Trainer(plan.cfg, quiet=True, plan=plan)
    try:
        with compile_failures():
            uncompiled = trainer.step().uncompiled  # a compile that failed: the steps timed are the plain ones
            synchronize(plan.device)
            began = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            synchronize(plan.device)
        seconds = (time.perf_counter() - began) / steps
    finally:
        trainer.close()
    t = plan.cfg.train
    tokens_per_s = plan.tokens_per_step / seconds
    peak = peak_flops(plan.device, plan.world.size)  # every rank's: tokens_per_s counts every rank's tokens
    projected = min(t.max_steps * seconds if t.max_steps else t.max_time, t.max_time or t.max_steps * seconds)
    return {
        "measured_steps": steps,
        "s_per_step": round(seconds, 6),  # microseconds: a tiny model's step is a few ms
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(plan.flops_per_token * tokens_per_s / peak, 4) if peak else None,
        "projected_seconds": round(projected, 1),
        "uncompiled": uncompiled,
    }


def measure_line(found: dict) -> str:
    mfu = f", MFU {100 * found['mfu']:.1f}%" if found["mfu"] is not None else ""
    plain = f" uncompiled ({found['uncompiled']})" if found["uncompiled"] else ""
    return (
        f"measured{plain}: {found['s_per_step']:.3f} s/step over {found['measured_steps']} steps, "
        f"{found['tokens_per_s']:,.0f} tokens/s{mfu}; the run would train for about "
        f"{format_duration(found['projected_seconds'])}"
    )
