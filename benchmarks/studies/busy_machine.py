"""A training step on a CPU that another process is using too: how much slower than on a quiet one.

    python -m benchmarks.studies.busy_machine [--steps 20] [--out FILE.json]

A second process on the same cores takes its share of them, so a step should take about twice as long
beside one other busy process on every core. PyTorch's CPU threads are OpenMP's (libgomp in the pip wheels),
and by default a thread that finishes its part of a parallel region spins for a while before it sleeps, so
that the next region starts without a wake-up; beside another process those spinning threads burn the time
slices the threads with work left need, and a step took 10-20x as long (issue 64). OMP_WAIT_POLICY=PASSIVE
sleeps at once; GOMP_SPINCOUNT bounds the spin. Each policy is measured quiet and beside a competitor (a
second process training the same step with the default policy, as a second run would), in processes of their
own (the policy is read when OpenMP starts), alternating, on configs/base.toml's 2 x 128 shape at its batch.

Writes benchmarks/results/cpu-step/cpu-busy-machine-<date>.json by default: ms a step per policy, quiet and busy, and
the slowdown busy / quiet. Run it on a machine with nothing else running (load average under 0.5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.studies.common import ROOT, result_header

POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin 10000": {"GOMP_SPINCOUNT": "10000"}}

# One process's work: forward and backward of the 2 x 128 model at configs/base.toml's batch, timed after two
# untimed steps; prints ms a step. With --forever it trains until killed (the competitor).
STEP = """
import sys, time, torch
from fasttrain.config import load_config
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.objective import NextTokenLoss
shape = ["model.vocab_size=4096", "model.n_layers=2", "model.d_model=128", "model.n_heads=2"]
loss = NextTokenLoss(Transformer(load_config("configs/base.toml", shape).model))
x = torch.randint(0, 4096, (16, 257))
steps = int(sys.argv[1])
i = 0
while steps == 0 or i < steps + 2:
    if i == 2:
        began = time.perf_counter()
    sums = loss(x[:, :-1], x[:, 1:])
    (sums.loss / sums.counted).backward()
    i += 1
print((time.perf_counter() - began) / steps * 1000)
"""


def ms_per_step(policy: dict[str, str], steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | policy
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(steps)], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    day = datetime.date.today().isoformat()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="quiet/busy measurements of each policy, alternating")
    parser.add_argument("--out", default=str(ROOT / f"benchmarks/results/cpu-step/cpu-busy-machine-{day}.json"))
    args = parser.parse_args(argv)
    found: dict[str, dict[str, list[float]]] = {name: {"quiet": [], "busy": []} for name in POLICIES}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, policy in POLICIES.items():
            found[name]["quiet"].append(ms_per_step(policy, args.steps))
            competitor = subprocess.Popen(
                [sys.executable, "-c", STEP, "0"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                time.sleep(3)  # past its imports and first steps
                found[name]["busy"].append(ms_per_step(policy, max(2, args.steps // 4)))
            finally:
                competitor.kill()
                competitor.wait()
            print(name, {k: [round(v) for v in vs] for k, vs in found[name].items()}, flush=True)
    summary = {
        name: {
            "quiet_ms": round(min(f["quiet"]), 1),
            "busy_ms": round(min(f["busy"]), 1),
            "slowdown": round(min(f["busy"]) / min(f["quiet"]), 2),
        }
        for name, f in found.items()
    }
    what = (
        "ms a forward-backward step of the 2 x 128 model (16 x 256 tokens), quiet and beside a second process doing "
        "the same, per OpenMP wait policy; the best of --rounds"
    )
    result = {
        **result_header(what, "benchmarks.studies.busy_machine", argv, day),
        "threads": os.cpu_count(),
        "load_average_before": load_before,
        "summary": summary,
        "runs": found,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
