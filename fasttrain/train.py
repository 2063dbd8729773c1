"""Train a language model from a TOML config.

Imports from fasttrain: checkpoints.checkpoint_files, checkpoints.run_directory, compute.device,
compute.distributed, config, config.shipped, evaluate, evaluation.trained_model, planning.plan, system.errors,
system.run_lock, system.signals, training.launch, training.measure, training.phases, training.plan_table,
training.trainer.

    python -m fasttrain.train configs/base.toml [--set SECTION.KEY=VALUE ...] [--resume auto|auto-or-new|PATH]
    python -m fasttrain.train configs/base.toml --dry-run [--json] [--measure N]

With the default config this prepares the embedded corpus (cached), trains a small model, evaluating and sampling it,
saves checkpoints and the final weights, and prints where everything went. Ctrl-C (or SIGTERM) saves and prints the
command that resumes. `--resume auto-or-new` is for `torchrun --max-restarts`: a new run the first time, then the latest
checkpoint (docs/multi-gpu.md). `--dry-run` prints the run's plan (planning/plan.py) and writes nothing but the prepared
data.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shlex
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

import torch

from fasttrain.checkpoints.checkpoint_files import resolve
from fasttrain.checkpoints.run_directory import EARLIER_RUN_CHOICES, earlier_run, finish_overwrite, saves_to_resume
from fasttrain.compute import distributed
from fasttrain.compute.device import use_device
from fasttrain.config import (
    Config,
    add_config_arguments,
    config_from_args,
    config_line,
    config_overrides,
    copied_run_note,
    shipped,
    toml_value,
)
from fasttrain.evaluate import score_tasks
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.planning.plan import RunPlan, plan_run
from fasttrain.system import run_lock
from fasttrain.system.errors import ArgumentParser, UsageError, positive_int, run_cli
from fasttrain.system.signals import raising_on_signals
from fasttrain.training.launch import check_directory, check_start, start_run
from fasttrain.training.measure import measure, measure_line
from fasttrain.training.phases import (
    REPLACES,
    TEACHER_INIT,
    Phase,
    discard_earlier_rounds,
    first_phase,
    kept_phase_items,
    members_dir,
    next_phase,
    phase_seconds,
    publish,
    round_folders,
    rounds,
)
from fasttrain.training.plan_table import plan_table
from fasttrain.training.trainer import Interrupted, Trainer

if TYPE_CHECKING:  # lm-eval is the optional eval extra
    from lm_eval.tasks import TaskManager

AUTO_OR_NEW = "auto-or-new"  # --resume auto, or a new run while train.out_dir has no checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.json or args.measure) and not args.dry_run:
        raise UsageError(f"{'--json' if args.json else '--measure'}: only with --dry-run")
    # A moved or copied run directory's config.toml names the original: resumed, the run goes on where it now is
    cfg, moved = copied_run_note(args, config_from_args(args), args.resume in ("auto", AUTO_OR_NEW))
    sets = [item for _, item in config_overrides(args)]  # a distilled run's phases take them (phases.phase_items)
    if args.dry_run:
        return dry_run(cfg, args, moved, sets)
    named = args.config in shipped.available()  # shipped, or a file here that hides the shipped one: say which
    if named and not args.quiet and distributed.world_from_env().is_main:
        print(config_line(args.config))
    if moved and not args.quiet and distributed.world_from_env().is_main:
        print(f"note: {moved}")
    harness, index = eval_task_index(cfg)
    world = distributed.world_from_env()
    # Before anything reads the directory: Trainer's process group then holds the other ranks until this is done.
    for directory in (Path(cfg.train.out_dir), *round_folders(cfg.train.out_dir)) if world.is_main else ():
        note = finish_overwrite(directory) if directory.is_dir() else None
        if note and not args.quiet:
            print(f"note: {note}")
    try:
        phase = None
        if args.resume in ("auto", AUTO_OR_NEW) and cfg.train.distill:  # rank 0 decides, the others follow
            distributed.start(world, use_device(cfg.train.device, world.local_rank if world.distributed else None))
            phase = distributed.decided_by_main(world, lambda: next_phase(cfg, sets))
        if phase is not None:  # a distilled run goes on with the phase it was in
            summary, device, batch_size = continue_distilled(cfg, phase, args, harness, sets, world)
        else:
            summary, device, batch_size = start_or_resume(cfg, args, harness, world, sets)
    finally:
        distributed.stop()  # under torchrun: leave the process group, whatever happened
    if index is not None and distributed.world_from_env().is_main:  # eval.tasks: the final weights scored
        score_final_weights(cfg, summary["weights"], device, index, batch_size)
    return 0


def build_parser() -> ArgumentParser:
    """The command line of `python -m fasttrain.train`: the config's arguments, the start (--resume or --overwrite),
    --quiet, and --dry-run with its --json and --measure."""
    parser = ArgumentParser(prog="python -m fasttrain.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        metavar="auto|auto-or-new|PATH",
        help="continue a saved run: auto = the latest checkpoint in train.out_dir; auto-or-new = "
        "that, or a new run while train.out_dir has no checkpoint yet (for torchrun "
        "--max-restarts); or a checkpoint file or run directory",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a train.out_dir that holds another run's checkpoints, deleting them",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing; metrics.jsonl still gets everything")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what the run would do (its plan) and exit, writing nothing"
    )
    parser.add_argument("--json", action="store_true", help="--dry-run: the plan as one JSON object")
    parser.add_argument(
        "--measure",
        type=positive_int,
        metavar="N",
        help="--dry-run: time N real steps (saved nowhere) and project the run's time",
    )
    return parser


def eval_task_index(cfg: Config) -> tuple[ModuleType | None, TaskManager | None]:
    """The harness module and lm-eval's index of eval.tasks, (None, None) without tasks: UsageError now, not after
    the run, where lm-eval is missing or an include path or a task cannot be found."""
    if not cfg.eval.tasks:
        return None, None
    harness = importlib.import_module("fasttrain.evaluation.harness")
    index = harness.task_index(
        cfg.eval.tasks,
        cfg.eval.include_path or None,
        cfg.eval.num_fewshot,
        ("eval.tasks", "eval.include_path", "eval.num_fewshot"),
    )
    return harness, index


def continue_distilled(
    cfg: Config,
    phase: Phase,
    args: argparse.Namespace,
    harness: ModuleType | None,
    sets: list[str],
    world: distributed.World,
) -> tuple[dict, torch.device, int]:
    """A distilled run of `cfg` resumed with --resume auto (or auto-or-new), going on with `phase`, the one it was in
    (`sets`: the --set items, which a resume leaves to what the phases recorded): its summary, device and batch size."""
    kept = kept_phase_items(cfg.train.out_dir, sets)
    if kept and world.is_main and not args.quiet:
        print(f"note: distill: {' '.join(kept)}: a resume keeps what the run's phases recorded")
    return train_phases(cfg, phase, args, harness, sets)


def start_or_resume(
    cfg: Config, args: argparse.Namespace, harness: ModuleType | None, world: distributed.World, sets: list[str]
) -> tuple[dict, torch.device, int]:
    """A new run of `cfg`, or the one --resume names (not a distilled run's phase to go on with): train.out_dir checked
    on rank 0 before the plan times the machine, then planned and trained (a new distilled run from its first round
    of members; `sets`: the --set items, which its later phases take): its summary, device and batch size."""
    resume = checkpoint_to_resume(args.resume, cfg.train.out_dir, args.quiet or not world.is_main)
    if world.is_main:  # refused before the plan times the machine; the other ranks check once rank 0 settled it
        members = members_dir(cfg.train.out_dir)  # a distilled run's, which --resume auto continues
        if resume is None and cfg.train.distill and cfg.model.members != 1 and members.is_dir():
            # first: its saves are what --resume auto continues, not an earlier student's in RUN
            check_directory(members, False, args.overwrite, is_main=True)
        check_directory(Path(cfg.train.out_dir), resume is not None, args.overwrite, is_main=True)
        if resume is not None:
            resolve(resume, cfg.train.out_dir)  # the save to resume: there, or the resume's own line
    plan = start_run(cfg, args.quiet, resume)
    if plan.cfg.train.distill and resume is None:
        return train_phases(cfg, first_phase(plan.cfg, args.overwrite), args, harness, sets, plan)
    try:
        return train_one(plan, resume, args.overwrite, args, harness)
    except Interrupted as e:
        raise with_resume_command(e, args, plan.cfg) from None


def score_final_weights(cfg: Config, weights: str, device: torch.device, index: TaskManager, batch_size: int) -> None:
    """Score the run's final weights (`weights`, loaded on `device`) on eval.tasks, as evaluate --tasks does
    (`index`: eval_task_index's)."""
    tasks = cfg.eval
    score_tasks(load_trained(weights, device), tasks.tasks, tasks.num_fewshot, tasks.limit or None, index, batch_size)


def train_one(
    plan: RunPlan, resume: str | None, overwrite: bool, args: argparse.Namespace, harness: ModuleType | None
) -> tuple[dict, torch.device, int]:
    """Train `plan`'s run (resuming the save `resume` names, if given): its summary, device and batch size. An
    interruption (Interrupted) is the caller's to add the command that continues the run to (`with_resume_command`)."""
    trainer = None
    try:
        trainer = Trainer(plan.cfg, quiet=args.quiet, resuming=resume is not None, plan=plan)
        if harness is not None:  # the data's tokenizer must encode the tasks' text: said now, not after the run
            harness.check_tokenizer(trainer.tokenizer, "eval.tasks")
        if resume:
            trainer.resume(resume)
        return trainer.train(overwrite=overwrite), trainer.device, trainer.cfg.train.batch_size
    finally:
        # Free the model, its DDP wrapper and the loader now, while the interpreter is whole: left to the
        # collector at exit, a communication thread that touches a Python object then aborts the process.
        if trainer is not None:
            trainer.close()
        trainer = None
        gc.collect()


def train_phases(
    cfg: Config,
    phase: Phase,
    args: argparse.Namespace,
    harness: ModuleType | None,
    sets: list[str],
    whole: RunPlan | None = None,
) -> tuple[dict, torch.device, int]:
    """The distilled run of `cfg` (fasttrain/training/phases.py; `sets`: the --set items) from `phase` on, each next
    phase decided as the one before it ends (phases.next_phase), until the run has ended; then how its budget was
    spent, over all its phases (phases.phase_seconds). `whole`: a new run's plan, whose first round `phase` is (its
    notes were printed as the run planned it; its record goes into the round's start event). A signal stops it in a
    phase as any run (a save, then Interrupted), between phases at once (each phase's files are whole at any instant),
    and either way the message ends with the command that goes on with the whole run."""
    out = os.path.abspath(cfg.train.out_dir)
    if whole is not None and distributed.world_from_env().is_main:  # what the student does to an earlier run in RUN
        members = Path(phase.cfg.train.out_dir)
        members.mkdir(parents=True, exist_ok=True)
        if phase.overwrite:
            (members / REPLACES).write_text("the student replaces the run in the directory above\n")
        else:
            (members / REPLACES).unlink(missing_ok=True)

    def stopped(signum: int) -> Interrupted:
        return Interrupted(f"stopped by {signal.Signals(signum).name} between the run's phases", 128 + signum)

    try:
        with raising_on_signals(stopped):
            ended = train_phases_from(cfg, phase, args, harness, sets, whole)
    except Interrupted as e:  # a phase's config holds the data's folders as the run resolved them
        begun = (members_dir(out) / "config.toml").is_file()
        left_out = kept_phase_items(out, sets) if begun else []  # which the resume would only name
        resolved = replace(phase.cfg, train=replace(phase.cfg.train, out_dir=out))
        raise with_resume_command(e, args, resolved, left_out) from None
    is_main = distributed.world_from_env().is_main
    for folder in discard_earlier_rounds(out) if is_main else ():
        if not args.quiet:
            print(f"distill: removed {folder}, a later round of the run --overwrite replaced")
    spent = phase_seconds(out)
    if is_main and not args.quiet and spent:
        budget = f" of train.max_time = {cfg.train.max_time:g} s" if cfg.train.max_time else ""
        trained = "; ".join(f"{what} {seconds:.0f} s" for what, seconds in spent)
        print(f"distill: {sum(s for _, s in spent):.0f} s trained{budget}: {trained}")
    return ended


def train_phases_from(
    cfg: Config,
    phase: Phase,
    args: argparse.Namespace,
    harness: ModuleType | None,
    sets: list[str],
    whole: RunPlan | None,
) -> tuple[dict, torch.device, int]:
    """`train_phases`' loop: `phase`, then each phase next_phase decides, until the student or the published member;
    the last phase's summary, device and batch size."""
    out = os.path.abspath(cfg.train.out_dir)
    say = distributed.world_from_env().is_main and not args.quiet
    summary: dict = {}
    device, batch_size = torch.device("cpu"), phase.cfg.train.batch_size  # a run resumed only to publish trains none
    next_one, first = phase, whole
    while True:
        if say:
            print(f"distill: {phase_line(next_one)}")
        if next_one.kind == "publish":  # the run's model is its one member's
            weights = publish(next_one) if distributed.world_from_env().is_main else Path(out) / "final"
            return {**summary, "weights": str(weights)}, device, batch_size
        part: dict = {"kind": next_one.kind, "run": out, "why": next_one.note, "begun": next_one.begun}
        # A new run's first round: its notes were said as the whole run planned it, and it reads for the seconds the
        # whole run's timing gives it (its record beside its own)
        if first is not None:
            part["whole"] = first.record()
            part[TEACHER_INIT] = first.cfg.train.teacher_init  # what the student takes, resumed or not
        quiet = args.quiet or first is not None
        plan = start_run(next_one.cfg, quiet, next_one.resume, part, first.speed if first is not None else None)
        summary, device, batch_size = train_one(plan, next_one.resume, next_one.overwrite, args, harness)
        decided = (
            None
            if next_one.kind == "student"
            else distributed.decided_by_main(plan.world, lambda: next_phase(cfg, sets))
        )
        if decided is None:  # the student, the run's last phase; or an ordinary run took train.out_dir over meanwhile
            return summary, device, batch_size
        next_one, first = decided, None


def phase_line(phase: Phase) -> str:
    """What a distilled run's `phase` is, in the line it starts with."""
    t = phase.cfg.train
    why = f"{phase.note}: " if phase.note else ""
    if phase.kind == "members":
        return f"{why}{phase.cfg.model.members} member(s) side by side into {t.out_dir}"
    if phase.kind == "publish":
        return f"{why}final/ holds the one member's weights, copied from {Path(t.out_dir) / 'final'}"
    return f"{why}one model taught by {t.teacher}, into {t.out_dir}"


def dry_run(cfg: Config, args: argparse.Namespace, moved: str | None, sets: list[str]) -> int:
    """Print the plan of a run of `cfg` (rank 0 prints the world's), as a table after the config file's line, or
    (--json) one JSON object with the start event's keys and `config_file`; with --measure N, time N real steps (the
    data must be prepared). Writes nothing. train.out_dir gets the run's checks first, each the run's one line; an
    earlier run there, which a new run without --overwrite would refuse, is a note instead; `moved`: the note on a
    moved run directory's config (copied_run_note), said before a refusal of the directory it names; `sets`: the --set
    items, which a distilled run's phase takes."""
    as_json, measure_steps, resume, overwrite = args.json, args.measure, args.resume, args.overwrite
    world = distributed.world_from_env()
    if world.is_main and not as_json:
        print(config_line(args.config))
    if world.is_main and moved:
        print(f"note: {moved}", file=sys.stderr if as_json else sys.stdout)  # --json: the object alone on stdout
    device = use_device(cfg.train.device, world.local_rank if world.distributed else None)
    run_dir = Path(cfg.train.out_dir)  # the whole run's, where a phase's plan below is made in a round's
    phase = next_phase(cfg, sets) if resume in ("auto", AUTO_OR_NEW) and cfg.train.distill else None
    if phase is not None and phase.kind == "publish":  # nothing left to train: said, as the run would say it
        if world.is_main:
            print(f"distill: {phase_line(phase)}", file=sys.stderr if as_json else sys.stdout)
        return 0
    if phase is not None:  # a distilled run: the plan of the phase it would go on with
        cfg, resume = phase.cfg, phase.resume
    spec = checkpoint_to_resume(resume, cfg.train.out_dir, quiet=True)
    out = Path(cfg.train.out_dir)
    # The plan of a new run where an earlier one is, which the run would refuse: said, not refused, as the dry
    # run writes nothing there; its other checks are made as with --overwrite, which lets an earlier run be.
    earlier = None if spec is not None or overwrite else earlier_run(out)
    if earlier is None and spec is None and not overwrite and cfg.train.distill and cfg.model.members != 1:
        earlier = earlier_run(members_dir(out))  # a new distilled run's first round there: refused as in RUN
    overwrite = overwrite or earlier is not None
    check_directory(out, spec is not None, overwrite, world.is_main)  # before the plan times the machine
    # A distilled run training a round is refused as in RUN
    for round_dir in rounds(run_dir).dirs if world.is_main else ():
        run_lock.check_free(round_dir)
    if spec is not None:
        resolve(spec, cfg.train.out_dir)  # the save a resume would load: there, or the run's own line
    if earlier and world.is_main:
        print(
            f"note: {earlier}: the run would refuse to start there; {EARLIER_RUN_CHOICES}",
            file=sys.stderr if as_json else sys.stdout,
        )
    plan = plan_run(cfg, world, device, spec)
    if spec is None or plan.sources:  # a resume's tokenizer check needs the prepared data
        check_start(plan, spec is not None, overwrite)
    found = {}
    if measure_steps:
        if plan.prepare:
            raise UsageError(
                f"--measure: the data is not prepared yet (the run prepares {plan.prepare}); prepare "
                "it first (fasttrain prepare, or a run), or leave out --measure"
            )
        distributed.start(world, device)
        try:
            found = measure(plan, measure_steps)
        finally:
            distributed.stop()
    if world.is_main:
        config_file = os.path.abspath(shipped.locate(args.config)[0])
        print(
            json.dumps({"config_file": config_file, **plan.record(), **found})
            if as_json
            else "\n".join([plan_table(plan), *([measure_line(found)] if found else [])])
        )
    return 0


def checkpoint_to_resume(spec: str | None, out_dir: str, quiet: bool) -> str | None:
    """What `--resume spec` asks Trainer.resume for; None for a new run. auto-or-new is "auto" once `out_dir` has a
    `latest` save, else a new run, said in one line so a mistyped out_dir shows."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and not quiet:
        print(f"note: torchrun restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}")
    if spec != AUTO_OR_NEW:
        return spec
    # A damaged pointer: the resume says so. Saves without one: the first save was killed before its pointer. A run
    # an --overwrite start set aside is rank 0's to put back (finish_overwrite): another rank may look while it
    # does, so where it was first, then where it goes (a rename between the two looks is seen by the second).
    if saves_to_resume(out_dir):
        return "auto"
    if not quiet:
        print(f"resume: no checkpoint in {out_dir} yet, so a new run starts there (--resume {AUTO_OR_NEW})")
    return None


def with_resume_command(
    stopped: Interrupted, args: argparse.Namespace, cfg: Config, left_out: Sequence[str] = ()
) -> Interrupted:
    """`stopped` with the command that continues the run `args` started in cfg's train.out_dir (`resume_command`)."""
    return Interrupted(f"{stopped}; resume with: {resume_command(args, cfg, left_out)}", stopped.exit_code)


def resume_command(args: argparse.Namespace, cfg: Config, left_out: Sequence[str] = ()) -> str:
    """The command line that continues the run `args` started with config `cfg` (resolved: its data's folders), from
    any directory: config file, out_dir and data folders absolute, the other --set items but those of the keys of
    `left_out` (a distilled run's that differ from what its phases recorded: phases.kept_phase_items), `--resume
    auto`."""
    places = {"train.out_dir": os.path.abspath(cfg.train.out_dir)}
    if cfg.data.sources:  # a mixture has no data.dir (setting one is refused): its sources are the data
        # each whole (its name too: what metrics and train.monitor call it), its folder absolute
        places["data.sources"] = toml_value([replace(s, dir=os.path.abspath(s.dir)) for s in cfg.data.sources])
    else:
        places["data.dir"] = os.path.abspath(cfg.data.dir)
    sets = [item for _, item in config_overrides(args) if item.partition("=")[0].strip() not in places]
    dropped = {item.partition("=")[0].strip() for item in left_out}  # every item of such a key: the last one counts
    sets = [item for item in sets if item.partition("=")[0].strip() not in dropped]
    sets += [f"{key}={value}" for key, value in places.items()]  # a path as a bare string, see load_config
    quiet = ["--quiet"] if args.quiet else []
    config_file = shipped.locate(args.config)[0]  # a shipped config's name: its file, wherever it is run from
    return shlex.join(
        ["python", "-m", "fasttrain.train", os.path.abspath(config_file), *quiet, "--set", *sets, "--resume", "auto"]
    )


if __name__ == "__main__":
    run_cli(main)
