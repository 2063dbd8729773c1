"""Write the measured dispatch table (fasttrain/compute/kernel_table.py) from GPU benchmark results.

    python -m benchmarks.studies.dispatch_table RESULTS.json [RESULTS.json ...] [--out fasttrain/compute/kernel_table.json]

RESULTS are gpu_check.json files or `pytest benchmarks/ --benchmark-json` files from a GPU, oldest
first. Per GPU capability, op, shape and mode, the kernel's median is raced against the fastest stock
path the trainer would run instead, and the entry says `use` only where the kernel is faster by MARGIN;
a later file's entry replaces an earlier one's at the same capability, op, mode and shape:

    op                    mode      case (bench file)                          stock
    rms_norm              eager     residual, forward + backward (rms_norm)     eager, torch
    rms_norm              compiled  a whole compiled block (block)              stock (inductor fuses the norms)
    linear_cross_entropy  eager     forward + backward (cross_entropy)          eager
    linear_cross_entropy  compiled  forward + backward (cross_entropy)          compiled
    adamw                 both      with clipping (adamw)                       torch_fused, torch_foreach

A norm inside a compiled model is fused by inductor with its neighbours, so only the whole-block A/B
decides it under torch.compile. The gpu_check `kernels` stage records the same entries.

RESULTS may also be `python -m benchmarks.studies.ablation` records: the whole compiled step with "auto"'s
kernels, or with one kernel forced on ("kernel adamw", ...), against stock's, repeats interleaved.
Where that step is slower than stock's beyond MARGIN, every kernel the case ran is off at that model's
shapes, whatever its own benchmark said (a kernel faster alone can still cost the step: host time, a
sync, a graph break); where one kernel alone made it faster by MARGIN, that kernel is on there. Such a
verdict replaces the op-level entries it falls near, and a later file's verdict an earlier one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.studies.ablation import LEVERS
from fasttrain.compute.kernel_table import TABLE, lookup

MARGIN = 0.98  # on only where the kernel's median is at most this fraction of stock's: a 2% win, not noise

# (op, benchmark function, selects the trainer's case, its shape, stock implementations per mode)
CASES = [
    (
        "rms_norm",
        "test_rms_norm",
        lambda e: e.get("residual") and e.get("passes") == "forward+backward",
        lambda e: {"hidden": e["hidden"]},
        {"eager": ("eager", "torch")},
    ),
    (
        "rms_norm",
        "test_block_fwd_bwd",
        lambda e: e.get("compiled"),
        lambda e: {"hidden": e["hidden"]},
        {"compiled": ("stock",)},
    ),
    (
        "linear_cross_entropy",
        "test_linear_cross_entropy_fwd_bwd",
        lambda e: True,
        lambda e: {"hidden": e["hidden"], "vocab": e["vocab"]},
        {"eager": ("eager",), "compiled": ("compiled",)},
    ),
    (
        "adamw",
        "test_adamw_step",
        lambda e: e.get("clip"),
        lambda e: {"params": e["parameters"]},
        {"eager": ("torch_fused", "torch_foreach"), "compiled": ("torch_fused", "torch_foreach")},
    ),
]


def capability_of(results: dict) -> str | None:
    """The GPU's compute capability as the gpu_check env stage recorded it ("sm_90"), if it did."""
    env = results.get("gpu_check", {}).get("stages", {}).get("env", {}).get("figures", {}).get("environment", {})
    return env.get("capability")


def table_entries(benchmarks: list[dict], capability: str | None = None) -> list[dict]:
    """The dispatch entries the GPU cases among `benchmarks` support (each case's extra_info names its gpu,
    and its capability where `capability` does not)."""
    medians: dict[tuple, dict[str, float]] = {}  # (capability, gpu, case index, shape) -> impl -> median
    for b in benchmarks:
        e = b["extra_info"]
        gpu, cap = e.get("gpu"), e.get("capability", capability)
        for index, (op, function, selects, shape_of, _) in enumerate(CASES):
            if b["name"].split("[")[0] == function and gpu and cap and selects(e):
                key = (cap, gpu, index, tuple(sorted(shape_of(e).items())))
                medians.setdefault(key, {})[e["impl"]] = b["stats"]["median"]
    entries = []
    for (cap, gpu, index, shape), times in sorted(medians.items()):
        op, stocks = CASES[index][0], CASES[index][4]
        for mode, stock_impls in stocks.items():
            stock = {impl: times[impl] for impl in stock_impls if impl in times}
            if "fasttrain" not in times or not stock:
                continue
            rival = min(stock, key=stock.get)
            entries.append(
                {
                    "capability": cap,
                    "gpu": gpu,
                    "op": op,
                    "mode": mode,
                    "shape": dict(shape),
                    "use": times["fasttrain"] <= MARGIN * stock[rival],
                    "fasttrain_ms": round(times["fasttrain"] * 1e3, 4),
                    "stock_ms": round(stock[rival] * 1e3, 4),
                    "stock": rival,
                }
            )
    return entries


def step_entries(records: list[dict]) -> list[dict]:
    """The whole-step verdicts among ablation `records`: per GPU and model, each case of the ablation's
    "kernels" group ("kernels auto", or one kernel forced on: "kernel adamw", ...) against stock, by the
    median of each's median steps. Slower beyond MARGIN: an off entry (mode compiled: the ablation
    compiles) for each kernel the case ran, at that model's shape for the op; one kernel alone faster by
    MARGIN: an on entry for it; in between, none (the op-level entries stand)."""
    steps: dict[tuple, dict[str, list[float]]] = {}  # (capability, gpu, shapes) -> case -> median step ms
    kernels: dict[tuple, list[str]] = {}  # (capability, gpu, shapes, case) -> the kernels it ran
    for r in records:
        kernel_case = LEVERS.get(r["case"], ("",))[0] == "kernels"
        if r.get("error") or r.get("skipped") or not r.get("capability") or not (kernel_case or r["case"] == "stock"):
            continue
        key = (r["capability"], r["gpu"], json.dumps(r["shapes"], sort_keys=True))
        steps.setdefault(key, {}).setdefault(r["case"], []).append(r["step_ms"]["median"])
        if kernel_case:
            kernels[(*key, r["case"])] = r["kernels"]
    entries = []
    for (cap, gpu, shapes), cases in sorted(steps.items()):
        if "stock" not in cases:
            continue
        stock = statistics.median(cases["stock"])
        for case, times in cases.items():
            ran, ops = statistics.median(times), kernels.get((cap, gpu, shapes, case), [])
            if stock < MARGIN * ran:  # measurably slower with them
                use = False
            elif ran <= MARGIN * stock and len(ops) == 1:  # one kernel, measurably faster
                use = True
            else:
                continue
            entries += [
                {
                    "capability": cap,
                    "gpu": gpu,
                    "op": op,
                    "mode": "compiled",
                    "shape": json.loads(shapes)[op],
                    "use": use,
                    "fasttrain_ms": round(ran, 4),
                    "stock_ms": round(stock, 4),
                    "stock": "whole step",
                }
                for op in ops
            ]
    return entries


def superseded(entry: dict, verdicts: list[dict]) -> bool:
    """Whether a whole-step verdict stands for `entry`'s capability, op, mode and shape, as the trainer's lookup
    would read it there (kernel_table.lookup: within a factor of two in every size)."""
    return any(
        lookup([v], entry["capability"], entry["op"], entry["mode"], entry["shape"]) is not None for v in verdicts
    )


def build_table(paths: list[str]) -> list[dict]:
    """The table's entries from the results at `paths`, read in order. A later file's op-level entry replaces
    an earlier one's at the same capability, op, mode and shape (the kernels change between sessions, and an
    H100 and an H200 are both sm_90: the newest measurement decides); the whole-step verdicts of ablation
    records (the newest likewise at one key) then replace the op-level entries near them."""
    measured: dict[tuple, dict] = {}
    verdicts: dict[tuple, dict] = {}
    for path in paths:
        results = json.loads(Path(path).read_text())
        if isinstance(results, list):  # benchmarks.studies.ablation's records
            found, into = step_entries(results), verdicts
        else:
            found, into = table_entries(results["benchmarks"], capability_of(results)), measured
        for e in found:
            into[(e["capability"], e["op"], e["mode"], json.dumps(e["shape"], sort_keys=True))] = e
    steps = list(verdicts.values())
    return [e for e in measured.values() if not superseded(e, steps)] + steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.studies.dispatch_table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "results",
        nargs="+",
        help="gpu_check.json, pytest-benchmark or benchmarks.studies.ablation JSON files from a GPU",
    )
    parser.add_argument("--out", default=str(TABLE), help=f"where to write the table (default {TABLE})")
    args = parser.parse_args(argv)
    entries = build_table(args.results)
    lines = ",\n".join("  " + json.dumps(e) for e in entries)  # an entry a line: diffs read per entry
    Path(args.out).write_text(
        f'{{"source": {json.dumps(args.results)}, "margin": {MARGIN}, "entries": [\n{lines}\n]}}\n'
    )
    for e in entries:
        print(
            f"{e['capability']} {e['op']:<21} {e['mode']:<8} {e['shape']}: {'on ' if e['use'] else 'off'} "
            f"{e['fasttrain_ms']:.4g} ms vs {e['stock']} {e['stock_ms']:.4g} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
