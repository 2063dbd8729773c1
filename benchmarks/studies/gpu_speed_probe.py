"""The sizing's speed at the run's geometry: each ladder depth's update timed as the plan times it
(`sizing.calibrate`), eager and compiled (as the run trains it on a GPU), at the batch geometry, precision and loss
the plan of CONFIG resolves, with each timing's seconds (a shape's compile included). On a GPU a small step is bound
by its launches, so a timing at other rows, context or compiling than the run's reads the machine at another speed
(benchmarks/results/gpu/h200-2026-11-30b: 5.3x slower at 16 x 256 than the run at 32 x 512).

    python -m benchmarks.studies.gpu_speed_probe configs/base.toml --set data.dir=DIR --depths 2 3 4 6 8 --out F

One JSON object to --out (and stdout): the plan's geometry, and per depth the eager and compiled tokens/s, TFLOP/s and
seconds; `fasttrain train CONFIG --dry-run --measure N` gives the run's own speed beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from fasttrain.compute import distributed
from fasttrain.compute.device import use_device
from fasttrain.config import Config
from fasttrain.config.loading import load_config
from fasttrain.planning.plan import plan_run
from fasttrain.planning.sizing import calibrate
from fasttrain.planning.timed_pass import timed_loss, timed_update


def calibrated(cfg: Config, device: torch.device, depth: int, compiled: bool) -> dict:
    """The plan's own timing of `depth` (`sizing.calibrate`: its loss and optimizer step, compiled as the timing
    compiles them or eager): tokens/s, TFLOP/s, and the call's seconds (the compile, where compiled, included)."""
    cfg = replace(cfg, train=replace(cfg.train, compile=compiled))
    began = time.perf_counter()
    speed = calibrate(cfg, device, update=timed_update(cfg, device), loss=timed_loss(cfg, device), depths=[depth])
    ((flops, rate),) = speed.points
    return {
        "tokens_per_s": round(rate / flops),
        "tflops": round(rate / 1e12, 2),
        "seconds": round(time.perf_counter() - began, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--depths", nargs="+", type=int, default=[2, 3, 4, 6, 8])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    device = use_device(cfg.train.device, None)
    plan = plan_run(cfg, distributed.world_from_env(), device)
    resolved = plan.cfg
    t = resolved.train
    print("\n".join(plan.notes), flush=True)
    rows: dict[int, dict] = {}
    found = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "plan_shape": [resolved.model.n_layers, resolved.model.d_model],
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "precision": t.precision,
        "compile_mode": t.compile_mode,
        "depths": rows,
    }
    base = replace(resolved, model=replace(resolved.model, n_layers=0, d_model=0, n_heads=0, n_kv_heads=0))
    for depth in args.depths:
        row = {"eager": calibrated(base, device, depth, False), "compiled": calibrated(base, device, depth, True)}
        row["compiled_over_eager"] = round(row["compiled"]["tokens_per_s"] / row["eager"]["tokens_per_s"], 3)
        rows[depth] = row
        print(depth, json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(found, indent=1) + "\n")
    print(json.dumps(found))


if __name__ == "__main__":
    main()
