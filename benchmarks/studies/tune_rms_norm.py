"""Measure RMSNorm tilings on this GPU and write the winners to the table the kernels read.

    python -m benchmarks.studies.tune_rms_norm [--hidden 768 2048 ...] [--rows 32768] [--out FILE] [--dry-run]

For each hidden size, the forward and the backward launchers (fasttrain_kernels/rms_norm.py) are timed
over candidate tilings (rows a tile, warps a program; for the backward, programs per SM and
prefetch stages too), on the two dtype cases that matter: a bf16 model (everything bf16) and
bf16 autocast over fp32 parameters (x and y bf16, the residual stream and h fp32), both with a
residual. A tiling's score is the sum over the cases of its time over the case's best; the
lowest score wins. The backward is swept in two rounds (tile shape at the default grid, then
grid and stages for the winning shape): a full product would not fit a 10-minute command.

Timing is the kernel benchmarks' (benchmarks/conftest.py, cuda_event_seconds): CUDA events around
each of 30 calls, L2 flushed before it, the median of the calls (min reported beside it). Every
candidate's outputs must equal the default tiling's within rounding, or it is dropped; so is one
that fails to compile or launch (too many registers or too much shared memory for this GPU).

The winners are merged into --out (default: fasttrain_kernels/rms_norm_tilings.json, which `rms_norm`
reads when it is imported) under this GPU's capability, with each winner's and the default's
times beside it. --dry-run runs the plumbing on the CPU at hidden 64 and 200 (its times mean
nothing) and writes only to an explicit --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from benchmarks.conftest import cuda_event_seconds
from fasttrain_kernels._backend import triton  # or its stand-in: this module imports where triton is not installed
from fasttrain_kernels.rms_norm import Tiling, default_tilings

norm = importlib.import_module("fasttrain_kernels.rms_norm")  # the module: the package exports a function of that name

HIDDEN = (768, 2048, 4096, 8192)  # 16384 already wins by 1.35-1.69x on the defaults (H100, 2026-11-22)
ROWS = 32768
BLOCK_ROWS = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8, 16)
PROGRAMS_PER_SM = (1, 2, 4, 8)
STAGES = (1, 2, 3)
MIN_PER_THREAD, MAX_PER_THREAD = 4, 64  # elements of a tile per thread: fewer wastes lanes, more spills


@dataclasses.dataclass(frozen=True)
class Case:
    """One dtype case: x (a block's output) and y in `compute`, the residual stream and weight in `stream`."""

    name: str
    compute: torch.dtype
    stream: torch.dtype


CASES = (Case("bf16", torch.bfloat16, torch.bfloat16), Case("bf16 autocast", torch.bfloat16, torch.float32))


def tile_shapes(block: int) -> list[tuple[int, int]]:
    """(rows a tile, warps) worth timing for rows of `block` columns: each thread holds 4-64 of the tile."""
    return [
        (rows, warps)
        for rows in BLOCK_ROWS
        for warps in WARPS
        if MIN_PER_THREAD <= rows * block // (32 * warps) <= MAX_PER_THREAD
    ]


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(min, median) seconds of `fn` on `device`: GPU time as the kernel benchmarks take it (CUDA events,
    L2 flushed before each call; benchmarks/conftest.py), or a few host-timed calls on the CPU."""
    if device.type == "cuda":
        samples = cuda_event_seconds(fn, device, warmup=10, rounds=30)
    else:
        samples = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return min(samples), statistics.median(samples)


class Inputs:
    """One case's tensors at (rows, hidden), and the default tiling's outputs to check candidates against."""

    def __init__(self, case: Case, rows: int, hidden: int, device: torch.device):
        self.x = torch.randn(rows, hidden, device=device, dtype=case.compute)
        self.residual = torch.randn(rows, hidden, device=device, dtype=case.stream)
        self.weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(case.stream)
        self.dy = torch.randn(rows, hidden, device=device, dtype=case.compute)
        self.y, self.h, self.rstd = norm._forward(self.x, self.residual, self.weight, 1e-6, case.compute)
        self.dh = torch.randn_like(self.h)
        self.dx = torch.empty_like(self.x)
        # The residual's gradient is written apart only when its dtype is not x's (autocast's fp32 stream).
        self.dresidual = torch.empty_like(self.residual) if case.stream != case.compute else None
        self.expected = self.outputs(None, None)

    def forward(self, tiling: Tiling | None) -> tuple[torch.Tensor, ...]:
        return norm._forward(self.x, self.residual, self.weight, 1e-6, self.y.dtype, tiling)

    def backward(self, tiling: Tiling | None) -> torch.Tensor:
        return norm._backward(self.dy, self.dh, self.h, self.weight, self.rstd, self.dx, self.dresidual, True, tiling)

    def outputs(self, forward: Tiling | None, backward: Tiling | None) -> list[torch.Tensor]:
        """Copies of y, dx, dweight (and dresidual when apart) from these tilings (None: the default)."""
        y, dweight = self.forward(forward)[0], self.backward(backward)
        return [t.clone() for t in (y, self.dx, dweight, self.dresidual) if t is not None]

    def agrees(self, forward: Tiling | None, backward: Tiling | None) -> bool:
        """The outputs of these tilings equal the default's within rounding (row sums may be ordered otherwise)."""
        return all(
            torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-2)
            for a, b in zip(self.outputs(forward, backward), self.expected)
        )


def best(
    candidates: Iterable[Tiling], time_one: Callable[[Case, Tiling], float], cases: Iterable[Case]
) -> tuple[Tiling, dict[Tiling, float]]:
    """The candidate with the lowest sum over `cases` of its time over the case's fastest, and every
    candidate's score; a candidate whose `time_one` raises (fails to compile or launch) is dropped."""
    times: dict[Tiling, dict[str, float]] = {}
    for tiling in candidates:
        try:
            times[tiling] = {case.name: time_one(case, tiling) for case in cases}
        except Exception as e:  # noqa: BLE001  (out of registers or shared memory on this GPU: not a candidate)
            print(f"  {tiling}: dropped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not times:
        raise RuntimeError("no candidate tiling ran")
    fastest = {case.name: min(t[case.name] for t in times.values()) for case in cases}
    scores = {tiling: sum(t[name] / fastest[name] for name in t) for tiling, t in times.items()}
    return min(scores, key=scores.get), scores


def tune(hidden: int, rows: int, device: torch.device) -> dict:
    """The winning (forward, backward) tilings for `hidden` and their times against the defaults'."""
    block = triton.next_power_of_2(hidden)
    inputs = {case.name: Inputs(case, rows, hidden, device) for case in CASES}
    default_forward, default_backward = default_tilings(block)
    timings: dict[tuple, tuple[float, float]] = {}  # (pass, case name, tiling) -> (min, median) seconds

    def timer(which: str) -> Callable[[Case, Tiling], float]:
        """The median seconds of the `which` pass ("forward" or "backward") of a case under a tiling,
        once that tiling has reproduced the default's outputs."""

        def time_one(case: Case, tiling: Tiling) -> float:
            run = inputs[case.name]
            if not run.agrees(*((tiling, None) if which == "forward" else (None, tiling))):
                raise ValueError("outputs differ from the default tiling's")
            timings[which, case.name, tiling] = measure(lambda: getattr(run, which)(tiling), device)
            return timings[which, case.name, tiling][1]

        return time_one

    shapes = tile_shapes(block) or [(default_forward.block_rows, default_forward.num_warps)]
    forward, _ = best([Tiling(r, w) for r, w in shapes] + [default_forward], timer("forward"), CASES)
    shape, _ = best(
        [Tiling(r, w, default_backward.programs_per_sm, default_backward.stages) for r, w in shapes]
        + [default_backward],
        timer("backward"),
        CASES,
    )
    backward, _ = best(
        [Tiling(shape.block_rows, shape.num_warps, p, s) for p in PROGRAMS_PER_SM for s in STAGES],
        timer("backward"),
        CASES,
    )
    winners = (("forward", forward, default_forward), ("backward", backward, default_backward))

    def micros(statistic: int) -> dict:  # 0: min, 1: median
        return {
            f"{which} {case.name}": {
                "tuned": round(1e6 * timings[which, case.name, tuned][statistic], 2),
                "default": round(1e6 * timings[which, case.name, default][statistic], 2),
            }
            for which, tuned, default in winners
            for case in CASES
            if (which, case.name, default) in timings
        }

    return {
        "hidden": hidden,
        "block": block,
        "rows": rows,
        "forward": dataclasses.asdict(forward),
        "backward": dataclasses.asdict(backward),
        "median_us": micros(1),
        "min_us": micros(0),
    }


def merge(path: Path, capability: str, results: list[dict], source: str) -> dict:
    """The table at `path` with `results` set under `capability` (other sizes' and GPUs' entries kept)."""
    table = json.loads(path.read_text()) if path.is_file() else {"tilings": {}}
    entries = table["tilings"].setdefault(capability, {})
    for r in results:
        entries[str(r["block"])] = {key: r[key] for key in ("forward", "backward", "hidden", "median_us", "min_us")}
    table["source"] = source
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.studies.tune_rms_norm", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--out", type=Path, help=f"default: {norm.TILINGS_FILE} (a dry run writes only to --out)")
    parser.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, capability, hidden, rows = torch.device("cpu"), "dry-run", [64, 200], 64
    elif torch.cuda.is_available():
        device, capability, hidden, rows = (
            torch.device("cuda"),
            norm._capability(torch.device("cuda")),
            args.hidden,
            args.rows,
        )
    else:
        print("error: no CUDA GPU (use --dry-run to check the plumbing on the CPU)")
        return 2
    out = args.out or (None if args.dry_run else norm.TILINGS_FILE)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    source = f"python -m benchmarks.studies.tune_rms_norm --rows {rows} on {name}"
    for h in hidden:  # written after each size: a command cut off by its time limit keeps what it measured
        found = tune(h, rows, device)
        print(f"hidden {h}: forward {found['forward']}, backward {found['backward']}: {found['median_us']}", flush=True)
        if out is not None:
            out.write_text(json.dumps(merge(out, capability, [found], source), indent=1) + "\n")
            print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
