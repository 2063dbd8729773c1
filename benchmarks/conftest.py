"""What every benchmark records beside its timings, so a results file says where it came from."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import platform
import sys
import time
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

from benchmarks.studies.report import markdown
from fasttrain.compute.device import synchronize

# Set by `python -m benchmarks.studies.gpu_check --dry-run`: the GPU cases run on the CPU at tiny sizes, so the
# whole acceptance pack's plumbing is exercised on a machine without a GPU. Their timings mean nothing.
DRY_RUN = os.environ.get("FASTTRAIN_BENCH_DRY_RUN") == "1"


# configs/base.toml sizes its model for its 2-minute budget (model.n_layers = 0) and trains it with Muon and a
# warmdown. The benchmarks that time "the base model" keep the fixed run it was until 2026-11-25, so that their
# figures stay comparable with the result files before then: 4 x 192 (2.6M parameters), AdamW, cosine, 200 steps.
FIXED_BASE = (
    "model.n_layers=4",
    "model.d_model=192",
    "model.n_heads=4",
    "optim.name=adamw",
    "schedule.decay=cosine",
    "train.max_steps=200",
    "train.max_time=0",
)


def sizes(full, tiny):
    """A case's sizes: `full` on the GPU, `tiny` in a dry run."""
    return tiny if DRY_RUN else full


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    """Without --benchmark-only, run each benchmark once as a test, untimed: the default `pytest` run
    checks that they work, quickly. (pytest-benchmark refuses --benchmark-disable in addopts beside
    --benchmark-only, so the choice is made here, before its session reads the option.)

    pytest-benchmark's own table shows the median and the rounds unless --benchmark-columns says otherwise:
    its ten default columns make it about 220 characters wide, and the table a timed run ends with
    (pytest_terminal_summary, below) holds the median and min beside each case's speed against stock."""
    if not config.getoption("benchmark_only") and not config.getoption("benchmark_enable"):
        config.option.benchmark_disable = True
    if config.getoption("benchmark_columns") is None:
        config.option.benchmark_columns = ["median", "rounds"]


def median_seconds(benchmark) -> float | None:
    """The median time of a benchmark's rounds; None when timing is off (a plain test run)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def environment() -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:  # Linux only
        lines = f.read().splitlines()
        # the vector and matrix extensions that decide the CPU's matmul kernels (and bf16 against fp32)
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        info["cpu_flags"] = " ".join(sorted(set(flags) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())  # the dispatch table's key
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    return info


@pytest.fixture
def record(benchmark):
    """record(per_call_units=..., unit="tokens", **info): store info and, after timing, units per second."""

    def _record(per_call: float | None = None, unit: str = "tokens", **info) -> None:
        benchmark.extra_info.update(environment())
        benchmark.extra_info.update(info)
        median = median_seconds(benchmark)
        if per_call is not None and median is not None:
            benchmark.extra_info[f"{unit}_per_s"] = round(per_call / median)

    return _record


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the GPU cases run: the GPU; the CPU in a dry run; otherwise they skip (with this reason)."""
    if DRY_RUN:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes/s of a large copy within `device` (read + write): the memory floor's practical peak."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()  # one sync around many copies: host timing is as good as events here
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def measure_matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device`, on random data: the compute floor's practical peak."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy, measured once per session."""
    return measure_copy_bandwidth(device, sizes(1 << 30, 1 << 22))


def bandwidth(floor_bytes: int, median_s: float | None, copy_bytes_per_s: float) -> dict[str, float]:
    """What a memory-bound case records: GB/s of its floor traffic, the copy GB/s it is measured
    against, and the fraction of that floor reached (nothing when untimed)."""
    if median_s is None:
        return {}
    return {
        "gb_per_s": round(floor_bytes / median_s / 1e9, 1),
        "copy_gb_per_s": round(copy_bytes_per_s / 1e9, 1),
        "fraction_of_floor": round(floor_bytes / copy_bytes_per_s / median_s, 3),
    }


def time_device(
    benchmark, device: torch.device, fn: Callable[[], object], rounds: int = 20, events: bool = True, warmup: int = 3
) -> None:
    """Benchmark `fn` on `device` after `warmup` untimed calls (compilation, autotuning; 1 in a dry run).

    On a GPU, with `events`, each round is GPU time alone (`cuda_event_seconds`): the host's Python,
    launches and syncs are outside it (bench_host_overhead.py measures that cost apart). `events=False`
    is for a workload that syncs inside itself (a training step, generation): after each of its syncs
    the GPU waits for the host's next launches, so no work queued ahead keeps host time out of an event
    interval, and such a workload costs its wall time anyway: each round is then a call and a sync on
    the host clock, as on the CPU (a dry run). `benchmark.extra_info` says which ("timing": "cuda_events"
    or "host") and whether the L2 cache was flushed before each round ("l2_flushed")."""

    def call():
        fn()
        synchronize(device)

    warmup, rounds = sizes(warmup, 1), sizes(rounds, 2)
    if device.type == "cuda" and events:
        benchmark.extra_info.update(timing="cuda_events", l2_flushed=True)
        record_samples(benchmark, lambda: cuda_event_seconds(fn, device, warmup, rounds), untimed=call)
    else:
        benchmark.extra_info.update(timing="host", l2_flushed=False)
        benchmark.pedantic(call, warmup_rounds=warmup, rounds=rounds, iterations=1)


# Zeroing this many bytes evicts everything from the L2 cache: more than any current GPU's (H100: 50 MiB;
# B200: 126 MiB), as triton.testing.do_bench does.
L2_FLUSH_BYTES = 256 << 20


def cuda_event_seconds(fn: Callable[[], object], device: torch.device, warmup: int, rounds: int) -> list[float]:
    """GPU seconds of each of `rounds` calls of `fn`, after `warmup` untimed ones, as triton.testing.do_bench
    times: before each call the L2 cache is flushed, then CUDA events are recorded around it, and the host
    syncs once, after the last. The flushes also keep the GPU busy while the host enqueues the call, so
    the GPU never waits for the host inside an interval: it holds the GPU's work alone."""
    for _ in range(warmup):
        fn()
    # Made per case rather than held for the session: the caching allocator hands the same block back
    # each time, and it never counts in a later case's peak memory.
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    flushes = flushes_ahead(fn, flush)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, end in events:
        for _ in range(flushes):
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def flushes_ahead(fn: Callable[[], object], flush: torch.Tensor) -> int:
    """How many zeroings of `flush` to queue before each timed call of `fn` so that the GPU is still busy
    with them when the host has enqueued the whole call: GPU work of twice the call's host time (measured
    here, in one more call). One flush (~0.1 ms on an H100) is less than the host time of some calls (an
    autograd forward + backward of a Triton kernel), and then the GPU would wait on launches, timed."""
    torch.cuda.synchronize(flush.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    flush.zero_()
    end.record()
    begin = time.perf_counter()
    fn()
    host_s = time.perf_counter() - begin
    torch.cuda.synchronize(flush.device)
    return max(1, math.ceil(2 * host_s / (start.elapsed_time(end) / 1e3)))


def record_samples(benchmark, measure: Callable[[], Sequence[float]], untimed: Callable[[], object]) -> None:
    """Make the durations (seconds) that `measure()` returns, timed outside pytest-benchmark, the case's
    stats: its terminal table, its --benchmark-json entry and `median_seconds` all read them. In an
    untimed run (a plain `pytest`) nothing is measured: `untimed()` is called once, as pytest-benchmark
    calls a case then.

    pytest-benchmark has no public way to take durations it did not time: its runner times a round as
    timer() after the target minus timer() before. So this runs the public `pedantic`, a round per
    sample, with a timer that reads a clock the target moves on by that sample. A case's timer is public
    only as the `benchmark(timer=...)` marker, read when the fixture is made, before the test knows how it
    will time. Setting the fixture's `_timer` is the one internal step, so the stats are checked against
    the samples: should pytest-benchmark stop timing rounds with it, the case fails rather than record
    the host time of a no-op."""
    if not benchmark.enabled:
        benchmark.pedantic(untimed)
        return
    samples = list(measure())
    pending = iter(samples)
    now = 0.0

    def externally_measured() -> float:  # the timer: pytest-benchmark's JSON names it in options.timer
        return now

    def next_sample() -> None:
        nonlocal now
        now += next(pending, 0.0)  # 0.0 past the last: --benchmark-cprofile calls the target again

    benchmark._timer = externally_measured
    benchmark.pedantic(next_sample, rounds=len(samples), iterations=1)
    recorded = benchmark.stats.stats.data if benchmark.stats else []
    if len(recorded) != len(samples) or not all(map(math.isclose, recorded, samples)):
        benchmark.has_error = True  # keeps the wrong stats out of --benchmark-json, as for any failed case
        raise RuntimeError(
            "pytest-benchmark did not record the durations measured outside it: its fixture no "
            "longer times pedantic rounds with `_timer` (benchmarks/conftest.py, record_samples)"
        )


def peak_extra_memory(device: torch.device, fn) -> int:
    """Bytes the GPU allocator held at the peak of `fn()` beyond what was allocated before it (0 off the GPU)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@functools.cache
def compiled(fn):
    """torch.compile(fn) for static shapes, made on first use: importing the compiler at collection costs
    every pytest run. Static, and compiled afresh for each case (`fresh_compiler`): dynamo would otherwise
    recompile a function's second shape with symbolic sizes, and the compiled baseline of every later
    case would be a dynamic-shape graph, slower than what a user compiles for one shape."""
    return torch.compile(fn, dynamic=False)


@pytest.fixture(autouse=True)
def fresh_compiler() -> None:
    """Each case starts with dynamo's caches empty: a training step compiled for one model and batch
    size must not make the next case's compile dynamic (nor count toward its recompile limit)."""
    if "torch._dynamo" in sys.modules:  # nothing compiled yet: nothing to forget
        torch._dynamo.reset()


def liger(module: str, name: str):
    """`name` from Liger-Kernel's `module`: a baseline only, never a dependency (see `require`)."""
    return getattr(importlib.import_module(module), name)


def require(impl: str) -> None:
    """Skip a case whose implementation cannot run here, before anything is timed: a case that skips
    mid-timing leaves pytest-benchmark an empty sample, which breaks --benchmark-json."""
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    if impl == "compiled" and DRY_RUN:
        pytest.skip("a dry run skips the torch.compile baselines: minutes of CPU compiling that prove nothing")


# The CUDA caching allocator's running counts that explain a slow step: a retry (a cudaMalloc failed, so
# every cached block was freed, with a device sync, and it tried again) costs tens of ms, and a cudaMalloc
# or cudaFree after warm-up means the cache is still churning.
ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The caching allocator's ALLOCATOR_COUNTS on `device` so far; {} off CUDA (no such allocator)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: stats.get(k, 0) for k in ALLOCATOR_COUNTS}


def counts_since(before: dict[str, int], device: torch.device) -> dict[str, int]:
    """The allocator events on `device` since `before` (an allocator_counts), per count."""
    now = allocator_counts(device)
    return {k: now[k] - before.get(k, 0) for k in now}


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config) -> None:
    """After pytest-benchmark's table of times, what each timed case is worth: its speed against the strongest
    stock implementation of the same case and what it recorded (tokens/s, GB/s, TFLOP/s, the fraction of its
    floor), the table `python -m benchmarks.studies.report` makes of a results file. Nothing in an untimed run."""
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's; its cases' stats are public
    timed = [b.as_dict(include_data=False) for b in getattr(session, "benchmarks", ()) if b and not b.has_error]
    if timed:
        terminalreporter.write_sep("-", "speed against stock PyTorch and throughput (benchmarks/studies/report.py)")
        results = {
            "benchmarks": timed,
            "commit_info": config.hook.pytest_benchmark_generate_commit_info(config=config),
            "datetime": time.strftime("%Y-%m-%d"),
            "command": " ".join(["pytest", *config.invocation_params.args]),
        }
        terminalreporter.write(markdown(results))
