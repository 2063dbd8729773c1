"""Profile training steps with torch.profiler: where a step's time goes, and a trace to look at.

    python -m benchmarks.profile_step configs/gpt2-small.toml [--set KEY=VALUE ...] [--steps 5] [--out DIR]

Builds the config's Trainer as bench_train_step does (random tokens already on the
device, one micro-batch per step), runs 3 warm-up steps (compilation, autotuning),
then profiles --steps steps. Prints the ops that took the most time (GPU time on
CUDA, CPU time otherwise) and writes DIR/trace.json for chrome://tracing or
Perfetto, where the gaps show: launch overhead between short kernels, host syncs
(the device idle while the CPU waits), unfused elementwise chains.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_train_step import make_trainer
from fasttrain.system.errors import ArgumentParser, run_cli

WARMUP_STEPS = 3


def profile_steps(config: str, overrides: Sequence[str], steps: int, out: Path) -> str:
    """Profile `steps` steps of `config`; writes out/trace.json and returns the top-ops table."""
    with tempfile.TemporaryDirectory() as data_dir:
        trainer = make_trainer(Path(config), Path(data_dir), *overrides)
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(WARMUP_STEPS):
            trainer.step()
        cuda = trainer.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.step()
            if cuda:
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / "trace.json"))
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a run config (TOML)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--steps", type=int, default=5, help="steps to profile after the warm-up (default 5)")
    parser.add_argument("--out", default="profile", help="directory for trace.json (default ./profile)")
    args = parser.parse_args(argv)
    print(profile_steps(args.config, args.set, args.steps, Path(args.out)))
    print(f"trace: {Path(args.out) / 'trace.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
