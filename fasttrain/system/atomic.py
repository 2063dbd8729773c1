"""Safe file access: atomic replacement (a crash leaves either the old file or the new one, never half of
one), directories synced (a rename in them survives a power cut), run files opened without following links
(a link planted as metrics.jsonl or .lock must not redirect a write, or a truncation, to its target), and
small files read only when they are regular files of bounded size (a FIFO would hang the read, /dev/zero
would never end it). A folder of files is written as a temporary folder beside it and put in place whole: renamed
there, or exchanged with the folder it replaces in one step (`folder_atomically`, `replace_folder`). A full disk is
said as one, naming the folder.

Imports from fasttrain: system.errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from fasttrain.system.errors import UsageError


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], what: str = "write") -> Path:
    """Create `path`'s directory, `write(f)` a temporary file beside it, fsync, rename over `path`. Any OSError removes
    the temporary file and is a UsageError: "<path>: cannot <what> (<reason>)"."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save writes through C++, which turns the OSError of f.write into a RuntimeError of its own (a
        # traceback): the OSError is still its context.
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        reason = failure(error, path.parent)  # before the partial file is removed: the room it took is the clue
        with contextlib.suppress(OSError):  # no directory (or not a directory): no temporary file either
            tmp.unlink(missing_ok=True)
        raise UsageError(f"{path}: cannot {what} ({reason})") from None
    return path


def failure(error: OSError, folder: Path) -> str:
    """Why a write into `folder` failed, in words. A full disk says so and names the folder: ENOSPC, and a short write
    that carries no errno where the disk has less room left than the write lacked (numpy's tofile, which the gguf
    writer uses, raises only "N requested and M written")."""
    short = re.fullmatch(r"(\d+) requested and (\d+) written", str(error)) if error.errno is None else None
    full = error.errno == errno.ENOSPC
    if short:
        with contextlib.suppress(OSError):
            room = os.statvfs(folder)
            full = room.f_bavail * room.f_frsize < int(short[1]) - int(short[2])
    if full:
        return f"no space left on the device holding {folder}"
    return error.strerror or str(error)


@contextlib.contextmanager
def folder_atomically(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new temporary folder beside the folder `path` to write into. When the block ends it takes `path`'s place
    (`replace_folder`: what `path` held and the block did not write is kept) and the folders are synced; an exception
    in the block removes the temporary folder and leaves `path` as it was, so a failure never leaves part of what was
    written. A UsageError from the block names `path` where it named the temporary folder; an OSError here is one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had this one's id
            tmp.mkdir()
            yield tmp
            replace_folder(tmp, path)
            sync_directory(path)
        except OSError as e:
            raise UsageError(f"{path}: cannot write ({failure(e, path.parent)})") from None
        except UsageError as e:
            raise UsageError(str(e).replace(str(tmp), str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, path: Path, carry: bool = True) -> None:
    """Put the folder `new` at `path` (a sibling); with `carry`, keeping what `path` holds that `new` does not (an export
    folder's .git, say: hard links, no copy). Where `path` is a folder, the two are exchanged in one rename (Linux's
    RENAME_EXCHANGE), so a kill at any moment leaves `path` wholly the old folder or wholly the new one (the old one
    then lies at `new`'s name, which the next start removes, as any writer's left-over temporary folder); `new` is
    removed. Where the file system cannot exchange, `new`'s files replace `path`'s one by one (without `carry`, `path`
    is removed, then `new` renamed). Syncs the parent."""
    if not path.is_dir():
        os.replace(new, path)
    else:
        carried = [entry for entry in path.iterdir() if carry and not os.path.lexists(new / entry.name)]
        for entry in carried:
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=os.link)
            else:
                os.link(entry, new / entry.name, follow_symlinks=False)
        if exchange(new, path):
            shutil.rmtree(new)
        elif not carry:
            shutil.rmtree(path)
            os.replace(new, path)
        else:
            for file in sorted(set(new.iterdir()) - {new / entry.name for entry in carried}):
                os.replace(file, path / file.name)
    sync_directory(path.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` (two folders in one file system) atomically. False where this system or file system
    cannot (not Linux, an old C library or kernel, NFS): nothing is moved then. Another failure is an OSError."""
    rename_exchange = 2  # RENAME_EXCHANGE, linux/fs.h
    at_current_directory = -100  # AT_FDCWD
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(at_current_directory, os.fsencode(a), at_current_directory, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def sync_directory(path: str | os.PathLike[str]) -> None:
    """fsync the directory `path`: the names in it (a renamed folder, new files) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """os.open(`path`, `flags`) without following a link: the descriptor of a regular file (created with
    O_CREAT). A link or anything but a regular file is a UsageError naming it; so is any OSError."""
    path = Path(path)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{path}: a symbolic link; remove it (fasttrain does not write through links)") from None
        raise UsageError(f"{path}: cannot write ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path}: not a regular file; remove it")
    os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from hanging the open
    return fd


def read_regular(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file at `path` (links followed), at most `limit` of them. A missing path,
    a directory, a FIFO or device, a larger file or any OSError is a UsageError naming `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not block
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UsageError(f"{path}: cannot read ({'is a directory' if stat.S_ISDIR(mode) else 'not a regular file'})")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise UsageError(f"{path}: larger than {limit:,} bytes, too large for a {what}")
    return data
