"""What a run reports: metrics.jsonl, TensorBoard, the console, and MFU.

Every event is one JSON object per line in `metrics.jsonl` with an "event" field
("start", "train", "eval", "sample", "end"); train events carry `step` and
`loss`, eval events `step`, `val_loss` and `val_bpb`. The file is flushed per
event, so a crashed run still has its curve; the next run in the directory first
cuts off a line left unfinished, so every line parses. A failed write (a full
disk) stops the run with a one-line UsageError. TensorBoard event files are written
too when the `tensorboard` package is installed (and the config asks for them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fasttrain.errors import UsageError

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name(); the first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # also GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverged run logs a large number rather than inf."""
    return math.exp(min(loss, 50.0))


def peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of `device` in FLOP/s, or None when it is not a GPU in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class MetricsLog:
    """Appends events to `out_dir/metrics.jsonl` (and TensorBoard); prints lines to the console.

    On a terminal the console shows a tqdm progress bar and prints lines above it;
    otherwise (a log file, CI) it prints plain lines only.
    """

    def __init__(self, out_dir: str | Path | None, total_steps: int, tensorboard: bool = True, quiet: bool = False):
        """`out_dir` None: a log that records and prints nothing (the other ranks of a distributed run)."""
        self.quiet = quiet or out_dir is None
        self._file = self._tb = self._bar = None
        self.path = None if out_dir is None else Path(out_dir) / "metrics.jsonl"
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)  # a run killed (or out of space) mid-write: every line must parse
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self._tb = _summary_writer(self.path.parent) if tensorboard else None
        self._bar = None if quiet or not sys.stdout.isatty() else tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def event(self, kind: str, **fields: Any) -> None:
        """Record one event; numeric fields of train and eval events also go to TensorBoard."""
        if self._file is None:
            return
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk, say: the run stops with one line, not two chained tracebacks
            with contextlib.suppress(OSError):  # closing flushes the unwritten rest again, and fails again
                self._file.close()
            self._file = None
            raise UsageError(f"{self.path}: cannot write ({e.strerror or e})") from None
        if self._tb is not None and "step" in fields:
            for key, value in fields.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, fields["step"])

    def print(self, line: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, step: int, **postfix: Any) -> None:
        """Move the progress bar (if any) to `step`, showing `postfix` beside it."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _drop_partial_line(path: Path) -> None:
    """Cut the file at `path` (if any) after its last newline, dropping a last line left unfinished."""
    try:
        with open(path, "r+b") as f:
            size = end = f.seek(0, os.SEEK_END)
            while end > 0:  # back from the end, a block at a time, to the last newline
                start = max(end - 4096, 0)
                f.seek(start)
                newline = f.read(end - start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end < size:
                f.truncate(end)
    except FileNotFoundError:
        pass


def _summary_writer(log_dir: Path):
    """A TensorBoard SummaryWriter for `log_dir`, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(log_dir / "tensorboard"))
