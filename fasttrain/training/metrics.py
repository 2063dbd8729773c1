"""What a run reports: metrics.jsonl, TensorBoard, the console, and MFU.

Imports from fasttrain: checkpoints.run_directory, system.atomic, system.errors.

Every event is one JSON object per line in `metrics.jsonl` with an "event" field ("start", "train", "eval", "sample",
"end"); train events carry `step` and `loss`, eval events `step`, `val_loss` and `val_bpb`. The file is flushed per
event, and the next run there first cuts off a line left unfinished, so every line parses; a failed write stops the run
with a one-line UsageError. TensorBoard files are written too where the package is installed and the config asks, and
with [log] wandb = true every event goes to Weights & Biases (WandbSink).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm

from fasttrain.checkpoints.run_directory import WANDB_ID_FILE
from fasttrain.system.atomic import open_regular, write_atomically
from fasttrain.system.errors import UsageError

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name(); the first match wins, so a name that holds a shorter
# key ("NVIDIA L40" holds "L4") comes before it.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # also GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),  # before "L4", which its name holds too
    ("L4", 121.0),
    ("A10", 125.0),
]


def peak_flops(device: torch.device, devices: int = 1) -> float | None:
    """The bf16 dense peak in FLOP/s of `devices` GPUs like `device` (a run's world, whose tokens a speed counts), or
    None when it is not a GPU in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((devices * tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def check_log_writable(out_dir: str | Path) -> None:
    """UsageError if `out_dir`/metrics.jsonl exists but cannot be appended to (a link, a directory, a
    read-only file): a run checks this before it changes anything in `out_dir`."""
    path = Path(out_dir) / "metrics.jsonl"
    if os.path.lexists(path):
        os.close(open_regular(path, os.O_WRONLY | os.O_APPEND))


class MetricsLog:
    """Appends events to `out_dir/metrics.jsonl` (and TensorBoard); prints lines to the console, above a tqdm progress
    bar on a terminal, plain lines otherwise (a log file, CI)."""

    def __init__(
        self,
        out_dir: str | Path | None,
        total_steps: int | None,
        tensorboard: bool = True,
        quiet: bool = False,
        wandb: WandbSink | None = None,
    ):
        """`out_dir` None: a log that records and prints nothing (the other ranks of a distributed run).
        `wandb`: a sink that receives every event too, closed with this log."""
        self.quiet = quiet or out_dir is None
        self._file = self._tb = self._bar = None
        self._wandb = wandb
        self.path = None if out_dir is None else Path(out_dir) / "metrics.jsonl"
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Never through a link: a metrics.jsonl planted as one would have its target cut and appended to
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            _drop_partial_line(fd)  # a run killed (or out of space) mid-write: every line must parse
            self._file = open(fd, "a", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self._tb = _summary_writer(self.path.parent) if tensorboard else None
        if not quiet and sys.stdout.isatty():
            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

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
            for key, value in _numbers(fields).items():
                self._tb.add_scalar(f"{kind}/{key}", value, fields["step"])
        if self._wandb is not None:
            self._wandb.event(kind, fields)

    def print(self, line: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, step: int, total: int | None = None, **postfix: Any) -> None:
        """Move the progress bar (if any) to `step` of `total` (a time budget's projected last step; None: as
        it was), showing `postfix` beside it."""
        if self._bar is not None:
            if total:
                self._bar.total = total
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(postfix, refresh=False)

    def end_progress(self) -> None:
        """Close the progress bar (if any), leaving its last state on the console: the lines printed after
        it (the run's summary) then follow it instead of being drawn over by it again."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end_progress()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.close()


def import_wandb() -> ModuleType:
    """The wandb module; a UsageError naming the extra when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise UsageError('log.wandb = true needs the wandb package: pip install -e ".[wandb]"') from None
    return wandb


class WandbSink:
    """A Weights & Biases run fed metrics.jsonl's events: `{event}/{field}` at each step, the start's fields in its
    config, the end's its summary, samples a table; resumed by `run_dir/wandb_run_id`."""

    def __init__(
        self, config: dict[str, Any], run_dir: Path, *, project: str, name: str, tags: list[str], resume: bool
    ):
        self.wandb = import_wandb()
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None  # None: W&B makes one
        self.run = self.wandb.init(
            project=project, name=name, tags=tags, config=config, id=run_id, resume="allow", dir=str(run_dir)
        )
        write_atomically(id_file, lambda f: f.write(self.run.id.encode()), "record the W&B run id")
        self.samples: list[list[Any]] = []

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "start":
            self.run.config.update({"start": fields}, allow_val_change=True)
        elif kind == "end":
            self.run.summary.update(fields)
        elif kind == "sample":  # a W&B table is logged whole: each time with every sample so far
            self.samples.append([fields["step"], fields["prompt"], fields["text"]])
            table = self.wandb.Table(columns=["step", "prompt", "text"], data=self.samples)
            self.run.log({"samples": table}, step=fields["step"])
        elif "step" in fields and (numbers := _numbers(fields)):
            self.run.log({f"{kind}/{key}": value for key, value in numbers.items()}, step=fields["step"])

    def close(self) -> None:
        self.run.finish()


def _numbers(fields: dict[str, Any]) -> dict[str, int | float]:
    """The numeric fields of an event, but its step (bools are not numbers here)."""
    return {k: v for k, v in fields.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _drop_partial_line(fd: int) -> None:
    """Cut the open file `fd` after its last newline, dropping a last line left unfinished."""
    size = end = os.fstat(fd).st_size
    while end > 0:  # back from the end, a block at a time, to the last newline
        start = max(end - 4096, 0)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end < size:
        os.ftruncate(fd, end)


def _summary_writer(log_dir: Path):
    """A TensorBoard SummaryWriter for `log_dir`, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(log_dir / "tensorboard"))
