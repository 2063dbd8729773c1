"""The main job at longer budgets: is each budget's model better than the one before?

    python -m benchmarks.studies.budget_ladder [--budgets 60 120 300 600 1800] [--set KEY=VALUE ...] [--out FILE]

Runs `fasttrain train configs/base.toml` as a user does (the embedded corpus, the shape, context and weight decay
its plan chooses), with only train.max_time, train.out_dir and the --set items (a seed, a variant of the recipe) set,
one budget after another on a machine left
alone; then scores each run's final/ as a user does, `fasttrain evaluate RUN --split val` (bits per byte over the
whole validation split). Records what each plan chose (its notes), the run's evaluations (best and last) and the
score. Run it on a quiet machine: the budgets are seconds, so the models depend on the machine's speed.

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


def run_budget(seconds: int, sets: list[str], work: Path) -> dict:
    """One budget, base.toml with `sets` (config items, KEY=VALUE): train, then score final/."""
    out = work / f"base-{seconds}s"
    before = load_average()
    train = [sys.executable, "-m", "fasttrain.train", "configs/base.toml", "--overwrite", "--quiet"]
    train += ["--set", *sets, f"train.max_time={seconds}", f'train.out_dir="{out}"']
    subprocess.run(train, cwd=ROOT, check=True)
    score = [sys.executable, "-m", "fasttrain.evaluate", str(out), "--split", "val"]
    printed = subprocess.run(score, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    bpb = float(re.search(r"bpb (\S+)", printed).group(1))  # evaluate's line: loss L  ppl P  bpb B  accuracy A
    events = read_metrics(out)
    evals = [round(e["val_bpb"], 4) for e in events if e["event"] == "eval"]
    start, end = (next(e for e in events if e["event"] == kind) for kind in ("start", "end"))
    m, o = load_config(out / "config.toml").model, load_config(out / "config.toml").optim
    return {
        "budget_s": seconds,
        "sets": sets,
        "shape": f"{m.n_layers} x {m.d_model}",
        "context": m.max_seq_len,
        "weight_decay": o.weight_decay,
        "steps": end["step"],
        "planned_epochs": start["sources"][0]["planned_epochs"],
        "evals": evals,
        "best": min(evals),
        "last": evals[-1],
        "final_val_bpb": bpb,
        "load_before": before,
        "load_after": load_average(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.budget_ladder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[60, 120, 300, 600, 1800], metavar="SECONDS")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config items for every run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / f"benchmarks/results/recipe/cpu-budget-ladder-{today}.json"
    what = "the main job at each budget, final/ scored on the validation split"
    with tempfile.TemporaryDirectory() as work:
        for seconds in args.budgets:
            run = run_budget(seconds, args.set, Path(work))
            add_runs(out, [run], what, __spec__.name, argv, today)  # after each budget: a long ladder keeps its parts
            print(
                f"{seconds:>5} s: {run['shape']} at {run['context']}, wd {run['weight_decay']:g}, {run['steps']} steps "
                f"({run['planned_epochs'] or 0:.1f} epochs planned): final/ {run['final_val_bpb']:.4f} "
                f"(best {run['best']:.4f}, last {run['last']:.4f})"
            )
    return 0


if __name__ == "__main__":
    run_cli(main)
