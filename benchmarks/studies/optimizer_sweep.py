"""The optimizers compared on the main job, and the cost of one Muon step against one AdamW step.

    python -m benchmarks.studies.optimizer_sweep                      # both parts, ~20 minutes on 2 CPU cores
    python -m benchmarks.studies.optimizer_sweep --part runs --max-steps 200
    python -m benchmarks.studies.optimizer_sweep --part steps         # only the 124M step timings

runs: configs/base.toml trained with each optimizer at three learning rates (the grid
below), shortened to --max-steps (default 100 instead of the config's 200, so the twelve
runs fit in ~15 minutes; the schedule is the config's, compressed), without samples,
evaluated once at the end. Each run records its final validation bits per byte and wall
time. Muon's rates are those of its matrix group; its AdamW half keeps the config's lr.
Every run decays to a tenth of its peak (schedule.min_lr).

steps: one optimizer update of the GPT-2-small model (configs/gpt2-small.toml: width 768,
vocabulary 50304) on the CPU, fp32, with random gradients: AdamW against Muon (AdamW for the
embedding and norms, Newton-Schulz for the block matrices), SGD and Adafactor. The median of
--repeats calls after one warm-up call. Muon's Newton-Schulz is ~130 GFLOP of matmuls per
block (in fp32 on a CPU without native bf16, see fasttrain.optimization.optimizers.Muon), so by default the
model keeps --layers 1 of its 12 blocks (the record says how many; --layers 12 is the whole 124M).

Writes one JSON (default benchmarks/results/recipe/cpu-optimizers-<date>.json) with the machine,
the command and every result.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.conftest import FIXED_BASE, environment
from benchmarks.studies.common import ROOT
from fasttrain.config import load_config
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import Updater
from fasttrain.system.errors import ArgumentParser, run_cli
from fasttrain.training.trainer import Trainer

# optimizer: (the key its peak learning rate is set by, the rates tried). The AdamW rates bracket the
# config's tuned 2e-3; the others start from their usual ranges (Muon ~0.02, SGD with momentum ~0.1).
GRID = {
    "adamw": ("optim.lr", [1e-3, 2e-3, 4e-3]),
    "muon": ("optim.muon.lr", [0.01, 0.02, 0.04]),
    "sgd": ("optim.lr", [0.03, 0.1, 0.3]),
    "adafactor": ("optim.lr", [3e-3, 1e-2, 3e-2]),
}


def sweep_overrides(name: str, key: str, lr: float, max_steps: int, out_dir: Path) -> list[str]:
    """The --set overrides of one run of the grid."""
    base = load_config(ROOT / "configs/base.toml")
    scheduled = lr if key == "optim.lr" else base.optim.lr  # the rate the schedule (and min_lr) is relative to
    return [
        *FIXED_BASE,
        f"optim.name={name}",
        f"{key}={lr}",
        f"schedule.min_lr={scheduled / 10:g}",
        f"schedule.warmup_steps={min(base.schedule.warmup_steps, max_steps)}",
        f"train.max_steps={max_steps}",
        f"train.eval_interval={max_steps}",
        f"checkpoint.interval={max_steps}",
        "train.sample_tokens=0",
        "train.tensorboard=false",
        f"train.out_dir={out_dir}",
    ]


def run_grid(max_steps: int, names: Sequence[str]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="optimizer-sweep-") as tmp:
        for name in names:
            key, rates = GRID[name]
            for lr in rates:
                overrides = sweep_overrides(name, key, lr, max_steps, Path(tmp) / f"{name}-{lr:g}")
                start = time.perf_counter()
                summary = Trainer(load_config(ROOT / "configs/base.toml", overrides), quiet=True).train()
                seconds = time.perf_counter() - start
                results.append(
                    {
                        "optimizer": name,
                        key: lr,
                        "final_val_bpb": round(summary["val_bpb"], 4),
                        "final_val_loss": round(summary["val_loss"], 4),
                        "wall_seconds": round(seconds, 1),
                        "skipped_steps": summary["skipped_steps"],
                        "overrides": overrides[:-1],
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    return results


def time_steps(names: Sequence[str], repeats: int, layers: int) -> list[dict]:
    """Median seconds of one Updater.apply per optimizer on the 124M model cut to `layers` blocks,
    gradients already in place."""
    cfg = load_config(ROOT / "configs/gpt2-small.toml", [f"model.n_layers={layers}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    results = []
    for name in names:
        optim = load_config(ROOT / "configs/gpt2-small.toml", [f"optim.name={name}"]).optim
        updater = Updater(model, optim, torch.device("cpu"), "fp32")
        times = []
        for _ in range(repeats + 1):  # the first call allocates the optimizer state
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            start = time.perf_counter()
            updater.apply(optim.lr)
            times.append(time.perf_counter() - start)
        results.append(
            {
                "optimizer": name,
                "model": f"gpt2-small with {layers} of its 12 blocks",
                "parameters": model.num_params(),
                "median_step_seconds": round(statistics.median(times[1:]), 3),
                "step_seconds": [round(t, 3) for t in times[1:]],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def git_commit() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.optimizer_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "runs", "steps"], default="all")
    parser.add_argument("--max-steps", type=int, default=100, help="steps of each run (configs/base.toml: 200)")
    parser.add_argument("--optimizers", nargs="+", choices=list(GRID), default=list(GRID))
    parser.add_argument("--repeats", type=int, default=1, help="timed calls of each 124M step (after one warm-up)")
    parser.add_argument("--layers", type=int, default=1, help="blocks of the 124M model kept for the step timings")
    parser.add_argument(
        "--out", type=Path, default=ROOT / f"benchmarks/results/recipe/cpu-optimizers-{datetime.date.today()}.json"
    )
    args = parser.parse_args(argv)
    report = {
        "what": "issue #22: the optimizers on configs/base.toml, and one 124M optimizer step on the CPU",
        "date": str(datetime.date.today()),
        "commit": git_commit(),
        "machine": environment(),
        "command": " ".join(["python -m benchmarks.studies.optimizer_sweep", *(argv or sys.argv[1:])]),
    }
    if args.part in ("all", "runs"):
        report["runs"] = {
            "config": "configs/base.toml",
            "max_steps": args.max_steps,
            "results": run_grid(args.max_steps, args.optimizers),
        }
    if args.part in ("all", "steps"):
        report["steps"] = time_steps(args.optimizers, args.repeats, args.layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
