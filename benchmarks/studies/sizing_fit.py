"""The rule of fasttrain/planning/sizing.py fitted to the ladder sweeps: which depth is best for a time budget, and
which tokens-per-parameter ratio makes the rule choose it.

    python -m benchmarks.studies.sizing_fit --measure [--threads 1 2]   # time each depth's training step (quiet machine)
    python -m benchmarks.studies.sizing_fit                              # fit, from the committed results

The sweeps (`python -m benchmarks.studies.recipe_sweep --steps S --case "depth N default" --out
benchmarks/results/sizing/cpu-ladder-default-<date>/<corpus>-<S>steps-depth<N>.json`) train each depth of the ladder
with configs/base.toml's recipe (width 64 d, Muon, a warmdown over the last half, the untied head, embedding
norm and value embeddings at their rates) for a number of steps: what a depth learns from so many tokens does
not depend on the machine or on what else runs on it. (The first fit, 2026-11-25, was made on the recipe
before, cases "depth N", files benchmarks/results/sizing/cpu-ladder-<corpus>-<S>steps-2026-11-25.json.) A machine's
speed turns a budget into tokens: --measure times each depth's real steps (`fasttrain train --dry-run
--measure`, optimizer included) at 1 and 2 threads into benchmarks/results/sizing/cpu-ladder-speeds-<date>.json. Then
for each corpus, budget (30 s to 10 min) and thread count, each depth's validation bits per byte at the tokens
it would train on is read off its sweep (interpolated in log tokens between the steps swept; a budget far beyond
a depth's sweep leaves it out), the best depth is the lowest (a depth up to twice past its last point follows
its last two points' line), and each ratio on a grid gives the depth sizing's rule would choose there (with the
corpus's size, as the run knows it, and no depth that would read it more often than the ceiling on epochs tried
with it, of EPOCH_CEILINGS). The pair with the smallest worst regret (bits per byte above the best depth's),
then mean regret, is the rule's TOKENS_PER_PARAM and MAX_EPOCHS; the table of choices and regrets goes to
benchmarks/results/sizing/cpu-ladder-fit-<date>.json and docs/performance.md.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from benchmarks.studies.common import ROOT
from benchmarks.studies.recipe_sweep import CASES, prepared, setting
from fasttrain.config import load_config
from fasttrain.model.transformer import matmul_params
from fasttrain.planning import repeats, sizing
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli

RESULTS = ROOT / "benchmarks/results/sizing"
BUDGETS = (30, 60, 120, 180, 300)  # seconds
EXTRAPOLATE = 2.0  # bpb_at follows a depth's last two sweep points this far beyond the last (in tokens)
# Ratios tried: 0.1 up, a quarter apart. (The first fit stopped at 1.71: above it the main job, its 92K-token
# corpus read 22 times, chose depth 1 and lost 0.14 to depth 2; no depth reading a corpus more than
# sizing.MAX_EPOCHS times is chosen since, so the fit needs no bound of its own.)
RATIOS = tuple(round(0.1 * 1.25**k, 3) for k in range(25))
DEPTHS = (1, 2, 3, 4)
SWEEPS = "cpu-ladder-default-*"  # the folders of the sweeps the fit reads
EPOCH_CEILINGS = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # sizing.MAX_EPOCHS tried with each ratio


def measure_speeds(threads: Sequence[int], cache: Path) -> dict:
    """Tokens/s of each depth's training steps on the large corpus at each thread count (5 timed steps after
    one untimed, the Trainer as the run builds it)."""
    data = prepared("large", cache)
    speeds: dict[str, dict[str, float]] = {}
    for n in threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
        for depth in DEPTHS:
            sets = [f"data.dir={data}", "train.compile=false", *CASES[f"depth {depth} default"]]
            command = [sys.executable, "-m", "fasttrain.train", "configs/base.toml", "--dry-run", "--json"]
            done = subprocess.run(
                [*command, "--measure", "5", "--set", *sets], cwd=ROOT, env=env, capture_output=True, text=True
            )
            if done.returncode:
                raise UsageError(f"depth {depth} at {n} threads: {done.stderr.strip().splitlines()[-1]}")
            speeds.setdefault(str(n), {})[str(depth)] = json.loads(done.stdout)["tokens_per_s"]
            print(f"{n} thread(s), depth {depth}: {speeds[str(n)][str(depth)]:,.0f} tokens/s", flush=True)
    return speeds


def sweep_points(corpus: str) -> tuple[dict[int, list[tuple[float, float]]], float]:
    """Each depth's (tokens, val bpb) of the ladder sweeps of `corpus`, by tokens, and the corpus's training tokens."""
    points: dict[int, list[tuple[float, float]]] = {}
    unique = 0.0
    for path in sorted(RESULTS.glob(f"{SWEEPS}/{corpus}-*steps-*.json")):
        for r in json.loads(path.read_text())["results"]:
            depth = setting(r["sets"], "model.n_layers", 0)
            points.setdefault(depth, []).append((r["tokens"], r["val_bpb"]))
            unique = r["tokens"] / r["epochs"] if r.get("epochs") else unique
    return {d: sorted(p) for d, p in points.items()}, unique


def bpb_at(points: list[tuple[float, float]], tokens: float) -> float | None:
    """The val bpb at `tokens`, linear in log tokens between the two sweep points around it, or along the last
    two points' line up to EXTRAPOLATE times the last (a depth cut off just past its sweep would bias the fit
    toward the depths swept further); None beyond, or below the first point."""
    pairs = list(zip(points, points[1:]))
    for i, ((t0, b0), (t1, b1)) in enumerate(pairs):
        if t0 <= tokens <= t1 or (i == len(pairs) - 1 and t1 < tokens <= EXTRAPOLATE * t1):
            return b0 + (b1 - b0) * math.log(tokens / t0) / math.log(t1 / t0)
    return None


@functools.cache
def ladder_params(depth: int) -> int:
    """matmul_params of the ladder's shape at `depth` as configs/base.toml builds it (vocabulary 4096)."""
    auto = load_config(ROOT / "configs/base.toml", [*CASES["auto"], "model.vocab_size=4096"]).model
    return matmul_params(sizing.ladder_shape(auto, depth))


def rule_depth(tokens_of: dict[int, float], unique: float, ratio: float, max_epochs: float) -> int:
    """The depth sizing's rule chooses among the swept ones at `ratio`, given each depth's tokens: of those that
    read the corpus (of `unique` tokens) at most `max_epochs` times, if any."""

    def distance(depth: int) -> float:
        return abs(math.log(repeats.effective_tokens(tokens_of[depth], unique) / ladder_params(depth) / ratio))

    within = [d for d, t in tokens_of.items() if t <= max_epochs * unique]
    return min(within or tokens_of, key=distance)


def fit(speeds: dict) -> dict:
    """The best depth at each (corpus, threads, budget), and each ratio's worst and mean regret there."""
    cells = []
    for corpus in ("large", "small"):
        points, unique = sweep_points(corpus)
        for threads, rates in speeds["tokens_per_s"].items():
            for budget in BUDGETS:
                tokens_of = {d: rates[str(d)] * budget for d in points if str(d) in rates}
                bpb = {d: bpb_at(points[d], t) for d, t in tokens_of.items()}
                known = {d: b for d, b in bpb.items() if b is not None}
                if len(known) < 2:
                    continue
                best = min(known, key=lambda d: known[d])
                cells.append(
                    {
                        "corpus": corpus,
                        "threads": int(threads),
                        "budget_s": budget,
                        "tokens": {d: round(tokens_of[d]) for d in known},
                        "val_bpb": {d: round(b, 4) for d, b in known.items()},
                        "best": best,
                        "unique": unique,
                    }
                )
    if not cells:
        raise UsageError("no budget has two depths inside the sweeps' tokens: run more of the ladder first")
    regrets = {}
    for rule in [(r, m) for m in EPOCH_CEILINGS for r in RATIOS]:
        worst = []
        for c in cells:
            chosen = rule_depth({d: c["tokens"][d] for d in c["val_bpb"]}, c["unique"], *rule)
            worst.append(c["val_bpb"][chosen] - c["val_bpb"][c["best"]])
        regrets[rule] = (max(worst), sum(worst) / len(worst))
    ratio, max_epochs = min(regrets, key=lambda r: regrets[r])
    for c in cells:
        c["rule"] = rule_depth({d: c["tokens"][d] for d in c["val_bpb"]}, c["unique"], ratio, max_epochs)
        c["regret"] = round(c["val_bpb"][c["rule"]] - c["val_bpb"][c["best"]], 4)
    return {
        "ratio": ratio,
        "max_epochs": max_epochs,
        "worst_regret": round(regrets[ratio, max_epochs][0], 4),
        "mean_regret": round(regrets[ratio, max_epochs][1], 4),
        "regrets": {f"{r} {m:g}": [round(w, 4), round(a, 4)] for (r, m), (w, a) in regrets.items()},
        "cells": cells,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.sizing_fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="time each depth's steps first (a quiet machine)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fasttrain-recipe-sweep"))
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    if args.measure:
        from benchmarks.conftest import environment

        speeds = {"machine": environment(), "date": today, "tokens_per_s": measure_speeds(args.threads, args.cache)}
        (RESULTS / f"cpu-ladder-speeds-{today}.json").write_text(json.dumps(speeds, indent=1) + "\n")
    found = sorted(RESULTS.glob("cpu-ladder-speeds-*.json"))
    if not found:
        raise UsageError("no benchmarks/results/sizing/cpu-ladder-speeds-*.json: run with --measure first")
    result = fit(json.loads(found[-1].read_text()))
    for c in result["cells"]:
        scores = "  ".join(f"d{d} {b:.3f}" for d, b in sorted(c["val_bpb"].items()))
        print(
            f"{c['corpus']:5} {c['threads']}t {c['budget_s']:4}s  best d{c['best']}  rule d{c['rule']} "
            f"(+{c['regret']:.3f})  {scores}"
        )
    print(
        f"ratio {result['ratio']}, at most {result['max_epochs']:g} epochs: worst regret {result['worst_regret']}, "
        f"mean {result['mean_regret']}"
    )
    (RESULTS / f"cpu-ladder-fit-{today}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
