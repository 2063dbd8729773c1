"""How a run starts: its plan made with the data prepared and the process group joined (start_run), every check that can
refuse the run (check_start; check_directory, which needs no plan, before planning), then train.out_dir opened for the
run (opened): locked, claimed by a new run, the resolved config written and the metrics log opened. A start that fails
before its first step is taken back whole (run_directory.RunStart).

Imports from fasttrain: checkpoints.checkpoint, checkpoints.run_directory, compute.device, compute.distributed, config,
planning.plan, planning.speed, preparation.cache, system.errors, system.run_lock, training.metrics.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from fasttrain.checkpoints import run_directory
from fasttrain.checkpoints.checkpoint import Checkpointer
from fasttrain.compute import distributed
from fasttrain.compute.device import use_device
from fasttrain.config import Config, save_config
from fasttrain.planning.plan import RunPlan, plan_run
from fasttrain.planning.speed import Speed
from fasttrain.preparation.cache import ensure_prepared, finish_interrupted_sources
from fasttrain.system import run_lock
from fasttrain.system.errors import UsageError
from fasttrain.training.metrics import MetricsLog, WandbSink, check_log_writable, import_wandb


def start_run(
    cfg: Config, quiet: bool = False, resume: str | None = None, phase: dict | None = None, speed: Speed | None = None
) -> RunPlan:
    """The plan of a run of `cfg` in this process's world (plan.plan_run), its data prepared first if need be (rank 0,
    the others waiting). `resume`: the save's --resume spec; `phase`: what the run is of a distilled run, as its start
    event records it (RunPlan.phase); `speed`: the machine's, as an earlier plan timed it (a distilled run's first
    round: the whole run's, so the round plans its reads for the seconds it has, not to its epoch limit). Prints the
    notes (rank 0)."""
    world = distributed.world_from_env()
    device = use_device(cfg.train.device, world.local_rank if world.distributed else None)
    if world.is_main:  # a mixture's folders, as ensure_prepared does data.dir: a killed prepare's move finished
        finish_interrupted_sources(cfg.data, quiet)
    # A config the run refuses is refused before anything is prepared
    plan = plan_run(cfg, world, device, resume, speed)
    distributed.start(world, device)
    if plan.prepare and resume is not None and cfg.data.dir and not Path(cfg.data.dir).exists():
        # not prepared anew from data.inputs (the default corpus, say): the run trained on what the folder held
        raise UsageError(
            f"data.dir = {cfg.data.dir}: not there; the run resumes on the data it trained on: set data.dir to where "
            "that folder is now"
        )
    if plan.prepare:
        if not world.is_main:
            distributed.barrier(world)
        ensure_prepared(cfg.data, quiet=quiet or not world.is_main)
        if world.is_main:
            distributed.barrier(world)
        plan = plan_run(cfg, world, device, resume, plan.speed)  # the machine timed once
    for note in plan.notes if world.is_main and not quiet else ():
        print(f"note: {note}")
    return replace(plan, phase=phase) if phase else plan


def check_start(plan: RunPlan, resumed: bool, overwrite: bool) -> None:
    """Every check that can refuse train() of `plan`, before train.out_dir changes: check_directory's, W&B missing, a
    new run's init_from weights gone, a `resumed` one's data prepared anew."""
    out, is_main = Path(plan.cfg.train.out_dir), plan.world.is_main
    check_directory(out, resumed, overwrite, is_main)
    if plan.cfg.log.wandb and is_main:
        import_wandb()
    if not resumed:
        plan.check_new_start()
    else:
        run_directory.check_kept_tokenizer(plan.sources[0].data.dir, out)


def check_directory(out: Path, resumed: bool, overwrite: bool, is_main: bool) -> None:
    """The checks of check_start that need no plan, made first: `out` a folder of another kind (data, weights, saves),
    another process training in it, an unwritable metrics.jsonl (rank 0), checkpoints/ or final/ it cannot write in,
    a new run's checkpoints there (unless `overwrite`)."""
    run_directory.check_run_folder(out)
    if is_main:
        run_lock.check_free(out)
        check_log_writable(out)
    if not overwrite:  # --overwrite sets what is there aside
        run_directory.check_writable(out, resumed)
    if not resumed:
        run_directory.check_new_run(out, overwrite)


@contextlib.contextmanager
def opened(
    plan: RunPlan, checkpoints: Checkpointer, resumed: bool, overwrite: bool, quiet: bool
) -> Iterator[tuple[MetricsLog, run_directory.RunStart | None]]:
    """train.out_dir ready for `plan`'s run: yields its metrics log and, on rank 0, its RunStart. A new run claims the
    directory, replacing another run's files if `overwrite`."""
    cfg, world = plan.cfg, plan.world
    t, lg, out = cfg.train, cfg.log, Path(cfg.train.out_dir)
    start = run_directory.RunStart(out) if world.is_main else None
    with run_lock.locked(out) if start else contextlib.nullcontext(), start or contextlib.nullcontext():
        if not resumed:
            checkpoints.claim(overwrite, start)
        if start:
            start.record()
            run_directory.keep_tokenizer(plan.sources[0].data.dir, out)
        if world.is_main:
            save_config(cfg, out)
        sink = None
        if lg.wandb and world.is_main:
            name = lg.run_name or out.resolve().name
            sink = WandbSink(asdict(cfg), out, project=lg.project, name=name, tags=lg.tags, resume=resumed)
        log = MetricsLog(
            out if world.is_main else None, t.max_steps or None, tensorboard=t.tensorboard, quiet=quiet, wandb=sink
        )
        try:
            yield log, start
        finally:
            log.close()
