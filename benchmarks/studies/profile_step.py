"""Profile training steps with torch.profiler: where a step's time goes, and a trace to look at.

    python -m benchmarks.studies.profile_step configs/gpt2-small.toml [--set KEY=VALUE ...] [--steps 5] [--out DIR]

Builds the config's Trainer as bench_train_step does (random tokens already on the
device, one micro-batch per step), runs 10 warm-up steps (compilation, autotuning),
times --steps steps one by one (CUDA events, one sync at the end: min, median, spread
and each step in order, with the caching allocator's cudaMalloc retries and calls
meanwhile: a slow step beside a retry is the allocator's), then profiles --steps
steps. Prints the time per step by kernel category (matmul, attention, norm, cross-entropy, optimizer, elementwise, copies, and on a GPU
the device idle: host work and gaps), the ops that took the most time (GPU time on
CUDA, CPU time otherwise), and writes DIR/trace.json for chrome://tracing or
Perfetto, where the gaps show: launch overhead between short kernels, host syncs
(the device idle while the CPU waits), unfused elementwise chains. On a GPU it also charges
each idle gap to the host op whose launch ended it (`idle_gaps`). The gpu_check `profile` stage
records the same for the stock and fasttrain steps.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_train_step import WARMUP_STEPS, make_trainer
from benchmarks.conftest import allocator_counts, counts_since
from fasttrain.system.errors import ArgumentParser, run_cli

# Kernel and op names -> category, first match wins (names lowercased). Inductor's generated kernels are
# "triton_poi_/red_/per_fused_..." and fall to elementwise unless a category's name is in them. Attention comes
# before matmul: its kernels' names hold matmul's words (cudnn's "..._sdpa_sm90_flash_...", "fmha_cutlass...").
CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("norm", r"rms_norm|rmsnorm|layer_norm"),
    ("cross-entropy", r"cross_entropy|log_softmax|nll_loss|softmax"),
    ("optimizer", r"adam|multi_tensor|foreach|sum_squares|_scale_kernel|clip_grad"),
    ("copies", r"memcpy|memset|copy|aten::cat$|aten::to$"),
    ("elementwise", r"triton_|elementwise|vectorized|pointwise|reduce|aten::"),
]


def category(name: str) -> str:
    name = name.lower()
    return next((c for c, pattern in CATEGORIES if re.search(pattern, name)), "other")


def step_times_ms(trainer, steps: int) -> list[float]:
    """Each of `steps` steps' time in ms: CUDA events around each, one sync after the last, so the timing
    adds no host sync (the step's own one stays, and the GPU's wait for the host after it counts, as it does
    in training); wall time on the CPU."""
    if trainer.device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        trainer.step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def timed_steps(trainer, steps: int) -> tuple[list[float], dict[str, int]]:
    """`step_times_ms` of `steps` steps, and the caching allocator's events meanwhile (conftest.allocator_counts)."""
    before = allocator_counts(trainer.device)
    times = step_times_ms(trainer, steps)
    return times, counts_since(before, trainer.device)


def step_summary(times: list[float]) -> dict:
    """Step times in ms: min, median, stdev and each in order, to the microsecond."""
    return {
        "min": round(min(times), 3),
        "median": round(statistics.median(times), 3),
        "stdev": round(statistics.stdev(times), 3) if len(times) > 1 else 0.0,
        "each": [round(t, 3) for t in times],
    }


def ms_by_category(events, cuda: bool, steps: int) -> dict[str, float]:
    """Milliseconds a step per category from the profiler's averaged `events`. On CUDA only the kernels'
    own events count: the CPU op that launched a kernel carries that kernel's device time too, as does a
    user annotation around it, and counting them would add each kernel two or three times (torch's own
    table sums the same way). On the CPU, each op's time outside the ops it calls."""
    by_category: dict[str, float] = {}
    for e in events:
        if cuda and (e.device_type != DeviceType.CUDA or e.is_user_annotation):
            continue
        spent = e.self_device_time_total if cuda else e.self_cpu_time_total
        if spent > 0:
            by_category[category(e.key)] = by_category.get(category(e.key), 0.0) + spent / 1e3 / steps
    return by_category


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of work on the GPU
LAUNCHES = ("cuda_runtime", "cuda_driver")  # the host calls that queue it (cudaLaunchKernel, cuLaunchKernelEx)


def enclosing_ops(events: list[dict], launches: dict[int, dict]) -> dict[int, list[str]]:
    """The names of the CPU ops (and annotations, but ProfilerStep's) open around each of `launches` (by
    correlation id) on its thread, outermost first: one sweep of each thread's ops in start order with the
    ones still open, rather than a scan of every op for every launch (a 20-step trace holds tens of thousands)."""
    by_thread: dict[tuple, list[tuple]] = {}
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and not e["name"].startswith("ProfilerStep"):
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append((e["ts"], 0, -e["dur"], e))
    for correlation, launch in launches.items():  # after the ops starting at its time (0 before 1)
        by_thread.setdefault((launch.get("pid"), launch.get("tid")), []).append((launch["ts"], 1, 0, correlation))
    chains: dict[int, list[str]] = {}
    for items in by_thread.values():
        open_ops: list[dict] = []  # outermost first: started earlier, or at once and longer
        for ts, is_launch, _, item in sorted(items, key=lambda i: i[:3]):
            open_ops = [o for o in open_ops if o["ts"] + o["dur"] >= ts]
            if is_launch:
                chains[item] = [o["name"] for o in open_ops]
            else:
                open_ops.append(item)
    return chains


def idle_gaps(trace: dict, steps: int, top: int = 8) -> dict:
    """Where the GPU waited, from a profiler's chrome `trace` of `steps` steps: each gap between the device's
    work (every stream merged) is charged to the host op that launched the work ending it, the innermost CPU
    op around that launch, and to the outermost one (the phase: the compiled region, the optimizer step).

    Returns {"ms_per_step": the device idle per step between its first and last work, "by_launcher":
    {innermost op: ms per step}, "by_phase": {outermost op: ms per step}, "largest": the `top` longest gaps,
    each {"ms", "next", "launcher", "phase", "launch_lag_ms"}}; launch_lag_ms > 0 means the work was
    queued only after the GPU ran dry (the host was behind), < 0 that it waited on something else (a
    dependency, a sync). Empty figures without device work (a CPU run)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    work = sorted((e for e in events if e.get("cat") in DEVICE_WORK), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e for e in events if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})
    }
    chains = enclosing_ops(events, launches)
    gaps, end = [], None
    for e in work:
        if end is not None and e["ts"] > end:
            correlation = e.get("args", {}).get("correlation")
            launch, chain = launches.get(correlation), chains.get(correlation, [])
            gaps.append(
                {
                    "ms": (e["ts"] - end) / 1e3,
                    "next": e["name"],
                    "launcher": chain[-1] if chain else "unknown",
                    "phase": chain[0] if chain else "unknown",
                    "launch_lag_ms": round((launch["ts"] - end) / 1e3, 3) if launch else None,
                }
            )
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])

    def per_step(key: str) -> dict[str, float]:
        totals: dict[str, float] = {}
        for g in gaps:
            totals[g[key]] = totals.get(g[key], 0.0) + g["ms"] / steps
        return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}

    largest = sorted(gaps, key=lambda g: -g["ms"])[:top]
    return {
        "ms_per_step": round(sum(g["ms"] for g in gaps) / steps, 3),
        "by_launcher": per_step("launcher"),
        "by_phase": per_step("phase"),
        "largest": [{**g, "ms": round(g["ms"], 3)} for g in largest],
    }


def profile_trainer(trainer, steps: int, out: Path) -> dict:
    """Warm `trainer` up, time `steps` steps, then profile `steps` more (writing out/trace.json): the step
    times (min, median, stdev in ms, and each in order), the allocator events during the timed steps, the
    time per step by category, and the top-ops table."""
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(WARMUP_STEPS):
        trainer.step()
    times, allocator = timed_steps(trainer, steps)
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / "trace.json"))
    gaps = idle_gaps(json.loads((out / "trace.json").read_text()), steps) if cuda else {}
    by_category = ms_by_category(prof.key_averages(), cuda, steps)
    if cuda:  # the device idle: host work the kernels waited for, launch gaps, syncs
        by_category["idle (host, gaps)"] = max(statistics.median(times) - sum(by_category.values()), 0.0)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25)
    return {
        "step_ms": step_summary(times),
        "allocator": allocator,
        "ms_per_step": {k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "idle_gaps": gaps,
        "table": table,
    }


def profile_steps(config: str, overrides: Sequence[str], steps: int, out: Path) -> dict:
    """`profile_trainer` on the Trainer of `config` with `overrides`, as bench_train_step builds it."""
    with tempfile.TemporaryDirectory() as data_dir:
        return profile_trainer(make_trainer(Path(config), Path(data_dir), *overrides), steps, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a run config (TOML)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--steps", type=int, default=5, help="steps to profile after the warm-up (default 5)")
    parser.add_argument("--out", default="profile", help="directory for trace.json (default ./profile)")
    args = parser.parse_args(argv)
    found = profile_steps(args.config, args.set, args.steps, Path(args.out))
    print(found["table"])
    step = found["step_ms"]
    print(f"step: min {step['min']:.2f} ms, median {step['median']:.2f} ms, stdev {step['stdev']:.2f} ms")
    print("each: " + " ".join(f"{t:.1f}" for t in step["each"]) + " ms")
    if found["allocator"]:
        print("allocator during the timed steps: " + ", ".join(f"{k} {v}" for k, v in found["allocator"].items()))
    for name, ms in found["ms_per_step"].items():
        print(f"  {name:<18} {ms:9.3f} ms/step")
    for name, ms in found["idle_gaps"].get("by_launcher", {}).items():
        print(f"  GPU idle before work launched by {name}: {ms:.3f} ms/step")
    print(f"trace: {Path(args.out) / 'trace.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
