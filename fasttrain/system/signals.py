"""Stopping a run at a step boundary on SIGINT (Ctrl-C) or SIGTERM.

Imports from fasttrain: nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
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
