"""A run directory and a run's start in it: the checks that a new run may start there or a resumed one go on
there, what an --overwrite start sets aside and puts back (RunStart; journalled, so that a start killed at any
point is finished or undone exactly by the next), and the tokenizer a run keeps.

Imports from fasttrain: checkpoints.saves, system.atomic, system.errors, system.run_lock.

Its checkpoints/ holds the run's saves (saves.py); the rest of what a run and the tools write at its top is RUN_FILES.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
from pathlib import Path

from fasttrain.checkpoints.saves import has_saves, saved_steps, step_of
from fasttrain.system.atomic import read_regular, sync_directory, write_atomically
from fasttrain.system.errors import RunStopped, UsageError
from fasttrain.system.run_lock import LOCK_FILE, locked, other_holder

WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the W&B run a resumed run continues
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
# A distilled run's first round of members, inside its run directory (training/phases.py, members_dir): what the tools
# name where the run itself has no save yet (members_note)
MEMBERS_DIR = "ensemble"
DISCARDED = ".discarded-by-overwrite"  # the new run's RUN_FILES on their way out while the earlier run is put back
# The journal of an --overwrite start: the phase it is in and the names of the earlier run's RUN_FILES. Each phase
# is written (file and directory fsync'd) before the first move or deletion it announces, and the journal is
# removed last, so the next start knows which entries are whose and finishes the phase (settle).
JOURNAL = ".overwrite.json"
SETTING_ASIDE = "setting-aside"  # moving the names into REPLACED; the new run has written nothing yet
SET_ASIDE = "set-aside"  # all moved: every RUN_FILES entry at the top is now the new run's
PUTTING_BACK = "putting-back"  # the new run's entries into DISCARDED, the names back from REPLACED
DISCARDING = "discarding"  # the new run has a complete save: REPLACED is being deleted
PHASES = (SETTING_ASIDE, SET_ASIDE, PUTTING_BACK, DISCARDING)
# What a start writes at the top through a temporary `.NAME.PID.tmp` (write_atomically): one killed in the middle
# of a write leaves that file, which the next start removes (finish_overwrite).
WRITTEN_ATOMICALLY = ("config.toml", "tokenizer.json", WANDB_ID_FILE, JOURNAL)
# What a new run can do instead of starting in a directory that holds an earlier run (earlier_run).
EARLIER_RUN_CHOICES = "continue it with --resume auto, start over with --overwrite, or set train.out_dir elsewhere"


def saves_to_resume(run_dir: str | os.PathLike[str]) -> bool:
    """Whether `run_dir` holds saves that `--resume auto` goes on from: in its checkpoints/, or in those an --overwrite
    start set aside and has not replaced yet (finish_overwrite puts them back)."""
    return has_saves(Path(run_dir) / REPLACED / "checkpoints") or has_saves(Path(run_dir) / "checkpoints")


def check_run_folder(run_dir: Path) -> None:
    """UsageError where `run_dir` is another kind of folder, whose files a run there would write over: a prepared data
    folder (its tokenizer.json), a model's weights (a run's final/, an export: their config.toml), or a run's
    checkpoints/ (beside its saves); or a file, or a path through one."""
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"train.out_dir = {run_dir}: {blocking} is a file, not a folder; set train.out_dir elsewhere")
    if (run_dir / "meta.json").is_file():
        what = "a prepared data folder (a run there would write its tokenizer.json over the data's)"
    elif os.path.lexists(run_dir / "model.safetensors"):
        what = "a model's weights (a run's final/ or an export), not a run directory"
    elif saved_steps(run_dir) or os.path.lexists(run_dir / "latest"):
        what = "a run's checkpoints/ folder, not a run directory"
    else:
        return
    raise UsageError(f"train.out_dir = {run_dir}: {what}; set train.out_dir elsewhere")


def check_writable(run_dir: Path, resumed: bool) -> None:
    """UsageError where the run in `run_dir` could not write its saves or its final/ weights, found now rather than
    after the training: checkpoints/ or final/ there but not a folder it can write in (a `resumed` run's checkpoints/
    that is no folder holds no save: the resume's own check says so)."""
    for name, what in (("checkpoints", "no checkpoint"), ("final", "no final weights")):
        path = run_dir / name
        if not os.path.lexists(path) or (resumed and name == "checkpoints" and not path.is_dir()):
            continue
        if not path.is_dir():
            raise UsageError(f"{path}: is not a directory, so {what} can be saved there; move it away")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{path}: not writable, so {what} can be saved there; let the run write in it")


def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """UsageError if a new run cannot start in `run_dir`: its checkpoints/ holds another run's saves (unless
    `overwrite`), or an --overwrite start there stopped halfway."""
    left = run_dir / JOURNAL if os.path.lexists(run_dir / JOURNAL) else run_dir / REPLACED
    if os.path.lexists(left):  # `train` finishes it first (finish_overwrite): another start left it
        raise UsageError(
            f"{left}: left by an --overwrite start stopped before its first checkpoint; `python -m fasttrain.train` "
            "puts the earlier run back (or finishes replacing it) when it starts there"
        )
    earlier = earlier_run(run_dir)
    if earlier and not overwrite:
        raise UsageError(f"{earlier}; {EARLIER_RUN_CHOICES}")


def earlier_run(run_dir: Path) -> str | None:
    """Where `run_dir` holds an earlier run, which a new run there would refuse, in words: its checkpoints (up to
    which step), or without them its final/ weights (a distilled run's one member published there keeps no
    checkpoints in the run directory, and a user may have removed them to save room); None where it holds neither."""
    directory = run_dir / "checkpoints"
    saved = saved_steps(directory)
    if saved:
        return f"{directory}: holds checkpoints of an earlier run (up to step {step_of(saved[-1])})"
    final = run_dir / "final"
    if os.path.lexists(final / "model.safetensors"):
        return f"{final}: holds an earlier run's model"
    return None


class RunStart:
    """A new or resumed run starting in `run_dir`, on rank 0, as a `with` block around its start: what the start changes
    in the directory is taken back if it fails before its first step, and a directory that did not exist is not left
    behind; every check that can refuse the run comes before it. `claim(overwrite=True)` moves the earlier run's
    RUN_FILES into REPLACED (set_aside) until the new run has a resumable save, whose completion (`publish`), or a run
    that ends without error, deletes them. Until then a failed start puts the earlier run back, and after a start killed
    outright the next `train` there does (finish_overwrite); `sample`, `evaluate`, `export` and `--resume` say where it
    is (set_aside_note). Every move and deletion is journalled (JOURNAL): a kill at any point leaves the earlier run
    whole, or the new one once it has saved, never a mix."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created = [d for d in (run_dir, *run_dir.parents) if not os.path.lexists(d)]  # the lock makes them
        self.lock_existed = os.path.lexists(run_dir / LOCK_FILE)
        self.replacing = self.done = False
        self.files: dict[str, bytes | None] | None = None  # what `record` found
        self.metrics_size: int | None = None
        self.tensorboard: set[str] | None = None

    def claim(self, overwrite: bool) -> None:
        """Clear the directory for a new run (checked first: check_new_run): set the earlier run aside if
        `overwrite`."""
        if overwrite:
            self.replacing = True  # before the first move: a start failing in the middle of them is undone too
            set_aside(self.run_dir)

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
            if self.replacing:
                discard_set_aside(self.run_dir)
        elif not self.done and not isinstance(error, RunStopped):  # a stop saves a checkpoint: that stays
            try:
                self.undo()
            except (UsageError, OSError) as failed:  # the start's own failure is the one to say (a read-only folder
                # fails both); that it could not be taken back is said with it
                why = failed if isinstance(failed, UsageError) else f"{failed.filename}: {failed.strerror or failed}"
                if isinstance(error, UsageError):
                    raise UsageError(f"{error} (nor could the start be taken back: {why})") from None
                print(f"error: {why}", file=sys.stderr)  # beside the failure's own traceback, which follows
        elif self.replacing and other_holder(self.run_dir) is None:  # not a directory another run took over
            settle(self.run_dir)

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
        if self.replacing:
            settle(d)
        if not self.lock_existed:
            (d / LOCK_FILE).unlink(missing_ok=True)
        for directory in self.created:  # the deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def set_aside(run_dir: Path) -> None:
    """Move the earlier run's RUN_FILES in `run_dir` into REPLACED (rank 0, holding the lock), their names journalled
    first, so a start killed between two moves is undone by the next (settle)."""
    names = [name for name in RUN_FILES if os.path.lexists(run_dir / name)]
    if not names:
        return
    write_journal(run_dir, SETTING_ASIDE, names)
    replaced = run_dir / REPLACED
    replaced.mkdir()
    for name in names:
        os.rename(run_dir / name, replaced / name)
    sync_directory(replaced)
    sync_directory(run_dir)  # the moves out of it on disk before the phase that makes the top the new run's
    write_journal(run_dir, SET_ASIDE, names)


def settle(run_dir: Path) -> bool:
    """Finish what an --overwrite start in `run_dir` left unfinished, as its journal says (rank 0): put the earlier run
    back, unless the new run has a complete save. Returns whether it was put back."""
    journal = read_journal(run_dir)
    if journal is None:
        return False
    phase, names = journal
    if phase == DISCARDING or (phase == SET_ASIDE and saved_steps(run_dir / "checkpoints")):
        discard(run_dir, phase, names)
        return False
    put_back(run_dir, phase, names)
    return True


def put_back(run_dir: Path, phase: str, names: list[str]) -> None:
    """Put the earlier run's `names` back from REPLACED, journalled in `phase`, the new run's entries set aside in
    DISCARDED first; a put-back killed at any point is finished by the next."""
    if phase != PUTTING_BACK:  # before any move: a save back at the top must not read as the new run's
        write_journal(run_dir, PUTTING_BACK, names)
    replaced, discarded = run_dir / REPLACED, run_dir / DISCARDED
    discarded.mkdir(exist_ok=True)
    for name in RUN_FILES:
        here, aside = run_dir / name, replaced / name
        earlier = name in names and os.path.lexists(aside)
        if os.path.lexists(here) and (earlier or name not in names):  # the new run's
            os.rename(here, discarded / name)
        if earlier:
            os.rename(aside, here)
    sync_directory(run_dir)
    shutil.rmtree(discarded)
    if replaced.is_dir():
        if os.listdir(replaced):
            raise UsageError(
                f"{replaced}: holds {', '.join(sorted(os.listdir(replaced)))} besides the files an --overwrite start "
                f"set aside, which are back in {run_dir}; move them away"
            )
        replaced.rmdir()
    (run_dir / JOURNAL).unlink()
    sync_directory(run_dir)


def discard(run_dir: Path, phase: str, names: list[str]) -> None:
    """Delete the earlier run set aside in REPLACED (the new run has a complete save), journalled in `phase`:
    a deletion killed halfway is finished by the next start."""
    if phase != DISCARDING:
        write_journal(run_dir, DISCARDING, names)
    shutil.rmtree(run_dir / REPLACED, ignore_errors=True)
    if not os.path.lexists(run_dir / REPLACED):  # else (a permission refused) the next start tries again
        (run_dir / JOURNAL).unlink()
        sync_directory(run_dir)


def discard_set_aside(run_dir: Path) -> None:
    """The new run in `run_dir` has a complete save (or its final/ weights): delete the run its --overwrite start
    set aside, if one is wholly set aside (rank 0). Cheap when there is none: every save asks."""
    journal = read_journal(run_dir)
    if journal is not None and journal[0] in (SET_ASIDE, DISCARDING):
        if (run_dir / "checkpoints").is_dir():  # the save's rename on disk before the phase that trusts it
            sync_directory(run_dir / "checkpoints")
        discard(run_dir, *journal)


def write_journal(run_dir: Path, phase: str, names: list[str]) -> None:
    """Record `phase` and the earlier run's `names` in the journal, on disk before this returns."""
    data = json.dumps({"phase": phase, "names": names}).encode()
    write_atomically(run_dir / JOURNAL, lambda f: f.write(data), what="record what --overwrite moves")
    sync_directory(run_dir)


def read_journal(run_dir: Path) -> tuple[str, list[str]] | None:
    """The phase and names the journal in `run_dir` records; None without one. UsageError if it is not one
    fasttrain wrote."""
    path = run_dir / JOURNAL
    if not os.path.lexists(path):
        return None
    try:
        record = json.loads(read_regular(path, 4096, "record of an --overwrite"))
        phase, names = record["phase"], record["names"]
    except (ValueError, KeyError, TypeError):  # a UnicodeDecodeError is a ValueError
        phase, names = None, None
    if phase not in PHASES or not isinstance(names, list) or not all(name in RUN_FILES for name in names):
        raise UsageError(
            f"{path}: not the record of an --overwrite start (its phase and the names it moves); "
            f"put back by hand what {run_dir / REPLACED} holds, or delete it, then remove {path}"
        )
    return phase, names


def finish_overwrite(run_dir: str | os.PathLike[str]) -> str | None:
    """What `train` does first, on rank 0: finish a killed --overwrite start (settle) and remove a killed write's
    temporary files (final/'s, a whole copy of the weights, once the process that wrote it has ended), unless another
    process holds the directory. A note if the earlier run was put back."""
    run_dir = Path(run_dir)
    stale = [p for name in WRITTEN_ATOMICALLY for p in run_dir.glob(f".{glob.escape(name)}.*.tmp")]
    stale += [p for p in run_dir.glob(".final.*.tmp") if not writer_alive(p)]  # a copy of final/'s weights each
    journal = os.path.lexists(run_dir / JOURNAL)
    if not (stale or journal or (run_dir / REPLACED).is_dir()) or other_holder(run_dir) is not None:
        return None
    if not journal and (run_dir / REPLACED).is_dir():  # nothing says which files are whose: none is moved
        raise UsageError(
            f"{run_dir / REPLACED}: holds files an --overwrite start set aside with no record of which or how far "
            f"it got (an earlier fasttrain's); move back into {run_dir} those of the run to keep, then remove it"
        )
    with locked(run_dir):
        for path in stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not settle(run_dir):
            return None
    return (
        f"{run_dir / REPLACED}: put back the run an --overwrite start had set aside (that start was stopped "
        "before its first checkpoint)"
    )


def writer_alive(temporary: Path) -> bool:
    """Whether the process whose id names `temporary` (`.NAME.PID.tmp`: atomic.folder_atomically's, phases.publish's)
    still runs, so may still be writing it; an id that is not a number is taken as running (the file left alone)."""
    try:
        os.kill(int(temporary.name.split(".")[-2]), 0)
    except ValueError:
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that id
        return True
    return True


def set_aside_note(directory: Path) -> str:
    """For a message about `directory` (a run's checkpoints/) holding no save: where the run an --overwrite start
    set aside is, if one did and was stopped before its first checkpoint."""
    aside = directory.parent / REPLACED / "checkpoints"
    if directory.name != "checkpoints" or not (aside.is_dir() and saved_steps(aside)):
        return ""
    then = (
        "the next `python -m fasttrain.train` there puts it back"
        if os.path.lexists(directory.parent / JOURNAL)
        else "with no record of the set-aside: move it back by hand"
    )
    return f"; the earlier run, set aside by an --overwrite start stopped before its first checkpoint, is in {aside} ({then})"


def members_note(directory: Path) -> str:
    """For a message about `directory` (a run's checkpoints/) holding no save: where a distilled run's members are, if
    the run is one whose student has no save yet (its members training, or trained: their final/ written)."""
    members = directory.parent / MEMBERS_DIR
    if directory.name != "checkpoints" or not members.is_dir():
        return ""
    if (members / "final").is_dir():
        where = f"members are trained, in {members}; its student, training in {directory.parent}, has no save yet"
    else:
        where = f"members are training in {members}, its student in {directory.parent} after them"
    return f"; this distilled run's {where}: fasttrain evaluate {members} --split val scores them (sample and export take it too)"


def check_kept_tokenizer(data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> None:
    """UsageError, naming both files, if the run in `run_dir` kept a tokenizer.json (keep_tokenizer) and the
    data's is no longer that one: a resume would read token ids that mean other text."""
    data, kept = Path(data_dir) / "tokenizer.json", Path(run_dir) / "tokenizer.json"
    if kept.is_file() and kept.read_bytes() != data.read_bytes():
        try:
            json.loads(kept.read_bytes())
        except ValueError:  # the run's own copy is what is damaged, not the data
            raise UsageError(
                f"{kept}: damaged (not JSON), the run's copy of its tokenizer; where {data_dir} is the data it trained "
                f"on, copy {data} over it"
            ) from None
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
    """UsageError if `path` is another run directory's save while `directory` holds this run's saves or events (resuming
    would prune them and mix both runs' metrics); elsewhere it may start from it."""
    parent, own = Path(path).resolve().parent, Path(directory).resolve()
    if parent.name != "checkpoints" or parent == own:
        return
    if saved_steps(own) or (own / "latest").exists() or (own.parent / "metrics.jsonl").exists():
        raise UsageError(
            f"{path}: a checkpoint of the run in {parent.parent}, but train.out_dir = {own.parent} holds a run of its "
            f"own; resume that one with train.out_dir = {parent.parent}, or start from it in a new directory"
        )
