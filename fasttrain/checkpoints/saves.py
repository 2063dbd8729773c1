"""A run's saves in its checkpoints/: their names and steps, the pointers that name them, removing them.

Imports from fasttrain: system.atomic, system.errors.

A run directory's checkpoints/ holds

    step_0000100.pt   a save as one file (checkpoint.format "file", see checkpoint_files.py)
    step_0000100/     or as a folder each rank writes its part of ("sharded", see sharded_files.py)
    latest            the name of the newest complete save
    best              the name of the save with the lowest validation loss

What a save holds, and how one is written, published and read, is checkpoint_files.py's.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import UsageError

SAVE_NAME = re.compile(r"step_(\d+)(\.pt)?")  # a file (gathered) or a folder (sharded)


def step_of(path: Path) -> int:
    """The step of a `step_NNNNNNN.pt` file's or `step_NNNNNNN` folder's name."""
    match = SAVE_NAME.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path.name}: not a save's name (step_NNNNNNN.pt or step_NNNNNNN)")
    return int(match.group(1))


def saved_steps(directory: Path) -> list[Path]:
    """The checkpoints (files and folders) in `directory`, oldest step first."""
    return sorted((p for p in directory.glob("step_*") if SAVE_NAME.fullmatch(p.name)), key=step_of)


def has_saves(directory: Path) -> bool:
    """Whether checkpoints/ `directory` holds a run's saves: a `latest` pointer (a damaged one too: the resume says so)
    or saves without one (the first save was killed before its pointer)."""
    return os.path.lexists(directory / "latest") or bool(saved_steps(directory))


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


def pointed(directory: Path, pointer: str) -> Path | None:
    """The file that `directory/<pointer>` names, or None if there is no such pointer; UsageError if it cannot be read
    or does not hold a save's file name (a damaged pointer must not become a path)."""
    path = directory / pointer
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(
            f"{directory}: is not a directory, so it holds no checkpoints; name a checkpoint file (step_*.pt) instead"
        ) from None
    except IsADirectoryError:
        raise UsageError(
            f"{path}: is a directory, not a pointer file; name a checkpoint file (step_*.pt) instead"
        ) from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        name = None
    if name is None or not SAVE_NAME.fullmatch(name):
        raise UsageError(
            f"{path}: does not name a checkpoint file (it should hold a name like step_0000100.pt); "
            "name a checkpoint file (step_*.pt) instead"
        )
    return directory / name


def point(directory: Path, pointer: str, path: Path) -> None:
    """Make `directory/<pointer>` name the save `path` (atomically)."""
    name = path.name.encode("utf-8")
    write_atomically(directory / pointer, lambda f: f.write(name), what="update the checkpoint pointer")
