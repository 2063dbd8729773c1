"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Callable

from fasttrain.system.errors import UsageError


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], what: str = "write") -> Path:
    """Create `path`'s directory, call `write(f)` on a temporary file beside it, fsync, rename over `path`.

    The temporary name is in the same directory, so the rename is atomic. Any OSError
    removes the temporary file and becomes a UsageError: "<path>: cannot <what> (<reason>)".
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # no directory (or not a directory): no temporary file either
            tmp.unlink(missing_ok=True)
        raise UsageError(f"{path}: cannot {what} ({e.strerror or e})") from None
    return path
