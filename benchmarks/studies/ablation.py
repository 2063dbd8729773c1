"""The step ablation: the GPT-2-small step from stock pieces, stock plus each lever alone, then the
levers that won together, each with tokens/s, MFU, step times, peak memory and its first step's time.

    python -m benchmarks.studies.ablation [--case NAME ...] [--out FILE.json]
    python -m benchmarks.studies.ablation --together LEVER [LEVER ...] [--out FILE.json]

Each case runs in a process of its own (a lever such as FlashAttention-3 switches process-wide state,
and a case that runs out of memory must not take the others with it), built as bench_train_step builds
its trainer: random tokens on the device, bf16, compiled, an update of two micro-batches (one of
twice the size in the "micro-batch x2" case: the same tokens per update, as a real run keeps them).
Steps are timed one by one with CUDA events after 10 warm-up steps; the first step's time
(compilation, autotuning) is reported on its own. The winners: every lever at least WIN faster than
stock, one per group (one attention kernel, one compile mode), together.
The gpu_check stages `ablation`, `ablation-kernels` and `ablation-compile` run it (STAGE_CASES), each
within one 10-minute command; `--together` then measures the winners of both at once. A lever that cannot run here (the
trainer refuses it: a GPU-only lever on a CPU, FlashAttention-3 not installed) is skipped, as is a case
there was no time left for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.studies.common import ROOT

# torch is imported where a case is set up or measured, not here: benchmarks.studies.dispatch_table and gpu_check import
# this module for LEVERS and STAGE_CASES, and a process that reads only those does without torch's 3 s of CPU.
WIN = 1.01  # a lever wins where its tokens/s is at least this times stock's
STEPS = 20
MICRO_BATCHES = 2  # per update, in every case but "micro-batch x2" (one of twice the size)

# name -> (group: at most one lever of a group is in the winners, --set overrides on top of stock)
AUTO_KERNELS = ['kernels.linear_cross_entropy="auto"', 'kernels.rms_norm="auto"', 'kernels.adamw="auto"']
LEVERS: dict[str, tuple[str, list[str]]] = {
    "kernels auto": ("kernels", AUTO_KERNELS),
    # One kernel forced on, whatever the dispatch table says: the whole-step A/B that the table reads
    "kernel adamw": ("kernels", ["kernels.adamw=true"]),
    "kernel rms_norm": ("kernels", ["kernels.rms_norm=true"]),
    "kernel linear_cross_entropy": ("kernels", ["kernels.linear_cross_entropy=true"]),
    "attention flash": ("attention", ['train.attention="flash"']),
    "attention cudnn": ("attention", ['train.attention="cudnn"']),
    "attention fa3": ("attention", ['train.attention="fa3"']),
    "attention flex": ("attention", ['train.attention="flex"']),
    "coordinate descent tuning": ("tuning", ["train.coordinate_descent_tuning=true"]),
    "max-autotune-no-cudagraphs": ("compile mode", ['train.compile_mode="max-autotune-no-cudagraphs"']),
    "cuda graphs": ("compile mode", ['train.compile_mode="reduce-overhead"']),
    "fp8 head": ("fp8", ['train.fp8="head"']),
    "fp8 all": ("fp8", ['train.fp8="all"']),
    "micro-batch x2": ("batch", []),  # the config's batch size doubled, tokens per update kept: lever_settings
}
CASES = ["stock", *LEVERS]
# The gpu_check stages that run them, each with its own stock case and within one 10-minute command (a
# compiled 124M case costs about a minute: a fresh process, the compile, the steps), most promising first.
# The compile modes are apart: max-autotune alone can take minutes.
STAGE_CASES = {
    "ablation": ["stock", "kernels auto", "fp8 head", "attention cudnn", "attention fa3", "fp8 all", "micro-batch x2"],
    "ablation-kernels": ["stock", "kernel adamw", "kernel rms_norm", "kernel linear_cross_entropy"],
    "ablation-compile": [
        "stock",
        "cuda graphs",
        "attention flex",
        "attention flash",
        "coordinate descent tuning",
        "max-autotune-no-cudagraphs",
    ],
}


def stock_settings() -> list[str]:
    """Stock pieces, and an update of MICRO_BATCHES micro-batches of the config's batch size, so that the
    "micro-batch x2" lever has the same tokens per update in half as many micro-batches."""
    import torch

    from benchmarks.bench_train_step import CONFIGS, GPU_CONFIGS, GPU_SETTINGS, KERNELS
    from fasttrain.config import load_config

    device = "train.device=cuda" if torch.cuda.is_available() else "train.device=cpu"
    settings = [device, *GPU_SETTINGS, *KERNELS["stock"]]
    t = load_config(CONFIGS / GPU_CONFIGS[0], settings).train
    return [*settings, f"train.tokens_per_update={MICRO_BATCHES * t.batch_size * t.seq_len}"]


def lever_settings(name: str, stock: list[str]) -> list[str]:
    """The --set overrides of case `name` on top of `stock`."""
    if name == "micro-batch x2":
        from benchmarks.bench_train_step import CONFIGS, GPU_CONFIGS
        from fasttrain.config import load_config

        return [f"train.batch_size={2 * load_config(CONFIGS / GPU_CONFIGS[0], stock).train.batch_size}"]
    return LEVERS[name][1] if name in LEVERS else []


def measure(settings: list[str], steps: int) -> dict:
    """One case in this process: the step of configs/gpt2-small.toml (the dry run: tiny) with `settings`:
    tokens/s and MFU (the median step), step times (each in order), allocator events while timed,
    peak memory and the first step's time."""
    import torch

    from benchmarks.bench_train_step import CONFIGS, GPU_CONFIGS, make_trainer
    from benchmarks.studies.profile_step import WARMUP_STEPS, step_summary, timed_steps
    from fasttrain.compute.kernel_table import run_shapes
    from fasttrain.model.transformer import num_params
    from fasttrain.training.metrics import peak_flops

    with tempfile.TemporaryDirectory() as data_dir:
        trainer = make_trainer(CONFIGS / GPU_CONFIGS[0], Path(data_dir), *settings)
        cuda = trainer.device.type == "cuda"
        start = time.perf_counter()
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        for _ in range(WARMUP_STEPS - 1):
            trainer.step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, allocator = timed_steps(trainer, steps)
        median = statistics.median(times) / 1e3
        peak = peak_flops(trainer.device)
        m = trainer.cfg.model
        flops = trainer.model.flops_per_token(trainer.cfg.train.seq_len) * trainer.tokens_per_step
        return {
            "tokens_per_s": round(trainer.tokens_per_step / median),
            "mfu": round(flops / median / peak, 4) if peak else None,
            "step_ms": step_summary(times),
            "allocator": allocator,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "first_step_s": round(first, 1),
            "kernels": trainer.kernels.names(),
            # where and at what shape: what benchmarks/studies/dispatch_table needs to read a whole-step verdict
            "gpu": torch.cuda.get_device_name(trainer.device) if cuda else None,
            "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(trainer.device)) if cuda else None,
            "shapes": run_shapes(m.d_model, m.vocab_size, num_params(m)),
            "batch_size": trainer.cfg.train.batch_size,
            "tokens_per_update": trainer.tokens_per_step,
        }


def run_case(name: str, settings: list[str], steps: int, timeout: float) -> dict:
    """`measure` in a new process; the case's record, with its error line if it failed or was skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        command = [
            sys.executable,
            "-m",
            "benchmarks.studies.ablation",
            "--measure",
            json.dumps(settings),
            "--steps",
            str(steps),
            "--out",
            str(out),
        ]
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            error = None if proc.returncode == 0 else ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]
            # Exit status 2: the trainer refused the settings here (a GPU-only lever on a CPU, FlashAttention-3
            # not installed): the lever cannot run on this machine, which is a skip, not a failure
            unavailable = proc.returncode == 2
        except subprocess.TimeoutExpired:
            error, unavailable = f"timed out after {timeout:.0f} s", False
        record = json.loads(out.read_text()) if error is None else {}
    return {"case": name, "settings": settings, **record, "error": error, "skipped": unavailable}


def winners(records: list[dict]) -> list[str]:
    """The levers at least WIN faster than stock, the fastest of each group."""
    stock = next((r for r in records if r["case"] == "stock" and not r["error"]), None)
    if stock is None:
        return []
    best: dict[str, dict] = {}
    for r in records:
        if r["case"] in LEVERS and not r["error"] and r["tokens_per_s"] >= WIN * stock["tokens_per_s"]:
            group = LEVERS[r["case"]][0]
            if group not in best or r["tokens_per_s"] > best[group]["tokens_per_s"]:
                best[group] = r
    return [r["case"] for r in best.values()]


def together(levers: list[str], stock: list[str], steps: int, deadline: float) -> dict:
    """One case of `levers` all on at once, on top of `stock`."""
    settings = stock + [s for name in levers for s in lever_settings(name, stock)]
    return run_case("together: " + " + ".join(levers), settings, steps, deadline - time.monotonic() - 30)


def ablation(cases: list[str], steps: int, deadline: float) -> list[dict]:
    """Run `cases` (and then the winners together) while time is left before `deadline` (time.monotonic()).
    A case there is no time left for is recorded as skipped ("not reached"): run it with --case later."""
    stock = stock_settings()
    records = []
    for name in cases:
        left = deadline - time.monotonic()
        if left < 60:
            records.append({"case": name, "error": "not reached: out of time", "skipped": True})
            continue
        records.append(run_case(name, stock + lever_settings(name, stock), steps, left - 30))
        print(json.dumps(records[-1]), flush=True)
    chosen = winners(records)
    if len(chosen) > 1 and deadline - time.monotonic() > 60:
        records.append(together(chosen, stock, steps, deadline))
        print(json.dumps(records[-1]), flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", choices=CASES, default=CASES, help="cases to run (default: all)")
    parser.add_argument(
        "--together",
        nargs="+",
        choices=list(LEVERS),
        metavar="LEVER",
        help="instead, stock and these levers all on at once (the winners of both gpu_check stages)",
    )
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per case (default {STEPS})")
    parser.add_argument("--seconds", type=float, default=3600, help="stop starting cases after this long")
    parser.add_argument("--out", help="write the records as JSON here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one case's settings, as JSON: the worker process
    args = parser.parse_args(argv)
    if args.measure is not None:
        from fasttrain.system.errors import UsageError

        try:
            record = measure(json.loads(args.measure), args.steps)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        Path(args.out).write_text(json.dumps(record))
        return 0
    deadline = time.monotonic() + args.seconds
    if args.together:
        stock = stock_settings()
        records = [
            run_case("stock", stock, args.steps, deadline - time.monotonic()),
            together(args.together, stock, args.steps, deadline),
        ]
    else:
        records = ablation(args.case, args.steps, deadline)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
