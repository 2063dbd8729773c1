"""The main job at longer budgets: is each budget's model better than the one before?

    python -m benchmarks.studies.budget_ladder [--budgets 60 120 300 600 1800] [--set KEY=VALUE ...] [--out FILE]
        [--busy-timing N]

Runs `fasttrain train configs/base.toml` as a user does (the embedded corpus, the shape, context and weight decay
its plan chooses), with only train.max_time, train.out_dir and the --set items (a seed, a variant of the recipe) set,
one budget after another on a machine left
alone; then scores each run's final/ as a user does, `fasttrain evaluate RUN --split val` (bits per byte over the
whole validation split). Records what each plan chose (its notes), the run's evaluations (best and last) and the
score, and the seconds its phases trained (a distilled run's rounds and student). Run it on a quiet machine: the
budgets are seconds, so the models depend on the machine's speed. `--busy-timing N` spins N processes while the plan
times the machine, and only then: a timing that reads the machine slow (issue 99), against which a run's later
phases, decided from the seconds they took, still spend the budget.

Writes one JSON (default benchmarks/results/recipe/cpu-budget-ladder-<date>.json).
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from benchmarks.studies.common import ROOT, add_runs, load_average
from fasttrain.config import load_config
from fasttrain.plot import read_metrics
from fasttrain.system.errors import ArgumentParser, run_cli

# `python -c SLOWED N ARGS...`: fasttrain.train's main with N processes spinning while sizing.calibrate times
SLOWED = """import multiprocessing, sys
from fasttrain.planning import sizing
from fasttrain.system.errors import run_cli
from fasttrain.train import main
calibrate = sizing.calibrate
def spin():
    while True:
        pass
def timed(*args, **kwargs):
    spinning = [multiprocessing.Process(target=spin, daemon=True) for _ in range(int(sys.argv[1]))]
    for p in spinning:
        p.start()
    try:
        return calibrate(*args, **kwargs)
    finally:
        for p in spinning:
            p.kill()
sizing.calibrate = timed
run_cli(main, sys.argv[2:])
"""


def run_budget(seconds: int, sets: list[str], work: Path, busy: int = 0) -> dict:
    """One budget, base.toml with `sets` (config items, KEY=VALUE): train (`busy` processes spinning while the
    plan times the machine), then score final/."""
    out = work / f"base-{seconds}s"
    before = load_average()
    command = ["-c", SLOWED, str(busy)] if busy else ["-m", "fasttrain.train"]
    train = [sys.executable, *command, "configs/base.toml", "--overwrite", "--quiet"]
    train += ["--set", *sets, f"train.max_time={seconds}", f'train.out_dir="{out}"']
    subprocess.run(train, cwd=ROOT, check=True)
    score = [sys.executable, "-m", "fasttrain.evaluate", str(out), "--split", "val"]
    printed = subprocess.run(score, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    bpb = float(re.search(r"bpb (\S+)", printed).group(1))  # evaluate's line: loss L  ppl P  bpb B  accuracy A
    # A distilled run's phases, in order: its rounds of members (ensemble, ensemble-2, ...), then its student in
    # RUN, which holds no run of its own where final/ is the one member's
    rounds = sorted((p for p in out.glob("ensemble*") if p.is_dir()), key=lambda p: int(p.name.partition("-")[2] or 1))
    phases = [*rounds, *([out] if (out / "metrics.jsonl").is_file() else [])]
    events = read_metrics(phases[-1])  # the phase whose model final/ holds
    evals = [round(e["val_bpb"], 4) for e in events if e["event"] == "eval"]
    end = next(e for e in events if e["event"] == "end")
    final = load_config(out / "final" / "config.toml")
    m, o = final.model, final.optim
    trained = [next(e for e in reversed(read_metrics(p)) if e["event"] == "end")["train_seconds"] for p in phases]
    # The epochs the whole run's plan read at its timed speed (a distilled run's first round records that plan; the
    # round's own plan, untimed, counts the steps to its epoch limit)
    first = next(e for e in read_metrics(phases[0]) if e["event"] == "start")
    whole = (first.get("phase") or {}).get("whole", first)
    return {
        "budget_s": seconds,
        "sets": sets,
        "shape": f"{m.n_layers} x {m.d_model}",
        "context": final.train.seq_len or m.max_seq_len,  # the rows it trained on (a set train.seq_len keeps its own)
        "weight_decay": o.decay(),
        "steps": end["step"],
        "planned_epochs": whole["sources"][0]["planned_epochs"],
        "evals": evals,
        "best": min(evals),
        "last": evals[-1],
        "final_val_bpb": bpb,
        "final_scale": end.get("weights_scale", 1.0),  # its output layer's (checkpoint.fit_temperature)
        "busy_timing": busy,
        "phases": [
            f"{p.name} ({load_config(p / 'config.toml').model.members} model(s)) {s:.0f} s"
            for p, s in zip(phases, trained)
        ],
        "trained_share": round(sum(trained) / seconds, 3),
        "load_before": before,
        "load_after": load_average(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.budget_ladder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[60, 120, 300, 600, 1800], metavar="SECONDS")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config items for every run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--busy-timing", type=int, default=0, metavar="N", help="N processes spin while it times")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / f"benchmarks/results/recipe/cpu-budget-ladder-{today}.json"
    what = "the main job at each budget, final/ scored on the validation split"
    with tempfile.TemporaryDirectory() as work:
        for seconds in args.budgets:
            run = run_budget(seconds, args.set, Path(work), args.busy_timing)
            add_runs(out, [run], what, __spec__.name, argv, today)  # after each budget: a long ladder keeps its parts
            print(
                f"{seconds:>5} s: {run['shape']} at {run['context']}, wd {run['weight_decay']:g}, {run['steps']} steps "
                f"({run['planned_epochs'] or 0:.1f} epochs planned): final/ {run['final_val_bpb']:.4f} "
                f"(best {run['best']:.4f}, last {run['last']:.4f}); {run['trained_share']:.0%} of it trained"
            )
    return 0


if __name__ == "__main__":
    run_cli(main)
