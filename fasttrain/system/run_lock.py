"""One process per directory: a training run holds an exclusive lock on `out_dir/.lock` while it trains, and a
preparation of data into DIR one on `.DIR.prepare-lock` beside it.

Imports from fasttrain: system.atomic, system.errors.

Two runs in one directory would interleave metrics.jsonl, race on saves or delete each other's files; two preparations
would move each other's shards. The lock is flock(2), which the kernel drops however the holder exits, so a SIGKILL
leaves no stale lock. The file holds the holder's pid and host for the other's message. Without fcntl (Windows) nothing
is locked.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

from fasttrain.system.atomic import open_regular
from fasttrain.system.errors import UsageError

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of run directory `out_dir` (created if missing) for the `with` block; UsageError
    naming the holder if another process holds it."""
    with holding(Path(out_dir) / LOCK_FILE, lambda holder: _busy(out_dir, holder)):
        yield


def check_free(out_dir: str | os.PathLike[str]) -> None:
    """The UsageError `locked` would raise if another process holds run directory `out_dir`, asked without
    creating anything: a run refuses early, before its other checks and before its lock makes the directory."""
    holder = other_holder(out_dir)
    if holder is not None:
        raise UsageError(_busy(out_dir, holder))


def _busy(out_dir: str | os.PathLike[str], holder: str) -> str:
    return (
        f"{Path(out_dir)}: another run ({holder}) is using it; wait for it to end, stop it, "
        "or set train.out_dir elsewhere"
    )


def other_holder(out_dir: str | os.PathLike[str]) -> str | None:
    """Who holds `out_dir`'s lock if another process: "pid P on host H"; else None. Asked before pruning or pointing at
    checkpoints: a new run may have replaced this one's directory."""
    if fcntl is None:
        return None
    try:
        fd = os.open(
            Path(out_dir) / LOCK_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except OSError:
        return None  # no lock file: no run holds the directory
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: no one holds it (this process included)
            return None
        except BlockingIOError:
            holder = _holder(fd)
            return None if holder == _identity() else holder
    finally:
        os.close(fd)


def _identity() -> str:
    """What a holder writes into its lock file."""
    return f"pid {os.getpid()} on host {socket.gethostname()}"


def _holder(fd: int) -> str:
    """The holder named in the lock file open as `fd`. It writes its name right after locking, so the
    file is empty only in that instant."""
    return os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "one that is just starting"


@contextlib.contextmanager
def holding(
    path: Path, busy: Callable[[str], str] | None = None, wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, with its directory) for the `with` block; held by another process:
    UsageError(busy(holder)), or with `wait`, wait(holder) and block. Links are not followed."""
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror or e})") from None
    fd = open_regular(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait is None:
                holder = _holder(fd)
                raise UsageError(busy(holder) if busy is not None else f"{path}: held by {holder}") from None
            wait(_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_identity()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # names a holder only while there is one (a killed one's name stays, unlocked)
    finally:
        os.close(fd)  # releases the lock
