"""Checkpoints saved and restored on every rank: `Checkpointer`, what a run saves into its checkpoints/ and
restores from them.

Imports from fasttrain: checkpoints.checkpoint_files, checkpoints.checksums, checkpoints.resume,
checkpoints.run_directory, checkpoints.run_state, checkpoints.saves, checkpoints.sharded_files, compute.distributed,
config, data.loader, formats.shards, system.atomic, system.errors, system.run_lock.

The rest is in modules of its own, one concept each: checkpoint_files.py (what a save holds, writing,
publishing, resolving and reading one), sharded_files.py (the sharded folders, through DCP), checksums.py
(the files' checksums), saves.py (the saves' names, listing, pointers), run_directory.py (the run directory:
new and resumed starts, --overwrite) and resume.py (what a resume checks and restores besides the tensors).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fasttrain.checkpoints import checksums, resume, saves, sharded_files
from fasttrain.checkpoints.checkpoint_files import STATE_FILE, load, publish, resolve, save, saved_config
from fasttrain.checkpoints.run_directory import RunStart, check_kept_tokenizer, check_new_run, check_own
from fasttrain.checkpoints.run_state import RunState
from fasttrain.compute import distributed
from fasttrain.config import Config, config_to_toml
from fasttrain.data.loader import TokenLoader, reshard
from fasttrain.formats.shards import PREPARATION, read_meta
from fasttrain.system.atomic import exchange, sync_directory, write_atomically
from fasttrain.system.errors import UsageError
from fasttrain.system.run_lock import other_holder


def make_directory(path: Path) -> None:
    """mkdir -p `path`; UsageError naming it if the disk or the permissions refuse."""
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot save checkpoint ({e.strerror or e})") from None


def dcp_exception() -> type[BaseException]:
    """DCP's CheckpointException (a BaseException): what a failed collective save raises on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


@dataclass
class InFlight:
    """A save whose background write is under way: what publishing it needs once `future` is done."""

    future: Future
    staging: Path
    path: Path
    rest: dict
    best: bool
    keep: Path | None


def data_folders(cfg: Config) -> list[str]:
    """The prepared folders a run of `cfg` reads: its [[data.sources]], or data.dir."""
    return [s.dir for s in cfg.data.sources] or [cfg.data.dir]


def preparations(cfg: Config) -> list[str | None]:
    """The identity of the preparation each of the run's data folders holds (meta.json's PREPARATION, which every
    prepare writes anew; None for data prepared before it did): what a save records and a resume compares."""
    return [(read_meta(folder) or {}).get(PREPARATION) if folder else None for folder in data_folders(cfg)]


def prepared_again(saved: list | None, now: list[str | None], cfg: Config) -> list[str]:
    """A resume's notes for each data folder of `cfg` that was prepared again since the save (`saved`: its
    `preparations`; `now`: the folders' now): the run goes on by the rows' positions, which are other text where the
    text changed (the token counts, which the loader checks, may well be the same)."""
    if not isinstance(saved, list) or len(saved) != len(now):
        return []
    return [
        f"{folder} was prepared again since this save: the run goes on at its rows' positions, so where its text "
        "changed, what it reads from here is not what the saved run would have read"
        for folder, then, current in zip(data_folders(cfg), saved, now)
        if then is not None and current is not None and then != current
    ]


class Checkpointer:
    """Saves and restores `model`, `optimizer` and `scaler` (with the RunState and loader given per call) in
    out_dir/checkpoints; every rank calls `save` and `restore`. File or sharded, a save restores in any world."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        optimizer: distributed.Optimizer,
        scaler: torch.amp.GradScaler,
        world: distributed.World,
        parallel: str,
        device: torch.device,
    ):
        self.cfg, self.model, self.world, self.parallel = cfg, model, world, parallel
        self.optimizer, self.scaler = optimizer, scaler
        self.device = device  # where a restored state's tensors go
        self.preparations = preparations(cfg)  # read once: each save records them, a resume compares them
        self.directory = Path(cfg.train.out_dir) / "checkpoints"
        fmt, self.background = cfg.checkpoint.format, cfg.checkpoint.async_save
        self.sharded = fmt == "sharded" or (fmt == "auto" and parallel in distributed.SHARDED) or self.background
        # A background write meets the other ranks on a gloo group of its own (DCP's collectives on the training
        # group would interleave with the steps'); made now, on every rank in the same order.
        self.write_group = distributed.new_group(world) if self.background else None
        self.in_flight: InFlight | None = None
        self.unsettled: tuple[Path, bool] | None = None  # the last background save waited for; failed here?

    def run_state(self, run: RunState, loader: TokenLoader) -> dict:
        """What a checkpoint holds besides the model and optimizer: small, gathered onto every rank."""
        return {
            "scaler": self.scaler.state_dict(),
            **run.state_dict(),  # "step" is the LR schedule's position too
            "ranks": distributed.gather({"train_loader": loader.state_dict(), "rng": resume.rng_state()}, self.world),
            "parallel": self.parallel,
            "config": config_to_toml(self.cfg),
            "preparations": self.preparations,
        }

    def state_dict(self, run: RunState, loader: TokenLoader) -> dict:
        """Everything needed to continue the run exactly: what a checkpoint file holds."""
        model, optimizer = distributed.full_state(self.model, self.optimizer, self.parallel in distributed.SHARDED)
        return {"model": model, "optimizer": optimizer, **self.run_state(run, loader)}

    def save(self, run: RunState, loader: TokenLoader, best: bool = False, keep: Path | None = None) -> Path:
        """Save the run at `run.step`; returns the file or folder. Keeps the newest `checkpoint.keep_last`
        saves, the best one (this save if `best`) and `keep`."""
        if self.sharded:
            return self.save_sharded(run, loader, best, keep)
        state = self.state_dict(run, loader)
        path = saves.path_for(self.directory, run.step)
        if self.world.is_main:
            self.check_still_ours()
            path = save(state, self.directory, run.step, self.cfg.checkpoint.keep_last, best, keep)
        distributed.barrier(self.world)
        return path

    def save_sharded(self, run: RunState, loader: TokenLoader, best: bool, keep: Path | None) -> Path:
        """Every rank writes its part into `.step_N.tmp/`; rank 0 adds state.pt, renames it `step_N/`, points and
        prunes. With checkpoint.async_save this returns once the state is in CPU memory (see `wait`)."""
        self.wait()  # the save still in flight, if any, comes first
        path = saves.path_for(self.directory, run.step, sharded=True)
        staging = self.directory / f".{path.name}.tmp"
        rest = self.run_state(run, loader)
        model, optimizer = distributed.local_state(self.model, self.optimizer)
        rest["optimizer_groups"] = optimizer["param_groups"]
        if self.world.is_main:
            self.check_still_ours()
            saves.clear_stale(self.directory)
            make_directory(staging)
        distributed.barrier(self.world)
        state = {"model": model, "optimizer": {"state": optimizer["state"]}}
        if self.background:
            future = sharded_files.write_async(staging, state, self.write_group, self.world.is_main)
            self.in_flight = InFlight(future, staging, path, rest, best, keep)
            return path
        try:
            sharded_files.write(staging, state)
        except (OSError, dcp_exception()) as e:
            raise UsageError(f"{staging}: cannot save checkpoint ({sharded_files.one_line(e)})") from None
        if self.world.is_main:
            self.publish_folder(staging, path, {**rest, "checksums": checksums.of_folder(staging)}, best, keep)
        distributed.barrier(self.world)
        return path

    def publish_folder(self, staging: Path, path: Path, rest: dict, best: bool, keep: Path | None) -> None:
        """Rank 0, once every rank's part is in `staging`: add state.pt (`rest`, with the other files' checksums),
        rename the folder `path`, point, prune."""
        write_atomically(staging / STATE_FILE, lambda f: torch.save(rest, f), what="save checkpoint")
        try:
            sync_directory(staging)
            # This step saved before (a resumed run's evaluation saves it again): the two folders swap names in one
            # rename, so a kill leaves the old save or the new one there, never neither (the old one is then removed)
            if not (path.exists() and exchange(staging, path)):
                if path.exists():  # a file system that cannot swap: set the old one aside first
                    os.rename(path, self.directory / f".{path.name}.old.tmp")
                os.rename(staging, path)
            sync_directory(self.directory)
        except OSError as e:
            raise UsageError(f"{path}: cannot save checkpoint ({e.strerror or e})") from None
        saves.clear_stale(self.directory)
        publish(self.directory, path, self.cfg.checkpoint.keep_last, best, keep)

    def poll(self) -> None:
        """Publish the save in flight if its background write is done (called after each step: cheap)."""
        if self.in_flight is not None and self.in_flight.future.done():
            self.wait()

    def wait(self) -> None:
        """Wait for the save in flight, if any, and publish it (rank 0). A failed background write is one line
        on stderr, its folder removed, and `latest` keeps naming the last complete save."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return
        try:
            sums = flight.future.result()  # rank 0: the folder's checksums
        except (Exception, dcp_exception()) as e:
            self.unsettled = (flight.path, True)
            if self.world.is_main:
                saves.remove(flight.staging)
                print(
                    f"warning: {flight.path}: the background checkpoint write failed ({sharded_files.one_line(e)}); "
                    f"latest still names {saves.pointed(self.directory, 'latest')}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        self.unsettled = (flight.path, False)
        if self.world.is_main:
            rest = {**flight.rest, "checksums": sums}
            self.publish_folder(flight.staging, flight.path, rest, flight.best, flight.keep)

    def settle(self) -> Path | None:
        """Wait for the save in flight; returns the last background save waited for if its write failed on any rank (a
        save that is no way back), else None. Every rank must call it at the same point."""
        if not self.background:
            return None
        self.wait()
        done, self.unsettled = self.unsettled, None
        if done is None or not distributed.any_rank(done[1], self.world, self.device):
            return None
        # A failed write of a step saved before (a resumed run's evaluation saves it again) left that save whole.
        return None if distributed.any_rank(done[0].exists(), self.world, self.device) else done[0]

    def resumable(self, spec: str, data_dir: str) -> Path:
        """The save `spec` names ("auto", a run directory or a checkpoint file); UsageError for another run directory's
        save, or for `data_dir` prepared again with another tokenizer."""
        path = resolve(spec, self.cfg.train.out_dir)
        check_own(path, self.directory)
        check_kept_tokenizer(data_dir, self.cfg.train.out_dir)
        return path

    def restore(self, path: str | Path, loader: TokenLoader, accumulation: int) -> tuple[RunState, Config, list[str]]:
        """Load the checkpoint at `path` into the model, optimizer, scaler, `loader` and random generators; returns its
        RunState, its config and notes (an init-only [model] key changed, another world). A save of another world
        continues the data at the same global batch, split over this one (loader.reshard; `accumulation`: this run's
        micro-batches per step); a rank with no saved random state is seeded from train.seed, the step and its rank.
        UsageError for another model shape or optimizer, a position this world cannot continue from, or a save that
        cannot be loaded."""
        self.wait()  # a rollback may go back to the save in flight
        path = Path(path)
        state = load(path, self.device, whole_model=False)
        saved = saved_config(state, path)  # parsed once: the checks below and the caller read it
        notes = resume.check_same_model(saved, self.cfg, path)
        resume.check_same_optimizer(saved, self.cfg, path)
        try:
            ranks, rank = state["ranks"], self.world.rank
            position = reshard([r["train_loader"] for r in ranks], rank, self.world.size, state["step"] * accumulation)
            if saves.is_sharded(path):
                model, optimizer = distributed.local_state(self.model, self.optimizer)
                sharded_files.read_into(path, {"model": model, "optimizer": {"state": optimizer["state"]}})
                distributed.load_local_state(
                    self.model,
                    self.optimizer,
                    model,
                    {"state": optimizer["state"], "param_groups": state["optimizer_groups"]},
                )
            else:
                distributed.load_full_state(
                    self.model, self.optimizer, state["model"], state["optimizer"], self.parallel in distributed.SHARDED
                )
            self.scaler.load_state_dict(state["scaler"])
            loader.load_state_dict(position)
            if rank < len(ranks):
                resume.set_rng_state(ranks[rank]["rng"])
            else:
                resume.seed_rng(self.cfg.train.seed, state["step"], rank)
            run = RunState.from_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, UsageError) as e:
            raise UsageError(f"{path}: cannot continue from it ({str(e).splitlines()[0]})") from None
        notes += resume.world_change(len(ranks), state.get("parallel"), self.world.size, self.parallel)
        notes += prepared_again(state.get("preparations"), self.preparations, self.cfg)
        return run, saved, notes

    def leave_later_saves(self, path: Path, best_step: int | None) -> list[str]:
        """A resume from the save `path` of this run's checkpoints/: saves of later steps there are a continuation this
        run leaves (publish neither counts nor prunes them; this run saves over each as it reaches its step), and a
        `best` naming one of them is pointed back at the save of `best_step` (the restored run's best evaluation), or
        removed where that save is gone. Rank 0 moves the pointer; lines saying what there is."""
        if path.parent.resolve() != self.directory.resolve() or saves.SAVE_NAME.fullmatch(path.name) is None:
            return []
        step, saved = saves.step_of(path), saves.saved_steps(self.directory)
        later = [p.name for p in saved if saves.step_of(p) > step]
        best = saves.pointed(self.directory, "best")
        lines = []
        if best is not None and saves.SAVE_NAME.fullmatch(best.name) and saves.step_of(best) > step:
            restored = next((p for p in saved if saves.step_of(p) == best_step and best_step <= step), None)
            if self.world.is_main:
                if restored is not None:
                    saves.point(self.directory, "best", restored)
                else:
                    (self.directory / "best").unlink(missing_ok=True)
            again = f"it names {restored.name} again" if restored is not None else "removed"
            lines.append(
                f"{self.directory / 'best'} named {best.name}, of the continuation this resume leaves: {again}"
            )
        if later:
            lines.append(
                f"{self.directory} holds {', '.join(later)}, saved after step {step} by a continuation this resume "
                "leaves: kept as they are, each replaced as this run saves that step"
            )
        distributed.barrier(self.world)
        return lines

    def restore_weights(self, path: Path) -> None:
        """Load only the model's weights of the save at `path` (what checkpoint.final_weights = "best" gives final/);
        the optimizer, scaler, loader and generators keep their state. UsageError if it cannot be loaded."""
        self.wait()
        state = load(path, self.device, whole_model=True)
        try:
            distributed.load_full_model_state(self.model, state["model"], self.parallel in distributed.SHARDED)
        except (RuntimeError, KeyError) as e:
            raise UsageError(f"{path}: cannot load its weights ({str(e).splitlines()[0]})") from None

    def point_latest(self, path: Path) -> None:
        """Make `latest` name `path` again (after a rollback to it), so a resume starts there too."""
        if self.world.is_main:
            self.check_still_ours()
            saves.point(self.directory, "latest", path)
        distributed.barrier(self.world)

    def check_still_ours(self) -> None:
        """UsageError if another process now holds the run directory (this one was removed, say with rm -rf,
        and a new run started there): its checkpoints must not be pruned or its `latest` moved by this run."""
        holder = other_holder(self.directory.parent)
        if holder is not None:
            raise UsageError(
                f"{self.directory.parent}: now held by another run ({holder}), so this run's directory "
                "was removed or replaced; stopping without saving, pruning or pointing at anything there"
            )

    def latest(self) -> Path | None:
        """The newest complete save, or None before the first; a save in flight is waited for first. Every rank calls
        it and gets rank 0's answer: rank 0 points at a save in its `wait`, which another rank's can end before."""
        return self._pointed("latest")

    def best(self) -> Path | None:
        """The save with the lowest validation loss (checkpoint.keep_best), or None; a save in flight is waited for
        first. Every rank calls it and gets rank 0's answer, as `latest`."""
        return self._pointed("best")

    def _pointed(self, name: str) -> Path | None:
        self.wait()
        return distributed.decided_by_main(self.world, lambda: saves.pointed(self.directory, name))

    def history(self, upto: Path) -> list[Path]:
        """The saves in this run's checkpoints/ from before `upto`'s step, oldest first, then `upto`:
        what a run resumed from `upto` can go back to (policies.Recovery)."""
        if saves.SAVE_NAME.fullmatch(upto.name) is None:  # a checkpoint file renamed by hand: no step to compare
            return [upto]
        return [p for p in saves.saved_steps(self.directory) if saves.step_of(p) < saves.step_of(upto)] + [upto]

    def claim(self, overwrite: bool, start: RunStart | None) -> None:
        """Make the run directory ready for a new run: every rank checks (check_new_run), rank 0 claims it
        with `start`."""
        check_new_run(self.directory.parent, overwrite)
        distributed.barrier(self.world)  # no rank checks a directory that rank 0 has begun to set aside
        if start is not None:
            start.claim(overwrite)
        distributed.barrier(self.world)
