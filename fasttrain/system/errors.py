"""User-facing errors and the command-line wrapper that reports them.

Imports from fasttrain: nothing.

Anything the user can get wrong raises `UsageError` with a message naming the file, key or value; entry points run
through `run_cli`, which prints it as one line and exits with status 2, never a traceback. Bugs in fasttrain itself
still show theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
from contextvars import ContextVar
from typing import Any, Callable, Iterator, NoReturn, Sequence


class UsageError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""


class RunStopped(Exception):
    """A run that ended early and says why in one line: exit 128 + signal number, or 1 when it diverged."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit: 0; 2 on `UsageError` or out of memory (one line); RunStopped's code; 130 on Ctrl-C;
    141, quietly, when its output's reader went away (unless already failing)."""
    code: int | str | None = None
    try:
        code = _exit_code(main, argv)
        if sys.stdout is not None:  # None: started with standard output closed
            sys.stdout.flush()  # buffered output meets a closed pipe here, not at the interpreter's exit
    except BrokenPipeError:
        if not _reader_gone():  # another pipe than standard output's: not ours to silence
            raise
        # The reader of standard output went away (`| head`): stop quietly, as a tool killed by SIGPIPE does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting does not flush into the pipe
        code = code or 141
    sys.exit(code)


def _exit_code(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None) -> int | str | None:
    """`main(argv)`'s exit status; what went wrong is said on stderr in one line (see run_cli)."""
    try:
        return main(argv) or 0
    except SystemExit as e:  # argparse's --help: its output is flushed by run_cli, where a closed pipe is caught
        return e.code
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError and CPU allocator failures are RuntimeErrors
        reason = _out_of_memory(e)
        if reason is None:
            raise
        print(
            f"error: out of memory ({reason}); lower the batch size or the model's size, or free memory "
            "(pre-flight's estimate did not catch this one)",
            file=sys.stderr,
        )
        return 2


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end has been closed."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced (a test's capture) or closed: no pipe of ours
        return False
    if not hasattr(select, "poll"):  # Windows
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _out_of_memory(e: BaseException) -> str | None:
    """What an allocation failure `e` says, in one line; None if `e` is not one."""
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return text[:200] or "MemoryError"
    if "can't allocate memory" in text:  # the CPU allocator: "... you tried to allocate N bytes ..."
        return text[text.index("you tried") :][:200] if "you tried" in text else "the CPU allocator failed"
    return None


# The command line a tool is being run as, when the `fasttrain` command runs it ("fasttrain sample"; see
# invoked_as); None: the tool's own `python -m MODULE`, the prog its parser names.
_INVOKED_AS: ContextVar[str | None] = ContextVar("invoked_as", default=None)


@contextlib.contextmanager
def invoked_as(command: str) -> Iterator[None]:
    """Within it, a tool's ArgumentParser is `command`: its --help and error lines name the command the user
    typed (`fasttrain sample`), not the module it runs (`python -m fasttrain.sample`)."""
    token = _INVOKED_AS.set(command)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {value}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse, a bad flag a one-line `UsageError`, and no abbreviated flags (`--over` meaning `--overwrite` would
    delete a run). `prog`: the tool's `python -m MODULE`, or its command (invoked_as)."""

    def __init__(self, **kwargs: Any) -> None:  # keywords only: a positional argument could fill allow_abbrev's slot
        kwargs["prog"] = _INVOKED_AS.get() or kwargs.get("prog")
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")
