"""What every benchmark records beside its timings, so a results file says where it came from."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import platform
import time

import numpy as np
import pytest
import torch

# Set by `python -m benchmarks.gpu_check --dry-run`: the GPU cases run on the CPU at tiny sizes, so the
# whole acceptance pack's plumbing is exercised on a machine without a GPU. Their timings mean nothing.
DRY_RUN = os.environ.get("FASTTRAIN_BENCH_DRY_RUN") == "1"


def sizes(full, tiny):
    """A case's sizes: `full` on the GPU, `tiny` in a dry run."""
    return tiny if DRY_RUN else full


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    """Without --benchmark-only, run each benchmark once as a test, untimed: the default `pytest` run
    checks that they work, quickly. (pytest-benchmark refuses --benchmark-disable in addopts beside
    --benchmark-only, so the choice is made here, before its session reads the option.)"""
    if not config.getoption("benchmark_only") and not config.getoption("benchmark_enable"):
        config.option.benchmark_disable = True


def median_seconds(benchmark) -> float | None:
    """The median time of a benchmark's rounds; None when timing is off (a plain test run)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def environment() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu": platform.processor() or platform.machine()}
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:  # Linux only
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
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


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU, which runs it as it is called)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy, measured once per session."""
    return measure_copy_bandwidth(device, sizes(1 << 30, 1 << 22))


def bandwidth(floor_bytes: int, median_s: float | None, copy_bytes_per_s: float) -> dict[str, float]:
    """What a memory-bound case records: GB/s of its floor traffic, the copy GB/s it is measured
    against, and the fraction of that floor reached (nothing when untimed)."""
    if median_s is None:
        return {}
    return {"gb_per_s": round(floor_bytes / median_s / 1e9, 1), "copy_gb_per_s": round(copy_bytes_per_s / 1e9, 1),
            "fraction_of_floor": round(floor_bytes / copy_bytes_per_s / median_s, 3)}


def time_device(benchmark, device: torch.device, fn, rounds: int = 20) -> None:
    """Benchmark `fn` on `device`: warm-up calls first (compilation, autotuning), then each round synchronised."""

    def call():
        fn()
        synchronize(device)

    benchmark.pedantic(call, warmup_rounds=sizes(3, 1), rounds=sizes(rounds, 2), iterations=1)


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
    """torch.compile(fn), made on first use: importing the compiler at collection costs every pytest run."""
    return torch.compile(fn)


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
