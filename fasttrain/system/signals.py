"""Stopping a run at a step boundary on SIGINT (Ctrl-C) or SIGTERM.

Imports from fasttrain: nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


class SignalCatcher:
    """While active, SIGINT and SIGTERM only set `received`, so training stops at a step boundary; a second of a kind
    stops at once. Only the main thread can catch signals; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> SignalCatcher:
        self.received: int | None = None
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._catch) for s in self.SIGNALS}
        return self

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def raising_on_signals(stopped: Callable[[int], BaseException]) -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise `stopped(signum)` wherever the main thread is: for stretches with nothing
    to save first, whose files are whole at any instant (written atomically, or journalled), so that a stop there ends
    with words rather than a silent kill. A SignalCatcher within it catches them as it always does, and hands them back
    to this as it ends. Only the main thread can catch signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stopped(signum: int, frame: FrameType | None) -> None:
        raise stopped(signum)

    previous = {s: signal.signal(s, raise_stopped) for s in SignalCatcher.SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
