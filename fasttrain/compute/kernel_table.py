"""The measured dispatch table: which Triton kernel won against stock PyTorch, per GPU, op, shape and mode.

Imports from fasttrain: system.errors.

`kernels.* = "auto"` on a GPU switches a kernel on only where this table measured it faster than the fastest stock path,
on a GPU of the same compute capability, at a shape near the run's, in the run's mode (eager, or under torch.compile);
anything else runs stock PyTorch (or inductor), so "auto" never picks a path measured slower. The table is
`kernel_table.json` beside this file, written by `python -m benchmarks.studies.dispatch_table` (and gpu_check's
`kernels` stage):

    {"source": [...], "entries": [{"capability": "sm_90", "gpu": "NVIDIA H100 80GB HBM3",
      "op": "rms_norm", "mode": "eager", "shape": {"hidden": 768}, "use": false,
      "fasttrain_ms": 1.035, "stock_ms": 0.49, "stock": "torch", "case": "..."}, ...]}

Shapes: rms_norm by `hidden`, linear_cross_entropy by `hidden` and `vocab`, adamw by `params`. A run's shape matches the
nearest entry if each of its sizes is within a factor of two of the entry's, or, for a one-size shape, lies between two
entries that agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fasttrain.system.errors import UsageError

TABLE = Path(__file__).with_name("kernel_table.json")
OPS = ("linear_cross_entropy", "rms_norm", "adamw")
MODES = ("eager", "compiled")
NEAR = math.log(2)  # a measured shape stands for sizes within a factor of two of it


@dataclass(frozen=True)
class Measurement:
    """One entry: whether the kernel is used there, and the medians that decided it."""

    use: bool
    fasttrain_ms: float
    stock_ms: float
    stock: str  # the fastest stock implementation measured
    shape: dict[str, int]
    gpu: str


def run_shapes(hidden: int, vocab: int, params: int) -> dict[str, dict[str, int]]:
    """The shapes a run reads the table at, per op: its model width, vocabulary and parameter count."""
    return {
        "rms_norm": {"hidden": hidden},
        "linear_cross_entropy": {"hidden": hidden, "vocab": vocab},
        "adamw": {"params": params},
    }


def load_table(path: str | Path = TABLE) -> list[dict]:
    """The entries of the table at `path` ([] when there is none); UsageError naming it if it is malformed."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["entries"]
        for e in entries:
            if e["op"] not in OPS or e["mode"] not in MODES or not isinstance(e["use"], bool):
                raise ValueError(f"bad entry {e}")
            if not all(isinstance(v, int) and v > 0 for v in e["shape"].values()):
                raise ValueError(f"bad shape in {e}")
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a kernel table ({e})") from None
    return entries


def lookup(entries: list[dict], capability: str, op: str, mode: str, shape: dict[str, int]) -> Measurement | None:
    """The measurement of `op` at `shape` on `capability` in `mode`: the nearest entry within a factor of two in every
    size, else for a one-size shape two agreeing entries on either side; else None."""
    candidates = [
        e
        for e in entries
        if (e["capability"], e["op"], e["mode"]) == (capability, op, mode) and e["shape"].keys() == shape.keys()
    ]
    if not candidates or not shape:
        return None

    def gaps(e: dict) -> list[float]:
        return [abs(math.log(shape[k] / e["shape"][k])) for k in shape]

    nearest = min(candidates, key=lambda e: sum(gaps(e)))
    if max(gaps(nearest)) > NEAR:
        if len(shape) != 1:
            return None
        ((key, size),) = shape.items()
        below = [e for e in candidates if e["shape"][key] <= size]
        above = [e for e in candidates if e["shape"][key] >= size]
        if not below or not above:
            return None
        low, high = max(below, key=lambda e: e["shape"][key]), min(above, key=lambda e: e["shape"][key])
        if low["use"] != high["use"]:
            return None
        nearest = min((low, high), key=lambda e: sum(gaps(e)))
    return Measurement(
        nearest["use"],
        nearest["fasttrain_ms"],
        nearest["stock_ms"],
        nearest["stock"],
        dict(nearest["shape"]),
        nearest.get("gpu", capability),
    )
