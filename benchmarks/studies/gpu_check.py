"""The GPU acceptance pack: every GPU check and measurement from one command, the results in four files.

    python -m benchmarks.studies.gpu_check [--stage env|quality|tests|tune|kernels|step|profile|ablation|ablation-kernels|ablation-compile|parity|hf|train ...] [--out DIR] [--dry-run]
    python -m benchmarks.studies.gpu_check --combine RESULTS.json [RESULTS.json ...] --out DIR

Stages (default: all, in this order). Each runs in a process of its own under its own time
limit (STAGE_LIMITS), so a crash or a hang in one leaves the others' results intact:

  env      GPU, driver and versions; the floors every figure is a fraction of, measured here:
           a device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s)
  quality  time to quality: fasttrain's budgeted base (configs/base.toml, 2 minutes) against nanochat at its own GPU
           settings, its better of two depths bracketing its compute-optimal one, 2 minutes each, on the same
           prepared tokens, validation bits per byte on the whole split (benchmarks/studies/gpu_quality.py; the
           prepared corpus and a nanochat checkout travel in .quality/)
  tests    the test suite on the GPU, so the CUDA-only tests run too
  tune     RMSNorm tilings timed on this GPU (benchmarks/studies/tune_rms_norm.py); the winners go into
           fasttrain_kernels/rms_norm_tilings.json here (the later stages run them) and into the stage's figures
  kernels  every kernel benchmark against eager PyTorch, torch.compile and Liger-Kernel (when installed),
           GPU time from CUDA events with the L2 cache flushed; the RMSNorm kernel inside a compiled block
           against inductor's fusion (bench_block.py); each kernel wrapper's host time per call against
           stock PyTorch's (bench_host_overhead.py)
  step     the 124M and 350M training step: fasttrain (auto), every kernel on, and the stock pieces:
           tokens/s, MFU, memory
  profile  the 124M step of each of those: step times (min, median, spread, each), allocator events,
           and the time per step by kernel category (matmul, attention, norm, cross-entropy, optimizer,
           elementwise, idle)
  ablation the 124M step from stock pieces, stock + each lever (kernels auto, FP8, the cuDNN and
           FlashAttention-3 attention kernels, a doubled micro-batch), then the winners together
  ablation-kernels  the same with each kernel forced on alone (AdamW, RMSNorm, linear + cross-entropy):
           the whole-step verdicts benchmarks/studies/dispatch_table.py reads
  ablation-compile  the same for CUDA graphs, flex and flash attention, and inductor's tuning and
           max-autotune-no-cudagraphs (slow to compile, so a stage of their own)
  parity   200 steps of a real run (configs/gpt2-small.toml on the docstrings corpus) with the configs'
           defaults and with stock pieces, from the same seed: their final losses within 1%
  hf       a transformers Llama trained unpatched, with kernels.patch_hf_model, and with Liger-Kernel's
           patch when it is installed: tokens/s and peak memory
  train    a short real run of configs/gpt2-small.toml on the embedded docstrings corpus (bf16, compiled,
           every kernel on): the loss falls, nothing recompiles after warm-up, a checkpoint resumes
           bit for bit; then the document-masking path (bucketed padding, compiled flex attention)

--out DIR receives gpu_check.json (pytest-benchmark's layout, so `python -m benchmarks.studies.report` reads
it, plus a "gpu_check" entry with every stage's checks and figures), gpu_check.md (the report),
gpu_check.png (the chart) and gpu_check.log (what each stage printed); they are rewritten after
every stage (the chart after one that added cases). A one-screen summary ends the output. The exit
status is 1 if any check failed.

On a GPU lent in 10-minute commands, run one stage per command and merge the JSON files afterwards
with --combine. --dry-run runs every stage on the CPU at tiny sizes (CI does): it proves the
plumbing, and its timings mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.studies.common import ROOT
from benchmarks.studies.dispatch_table import table_entries
from benchmarks.studies.goals import judge
from benchmarks.studies.report import case_of, chart, duration, load_results, markdown
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli

STAGES = (
    "env",
    "quality",
    "tests",
    "tune",
    "kernels",
    "step",
    "profile",
    "ablation",
    "ablation-kernels",
    "ablation-compile",
    "parity",
    "hf",
    "train",
)
# quality's sides one at a time, a lent GPU's command each (fasttrain's whole run with its timing and phases, or
# nanochat's two depths): run only when named
SIDE_STAGES = ("quality-fasttrain", "quality-nanochat")
EVERY_STAGE = STAGES + SIDE_STAGES  # what --stage may name, in the order stages run and are reported
# Each stage's limit. Its process is killed a minute after that, and the lent GPU machine's command
# limit is 10 minutes, installing the project included: 8 + 1 leaves a minute.
STAGE_SECONDS = 480
# quality: three sides of 2 minutes' training each, their compiles and scoring; it keeps to its limit itself (each
# side killed, or the last one not run, before it), and 500 s leaves `step` its 4.5 minutes of a lent GPU's 15
STAGE_LIMITS = {"quality": 500, "quality-fasttrain": 500, "quality-nanochat": 500}
FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.png", "gpu_check.log")
KERNEL_BENCHMARKS = (
    "bench_cross_entropy.py",
    "bench_rms_norm.py",
    "bench_block.py",
    "bench_adamw.py",
    "bench_host_overhead.py",
)
LOG_TAIL = 200_000  # characters of a stage's output kept in the log
XDIST = importlib.util.find_spec("xdist") is not None  # pytest-xdist: the suite in parallel processes


@dataclasses.dataclass
class Stage:
    """What one stage found: named pass/fail checks, figures for the report, benchmark cases."""

    checks: list[dict] = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)
    benchmarks: list[dict] = dataclasses.field(default_factory=list)
    summary: str = ""

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok


@dataclasses.dataclass(frozen=True)
class Context:
    """What every stage is given: where to work, how long it has, and whether this is a dry run."""

    work: Path
    deadline: float  # time.monotonic() by which the stage must be done
    dry_run: bool

    def seconds_left(self) -> float:
        return max(self.deadline - time.monotonic(), 1.0)


def run(command: Sequence[str], ctx: Context, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run `command` in the repository (stdout and stderr merged), within the stage's time.

    Returns (exit status, output); the status is None when time ran out, and then the
    command's whole process group (pytest's workers, a trainer's loader threads) is killed.
    The output is echoed, so it reaches the stage's log."""
    print(f"+ {' '.join(command)}", flush=True)
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=ctx.seconds_left())
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    print(output[-LOG_TAIL:], flush=True)
    return code, output


def outcome(code: int | None) -> str:
    return "timed out" if code is None else f"exit {code}"


# ----------------------------------------------------------------------------- env


def env_stage(ctx: Context) -> Stage:
    import numpy as np
    import torch

    from benchmarks.conftest import environment, measure_copy_bandwidth, measure_matmul_rate

    stage = Stage()
    info = {**environment(), "cuda": torch.version.cuda or "none", "numpy": np.__version__}
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=f"sm_{props.major}{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        if shutil.which("nvidia-smi"):
            info["driver"] = smi_query("driver_version") or "?"
    stage.check("a CUDA GPU is visible", gpu or ctx.dry_run, info.get("gpu", "none (a dry run on the CPU)"))

    copy = measure_copy_bandwidth(device, 1 << 30 if gpu else 1 << 24)
    n, dtype = (8192, torch.bfloat16) if gpu else (256, torch.float32)
    matmul = measure_matmul_rate(device, n, dtype)
    stage.figures = {
        "environment": info,
        "copy_gb_per_s": round(copy / 1e9, 1),
        "matmul_tflop_per_s": round(matmul / 1e12, 3),
        "matmul": f"{n}x{n}x{n} {str(dtype)[6:]}",
    }
    stage.summary = (
        f"{info.get('gpu', info['cpu'])}: copy {copy / 1e9:,.0f} GB/s, "
        f"{stage.figures['matmul']} matmul {matmul / 1e12:,.3g} TFLOP/s"
    )
    return stage


# ----------------------------------------------------------------------------- tests


def tests_stage(ctx: Context) -> Stage:
    """The suite as CI runs it, but on the GPU (tests/conftest.py uses the interpreter only without one)."""
    stage = Stage()
    junit = ctx.work / "tests.xml"
    # A dry run checks the plumbing (pytest, its junit file, the counts) on one quick file; its profiling test
    # repeats what the dry run's profile stage does for real, and its chart test (matplotlib: a second of CPU)
    # what the dry run does after its kernels stage, the chart it writes.
    targets = ["tests/test_report.py", "-k", "not profile_step and not chart"] if ctx.dry_run else ["tests"]
    # A file's tests stay in one worker (module fixtures run once); the suite is CPU-bound in good part.
    parallel = ["-n", str(min(8, os.cpu_count() or 1)), "--dist", "loadfile"] if XDIST and not ctx.dry_run else []
    code, _ = run(
        [sys.executable, "-m", "pytest", *targets, *parallel, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        ctx,
    )
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    if junit.exists():
        root = ElementTree.parse(junit).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        failed = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in root.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    bad = counts["failures"] + counts["errors"]
    passed = counts["tests"] - bad - counts["skipped"]
    stage.figures = {"passed": passed, "failed": bad, "skipped": counts["skipped"], "failing": failed[:30]}
    stage.check(
        "test suite",
        code == 0 and passed > 0,
        f"{outcome(code)}: {passed} passed, {bad} failed, {counts['skipped']} skipped"
        + (f"; first failures: {', '.join(failed[:5])}" if failed else ""),
    )
    stage.summary = stage.checks[-1]["detail"]
    return stage


# ----------------------------------------------------------------------------- kernels and step


def benchmark_files(ctx: Context, stage: Stage, files: Sequence[str], select: str) -> None:
    """Run benchmark files one at a time (one slow file costs only its own cases), keeping every case; each
    file's check is that it ran and recorded cases. A dry run runs them all in one pytest process: apart,
    each file cost a process start (torch, pytest, the kernels: about 5 s of CPU) for a second of toy cases,
    and no file there is slow enough to cost the others theirs."""
    for group in [list(files)] if ctx.dry_run else [[name] for name in files]:
        out = ctx.work / f"{'+'.join(Path(name).stem for name in group)}.json"
        code, _ = run(
            [
                sys.executable,
                "-m",
                "pytest",
                *(f"benchmarks/{name}" for name in group),
                "-k",
                select,
                "--benchmark-only",
                f"--benchmark-json={out}",
                "-q",
                "-p",
                "no:cacheprovider",
            ],
            ctx,
        )
        text = out.read_text() if out.exists() else ""  # empty when pytest died before writing it
        cases = json.loads(text)["benchmarks"] if text.strip() else []
        stage.benchmarks.extend(cases)
        files_of = [Path(case["fullname"].split("::")[0]).name for case in cases]
        for name in group:
            found = files_of.count(name)
            stage.check(name, code == 0 and found > 0, f"{outcome(code)}: {found} cases")


def races(benchmarks: list[dict]) -> list[dict]:
    """Per case: fasttrain's median and min against those of the fastest other implementation (by median)
    of the same case, and the speedups of both."""
    groups: dict[str, dict[str, dict]] = {}  # case -> impl -> stats
    for b in benchmarks:
        group, impl = case_of(b)
        groups.setdefault(group, {})[impl] = b["stats"]
    rows = []
    for group, stats in groups.items():
        others = {impl: s for impl, s in stats.items() if impl != "fasttrain"}
        if "fasttrain" in stats and others:
            rival = min(others, key=lambda impl: others[impl]["median"])
            ours, theirs = stats["fasttrain"], others[rival]
            rows.append(
                {
                    "case": group,
                    "fasttrain_s": ours["median"],
                    "fasttrain_min_s": ours["min"],
                    "rival": rival,
                    "rival_s": theirs["median"],
                    "rival_min_s": theirs["min"],
                    "speedup": theirs["median"] / ours["median"],
                    "min_speedup": theirs["min"] / ours["min"],
                }
            )
    return rows


def tune_stage(ctx: Context) -> Stage:
    """RMSNorm's tilings measured on this GPU: the winners, with their and the defaults' median times, are
    written to the tilings file the kernels read (a dry run writes a scratch copy), and kept in the figures
    so that the results files carry them back from a lent GPU."""
    stage = Stage()
    if ctx.dry_run:
        path = ctx.work / "rms_norm_tilings.json"
        options = ["--dry-run", "--out", str(path)]
    else:  # imported only here: fasttrain_kernels imports torch, which a dry run's worker does without
        from fasttrain_kernels.rms_norm import TILINGS_FILE

        path, options = TILINGS_FILE, []
    code, _ = run([sys.executable, "-m", "benchmarks.studies.tune_rms_norm", *options], ctx)
    tilings = json.loads(path.read_text())["tilings"] if path.exists() else {}
    stage.figures = {"tilings": tilings}
    tuned = {block: entry for entries in tilings.values() for block, entry in entries.items()}
    stage.check("RMSNorm tilings measured", code == 0 and bool(tuned), f"{outcome(code)}: {len(tuned)} row blocks")
    gains = [
        f"{entry['hidden']}: {name} {t['default'] / t['tuned']:.2f}x"
        for block, entry in tuned.items()
        for name, t in entry["median_us"].items()
        if name.endswith("bf16")
    ]
    stage.summary = "; ".join(gains) or "nothing tuned"
    return stage


def kernels_stage(ctx: Context) -> Stage:
    stage = Stage()
    benchmark_files(ctx, stage, KERNEL_BENCHMARKS, "not cpu")
    rows = races(stage.benchmarks)
    # what "auto" would choose from these results: python -m benchmarks.studies.dispatch_table gpu_check.json writes it
    stage.figures = {"races": rows, "kernel_table": table_entries(stage.benchmarks)}
    ahead = sum(r["speedup"] >= 1 for r in rows)
    stage.summary = f"{len(stage.benchmarks)} cases; fasttrain fastest in {ahead} of {len(rows)} races"
    return stage


def step_stage(ctx: Context) -> Stage:
    stage = Stage()
    benchmark_files(ctx, stage, ("bench_train_step.py",), "gpu")
    steps = [
        {k: b["extra_info"].get(k) for k in ("config", "impl", "tokens_per_s", "mfu", "peak_memory_gib")}
        for b in stage.benchmarks
    ]
    stage.figures = {"steps": steps, "races": races(stage.benchmarks)}
    stage.summary = "; ".join(
        f"{s['config']} {s['impl']} {s['tokens_per_s']:,} tok/s" + (f" MFU {s['mfu']:.1%}" if s["mfu"] else "")
        for s in steps
    )
    return stage


def profile_stage(ctx: Context) -> Stage:
    """Where the 124M step's time goes, for each kernel setting of bench_train_step (auto, every kernel on,
    stock): step times from CUDA events (min, median, stdev: the spread), then the profiled time per step
    by kernel category, the device's idle time included and charged to the host ops whose launches ended
    each gap, and the allocator's cudaMalloc retries and calls during the timed steps
    (benchmarks/studies/profile_step.py)."""
    import torch

    from benchmarks.bench_train_step import CONFIGS, GPU_CONFIGS, GPU_SETTINGS, KERNELS, make_trainer
    from benchmarks.conftest import sizes
    from benchmarks.studies.profile_step import profile_trainer

    stage = Stage()
    config = GPU_CONFIGS[0]
    device = "train.device=cpu" if ctx.dry_run else "train.device=cuda"
    for impl, settings in KERNELS.items():
        torch._dynamo.reset()  # each setting compiled afresh: static shapes, its own recompile limit
        data_dir = ctx.work / f"profile-{impl}"
        trainer = make_trainer(CONFIGS / config, data_dir, device, *GPU_SETTINGS, *settings)
        found = profile_trainer(trainer, sizes(20, 3), data_dir)
        print(f"{config} {impl} (kernels: {', '.join(trainer.kernels.names()) or 'none'})\n{found['table']}")
        stage.figures[impl] = {
            "config": config,
            "kernels": trainer.kernels.names(),
            "step_ms": found["step_ms"],
            "allocator": found["allocator"],
            "ms_per_step": found["ms_per_step"],
            "idle_gaps": found["idle_gaps"],
        }
        stage.check(f"{impl} profiled", bool(found["ms_per_step"]), f"median step {found['step_ms']['median']:.2f} ms")
    stage.summary = "; ".join(
        f"{impl} {f['step_ms']['median']:.1f} ms (stdev {f['step_ms']['stdev']:.1f})"
        for impl, f in stage.figures.items()
    )
    return stage


# ----------------------------------------------------------------------------- train

LOSS_DROP = 0.1  # the loss must fall by 10% of its first value over a run, at least
RECOMPILE = re.compile(r"Recompiling function (\S+)")  # TORCH_LOGS=recompiles: this line, then the guards
GUARD_FAILURE = re.compile(r"\[__recompiles\]\s+- (.+)")


def train_settings(ctx: Context, out_dir: Path) -> tuple[str, list[str]]:
    """(config, --set overrides) of the short runs: GPT-2 small on the docstrings corpus with the config's
    kernels (callers add theirs); in a dry run the base config's model, tiny, eager, fp32 on the CPU."""
    common = [
        f'data.dir="{ctx.work / "data"}"',
        'data.tokenizer=""',
        "train.tokens_per_update=0",
        f'train.out_dir="{out_dir}"',
        "train.log_interval=1",
        "train.tensorboard=false",
        "train.eval_steps=4",
        "train.sample_tokens=16",
        "schedule.warmup_steps=5",
    ]
    if ctx.dry_run:
        return "configs/base.toml", [
            *common,
            "train.max_time=0",
            "optim.name=adamw",  # the AdamW run checked before configs/base.toml took Muon (2026-11-25)
            'data.inputs=["builtin:pydoc"]',
            "data.vocab_size=512",
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=2",
            "train.batch_size=4",
            "optim.lr=1e-2",
            "train.seq_len=64",
            "train.device=cpu",
            "train.compile=false",
            'train.precision="fp32"',
        ]
    return "configs/gpt2-small.toml", [
        *common,
        'data.inputs=["builtin:docstrings"]',
        "data.vocab_size=8192",
        "train.batch_size=16",
        "train.device=cuda",
        "train.compile=true",
        'train.precision="bf16"',
    ]


def train_run(
    ctx: Context, out_dir: Path, steps: int, *extra: str, resume: Path | None = None
) -> tuple[int | None, str, list[dict]]:
    """Train `steps` steps through the command line (recompiles logged); (status, output, metrics events)."""
    from fasttrain.plot import read_metrics

    config, overrides = train_settings(ctx, out_dir)
    command = [
        sys.executable,
        "-m",
        "fasttrain.train",
        config,
        "--set",
        *overrides,
        f"train.max_steps={steps}",
        f"train.eval_interval={steps // 2}",
        f"checkpoint.interval={steps // 2}",
        *extra,
    ]
    code, output = run(
        [*command, *(["--resume", str(resume)] if resume else [])], ctx, env={"TORCH_LOGS": "recompiles"}
    )
    events = read_metrics(out_dir) if (out_dir / "metrics.jsonl").exists() else []
    return code, output, events


def train_losses(events: list[dict]) -> dict[int, tuple[float, float]]:
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in events if e["event"] == "train"}


def loss_falls(stage: Stage, name: str, code: int | None, events: list[dict]) -> bool:
    losses = [loss for loss, _ in train_losses(events).values()]
    if not losses:
        return stage.check(name, False, f"{outcome(code)}, no training step logged")
    tail = losses[-max(len(losses) // 4, 1) :]
    end = sum(tail) / len(tail)
    finite = all(abs(x) < float("inf") for x in losses)  # nan fails too
    return stage.check(
        name,
        code == 0 and finite and end < (1 - LOSS_DROP) * losses[0],
        f"{outcome(code)}: loss {losses[0]:.3f} -> {end:.3f} over {len(losses)} steps",
    )


def late_recompiles(output: str) -> tuple[list[str], list[str]]:
    """(every recompile, those after warm-up), each as "function: first failed guard". Warm-up ends once
    the first evaluation has been printed (it may compile the eval-mode graph); from then on every step
    and evaluation must hit the compiled cache."""
    found: list[list[str]] = []  # [function, its first failed guard]
    warm_from = None  # how many recompiles came before warm-up ended
    for line in output.splitlines():
        if recompile := RECOMPILE.search(line):
            found.append([recompile.group(1), ""])
        elif (guard := GUARD_FAILURE.search(line)) and found and not found[-1][1]:
            found[-1][1] = guard.group(1).strip()
        elif warm_from is None and line.startswith("eval step"):
            warm_from = len(found)
    recompiles = [f"{function}: {guard}" if guard else function for function, guard in found]
    return recompiles, recompiles[warm_from:] if warm_from is not None else []


def train_stage(ctx: Context) -> Stage:
    from benchmarks.bench_train_step import KERNELS
    from fasttrain.checkpoints import saves

    stage = Stage()
    every = KERNELS["kernels-on"]
    steps = 16 if ctx.dry_run else 60
    straight = ctx.work / "straight"
    code, output, events = train_run(ctx, straight, steps, *every)
    falls = loss_falls(stage, "the loss falls", code, events)
    recompiles, late = late_recompiles(output)
    stage.check(
        "no recompiles after warm-up",
        code == 0 and not late,
        f"{len(recompiles)} recompiles, {len(late)} after warm-up" + (f"; first: {late[0]}" if late else ""),
    )
    compile_events = [e for e in events if e["event"] == "compile"]
    trains = [e for e in events if e["event"] == "train"]
    stage.figures["straight"] = {
        "steps": steps,
        "compile_s": compile_events[0]["seconds"] if compile_events else None,
        "tokens_per_s": trains[-1].get("tokens_per_s") if trains else None,
        "mfu": trains[-1].get("mfu") if trains else None,
        "final_loss": trains[-1]["loss"] if trains else None,
        "recompiles": recompiles[:10],
    }

    half = steps // 2
    saved = saves.path_for(straight / "checkpoints", half)
    if code == 0 and saved.exists():
        code, _, resumed = train_run(ctx, ctx.work / "resumed", steps, *every, resume=saved)
        want = {s: v for s, v in train_losses(events).items() if s > half}
        got = train_losses(resumed)
        differ = [s for s in want if got.get(s) != want[s]]
        # How far apart tells a resume bug (large) from a nondeterministic GPU kernel (rounding-sized).
        gap = max(
            (abs(a - b) / max(abs(a), 1e-30) for s in differ if s in got for a, b in zip(want[s], got[s])), default=0.0
        )
        stage.check(
            "a checkpoint resumes bit for bit",
            code == 0 and bool(want) and not differ,
            f"{outcome(code)}: steps {half + 1}-{steps} from step {half}'s checkpoint, "
            + (
                f"{len(differ)} of {len(want)} steps differ (largest relative difference {gap:.1e}), first "
                f"at step {differ[0]}: {want[differ[0]]} vs {got.get(differ[0])}"
                if differ
                else "loss and gradient norm identical"
            ),
        )
    else:
        stage.check("a checkpoint resumes bit for bit", False, f"no checkpoint at step {half} to resume from")

    masked = ctx.work / "masked"
    code, output, events = train_run(
        ctx, masked, steps, *every, 'data.batching="padded"', 'data.padding="bucketed"', "data.document_mask=true"
    )
    loss_falls(stage, "document masking (bucketed, compiled flex attention) trains", code, events)
    trains = [e for e in events if e["event"] == "train"]
    stage.figures["document_mask"] = {
        "recompiles": len(late_recompiles(output)[0]),
        "tokens_per_s": trains[-1].get("tokens_per_s") if trains else None,
    }
    stage.summary = f"{sum(c['ok'] for c in stage.checks)} of {len(stage.checks)} checks pass" + (
        f"; {stage.figures['straight']['tokens_per_s']:,.0f} tok/s" if falls else ""
    )
    return stage


PARITY_STEPS = 200
PARITY_GAP = 0.01  # the defaults' loss may differ from stock's by this fraction of it, at most


def final_losses(events: list[dict]) -> dict[str, float | None]:
    """A run's end: its last validation loss, and its mean training loss over the last tenth of its steps."""
    trains = [e["loss"] for e in events if e["event"] == "train"]
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    tail = trains[-max(len(trains) // 10, 1) :]
    return {"val_loss": evals[-1] if evals else None, "train_loss": sum(tail) / len(tail) if tail else None}


def parity_stage(ctx: Context) -> Stage:
    """The config's defaults (kernels auto and every lever the configs turn on) against stock pieces, each
    PARITY_STEPS steps of the same run on the same data from the same seed: the losses they end at must
    agree within PARITY_GAP, so a speed-up is not bought with a worse model. On a GPU, the FP8 head (not a
    default: the fastest lever the ablation found) against the defaults too, before it can become one."""
    from benchmarks.bench_train_step import KERNELS

    stage = Stage()
    steps = 30 if ctx.dry_run else PARITY_STEPS
    runs = [("stock", KERNELS["stock"]), ("defaults", [])] + (
        [] if ctx.dry_run else [("fp8 head", ['train.fp8="head"'])]
    )
    for name, settings in runs:
        code, _, events = train_run(ctx, ctx.work / f"parity-{name}", steps, *settings)
        trains = [e for e in events if e["event"] == "train"]
        stage.figures[name] = {
            "status": code,
            "steps": len(trains),
            **final_losses(events),
            "tokens_per_s": trains[-1].get("tokens_per_s") if trains else None,
        }
    for base, other in [("stock", "defaults")] + [("defaults", name) for name, _ in runs[2:]]:
        for key in ("val_loss", "train_loss"):
            a, b = stage.figures[base][key], stage.figures[other][key]
            gap = abs(b - a) / abs(a) if a and b is not None else None
            stage.check(
                f"{other}: {key} within {PARITY_GAP:.0%} of {base}'s",
                gap is not None and gap <= PARITY_GAP,
                f"{base} {a}, {other} {b}"
                + (f" ({gap:.2%} apart)" if gap is not None else "")
                + f" after {steps} steps",
            )
    stage.summary = "; ".join(f"{name} val_loss {f['val_loss']}" for name, f in stage.figures.items())
    return stage


def ablation_stage(ctx: Context, name: str) -> Stage:
    """The 124M step from stock pieces, stock plus each of the stage's levers, then its winners together
    (benchmarks/studies/ablation.py, STAGE_CASES[name]): tokens/s, MFU, step times, peak memory, first-step
    (compile) time. A lever this machine cannot run, or a case there was no time left for, is skipped."""
    from benchmarks.conftest import sizes
    from benchmarks.studies.ablation import STAGE_CASES, STEPS, ablation, winners

    stage = Stage()
    # The dry run proves the plumbing with few cases, each a process of about 8 s of CPU: a lever the CPU
    # skips (its overrides reach the trainer, which refuses them) and the doubled micro-batch, measured. No
    # kernel lever: [kernels] auto runs in the step and profile stages' "fasttrain" cases, and two measured
    # levers could both beat stock by CPU noise and cost a third case, the two together.
    dry = {
        "ablation": ["stock", "attention cudnn", "micro-batch x2"],
        "ablation-kernels": ["stock"],
        "ablation-compile": ["stock"],
    }
    records = ablation(sizes(STAGE_CASES[name], dry[name]), sizes(STEPS, 3), ctx.deadline - 30)
    stage.figures = {"cases": records, "winners": winners(records)}
    for r in records:
        stage.check(
            r["case"],
            r["error"] is None or r["skipped"],
            r["error"] or f"{r['tokens_per_s']:,} tok/s, first step {r['first_step_s']} s",
        )
    stock = next((r for r in records if r["case"] == "stock" and not r["error"]), None)
    measured = [r for r in records if not r["error"]]
    best = max(measured, key=lambda r: r["tokens_per_s"], default=None)
    skipped = [r["case"] for r in records if r["skipped"]]
    measured_summary = (
        f"stock {stock['tokens_per_s']:,} tok/s; best {best['case']} {best['tokens_per_s']:,} "
        f"({best['tokens_per_s'] / stock['tokens_per_s']:.2f}x)"
        if stock and best
        else "stock not measured"
    )
    stage.summary = measured_summary + (f"; skipped: {', '.join(skipped)}" if skipped else "")
    return stage


def quality_stage(ctx: Context, sides: Sequence[str] = ("fasttrain", "nanochat")) -> Stage:
    """fasttrain's budgeted base against nanochat's better of two depths after 2 minutes' training each on this GPU,
    in validation bits per byte on the whole split (benchmarks/studies/gpu_quality.py), of `sides` (quality-fasttrain
    and quality-nanochat: one side a stage, each a lent GPU's command); a dry run on the CPU, for seconds each, with
    the stand-in nanochat (benchmarks/studies/fake_nanochat)."""
    from benchmarks.studies.gpu_quality import compare

    stage = Stage()
    found = stage.figures = compare(ctx.work / "quality", ctx.deadline, ctx.dry_run, sides)
    if "error" in found:
        stage.check("the prepared corpus and nanochat are here", False, found["error"])
        stage.summary = found["error"]
        return stage
    fasttrain = found.get("fasttrain")
    if fasttrain:
        stage.check(
            "fasttrain trained and was scored",
            True,
            f"{fasttrain['shape']}, {fasttrain['steps']} steps, {fasttrain['tokens_per_s']:,} tok/s: "
            f"{fasttrain['val_bpb']:.3f} bpb",
        )
    for run in found.get("nanochat_runs", []):
        stage.check(
            f"nanochat {run['case']} trained and was scored",
            True,
            f"{run['steps']} updates of {run['recipe']['batch_tokens']:,} tokens, {run['tokens_per_s']:,} tok/s: "
            f"{run['val_bpb']:.3f} bpb",
        )
    for failed in found["failures"]:
        stage.check(failed["part"], False, failed["error"])
    best = found.get("nanochat_best")
    stage.summary = "; ".join(
        [
            *([f"fasttrain {fasttrain['shape']} {fasttrain['val_bpb']:.3f} bpb"] if fasttrain else []),
            *([f"nanochat {best['case']} {best['val_bpb']:.3f}"] if best else []),
            *([f"lead {found['lead_bpb']:+.3f}"] if "lead_bpb" in found else []),
            *([f"depths bracketed: {'yes' if found['bracketed'] else 'no'}"] if "bracketed" in found else []),
        ]
    )
    return stage


def hf_stage(ctx: Context) -> Stage:
    """A transformers Llama trained unpatched, with kernels.patch_hf_model and with Liger-Kernel's patch
    (benchmarks/studies/hf_patch.py): tokens/s and peak memory; Liger is skipped where it is not installed."""
    from benchmarks.studies.hf_patch import compare

    stage = Stage()
    records = compare()
    stage.figures = {"variants": records}
    for r in records:
        skipped = r["variant"] == "liger" and r["error"] is not None
        stage.check(
            f"transformers Llama, {r['variant']}",
            r["error"] is None or skipped,
            r["error"] or f"{r['tokens_per_s']:,} tok/s, peak {r['peak_gb']} GB",
        )
    found = {r["variant"]: r for r in records if r["error"] is None}
    if "unpatched" in found and "fasttrain" in found:
        stage.summary = (
            f"patched {found['fasttrain']['tokens_per_s'] / found['unpatched']['tokens_per_s']:.2f}x unpatched tokens/s"
        )
    return stage


WORKERS: dict[str, Callable[[Context], Stage]] = {
    "env": env_stage,
    "quality": quality_stage,
    "quality-fasttrain": functools.partial(quality_stage, sides=("fasttrain",)),
    "quality-nanochat": functools.partial(quality_stage, sides=("nanochat",)),
    "tests": tests_stage,
    "tune": tune_stage,
    "kernels": kernels_stage,
    "step": step_stage,
    "profile": profile_stage,
    "ablation": functools.partial(ablation_stage, name="ablation"),
    "ablation-kernels": functools.partial(ablation_stage, name="ablation-kernels"),
    "ablation-compile": functools.partial(ablation_stage, name="ablation-compile"),
    "parity": parity_stage,
    "hf": hf_stage,
    "train": train_stage,
}


# ----------------------------------------------------------------------------- orchestration and report


def commit_id() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"  # no git: the lent GPU machine gets a copy of the working tree without .git


def smi_query(field: str) -> str:
    """nvidia-smi's `field` (--query-gpu) of the first GPU; "" where there is no nvidia-smi or it fails. It does
    not touch CUDA, so the parent process leaves every GPU byte to the stages' processes."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ""
    try:
        query = subprocess.run(
            [smi, f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:  # a hung driver: the stages say so themselves
        return ""
    return query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else ""


def new_results(argv: Sequence[str], commit: str, dry_run: bool) -> dict:
    return {
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # what the heading names where the env stage (which records the whole environment) did not run
        "machine": smi_query("name") or platform.processor() or platform.machine(),
        "commit_info": {"id": commit},
        "command": "python -m benchmarks.studies.gpu_check " + " ".join(argv),
        "benchmarks": [],
        "gpu_check": {"dry_run": dry_run, "stages": {}},
    }


def run_stage(name: str, out: Path, work: Path, seconds: float, dry_run: bool) -> dict:
    """Run one stage's worker process under its limit; its record (status, seconds, checks, figures, cases)."""
    result = work / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.studies.gpu_check",
        "--worker",
        name,
        "--work",
        str(work),
        "--seconds",
        str(seconds),
        *(["--dry-run"] if dry_run else []),
    ]
    # Without pytest-xdist's worker variables (when this runs inside a test): pytest-benchmark sees them
    # and refuses --benchmark-only in the stages' own pytest runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHONUNBUFFERED="1")
    if dry_run:  # on the CPU even where there is a GPU: the plumbing, at toy sizes
        env.update(FASTTRAIN_BENCH_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
        # Kernels on CPU tensors take their PyTorch path: under the test suite's TRITON_INTERPRET the
        # forced-on cases ran Triton's interpreter, seconds a step, for figures that mean nothing here.
        env.pop("TRITON_INTERPRET", None)
        # One OpenMP thread a process (as the test suite's workers have): a toy step gains nothing from more,
        # and on a busy 2-core machine two threads spun waiting for each other, 0.96 s a step against 0.045 s.
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:  # the worker keeps to `seconds` itself; the extra minute is for a hang it cannot see past
        output, _ = proc.communicate(timeout=seconds + 60)
        ended = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        ended = f"killed after {seconds + 60:.0f} s"
    elapsed = round(time.monotonic() - start, 1)
    with open(out / "gpu_check.log", "a", encoding="utf-8") as log:
        log.write(f"\n===== stage {name} ({elapsed} s, {ended})\n{output[-LOG_TAIL:]}")
    if not result.exists():  # it crashed or hung: its last line is the best clue (the log has the rest)
        last = (output.strip().splitlines() or ["no output"])[-1][-300:]
        return {
            "status": "error",
            "seconds": elapsed,
            "summary": f"the stage died ({ended}): {last}",
            "checks": [{"name": "the stage finished", "ok": False, "detail": f"{ended}: {last}"}],
            "figures": {},
            "benchmarks": [],
        }
    record = json.loads(result.read_text())
    record["status"] = "pass" if all(c["ok"] for c in record["checks"]) else "fail"
    record["seconds"] = elapsed
    return record


def add_stage(results: dict, name: str, record: dict) -> None:
    """Put a stage's record into the results, replacing an earlier run of the same stage and its cases."""
    cases = record.pop("benchmarks")
    for case in cases:
        case.setdefault("extra_info", {})["stage"] = name
    results["benchmarks"] = [b for b in results["benchmarks"] if b.get("extra_info", {}).get("stage") != name] + cases
    results["gpu_check"]["stages"][name] = record


def report(results: dict) -> str:
    """The markdown report: where, the checks, the issues' goals (benchmarks/studies/goals.py), the floors,
    fasttrain's races, then every case."""
    stages = results["gpu_check"]["stages"]
    env = stages.get("env", {}).get("figures", {})
    info = env.get("environment", {})
    lines = [
        f"# GPU acceptance: {info.get('gpu') or info.get('cpu') or results.get('machine', 'unknown machine')}"
        + (" (dry run on the CPU: timings mean nothing)" if results["gpu_check"].get("dry_run") else ""),
        "",
        "; ".join(
            part
            for part in (
                ", ".join(f"{k} {info[k]}" for k in ("driver", "cuda", "torch", "triton", "python") if k in info),
                f"commit {results['commit_info']['id']}",
                results["datetime"],
            )
            if part
        ),
        "",
        f"`{results['command']}`",
        "",
        "## Checks",
        "",
        "| stage | check | result | detail |",
        "| --- | --- | --- | --- |",
    ]
    for name in EVERY_STAGE:
        for c in stages.get(name, {}).get("checks", []):
            lines.append(f"| {name} | {c['name']} | {'pass' if c['ok'] else '**FAIL**'} | {c['detail']} |")
    goals = judge(results["benchmarks"])
    if goals:
        lines += [
            "",
            f"## Goals of the open performance issues: {sum(g['met'] for g in goals)} of {len(goals)} met",
            "",
            "| goal | case | met | detail |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {g['goal']} | {g['case']} | {'yes' if g['met'] else '**no**'} | {g['detail']} |" for g in goals]
    if env:
        lines += [
            "",
            f"Floors measured here: device copy {env['copy_gb_per_s']:,} GB/s (read + write), "
            f"{env['matmul']} matmul {env['matmul_tflop_per_s']:,} TFLOP/s.",
        ]
    # From the cases rather than the stages' stored races: results written before those had mins still read
    rows = [
        r
        for name in ("kernels", "step")
        for r in races([b for b in results["benchmarks"] if b.get("extra_info", {}).get("stage") == name])
    ]
    if rows:
        lines += [
            "",
            "## fasttrain against the fastest other implementation (by median)",
            "",
            "| case | fasttrain median | min | fastest other | its median | min | speedup (median) | (min) |",
            "| --- " * 8 + "|",
        ]
        lines += [
            f"| {r['case']} | {duration(r['fasttrain_s'])} | {duration(r['fasttrain_min_s'])} | {r['rival']} | "
            f"{duration(r['rival_s'])} | {duration(r['rival_min_s'])} | {r['speedup']:.2f}x | "
            f"{r['min_speedup']:.2f}x |"
            for r in rows
        ]
    if results["benchmarks"]:
        lines += ["", "## Every case", "", markdown(results)]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path, redraw_chart: bool = True) -> None:
    """Write the result files; the chart, a picture of the cases alone, only with `redraw_chart`."""
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "gpu_check.md").write_text(report(results), encoding="utf-8")
    if results["benchmarks"] and redraw_chart:
        try:
            chart(results, out / "gpu_check.png")
        except UsageError as e:  # no matplotlib, or no case with a headline figure: the table still says it all
            print(f"no chart: {e}")


def summary(results: dict) -> str:
    lines = [
        f"gpu_check ({'dry run, ' if results['gpu_check'].get('dry_run') else ''}"
        f"commit {results['commit_info']['id'][:12]}):"
    ]
    for name in EVERY_STAGE:
        record = results["gpu_check"]["stages"].get(name)
        if record:
            lines.append(f"  {name:<8} {record['status'].upper():<5} {record['seconds']:>6.0f} s  {record['summary']}")
            lines += [f"           failed: {c['name']}: {c['detail']}" for c in record["checks"] if not c["ok"]]
    return "\n".join(lines)


def writable_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create it ({e.strerror or e})") from None
    return out


def combine(paths: Sequence[str], out: Path) -> dict:
    """One results file from several runs' (one stage each, say); a later run's stage replaces an earlier one's."""
    results = None
    for path in paths:
        part = load_results(path)
        if "gpu_check" not in part:
            raise UsageError(f"{path}: no 'gpu_check' entry: not written by benchmarks.studies.gpu_check")
        if results is None:
            results = part
            continue
        for name, record in part["gpu_check"]["stages"].items():
            add_stage(
                results,
                name,
                {
                    **record,
                    "benchmarks": [b for b in part["benchmarks"] if b.get("extra_info", {}).get("stage") == name],
                },
            )
    write_outputs(results, out)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="python -m benchmarks.studies.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stage", action="append", choices=EVERY_STAGE, help="a stage to run (repeatable; default: all)"
    )
    parser.add_argument("--out", default="gpu-check", help="where the four result files go (default: gpu-check/)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes")
    parser.add_argument(
        "--seconds", type=float, help=f"each stage's time limit (default {STAGE_SECONDS:g}, or STAGE_LIMITS' own)"
    )
    parser.add_argument("--commit", help="the commit measured (default: git's HEAD, where there is a .git)")
    parser.add_argument("--combine", nargs="+", metavar="RESULTS", help="merge these gpu_check.json files into --out")
    parser.add_argument("--worker", choices=EVERY_STAGE, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # inside a stage's own process
        ctx = Context(Path(args.work), time.monotonic() + args.seconds, args.dry_run)
        stage = WORKERS[args.worker](ctx)
        (ctx.work / f"{args.worker}.json").write_text(json.dumps(dataclasses.asdict(stage)), encoding="utf-8")
        return 0

    out = writable_dir(args.out)
    if args.combine:
        results = combine(args.combine, out)
    else:
        results = new_results(argv, args.commit or commit_id(), args.dry_run)
        (out / "gpu_check.log").write_text(f"{results['command']}\n", encoding="utf-8")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
            for name in [s for s in EVERY_STAGE if s in (args.stage or STAGES)]:
                print(f"gpu_check: stage {name} ...", flush=True)
                seconds = args.seconds or STAGE_LIMITS.get(name, STAGE_SECONDS)
                record = run_stage(name, out, Path(work), seconds, args.dry_run)
                added = bool(record["benchmarks"])
                add_stage(results, name, record)
                # After every stage: a later crash keeps what is done. The chart is drawn again only when the
                # stage added cases (matplotlib: about 0.6 s of CPU a time, for most stages the same picture)
                write_outputs(results, out, redraw_chart=added)
    print(summary(results))
    print(f"results: {', '.join(str(out / f) for f in FILES if (out / f).exists())}")
    return 0 if all(r["status"] == "pass" for r in results["gpu_check"]["stages"].values()) else 1


if __name__ == "__main__":
    run_cli(main)
