"""Batches read ahead of the training thread: a daemon thread reads the next batches into a bounded queue
while the current one trains, and on CUDA copies each to the device on a side stream.

Imports from fasttrain: data.reader.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from fasttrain.data.reader import RowReader

T = TypeVar("T")  # what load(g) returns


def load_batch(
    reader: RowReader, device: torch.device, stream: torch.cuda.Stream | None, g: int
) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
    """Batch `g` on `device`; on CUDA, copied on `stream` with an event that marks the copy done."""
    x, y = reader.read(g)
    if stream is None:
        return x, y, None
    with torch.cuda.stream(stream):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return x, y, ready


class Prefetcher(Generic[T]):
    """A daemon thread that queues load(g), load(g + 1), ..., `depth` ahead; stopped at exit by an atexit hook (torn
    down inside a torch op, it would abort the process)."""

    def __init__(self, load: Callable[[int], T], first: int, depth: int):
        self._queue: queue.Queue[T | BaseException] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(load, first), daemon=True, name="fasttrain-prefetch")
        self._thread.start()
        atexit.register(self.stop)

    def _run(self, load: Callable[[int], T], g: int) -> None:
        while not self._stopped.is_set():
            item: T | BaseException
            try:
                item = load(g)
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:  # the consumer is behind; look at the stop flag, then try again
                    continue
            if isinstance(item, BaseException):
                return
            g += 1

    def get(self) -> T:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:  # never wait on a thread that is gone
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._stopped.set()
        self._thread.join()
