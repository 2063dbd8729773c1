"""The CPU step at the shapes a time budget chooses: tokens/s and FLOP/s per shape and setting, and where the time goes.

    python -m benchmarks.studies.cpu_step [--shape 2x128 3x192 4x256] [--setting eager compiled ...] [--against COMMIT]
                                  [--rounds 2] [--steps 8] [--threads 2] [--profile] [--calibration] [--out FILE]

Each measurement is a process of its own (its own OpenMP threads, a compile of its own): configs/base.toml's
recipe (Muon, the warmdown, today's head and tables) at a fixed shape, random tokens, one micro-batch of
16 x 256 tokens a step, fp32 or bf16 as the machine's "auto" precision gives, 3 untimed steps (a compiled
setting compiles in the first), then --steps steps timed one by one; the median counts. --against COMMIT
measures that commit's tree the same way, beside this one (a detached git worktree, removed afterwards), each
round going through every tree, shape and setting in turn, so a machine that changes speed during the run
moves both sides alike. FLOP/s is the model's training FLOPs per token (6N + attention, Transformer.
flops_per_token) times tokens/s. --profile adds, for this tree, each shape's step split by op category
(benchmarks/studies/profile_step.py: matmul, cross-entropy, norm, optimizer, elementwise, copies), in CPU time.
--calibration adds, each round, a process that times the machine as a budgeted run's plan does (model.n_layers = 0
under train.max_time: sizing.calibrate on the run's loss and update) and the tokens/s that timing predicts for
each shape, against the median measured for this tree's first setting (the run's: eager on a CPU).

Writes one JSON (default benchmarks/results/cpu-step/cpu-step-<date>.json) with the machine, the command and every
measurement. Compare only within one file: the figures depend on the CPU and on what else runs on it.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from benchmarks.studies.common import ROOT, load_average, result_header
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli

# name -> --set items on top of the recipe. A setting an older tree does not know fails there with its own
# message, recorded as that measurement's error.
SETTINGS: dict[str, list[str]] = {
    "eager": ["train.compile=false"],
    "compiled": ["train.compile=true"],
    "eager fused loss": ["train.compile=false", "kernels.linear_cross_entropy=true"],
    "eager unfused loss": ["train.compile=false", "kernels.linear_cross_entropy=false"],
    "compiled fused loss": ["train.compile=true", "kernels.linear_cross_entropy=true"],
    "compiled unfused loss": ["train.compile=true", "kernels.linear_cross_entropy=false"],
    "eager fp32": ["train.compile=false", "train.precision=fp32"],
    "compiled fp32": ["train.compile=true", "train.precision=fp32"],
    "eager bf16": ["train.compile=false", "train.precision=bf16"],
}
# configs/base.toml's recipe over bench_train_step's fixed base (AdamW, cosine; 200 steps, which the data is laid
# out for: more than any measurement takes)
RECIPE = ["optim.name=muon", "schedule.decay=wsd"]
WARMUP = 3
# Run in the tree measured (this one or --against's), so it imports only what both have had: make_trainer.
MEASURE = """
import json, statistics, sys, time
from pathlib import Path
from benchmarks.bench_train_step import make_trainer
sets, steps, data_dir = json.loads(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
trainer = make_trainer(Path("configs/base.toml"), data_dir, *sets)
for _ in range({warmup}):
    trainer.step()
times = []
for _ in range(steps):
    start = time.perf_counter()
    trainer.step()
    times.append(time.perf_counter() - start)
seconds = statistics.median(times)
print(json.dumps({{
    "tokens_per_s": round(trainer.tokens_per_step / seconds, 1),
    "flops_per_token": trainer.model.flops_per_token(trainer.cfg.train.seq_len),
    "step_ms": [round(t * 1e3, 2) for t in times],
    "kernels": trainer.kernels.names(),
    "compiled": bool(trainer.cfg.train.compile),
    "precision": trainer.cfg.train.precision,
}}))
""".format(warmup=WARMUP)
# Run in this tree: the speed a budgeted run's plan times (RunPlan.speed) and its tokens/s at each shape given
CALIBRATE = """
import json, sys
from dataclasses import replace
from pathlib import Path
from benchmarks.bench_train_step import make_trainer
from fasttrain.model.transformer import flops_per_token
sets, shapes, data_dir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
trainer = make_trainer(Path("configs/base.toml"), data_dir, *sets)
speed, m, seq_len = trainer.plan.speed, trainer.cfg.model, trainer.cfg.train.seq_len
print(json.dumps({
    shape: round(speed.tokens_per_s(flops_per_token(replace(m, n_layers=l, d_model=w, n_heads=w // 64), seq_len)), 1)
    for shape, (l, w) in shapes.items()
}))
"""
# What makes make_trainer's run a budgeted, self-sizing one as configs/base.toml is: its plan times the machine
BUDGETED = ["model.n_layers=0", "model.d_model=0", "model.n_heads=0", "train.max_steps=0", 'train.max_time="2m"']


def shape_sets(shape: str) -> list[str]:
    """--set items of a "LAYERSxWIDTH" shape (heads of 64); UsageError naming it if it is not one."""
    try:
        layers, width = (int(n) for n in shape.split("x"))
    except ValueError:
        raise UsageError(f"--shape {shape}: not LAYERSxWIDTH, as 2x128") from None
    if layers < 1 or width < 64 or width % 64:
        raise UsageError(f"--shape {shape}: needs at least one layer and a width a multiple of 64")
    return [f"model.n_layers={layers}", f"model.d_model={width}", f"model.n_heads={width // 64}"]


def measure(tree: Path, sets: list[str], steps: int, threads: int, data_dir: Path) -> dict:
    """One measurement in a fresh process in `tree`: MEASURE's figures, or {"error": its last line}."""
    return in_process(tree, threads, MEASURE, json.dumps(sets), str(steps), str(data_dir))


def predicted(shapes: Sequence[str], threads: int, data_dir: Path) -> dict:
    """The tokens/s a budgeted run's timing on `threads` threads predicts for each of `shapes`, in a fresh process
    of this tree (CALIBRATE), or {"error": its last line}."""
    dims = {s: [int(n) for n in s.split("x")] for s in shapes}
    return in_process(ROOT, threads, CALIBRATE, json.dumps(RECIPE + BUDGETED), json.dumps(dims), str(data_dir))


def in_process(tree: Path, threads: int, script: str, *args: str) -> dict:
    """The JSON `script` prints last, run with `args` in a fresh process in `tree` on `threads` threads, or
    {"error": its last line of stderr}."""
    # The step a CPU run takes: without TRITON_INTERPRET (a test session's), which would interpret the Triton kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profiled(shape: str, setting: str, steps: int, threads: int) -> dict:
    """This tree's step at `shape` under `setting` on `threads` threads, split by op category (in this process:
    profile_step.profile_trainer)."""
    import torch

    from benchmarks.studies.profile_step import profile_steps

    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as out:
        found = profile_steps(
            str(ROOT / "configs/base.toml"), RECIPE + shape_sets(shape) + SETTINGS[setting], steps, Path(out)
        )
    return {"step_ms": found["step_ms"], "ms_per_step": found["ms_per_step"]}


def worktree(commit: str, parent: Path) -> Path:
    """A detached worktree of `commit` under `parent`; UsageError naming the commit if git has none such."""
    path = parent / commit
    proc = subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise UsageError(f"--against {commit}: {(proc.stderr.strip().splitlines() or ['git worktree failed'])[-1]}")
    return path


def summarise(records: list[dict]) -> list[dict]:
    """Per (tree, shape, setting): the median over rounds of tokens/s, and FLOP/s from it."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["tree"], r["shape"], r["setting"]), []).append(r)
    rows = []
    for (tree, shape, setting), found in groups.items():
        ok = [r for r in found if "error" not in r]
        row = {"tree": tree, "shape": shape, "setting": setting}
        if ok:
            speed = statistics.median(r["tokens_per_s"] for r in ok)
            row |= {"tokens_per_s": round(speed), "gflop_per_s": round(speed * ok[0]["flops_per_token"] / 1e9, 1)}
        else:
            row["error"] = found[-1]["error"]
        rows.append(row)
    return rows


def calibration_summary(records: list[dict], shapes: Sequence[str], setting: str) -> list[dict]:
    """Per shape: the median over rounds of the tokens/s the timing predicted and of this tree's measured under
    `setting`, and predicted / measured."""
    rows = []
    for shape in shapes:
        guesses = [r["calibration"][shape] for r in records if shape in r.get("calibration", {})]
        found = [
            r["tokens_per_s"]
            for r in records
            if r.get("tree") == "HEAD" and r.get("shape") == shape and r.get("setting") == setting and "error" not in r
        ]
        if guesses and found:
            guess, real = statistics.median(guesses), statistics.median(found)
            rows.append(
                {"shape": shape, "predicted": round(guess), "measured": round(real), "ratio": round(guess / real, 3)}
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.cpu_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=["2x128", "3x192", "4x256"])
    parser.add_argument("--setting", nargs="+", choices=list(SETTINGS), default=["eager", "compiled"])
    parser.add_argument("--against", metavar="COMMIT", help="measure this commit's tree too, interleaved")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also split this tree's step by op category")
    parser.add_argument(
        "--calibration", action="store_true", help="also what a budgeted run's timing predicts for each shape"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shapes = {s: shape_sets(s) for s in args.shape}
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / f"benchmarks/results/cpu-step/cpu-step-{today}.json"
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"HEAD": ROOT}
        try:
            if args.against:
                trees[args.against] = worktree(args.against, Path(scratch))
            for round_ in range(args.rounds):
                for shape, sets in shapes.items():
                    for setting in args.setting:
                        for name, tree in trees.items():
                            # each tree prepares the tokenizer its own way: a data folder of its own
                            data_dir = Path(scratch) / f"data-{name}"
                            found = measure(tree, RECIPE + sets + SETTINGS[setting], args.steps, args.threads, data_dir)
                            records.append(
                                {
                                    "round": round_,
                                    "tree": name,
                                    "shape": shape,
                                    "setting": setting,
                                    **found,
                                    "load_average": load_average(),
                                }
                            )
                            print(json.dumps(records[-1]), flush=True)
                if args.calibration:
                    found = predicted(args.shape, args.threads, Path(scratch) / "data-HEAD")
                    records.append({"round": round_, "calibration": found, "load_average": load_average()})
                    print(json.dumps(records[-1]), flush=True)
        finally:
            if args.against in trees:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(trees[args.against])], cwd=ROOT, capture_output=True
                )
    results = {
        **result_header("the CPU step at the budget's shapes", "benchmarks.studies.cpu_step", argv, today),
        "threads": args.threads,
        "summary": summarise([r for r in records if "calibration" not in r]),
        "records": records,
    }
    if args.calibration:
        results["calibration"] = calibration_summary(records, args.shape, args.setting[0])
    if args.profile:
        results["profile"] = {
            f"{shape} {setting}": profiled(shape, setting, args.steps, args.threads)
            for shape in shapes
            for setting in args.setting
        }
    out.write_text(json.dumps(results, indent=1) + "\n")
    for row in results["summary"]:
        figures = row.get("error") or f"{row['tokens_per_s']:>8,} tokens/s {row['gflop_per_s']:>7.1f} GFLOP/s"
        print(f"{row['tree']:>10} {row['shape']:>6} {row['setting']:<20} {figures}")
    for row in results.get("calibration", []):
        print(f"calibration {row['shape']:>6}: predicted {row['predicted']:,} measured {row['measured']:,} tokens/s")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
