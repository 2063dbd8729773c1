"""Time to quality on one GPU: fasttrain's budgeted base against nanochat at its own GPU settings, validation bits per
byte after the same 2 minutes of training on the same prepared tokens. gpu_check's `quality` stage runs it:

    python -m benchmarks.studies.gpu_check --stage quality --out DIR      (--dry-run: on the CPU, at toy sizes)

What a lent GPU has no network for travels in the ignored folder QUALITY_DIR (`carry` takes it):
  .quality/stdlib-large/  the large corpus prepared (time_to_quality's `--corpus large`: every .py file of the
                          standard library at vocab 4096, 8.4M training tokens; 19 MB), both sides' tokens
  .quality/nanochat/      nanochat at 92d63d4 without its history (`git archive`, 1.3 MB), imported, never copied;
                          NANOCHAT_DIR names another checkout
Without them (a dry run) it prepares the docstrings corpus and imports the stand-in in fake_nanochat/.

The sides, each in a process of its own, one after the other on the same GPU:
  fasttrain  configs/base.toml with train.max_time = BUDGET (its default) on the prepared folder, as
             time_to_quality's run_fasttrain runs it: its plan chooses shape, context, decay and ensemble members
             for this GPU's measured speed; compiled (train.compile auto); bf16 (precision auto); final/'s weights
             scored on the whole val split at its own context.
  nanochat   time_to_quality's train_nanochat with scripts/base_train.py's GPU defaults (GPU): context 2048, head
             dim 128, 32 rows a micro-batch, its batch from its depth (base_train_batch: the Power Lines rule on
             its compute-optimal tokens, 12 per scaling parameter), its rates and weight decay scaled to that batch,
             bf16 (NANOCHAT_DTYPE, what it picks on sm_80 and later), torch.compile'd, its schedule read off the
             clock over its own horizon (the compute-optimal tokens' updates). Window pattern "L": nanochat reaches
             FlashAttention-3 only through the `kernels` package from the Hugging Face hub, which a lent GPU cannot
             reach, and base_train itself then advises --window-pattern L (SDPA has no sliding window).
Compiling and warming up are outside the clock on both sides (time_to_quality's module docstring says how).

nanochat's two depths bracket its best for the budget by its own compute-optimal rule (TARGET_PARAM_DATA_RATIO
tokens per scaling parameter): the first (first_depth) is the deepest whose compute-optimal training FLOPs
(GPT.estimate_flops x those tokens) fit the budget at MFU_GUESS of the GPU's bf16 matmul rate measured here. Its
run measures what the guess stood for: if it trained its compute-optimal tokens within the budget, the best depth
is deeper and the second is one deeper, else one shallower (second_depth). The result says whether the two did
bracket it (`bracketed`: one read its tokens within the budget, the other not). The better of the two by val bpb
is nanochat's figure.

Time: one 10-minute command. The stage's limit is gpu_check's STAGE_LIMITS["quality"]. fasttrain is killed where it
would leave the first depth less than its budget and RESERVE seconds (start, compile, warm-up, scoring); the second
depth runs only if the time left is at least what the first took, else the result says it was not run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.conftest import measure_matmul_rate
from benchmarks.studies.common import ROOT, prepared_corpus
from benchmarks.studies.time_to_quality import (
    TARGET_PARAM_DATA_RATIO,
    NanochatSettings,
    find_nanochat,
    nanochat_recipe,
    run_fasttrain,
    run_nanochat,
    scaling_params,
)
from fasttrain.system.errors import UsageError

QUALITY_DIR = ROOT / ".quality"  # ignored (.gitignore): what a lent GPU's `carry` takes along
CORPUS = QUALITY_DIR / "stdlib-large"
CHECKOUT = QUALITY_DIR / "nanochat"
FAKE_CHECKOUT = Path(__file__).parent / "fake_nanochat"
SIDES = ("fasttrain", "nanochat")
BUDGET = 120.0  # seconds of training a side: configs/base.toml's train.max_time
RESERVE = 75.0  # seconds a side takes beyond its budget, at most: process start, compile, warm-up, scoring
# scripts/base_train.py's defaults on a GPU (no FlashAttention-3 there: window pattern L, as it advises)
GPU = NanochatSettings(device="cuda", seq_len=2048, head_dim=128, window_pattern="L", rules="base_train")
MFU_GUESS = 0.25  # of the measured bf16 matmul rate, for the first depth only: its run measures the real one
MAX_DEPTH = 32
# A dry run: seconds, on the CPU, a toy context and batch, eager (its timings mean nothing)
DRY_BUDGET = 2.0
DRY_RESERVE = 60.0
DRY = NanochatSettings(
    seq_len=32, head_dim=16, window_pattern="L", device_rows=4, rules="base_train", batch=128, compile=False
)


def compute_optimal_flops(gpt: Any, depth: int, vocab_size: int, settings: NanochatSettings) -> float:
    """The training FLOPs base_train plans for nanochat at `depth`: GPT.estimate_flops a token x its
    compute-optimal tokens (TARGET_PARAM_DATA_RATIO x its scaling parameters). `gpt`: the nanochat.gpt module."""
    config, _ = nanochat_recipe(gpt, depth, vocab_size, settings)
    with torch.device("meta"):
        model = gpt.GPT(config)
    return float(model.estimate_flops()) * TARGET_PARAM_DATA_RATIO * scaling_params(model)


def first_depth(gpt: Any, vocab_size: int, settings: NanochatSettings, flops: float) -> int:
    """The deepest depth (1 at least) whose compute-optimal training FLOPs are at most `flops`."""
    depth = 1
    while depth < MAX_DEPTH and compute_optimal_flops(gpt, depth + 1, vocab_size, settings) <= flops:
        depth += 1
    return depth


def read_out(run: dict) -> bool:
    """Whether a nanochat run trained its compute-optimal tokens within its budget: its depth is then the best
    depth's or shallower."""
    return run["tokens"] >= run["compute_optimal_tokens"]


def second_depth(first: dict) -> int:
    """One deeper than the `first` run's depth where that run read its compute-optimal tokens out, else one
    shallower (one deeper from depth 1, where there is no shallower)."""
    depth = first["recipe"]["n_layer"]
    return depth + 1 if read_out(first) or depth == 1 else depth - 1


def matmul_rate(device: str) -> float:
    """FLOP/s of a large bf16 matmul on `device` (on a CPU: a small fp32 one), as gpu_check's env stage times it."""
    on_gpu = device == "cuda"
    return measure_matmul_rate(
        torch.device(device), 8192 if on_gpu else 256, torch.bfloat16 if on_gpu else torch.float32
    )


def failure(part: str, error: Exception) -> dict:
    """A side that did not finish: which, and why in one line."""
    if isinstance(error, subprocess.TimeoutExpired):
        why = f"killed after {error.timeout:.0f} s, to leave the later sides their time"
    else:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
    return {"part": part, "error": why}


def progress(out_dir: Path, launched: float) -> list[dict]:
    """What a fasttrain run killed in `out_dir` had done, a record a round (each metrics.jsonl, oldest first): the
    seconds from `launched` (time.time()) to its start event (its plan, the machine's timing included) and to its
    last event, its compile's seconds, its last step and seconds of training, and its plan's notes."""
    rounds = []
    for path in sorted(out_dir.rglob("metrics.jsonl"), key=lambda p: p.stat().st_mtime):
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        start = next((e for e in events if e["event"] == "start"), {})
        compiled = next((e for e in events if e["event"] == "compile"), {})
        trained = [e for e in events if e["event"] == "train"]
        rounds.append(
            {
                "round": str(path.parent.relative_to(out_dir)),
                "started_after_s": round(start["time"] - launched, 1) if start else None,
                "last_event_after_s": round(events[-1]["time"] - launched, 1) if events else None,
                "compile_s": compiled.get("seconds"),
                "last_step": trained[-1]["step"] if trained else None,
                "seconds_left": trained[-1].get("seconds_left") if trained else None,
                "notes": start.get("notes", []),
            }
        )
    return rounds


def compare(work: Path, deadline: float, dry_run: bool, sides: Sequence[str] = SIDES) -> dict:
    """fasttrain against nanochat's two depths (module docstring) by `deadline` (time.monotonic()), in `work`;
    the figures: each side's record (time_to_quality's), or its failure (a killed fasttrain's `progress`), and the
    comparison. `sides`: those of SIDES run (one alone has all the time: a lent GPU's 10-minute command holds
    fasttrain's whole run, its timing and phases included, or nanochat's two depths, not both)."""
    if dry_run:
        data = prepared_corpus(work / "docstrings", inputs=["builtin:docstrings"])
        checkout, settings, budget, reserve, threads = FAKE_CHECKOUT, DRY, DRY_BUDGET, DRY_RESERVE, 1
    else:
        data, settings, budget, reserve, threads = CORPUS, GPU, BUDGET, RESERVE, os.cpu_count() or 1
        checkout = Path(os.environ.get("NANOCHAT_DIR") or CHECKOUT)
    if not (data / "meta.json").exists():
        return {
            "error": f"{data}: no prepared corpus here; docs/benchmarks.md (The next lent GPU) says how to carry it"
        }
    try:
        nanochat = find_nanochat(str(checkout), "NANOCHAT_DIR" if os.environ.get("NANOCHAT_DIR") else "carried")
    except UsageError as e:  # the folder is not a checkout: the message names it and says how to get one
        return {"error": str(e)}
    assert nanochat is not None  # a folder given: found, or refused above
    figures: dict[str, Any] = {"budget_seconds": budget, "corpus": str(data), "nanochat": nanochat.describe()}
    figures["nanochat_settings"] = dataclasses.asdict(settings)
    failures: list[dict] = []
    figures["failures"] = failures

    def left() -> float:
        return deadline - time.monotonic()

    if "fasttrain" in sides:
        began, launched = time.monotonic(), time.time()
        # killed where it would leave the first nanochat run less than its budget and reserve
        limit = left() - (budget + reserve if "nanochat" in sides else 5)
        try:
            fasttrain = run_fasttrain([], data, budget, 0, None, threads, work / "fasttrain", limit)
            figures["fasttrain"] = {**fasttrain, "wall_seconds": round(time.monotonic() - began, 1)}
        except (subprocess.SubprocessError, OSError, StopIteration) as e:
            failures.append({**failure("fasttrain", e), "progress": progress(work / "fasttrain", launched)})
    if "nanochat" not in sides:
        return figures
    sys.path.insert(0, str(nanochat.folder))  # to size its depths here; each run imports it in its own process
    gpt = importlib.import_module("nanochat.gpt")
    vocab_size = json.loads((data / "meta.json").read_text())["vocab_size"]
    rate = matmul_rate(settings.device)
    depth = first_depth(gpt, vocab_size, settings, budget * rate * MFU_GUESS)
    figures["depth_choice"] = {"matmul_flop_per_s": rate, "mfu_guess": MFU_GUESS, "first_depth": depth}
    runs: list[dict] = []
    for second in (False, True):
        if second and left() < runs[0]["wall_seconds"] + 5:  # what the first took: the second would be cut short
            failures.append({"part": f"nanochat depth {depth}", "error": "not run: out of time"})
            break
        began = time.monotonic()
        try:
            spec = (nanochat, data, depth, budget, 0, None, threads, work / f"nanochat-{depth}.json", settings)
            runs.append({**run_nanochat(*spec, timeout=left() - 5), "wall_seconds": round(time.monotonic() - began, 1)})
        except (subprocess.SubprocessError, OSError) as e:
            failures.append(failure(f"nanochat depth {depth}", e))
            break
        depth = second_depth(runs[0])
    figures["nanochat_runs"] = runs
    if len(runs) == 2:
        figures["bracketed"] = read_out(runs[0]) != read_out(runs[1])
    if runs:
        best = min(runs, key=lambda r: r["val_bpb"])
        figures["nanochat_best"] = {"case": best["case"], "val_bpb": best["val_bpb"]}
        if "fasttrain" in figures:
            figures["lead_bpb"] = best["val_bpb"] - figures["fasttrain"]["val_bpb"]
    return figures
