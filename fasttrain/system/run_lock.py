"""One run per directory: a training run holds an exclusive lock on `out_dir/.lock` while it trains.

Two processes in one run directory would interleave their events in metrics.jsonl, race
on checkpoint saves, or (with --overwrite) delete the other's files under it. The lock
is flock(2) on an open file, so the kernel drops it when the holder exits, however it
exits: a run killed with SIGKILL leaves the file but no stale lock, and the next run
simply locks it again. While locked the file holds the holder's pid and host, for the
error message another run gets. Without fcntl (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

from fasttrain.system.atomic import open_regular
from fasttrain.system.errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of run directory `out_dir` (created if missing) for the `with` block; UsageError
    naming the holder if another process holds it."""
    if fcntl is None:
        yield
        return
    path = Path(out_dir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror or e})") from None
    fd = open_regular(path, os.O_RDWR | os.O_CREAT)  # a link planted as .lock would truncate its target
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # The holder writes its name right after locking: empty only in that instant.
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "one that is just starting"
            raise UsageError(f"{path.parent}: another run ({holder}) is using it; wait for it to end, stop it, "
                             "or set train.out_dir elsewhere") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # names a holder only while there is one (a killed run's name stays, unlocked)
    finally:
        os.close(fd)  # releases the lock
