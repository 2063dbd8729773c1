"""Checkpoint files: what a save holds, writing one and making it the run's latest, finding the save a `--resume` means,
and reading one back, or only the config its run recorded.

Imports from fasttrain: checkpoints.checksums, checkpoints.run_directory, checkpoints.saves, checkpoints.sharded_files,
config, system.atomic, system.errors.

A checkpoint file is a dict of

    model, optimizer      full (unsharded) state dicts
    scaler                the fp16 GradScaler's state
    step, tokens_seen...  the RunState's fields, at the top level
    ranks                 each rank's training-loader position and random generator states
    parallel              "none", "ddp", "fsdp" or "hsdp": the world that saved it, with len(ranks)
    config                the run's resolved config, as TOML

A sharded folder holds the same: the tensors in DCP's files, the rest (the optimizer's param_groups as
"optimizer_groups") in its state.pt. Either kind resumes in any world.

Files and folders are written under temporary names and renamed (fasttrain/system/atomic.py), and a pointer is updated
only once its save is complete, so a crash at any moment leaves `latest` loadable; old saves are deleted last, never one
a pointer names. Loading uses `torch.load(weights_only=True)` (a folder's metadata a restricted unpickler: never code to
run), after comparing each file with the checksums recorded at the save (checksums.py), so a bit changed on disk is one
line naming the file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from fasttrain.checkpoints import checksums, saves, sharded_files
from fasttrain.checkpoints.run_directory import discard_set_aside, members_note, set_aside_note
from fasttrain.config import Config, load_config, parse_config
from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import UsageError

REQUIRED_KEYS = ("model", "optimizer", "step", "config")  # what marks a file as a fasttrain checkpoint
STATE_FILE = "state.pt"  # in a sharded checkpoint's folder: everything but the model's and optimizer's tensors


def save(
    state: dict, directory: str | os.PathLike[str], step: int, keep_last: int, best: bool, keep: Path | None = None
) -> Path:
    """Write `state` as `directory/step_<step>.pt`, then publish it (see `publish`). Raises UsageError, with
    every earlier save intact, if the disk is full or the directory unwritable."""
    directory = Path(directory)
    path = saves.path_for(directory, step)
    saves.clear_stale(directory)
    write_atomically(path, lambda f: torch.save(state, f), what="save checkpoint")
    return publish(directory, path, keep_last, best, keep)


def publish(directory: Path, path: Path, keep_last: int, best: bool, keep: Path | None = None) -> Path:
    """Point `latest` (and `best` if `best`) at the complete save `path`, then prune: keeps the newest
    `checkpoint.keep_last` saves up to `path`'s step, the one `best` names and `keep`. Saves of later steps are
    another continuation's (one a resume from an earlier save left, or one whose pointer a kill never moved): they
    are neither counted nor pruned here, and this run replaces each as it saves that step."""
    if best:
        saves.point(directory, "best", path)
    saves.point(directory, "latest", path)
    saved = [p for p in saves.saved_steps(directory) if saves.step_of(p) <= saves.step_of(path)]
    kept = set(saved[-keep_last:]) | {saves.pointed(directory, "best"), keep, path}
    for old in saved:
        if old not in kept:
            saves.remove(old)
    discard_set_aside(directory.parent)  # the new run's first save is complete: the run it replaces goes
    return path


def resolve(spec: str, out_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint `--resume spec` means: "auto", a run directory or its checkpoints/: the latest save (else the
    newest step); a pointer file: the save it names; anything else: a checkpoint's path."""
    if spec != "auto" and (not Path(spec).is_dir() or saves.is_sharded(Path(spec).resolve())):
        path = Path(spec)
        if path.is_symlink():  # a link to checkpoints/latest names a save beside its target, not beside the link
            path = path.resolve()
        if path.name in ("latest", "best") and path.is_file():
            named = saves.pointed(path.parent, path.name)
            if named is None:  # removed since is_file()
                raise UsageError(f"{path}: no such file")
            if not named.exists():
                raise UsageError(f"{path}: names {named.name}, which is missing")
            return named
        return path
    run = Path(out_dir if spec == "auto" else spec)
    directory = run if (run / "latest").exists() or run.name == "checkpoints" else run / "checkpoints"
    latest = saves.pointed(directory, "latest")
    if latest is None:  # none yet, or the first save is in place and its pointer not (a run killed in between)
        saved = saves.saved_steps(directory) if directory.is_dir() else []
        if not saved:
            raise UsageError(
                f"{directory}: no checkpoint saved there yet, so nothing to resume or export"
                + set_aside_note(directory)
                + members_note(directory)
            )
        return saved[-1]  # a save is renamed into place whole: one that exists is complete
    if not latest.exists():
        raise UsageError(
            f"{directory / 'latest'}: names {latest.name}, which is missing; name a checkpoint file (step_*.pt) instead"
        )
    return latest


def load(path: str | os.PathLike[str], device: torch.device | str = "cpu", whole_model: bool = True) -> dict:
    """The state saved at `path`; UsageError if it is missing, damaged, unsafe or not a checkpoint. A sharded save's
    holds "optimizer_groups", and "model" only if `whole_model`."""
    path = Path(path)
    sharded = saves.is_sharded(path)
    state = read_trusted(path / STATE_FILE if sharded else path, device, path)
    if sharded:
        sums = state.get("checksums") if isinstance(state, dict) else None
        # .metadata's checksum before it is unpickled (a flipped bit can turn a pickle opcode into a memo index of
        # 1.5e9 and the load into a runaway), the shards' once it says which there are (a missing or short one
        # is named as such), all before any tensor is read
        checksums.verify(path, sums, only=sharded_files.METADATA)
        sharded_files.check_complete(path)
        checksums.verify(path, sums)
        if whole_model and isinstance(state, dict):
            state["model"] = sharded_files.read_whole(path, "model", path)
    check_keys(state, path, sharded)
    check_named_step(path, state["step"])
    return state


def check_keys(state: Any, path: Path, sharded: bool) -> None:
    """UsageError naming what `state`, read from the save at `path`, lacks of a fasttrain checkpoint's keys."""
    keys = ("optimizer_groups", "step", "config") if sharded else REQUIRED_KEYS
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"{path}: not a fasttrain checkpoint (no {', '.join(missing)})")


def check_named_step(path: Path, step: object) -> None:
    """UsageError if `path` is named as one step's save (step_NNNNNNN.pt, step_NNNNNNN/) and holds another's (renamed or
    swapped saves); a name of the user's own is taken as it is."""
    if saves.SAVE_NAME.fullmatch(path.name) is None:
        return
    if step != saves.step_of(path):
        raise UsageError(
            f"{path}: holds step {step}, not the step {saves.step_of(path)} its name says (saves renamed or swapped); "
            f"give it its own name, step_{step:07d}{path.suffix}, or resume from another save"
            if isinstance(step, int)
            else f"{path}: its step is not a number ({step!r})"
        )


def read_trusted(file: Path, device: torch.device | str, path: Path, mmap: bool = False) -> Any:
    """What `torch.load(weights_only=True)` reads from `file` (of the checkpoint at `path`; `mmap`: tensors mapped,
    not read), its checksums checked first: never code to run; UsageError naming `path` (or `file`) otherwise."""
    if file.is_file():
        checksums.check_records(file)
    try:
        return torch.load(file, map_location=device, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UsageError(f"{file}: no such checkpoint") from None
    except Exception as e:  # truncated, corrupt, or holding objects other than tensors and plain values
        raise UsageError(f"{path}: not a loadable checkpoint ({unloadable(file, e)})") from None


def unloadable(file: Path, error: Exception) -> str:
    """Why torch.load could not read `file`, in a few words: torch's own messages run to paragraphs (with terminal
    colour codes), so the kinds a user meets are named here, and any other by its first line, shortened."""
    with contextlib.suppress(OSError):
        with open(file, "rb") as f:
            start = f.read(4)
        if not (start.startswith(b"PK\x03\x04") or start.startswith(b"\x80")):  # torch.save's zip, or its old pickle
            return "not a file torch.save wrote"
    message = str(error)
    if "Weights only load failed" in message:
        return "it holds objects other than tensors and plain values, and fasttrain never unpickles code"
    if isinstance(error, (OSError, RuntimeError)):  # a missing zip index, a map past the file's end, ...
        return "cut short or damaged"
    first_line = " ".join(message.split("\n")[0].split())[:160]
    return f"{type(error).__name__}: {first_line}"


def config_of(path: Path) -> Config:
    """The config of the run that saved the checkpoint at `path`, read without its tensors: what a resume's plan needs
    first. UsageError as `load` gives, in the same words."""
    file = path / STATE_FILE if saves.is_sharded(path) else path
    state = read_trusted(file, "cpu", path, mmap=file.is_file() and path == file)
    check_keys(state, path, saves.is_sharded(path))
    return saved_config(state, path)


def recorded_config(out_dir: str, replayed: str, resume: str | None) -> tuple[Config, str] | None:
    """The config a resumed run (`resume`, a --resume spec in train.out_dir `out_dir`) or a replayed one (`replayed`:
    schedule.progress_from) trained, and the file saying so: its run directory's config.toml, else the checkpoint's;
    None for a new run."""
    if resume is not None:
        path = resolve(resume, out_dir).resolve()
        beside = path.parent.parent / "config.toml"
        if path.parent.name == "checkpoints" and beside.is_file():
            return load_config(beside), str(beside)
        return config_of(path), str(path)
    if not replayed:
        return None
    recorded = (Path(replayed) if Path(replayed).is_dir() else Path(replayed).parent) / "config.toml"
    return (load_config(recorded), str(recorded)) if recorded.is_file() else None


def saved_config(state: dict, path: str | os.PathLike[str]) -> Config:
    """The config the run that saved `state` (from `path`) used."""
    if not isinstance(state["config"], str):  # a save fasttrain wrote holds its config.toml's text
        raise UsageError(f"{path}: its saved config is {type(state['config']).__name__}, not a config's text")
    return parse_config(state["config"], f"{path} (its saved config)")
