"""How loaded this machine is now: the threads of other programs runnable at this instant, which take a share of any
speed timed (planning/sizing.py's calibration) and of the run's.

Imports from fasttrain: nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# Linux's /proc/loadavg: its 4th field, "runnable/total", counts the threads runnable at this instant
RUN_QUEUE = "/proc/loadavg"
QUEUE_READINGS = 5


def busy_note(device: torch.device) -> str:
    """ "; other programs were running ..." where, on a CPU about to be timed, other processes' threads runnable now
    number at least half its cores (they take a share of the speed timed, and of the run's); else "". What runs now,
    not the load average, which still counts for a minute a program that has ended."""
    if device.type != "cpu":
        return ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    others = others_runnable()
    if others is None or others < max(1.0, cores / 2):
        return ""
    return (
        f"; other programs were running when the machine was timed ({others} thread{'s' * (others != 1)} runnable besides "
        f"this run's, on {cores} core{'s' * (cores != 1)}): on a quiet machine the run would be faster and may choose a "
        "deeper model"
    )


def others_runnable() -> int | None:
    """The threads of other processes runnable now (running or waiting for a core): RUN_QUEUE's count less this
    process's own, the median of QUEUE_READINGS readings 20 ms apart (one instant's count is noisy); None where
    there is no RUN_QUEUE (not Linux)."""
    counts = []
    for reading in range(QUEUE_READINGS):
        if reading:
            time.sleep(0.02)
        try:
            with open(RUN_QUEUE) as f:
                runnable = int(f.read().split()[3].partition("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        counts.append(max(0, runnable - own_runnable()))
    return sorted(counts)[len(counts) // 2]


def own_runnable() -> int:
    """This process's threads runnable now (state R in /proc/self/task/*/stat), the one reading among them."""
    count = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            count += stat.read_text().rpartition(")")[2].split()[0] == "R"  # after the name, which may hold spaces
        except (OSError, IndexError):
            pass  # a thread that ended meanwhile
    return count
