"""A run directory and a run's start in it: the checks that a new run may start there or a resumed one go on
there, what an --overwrite start sets aside and puts back (RunStart), and the tokenizer a run keeps.

Its checkpoints/ holds the run's saves (saves.py); the rest of what a run and the tools write at its top is
RUN_FILES.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from fasttrain.checkpoints.saves import remove, saved_steps, step_of
from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import RunStopped, UsageError
from fasttrain.system.run_lock import LOCK_FILE, locked, other_holder
from fasttrain.training.metrics import WANDB_ID_FILE

# What a run and the tools write at the top of its run directory: what --overwrite replaces. Other files
# there (a user's notes, wandb/ with its offline runs) are never touched.
RUN_FILES = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "config.toml",
    "tokenizer.json",
    "tensorboard",
    WANDB_ID_FILE,
    "export",
    "export-hf",
    "curves.png",
)
REPLACED = ".replaced-by-overwrite"  # the earlier run's RUN_FILES, until the new run's first complete save


def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """UsageError if a new run cannot start in `run_dir`: its checkpoints/ holds another run's saves (unless
    `overwrite`), or is not a directory."""
    directory = run_dir / "checkpoints"
    if directory.exists() and not directory.is_dir():  # found now, not at the first save after training
        raise UsageError(
            f"{directory}: is not a directory, so no checkpoint can be saved there; move it away "
            "or set train.out_dir elsewhere"
        )
    if (run_dir / REPLACED).is_dir():  # `train` puts it back first (put_back_replaced): another start left it
        raise UsageError(
            f"{run_dir / REPLACED}: holds the run an --overwrite start set aside and stopped before "
            "its first checkpoint; `python -m fasttrain.train` puts it back when it starts there"
        )
    saved = saved_steps(directory)
    if saved and not overwrite:
        raise UsageError(
            f"{directory}: holds checkpoints of an earlier run (up to step {step_of(saved[-1])}); continue it "
            "with --resume auto, start over with --overwrite, or set train.out_dir elsewhere"
        )


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
        self.files = {
            name: (d / name).read_bytes() if (d / name).is_file() else None
            for name in ("config.toml", "tokenizer.json", WANDB_ID_FILE)
        }
        self.metrics_size = (d / "metrics.jsonl").stat().st_size if (d / "metrics.jsonl").is_file() else None
        self.tensorboard = set(os.listdir(d / "tensorboard")) if (d / "tensorboard").is_dir() else None

    def started(self) -> None:
        """The first step is done: what the start changed is not taken back now (the run set aside still is,
        until the first complete save)."""
        self.done = True

    def __enter__(self) -> RunStart:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
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
                content: bytes = data  # written now, in this iteration: the closure sees this file's bytes
                write_atomically(d / name, lambda f: f.write(content), what="restore")
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
    return (
        f"{run_dir / REPLACED}: put back the run an --overwrite start had set aside (that start was stopped "
        "before its first checkpoint)"
    )


def set_aside_note(directory: Path) -> str:
    """For a message about `directory` (a run's checkpoints/) holding no save: where the run an --overwrite start
    set aside is, if one did and was stopped before its first checkpoint."""
    aside = directory.parent / REPLACED / "checkpoints"
    if directory.name != "checkpoints" or not (aside.is_dir() and saved_steps(aside)):
        return ""
    return (
        f"; the earlier run, set aside by an --overwrite start stopped before its first checkpoint, is in "
        f"{aside} (the next `python -m fasttrain.train` there puts it back)"
    )


def check_kept_tokenizer(data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> None:
    """UsageError, naming both files, if the run in `run_dir` kept a tokenizer.json (keep_tokenizer) and the
    data's is no longer that one: a resume would read token ids that mean other text."""
    data, kept = Path(data_dir) / "tokenizer.json", Path(run_dir) / "tokenizer.json"
    if kept.is_file() and kept.read_bytes() != data.read_bytes():
        raise UsageError(
            f"{data}: differs from {kept}, the tokenizer this run trained with ({data_dir} was "
            "prepared again since); resume it on the data it was trained on, or start a new run"
        )


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
        raise UsageError(
            f"{path}: a checkpoint of the run in {parent.parent}, but train.out_dir = {own.parent} "
            f"holds a run of its own; resume that one with train.out_dir = {parent.parent}, or start "
            "from it in a new directory"
        )
