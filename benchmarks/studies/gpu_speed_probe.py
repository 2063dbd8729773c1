"""The sizing's speed against the run's: each ladder depth's update timed eager and compiled (as the run trains it
on a GPU), at the batch geometry, precision and loss the plan of CONFIG resolves, with each shape's compile time and
the plan's own timing of it (`sizing.calibrate`, compiled where the run compiles on a GPU). On a GPU a small step is
bound by its launches, so a timing at other rows, context or compiling than the run's reads the machine at another
speed (benchmarks/results/gpu/h200-2026-11-30b: 5.3x slower at 16 x 256 than the run at 32 x 512).

    python -m benchmarks.studies.gpu_speed_probe configs/base.toml --set data.dir=DIR --depths 2 3 4 6 8 --out F

One JSON object to --out (and stdout): the plan's geometry, and per depth the eager and compiled tokens/s (STEPS
passes after WARMUP untimed), the first compiled pass's seconds, and the plan's own two-pass calibration.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from fasttrain.compute import distributed
from fasttrain.compute.device import autocast, synchronize, use_device
from fasttrain.config import Config
from fasttrain.config.loading import load_config
from fasttrain.model.transformer import Transformer
from fasttrain.planning.plan import plan_run
from fasttrain.planning.sizing import calibrate, flops_per_token, ladder_shape
from fasttrain.planning.timed_pass import timed_loss, timed_update

WARMUP, STEPS = 3, 20


def timed(cfg: Config, device: torch.device, depth: int, compiled: bool) -> dict:
    """tokens/s of `depth`'s update (the plan's loss and optimizer step, the loss compiled as the timing compiles it
    or eager), an update's milliseconds and TFLOP/s, and the first pass's seconds (the compile, where compiled)."""
    cfg = replace(cfg, train=replace(cfg.train, compile=compiled))
    t, shape = cfg.train, ladder_shape(cfg.model, depth)
    model = Transformer(shape).to(device)
    step, objective = timed_update(cfg, device)(model), timed_loss(cfg, device)(model)
    tokens = torch.randint(0, shape.vocab_size, (t.batch_size, t.seq_len + 1), device=device)

    def passes(n: int) -> float:  # seconds of n passes, the device synchronized at the ends only (its throughput)
        synchronize(device)
        began = time.perf_counter()
        for _ in range(n):
            with autocast(t.precision, device):
                value = objective(tokens[:, :-1], tokens[:, 1:])
            value.backward()
            step()
        synchronize(device)
        return time.perf_counter() - began

    first = passes(1)
    passes(WARMUP - 1)
    each = passes(STEPS) / STEPS
    flops = flops_per_token(replace(shape, members=1), t.seq_len) * t.batch_size * t.seq_len
    return {
        "tokens_per_s": round(t.batch_size * t.seq_len / each),
        "first_pass_s": round(first, 2),
        "step_ms": round(1e3 * each, 3),
        "tflops": round(flops / each / 1e12, 2),
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
        began = time.perf_counter()  # the plan's own timing of the shape: compiled where the run compiles on a GPU
        speed = calibrate(
            base, device, update=timed_update(base, device), loss=timed_loss(base, device), depths=[depth]
        )
        flops, rate = speed.points[0]
        row: dict = {
            "calibrate_tokens_per_s": round(rate / flops),
            "calibrate_s": round(time.perf_counter() - began, 2),
            "eager": timed(base, device, depth, compiled=False),
            "compiled": timed(base, device, depth, compiled=True),
        }
        row["compiled_over_eager"] = round(row["compiled"]["tokens_per_s"] / row["eager"]["tokens_per_s"], 3)
        rows[depth] = row
        print(depth, json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(found, indent=1) + "\n")
    print(json.dumps(found))


if __name__ == "__main__":
    main()
