"""Checkpoints: what a run's checkpoint holds, its files and pointers, and saving and restoring it on every rank.

A run directory's checkpoints/ holds

    step_0000100.pt   a save as one file (checkpoint.format "file")
    step_0000100/     or as a folder each rank writes its part of ("sharded", see sharded_files.py)
    latest            the name of the newest complete save
    best              the name of the save with the lowest validation loss

A checkpoint file is a dict of

    model, optimizer      full (unsharded) state dicts
    scaler                the fp16 GradScaler's state
    step, tokens_seen...  the RunState's fields, at the top level
    ranks                 each rank's training-loader position and random generator states
    parallel              "none", "ddp", "fsdp" or "hsdp": the world that saved it, with len(ranks)
    config                the run's resolved config, as TOML

A sharded folder holds the same: the model's and optimizer's tensors in DCP's files, the rest (with the
optimizer's param_groups as "optimizer_groups") in its state.pt. Either kind resumes in any world.

Each file is written under a temporary name, fsync'd and renamed (fasttrain/system/atomic.py), a folder
under a temporary name too, and a pointer is updated only once the save it names is complete, so a crash
or `kill -9` at any moment leaves `latest` naming a loadable checkpoint. Old saves are deleted last, and
never one that a pointer names.

Loading uses `torch.load(weights_only=True)`, and a folder's metadata a restricted unpickler: a checkpoint
may hold tensors, numbers, strings and containers of them, never code to run. A load first compares each file
with the checksums recorded when it was saved (checksums.py): a bit changed on disk is one line naming the
file, not a silently different model.

The functions below are the files; `Checkpointer` is what a run saves into them and restores from them.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
from concurrent.futures import Future
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fasttrain.config import Config, config_to_toml, parse_config
from fasttrain.data.loader import TokenLoader, reshard
from fasttrain.system import distributed
from fasttrain.system.atomic import write_atomically
from fasttrain.system.device import seed_everything
from fasttrain.system.errors import RunStopped, UsageError
from fasttrain.system.run_lock import LOCK_FILE, locked, other_holder
from fasttrain.training import checksums, sharded_files
from fasttrain.training.metrics import WANDB_ID_FILE
from fasttrain.training.optimizers import Updater
from fasttrain.training.run_state import RunState

REQUIRED_KEYS = ("model", "optimizer", "step", "config")  # what marks a file as a fasttrain checkpoint
RESHAPE_FREE = ("dropout", "init_from")  # [model] keys a resumed run may change: they alter no saved weight


SAVE_NAME = re.compile(r"step_(\d+)(\.pt)?")  # a file (gathered) or a folder (sharded)
STATE_FILE = "state.pt"  # in a sharded checkpoint's folder: everything but the model's and optimizer's tensors


def step_of(path: Path) -> int:
    """The step of a `step_NNNNNNN.pt` file's or `step_NNNNNNN` folder's name."""
    return int(SAVE_NAME.fullmatch(path.name).group(1))


def saved_steps(directory: Path) -> list[Path]:
    """The checkpoints (files and folders) in `directory`, oldest step first."""
    return sorted((p for p in directory.glob("step_*") if SAVE_NAME.fullmatch(p.name)), key=step_of)


def path_for(directory: str | os.PathLike[str], step: int, sharded: bool = False) -> Path:
    """The file (or, `sharded`, the folder) the save at `step` goes to."""
    return Path(directory) / f"step_{step:07d}{'' if sharded else '.pt'}"


def is_sharded(path: Path) -> bool:
    """Whether `path` is a sharded checkpoint: a folder named like a save."""
    return path.is_dir() and SAVE_NAME.fullmatch(path.name) is not None and not path.name.endswith(".pt")


def remove(path: Path) -> None:
    """Delete a checkpoint file or folder (or a temporary one)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clear_stale(directory: Path) -> None:
    """Remove the temporary files and folders a save or pointer update killed halfway left in `directory`."""
    for stale in directory.glob(".*.tmp"):
        remove(stale)


def save(state: dict, directory: str | os.PathLike[str], step: int, keep_last: int, best: bool,
         keep: Path | None = None) -> Path:
    """Write `state` as `directory/step_<step>.pt`, then publish it (see `publish`). Raises UsageError, with
    every earlier save intact, if the disk is full or the directory unwritable."""
    directory = Path(directory)
    path = path_for(directory, step)
    clear_stale(directory)
    write_atomically(path, lambda f: torch.save(state, f), what="save checkpoint")
    return publish(directory, path, keep_last, best, keep)


def publish(directory: Path, path: Path, keep_last: int, best: bool, keep: Path | None = None) -> Path:
    """Point `latest` (and `best` if `best`) at the complete save `path`, then prune: keeps the newest
    `checkpoint.keep_last` saves, the one `best` names and `keep`."""
    if best:
        point(directory, "best", path)
    point(directory, "latest", path)
    saved = saved_steps(directory)
    kept = set(saved[-keep_last:]) | {pointed(directory, "best"), keep}
    for old in saved:
        if old not in kept:
            remove(old)
    shutil.rmtree(directory.parent / REPLACED, ignore_errors=True)  # the new run's first save is complete
    return path


# What a run and the tools write at the top of its run directory: what --overwrite replaces. Other files
# there (a user's notes, wandb/ with its offline runs) are never touched.
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "config.toml", "tokenizer.json", "tensorboard",
             WANDB_ID_FILE, "export", "export-hf", "curves.png")
REPLACED = ".replaced-by-overwrite"  # the earlier run's RUN_FILES, until the new run's first complete save


def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """UsageError if a new run cannot start in `run_dir`: its checkpoints/ holds another run's saves (unless
    `overwrite`), or is not a directory."""
    directory = run_dir / "checkpoints"
    if directory.exists() and not directory.is_dir():  # found now, not at the first save after training
        raise UsageError(f"{directory}: is not a directory, so no checkpoint can be saved there; move it away "
                         "or set train.out_dir elsewhere")
    if (run_dir / REPLACED).is_dir():  # `train` puts it back first (put_back_replaced): another start left it
        raise UsageError(f"{run_dir / REPLACED}: holds the run an --overwrite start set aside and stopped before "
                         "its first checkpoint; `python -m fasttrain.train` puts it back when it starts there")
    saved = saved_steps(directory)
    if saved and not overwrite:
        raise UsageError(
            f"{directory}: holds checkpoints of an earlier run (up to step {step_of(saved[-1])}); continue it "
            "with --resume auto, start over with --overwrite, or set train.out_dir elsewhere")


class RunStart:
    """A new or resumed run starting in `run_dir`, on rank 0, as a `with` block around its start: what the
    start changes in the directory is taken back if it fails before its first step is done (out of memory, a
    compiler error), so the directory keeps what it had, and one that did not exist is not left behind. Every
    check that can refuse the run comes before it (Trainer.train); it is made before the run's lock creates
    the directory.

    `claim(overwrite=True)` moves the earlier run's RUN_FILES into REPLACED, where they stay until the new run
    has a checkpoint that can be resumed: its first complete save deletes them (`publish`; for a background
    save, once its write is done), as does a run that ends without error (its final/ weights). Until then the
    earlier run is put back (`put_back`) by a start that fails, before its first step or after it, and, after
    a start killed outright, by the next `train` in the directory (put_back_replaced), before it decides
    what to resume: --overwrite replaces a run only once the new one has something to show for it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created = [d for d in (run_dir, *run_dir.parents) if not os.path.lexists(d)]  # the lock makes them
        self.lock_existed = os.path.lexists(run_dir / LOCK_FILE)
        self.set_aside = self.done = False
        self.files: dict[str, bytes | None] | None = None  # what `record` found
        self.metrics_size: int | None = None
        self.tensorboard: set[str] | None = None

    def claim(self, overwrite: bool) -> None:
        """Clear the directory for a new run (checked first: check_new_run): set the earlier run aside if
        `overwrite`."""
        replaced = self.run_dir / REPLACED
        if overwrite:
            replaced.mkdir()
            self.set_aside = True
            for name in RUN_FILES:
                if os.path.lexists(self.run_dir / name):
                    os.rename(self.run_dir / name, replaced / name)

    def record(self) -> None:
        """Note what the start is about to change: config.toml, tokenizer.json and the W&B run id (rewritten),
        metrics.jsonl (appended to) and tensorboard/ (given a new event file)."""
        d = self.run_dir
        self.files = {name: (d / name).read_bytes() if (d / name).is_file() else None
                      for name in ("config.toml", "tokenizer.json", WANDB_ID_FILE)}
        self.metrics_size = (d / "metrics.jsonl").stat().st_size if (d / "metrics.jsonl").is_file() else None
        self.tensorboard = set(os.listdir(d / "tensorboard")) if (d / "tensorboard").is_dir() else None

    def started(self) -> None:
        """The first step is done: what the start changed is not taken back now (the run set aside still is,
        until the first complete save)."""
        self.done = True

    def __enter__(self) -> RunStart:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:  # the run ended whole, with its final/ weights
            shutil.rmtree(self.run_dir / REPLACED, ignore_errors=True)
        elif not self.done and not isinstance(error, RunStopped):  # a stop saves a checkpoint: that stays
            self.undo()
        elif self.set_aside and other_holder(self.run_dir) is None:  # not a directory another run took over
            put_back(self.run_dir)

    def undo(self) -> None:
        """Take back what the start changed (see record), put back what it set aside, and remove the lock
        file and the directories the lock created (only if empty: nothing else may be lost)."""
        d = self.run_dir
        for name, data in (self.files or {}).items():
            if data is None:
                (d / name).unlink(missing_ok=True)
            else:
                write_atomically(d / name, lambda f, data=data: f.write(data), what="restore")
        if self.files is not None:
            metrics, tensorboard = d / "metrics.jsonl", d / "tensorboard"
            if self.metrics_size is None:
                metrics.unlink(missing_ok=True)
            elif metrics.is_file() and metrics.stat().st_size > self.metrics_size:
                os.truncate(metrics, self.metrics_size)
            if self.tensorboard is None:
                shutil.rmtree(tensorboard, ignore_errors=True)
            elif tensorboard.is_dir():
                for name in set(os.listdir(tensorboard)) - self.tensorboard:
                    (tensorboard / name).unlink(missing_ok=True)
        if self.set_aside:
            put_back(d)
        if not self.lock_existed:
            (d / LOCK_FILE).unlink(missing_ok=True)
        for directory in self.created:  # the deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def put_back(run_dir: Path) -> bool:
    """Finish what an --overwrite start in `run_dir` left in REPLACED (rank 0, holding the run's lock). Before
    the new run's first complete save (or its final/ weights) the earlier run is put back, the new run's files
    deleted (they hold no checkpoint: nothing to resume); after it, the set-aside run is deleted (a start
    killed between the two). Returns whether the earlier run was put back."""
    replaced = run_dir / REPLACED
    if not replaced.is_dir():
        return False
    if saved_steps(run_dir / "checkpoints") or (run_dir / "final").is_dir():  # a save is renamed into place whole
        shutil.rmtree(replaced)
        return False
    for name in RUN_FILES:
        if os.path.lexists(run_dir / name):
            remove(run_dir / name)
    for name in os.listdir(replaced):
        os.replace(replaced / name, run_dir / name)
    os.rmdir(replaced)
    return True


def put_back_replaced(run_dir: str | os.PathLike[str]) -> str | None:
    """What `train` does first, on rank 0: put back the run an --overwrite start killed before its first
    checkpoint set aside (put_back), unless another process holds the directory (a start still under way:
    its own lock check refuses). Returns a note when a run was put back."""
    run_dir = Path(run_dir)
    if not (run_dir / REPLACED).is_dir() or other_holder(run_dir) is not None:
        return None
    with locked(run_dir):
        if not put_back(run_dir):
            return None
    return (f"{run_dir / REPLACED}: put back the run an --overwrite start had set aside (that start was stopped "
            "before its first checkpoint)")


def set_aside_note(directory: Path) -> str:
    """For a message about `directory` (a run's checkpoints/) holding no save: where the run an --overwrite start
    set aside is, if one did and was stopped before its first checkpoint."""
    aside = directory.parent / REPLACED / "checkpoints"
    if directory.name != "checkpoints" or not (aside.is_dir() and saved_steps(aside)):
        return ""
    return (f"; the earlier run, set aside by an --overwrite start stopped before its first checkpoint, is in "
            f"{aside} (the next `python -m fasttrain.train` there puts it back)")


def pointed(directory: Path, pointer: str) -> Path | None:
    """The file that `directory/<pointer>` names, or None if there is no such pointer.

    UsageError if the pointer cannot be read or does not hold a save's file name (a damaged
    or hand-edited pointer must not become a path: it could name anything)."""
    path = directory / pointer
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(f"{directory}: is not a directory, so it holds no checkpoints; "
                         "name a checkpoint file (step_*.pt) instead") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a pointer file; name a checkpoint file (step_*.pt) "
                         "instead") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        name = None
    if name is None or not SAVE_NAME.fullmatch(name):
        raise UsageError(f"{path}: does not name a checkpoint file (it should hold a name like step_0000100.pt); "
                         "name a checkpoint file (step_*.pt) instead")
    return directory / name


def make_directory(path: Path) -> None:
    """mkdir -p `path`; UsageError naming it if the disk or the permissions refuse."""
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot save checkpoint ({e.strerror or e})") from None


def sync_directory(path: Path) -> None:
    """fsync the directory `path`: the names in it (a renamed folder, new files) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dcp_exception() -> type[BaseException]:
    """DCP's CheckpointException (a BaseException): what a failed collective save raises on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def point(directory: Path, pointer: str, path: Path) -> None:
    """Make `directory/<pointer>` name the save `path` (atomically)."""
    name = path.name.encode("utf-8")
    write_atomically(directory / pointer, lambda f: f.write(name), what="update the checkpoint pointer")


def resolve(spec: str, out_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint file that `--resume spec` means.

    "auto" is the latest save of the run in `out_dir`; a directory (a run directory or
    its checkpoints/) is its latest save (the newest step when there is no `latest` pointer yet);
    a pointer file (checkpoints/latest or best) is the save it names; anything else is a
    checkpoint file's path.
    """
    if spec != "auto" and (not Path(spec).is_dir() or is_sharded(Path(spec).resolve())):
        path = Path(spec)
        if path.is_symlink():  # a link to checkpoints/latest names a save beside its target, not beside the link
            path = path.resolve()
        if path.name in ("latest", "best") and path.is_file():
            named = pointed(path.parent, path.name)
            if not named.exists():
                raise UsageError(f"{path}: names {named.name}, which is missing")
            return named
        return path
    run = Path(out_dir if spec == "auto" else spec)
    directory = run if (run / "latest").exists() or run.name == "checkpoints" else run / "checkpoints"
    latest = pointed(directory, "latest")
    if latest is None:  # none yet, or the first save is in place and its pointer not (a run killed in between)
        saved = saved_steps(directory) if directory.is_dir() else []
        if not saved:
            raise UsageError(f"{directory}: no checkpoint saved there yet, so nothing to resume or export"
                             f"{set_aside_note(directory)}")
        return saved[-1]  # a save is renamed into place whole: one that exists is complete
    if not latest.exists():
        raise UsageError(f"{directory / 'latest'}: names {latest.name}, which is missing; "
                         "name a checkpoint file (step_*.pt) instead")
    return latest


def check_kept_tokenizer(data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> None:
    """UsageError, naming both files, if the run in `run_dir` kept a tokenizer.json (keep_tokenizer) and the
    data's is no longer that one: a resume would read token ids that mean other text."""
    data, kept = Path(data_dir) / "tokenizer.json", Path(run_dir) / "tokenizer.json"
    if kept.is_file() and kept.read_bytes() != data.read_bytes():
        raise UsageError(f"{data}: differs from {kept}, the tokenizer this run trained with ({data_dir} was "
                         "prepared again since); resume it on the data it was trained on, or start a new run")


def keep_tokenizer(data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> None:
    """Copy the data's tokenizer.json into the run directory, atomically (rank 0): the run's checkpoints decode
    with that copy even after data.dir is prepared again (a resume checks it first: check_kept_tokenizer)."""
    tokenizer = (Path(data_dir) / "tokenizer.json").read_bytes()
    write_atomically(Path(run_dir) / "tokenizer.json", lambda f: f.write(tokenizer), what="copy the run's tokenizer")


def check_own(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> None:
    """UsageError if `path` is a save of another run (in another run directory's checkpoints/) while
    `directory` holds this run's own saves or events: resuming it there would prune this run's saves, point
    its `latest` at the other's lineage and mix both in metrics.jsonl. Into a new directory, or from a
    checkpoint file outside any run's checkpoints/, a run may start from it."""
    parent, own = Path(path).resolve().parent, Path(directory).resolve()
    if parent.name != "checkpoints" or parent == own:
        return
    if saved_steps(own) or (own / "latest").exists() or (own.parent / "metrics.jsonl").exists():
        raise UsageError(f"{path}: a checkpoint of the run in {parent.parent}, but train.out_dir = {own.parent} "
                         f"holds a run of its own; resume that one with train.out_dir = {parent.parent}, or start "
                         "from it in a new directory")


def load(path: str | os.PathLike[str], device: torch.device | str = "cpu", whole_model: bool = True) -> dict:
    """The state saved at `path`; UsageError if it is missing, damaged, unsafe or not a fasttrain checkpoint.

    A sharded checkpoint's (a folder) holds no "optimizer" here but its "optimizer_groups", and "model" only if
    `whole_model`: its weights read whole (for the tools; a resume reads each rank's part: Checkpointer)."""
    path = Path(path)
    sharded = is_sharded(path)
    state = read_trusted(path / STATE_FILE if sharded else path, device, path)
    if sharded:
        sharded_files.check_complete(path)
        checksums.verify(path, state.get("checksums") if isinstance(state, dict) else None)
        if whole_model and isinstance(state, dict):
            state["model"] = sharded_files.read_whole(path, "model", path)
    missing = [k for k in (("optimizer_groups", "step", "config") if sharded else REQUIRED_KEYS)
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"{path}: not a fasttrain checkpoint (no {', '.join(missing)})")
    return state


def read_trusted(file: Path, device: torch.device | str, path: Path):
    """What `torch.load(weights_only=True)` reads from `file` (of the checkpoint at `path`), its records' checksums
    checked first: tensors, numbers, strings and containers, never code to run; UsageError naming `path` (or
    `file`) otherwise."""
    if file.is_file():
        checksums.check_records(file)
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{file}: no such checkpoint") from None
    except Exception as e:  # truncated, corrupt, or holding objects other than tensors and plain values
        reason = " ".join(str(e).split("\n")[0].split())[:160]
        raise UsageError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {reason})") from None


def saved_config(state: dict, path: str | os.PathLike[str]) -> Config:
    """The config the run that saved `state` (from `path`) used."""
    return parse_config(state["config"], f"{path} (its saved config)")


def check_same_model(saved_cfg: Config, cfg: Config, path: str | os.PathLike[str]) -> None:
    """UsageError naming every [model] key in which `cfg` differs from `saved_cfg`, the config of the run
    that saved the checkpoint at `path`."""
    saved = saved_cfg.model
    differ = [f"model.{f.name} = {getattr(saved, f.name)!r} there, {getattr(cfg.model, f.name)!r} here"
              for f in fields(saved) if f.name not in RESHAPE_FREE
              and getattr(saved, f.name) != getattr(cfg.model, f.name)]
    if differ:
        raise UsageError(f"{path}: saved by a model of another shape ({'; '.join(differ)}); "
                         "resume with the config that run was started with")


def check_same_optimizer(saved_cfg: Config, cfg: Config, path: str | os.PathLike[str]) -> None:
    """UsageError unless the checkpoint at `path`, saved with `saved_cfg`, comes from a run of `cfg`'s
    optimizer: each keeps a state of its own."""
    saved = saved_cfg.optim.name
    if saved != cfg.optim.name:
        raise UsageError(f'{path}: saved by a run with optim.name = "{saved}", this one has "{cfg.optim.name}": '
                         "one optimizer cannot continue from another's state; resume with the same optim.name")


def rng_state() -> dict:
    """Python's, NumPy's and torch's (CPU and every CUDA device) generator states, in types torch.load accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Seed every generator from (train.seed, step, rank): the random state of a rank that has no saved one."""
    seed_everything(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def world_change(saved_size: int, saved_parallel: str | None, size: int, parallel: str) -> list[str]:
    """What a resume on `size` processes in `parallel` mode says about a checkpoint saved by `saved_size`
    in `saved_parallel`: nothing in the same world."""
    if (saved_size, saved_parallel) == (size, parallel):
        return []
    note = (f"saved by {saved_size} process(es) ({saved_parallel}), continued by {size} ({parallel}): the model and "
            "optimizer state are whole, and the data stream goes on from the same global batch")
    if size > saved_size:
        note += (f"; ranks {saved_size}-{size - 1} have no saved random state, seeded from train.seed, the step "
                 "and the rank")
    return [note]


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class InFlight:
    """A save whose background write is under way: what publishing it needs once `future` is done."""

    future: Future
    staging: Path
    path: Path
    rest: dict
    best: bool
    keep: Path | None


class Checkpointer:
    """Saves and restores the state of `model` and `updater`, with the RunState and loader given per
    call, in `cfg.train.out_dir`/checkpoints. Every rank must call `save` and `restore`. A sharded save
    (checkpoint.format) has every rank write its own part into a folder; a file save gathers the whole
    state onto rank 0, which writes it while the others wait. Either kind is restored in any world."""

    def __init__(self, cfg: Config, model: nn.Module, updater: Updater, world: distributed.World, parallel: str,
                 device: torch.device):
        self.cfg, self.model, self.updater, self.world, self.parallel = cfg, model, updater, world, parallel
        self.device = device  # where a restored state's tensors go
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
            "scaler": self.updater.scaler.state_dict(),
            **run.state_dict(),  # "step" is the LR schedule's position too
            "ranks": distributed.gather({"train_loader": loader.state_dict(), "rng": rng_state()}, self.world),
            "parallel": self.parallel,
            "config": config_to_toml(self.cfg),
        }

    def state_dict(self, run: RunState, loader: TokenLoader) -> dict:
        """Everything needed to continue the run exactly: what a checkpoint file holds."""
        model, optimizer = distributed.full_state(self.model, self.updater.optimizer,
                                                  self.parallel in distributed.SHARDED)
        return {"model": model, "optimizer": optimizer, **self.run_state(run, loader)}

    def save(self, run: RunState, loader: TokenLoader, best: bool = False, keep: Path | None = None) -> Path:
        """Save the run at `run.step`; returns the file or folder. Keeps the newest `checkpoint.keep_last`
        saves, the best one (this save if `best`) and `keep`."""
        if self.sharded:
            return self.save_sharded(run, loader, best, keep)
        state = self.state_dict(run, loader)
        path = path_for(self.directory, run.step)
        if self.world.is_main:
            self.check_still_ours()
            path = save(state, self.directory, run.step, self.cfg.checkpoint.keep_last, best, keep)
        distributed.barrier(self.world)
        return path

    def save_sharded(self, run: RunState, loader: TokenLoader, best: bool, keep: Path | None) -> Path:
        """Every rank writes its part into `.step_N.tmp/`, rank 0 adds state.pt, fsyncs the folder and renames
        it `step_N/`, then moves the pointers and prunes: complete or invisible, as a file save. With
        checkpoint.async_save this returns once the state is copied to CPU memory, and the rest is done when the
        write is (`wait`)."""
        self.wait()  # the save still in flight, if any, comes first
        path = path_for(self.directory, run.step, sharded=True)
        staging = self.directory / f".{path.name}.tmp"
        rest = self.run_state(run, loader)
        model, optimizer = distributed.local_state(self.model, self.updater.optimizer)
        rest["optimizer_groups"] = optimizer["param_groups"]
        if self.world.is_main:
            self.check_still_ours()
            clear_stale(self.directory)
            make_directory(staging)
        distributed.barrier(self.world)
        state = {"model": model, "optimizer": {"state": optimizer["state"]}}
        if self.background:
            self.in_flight = InFlight(sharded_files.write_async(staging, state, self.write_group, self.world.is_main),
                                      staging, path, rest, best, keep)
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
            if path.exists():  # this step saved before (a folder cannot be renamed over): set it aside
                os.rename(path, self.directory / f".{path.name}.old.tmp")
            os.rename(staging, path)
            sync_directory(self.directory)
        except OSError as e:
            raise UsageError(f"{path}: cannot save checkpoint ({e.strerror or e})") from None
        clear_stale(self.directory)
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
                remove(flight.staging)
                print(f"warning: {flight.path}: the background checkpoint write failed ({sharded_files.one_line(e)}); "
                      f"latest still names {pointed(self.directory, 'latest')}", file=sys.stderr, flush=True)
            return
        self.unsettled = (flight.path, False)
        if self.world.is_main:
            self.publish_folder(flight.staging, flight.path, {**flight.rest, "checksums": sums}, flight.best,
                                flight.keep)

    def settle(self) -> Path | None:
        """Wait for the save in flight; the last background save waited for (here or by an earlier `poll`) if
        its write failed on any rank, else None: a save that is no way back. Every rank must call it at the
        same point; they all get the same answer."""
        if not self.background:
            return None
        self.wait()
        done, self.unsettled = self.unsettled, None
        if done is None or not distributed.any_rank(done[1], self.world, self.device):
            return None
        # A failed write of a step saved before (a resumed run's evaluation saves it again) left that save whole.
        return None if distributed.any_rank(done[0].exists(), self.world, self.device) else done[0]

    def restore(self, path: str | Path, loader: TokenLoader, accumulation: int
                ) -> tuple[RunState, Config, list[str]]:
        """Load the checkpoint at `path` into the model, optimizer, scaler, `loader` and the random
        generators; returns its RunState, the config it was saved with and notes for the user. A checkpoint
        saved by another number of processes or another parallel mode continues the data stream at the same
        global batch, split over this world (loader.reshard; `accumulation`: this run's micro-batches per step,
        which a mixture's loader counts in); a rank with no saved random state gets one seeded from train.seed,
        the step and its rank. UsageError if it comes from a model of another shape,
        another optimizer, a position this world cannot continue from, or cannot be loaded."""
        self.wait()  # a rollback may go back to the save in flight
        path = Path(path)
        state = load(path, self.device, whole_model=False)
        saved = saved_config(state, path)  # parsed once: the checks below and the caller read it
        check_same_model(saved, self.cfg, path)
        check_same_optimizer(saved, self.cfg, path)
        try:
            ranks, rank = state["ranks"], self.world.rank
            position = reshard([r["train_loader"] for r in ranks], rank, self.world.size,
                               state["step"] * accumulation)
            if is_sharded(path):
                model, optimizer = distributed.local_state(self.model, self.updater.optimizer)
                sharded_files.read_into(path, {"model": model, "optimizer": {"state": optimizer["state"]}})
                distributed.load_local_state(self.model, self.updater.optimizer, model,
                                             {"state": optimizer["state"], "param_groups": state["optimizer_groups"]})
            else:
                distributed.load_full_state(self.model, self.updater.optimizer, state["model"], state["optimizer"],
                                            self.parallel in distributed.SHARDED)
            self.updater.scaler.load_state_dict(state["scaler"])
            loader.load_state_dict(position)
            if rank < len(ranks):
                set_rng_state(ranks[rank]["rng"])
            else:
                seed_rng(self.cfg.train.seed, state["step"], rank)
            run = RunState.from_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, UsageError) as e:
            raise UsageError(f"{path}: cannot continue from it ({str(e).splitlines()[0]})") from None
        return run, saved, world_change(len(ranks), state.get("parallel"), self.world.size, self.parallel)

    def point_latest(self, path: Path) -> None:
        """Make `latest` name `path` again (after a rollback to it), so a resume starts there too."""
        if self.world.is_main:
            self.check_still_ours()
            point(self.directory, "latest", path)
        distributed.barrier(self.world)

    def check_still_ours(self) -> None:
        """UsageError if another process now holds the run directory (this one was removed, say with rm -rf,
        and a new run started there): its checkpoints must not be pruned or its `latest` moved by this run."""
        holder = other_holder(self.directory.parent)
        if holder is not None:
            raise UsageError(f"{self.directory.parent}: now held by another run ({holder}), so this run's directory "
                             "was removed or replaced; stopping without saving, pruning or pointing at anything there")

    def latest(self) -> Path | None:
        """The newest complete save, or None before the first; a save in flight is waited for first."""
        self.wait()
        return pointed(self.directory, "latest")

    def history(self, upto: Path) -> list[Path]:
        """The saves in this run's checkpoints/ from before `upto`'s step, oldest first, then `upto`:
        what a run resumed from `upto` can go back to (policies.Recovery)."""
        if SAVE_NAME.fullmatch(upto.name) is None:  # a checkpoint file renamed by hand: no step to compare
            return [upto]
        return [p for p in saved_steps(self.directory) if step_of(p) < step_of(upto)] + [upto]

    def claim(self, overwrite: bool, start: RunStart | None) -> None:
        """Make the run directory ready for a new run: every rank checks (check_new_run), rank 0 claims it
        with `start`."""
        check_new_run(self.directory.parent, overwrite)
        if start is not None:
            start.claim(overwrite)
        distributed.barrier(self.world)
