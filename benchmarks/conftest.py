"""What every benchmark records beside its timings, so a results file says where it came from."""

from __future__ import annotations

import contextlib
import functools
import importlib
import platform

import numpy as np
import pytest
import torch


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
def cuda() -> torch.device:
    """The GPU; GPU benchmarks skip (with this reason) on a machine without one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def copy_bandwidth(cuda) -> float:
    """Bytes/s of a large device-to-device copy (read + write): the memory floor's practical peak."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=cuda)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3)


def bandwidth(floor_bytes: int, median_s: float | None, copy_bytes_per_s: float) -> dict[str, float]:
    """What a memory-bound case records: GB/s of its floor traffic, the copy GB/s it is measured
    against, and the fraction of that floor reached (nothing when untimed)."""
    if median_s is None:
        return {}
    return {"gb_per_s": round(floor_bytes / median_s / 1e9, 1), "copy_gb_per_s": round(copy_bytes_per_s / 1e9, 1),
            "fraction_of_floor": round(floor_bytes / copy_bytes_per_s / median_s, 3)}


def time_cuda(benchmark, fn, rounds: int = 20) -> None:
    """Benchmark `fn` on the GPU: warm-up calls first (compilation, autotuning), then each round synchronised."""

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, warmup_rounds=3, rounds=rounds, iterations=1)


def peak_extra_memory(fn) -> int:
    """Bytes the GPU allocator held at the peak of `fn()` beyond what was allocated before it."""
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
    """`name` from Liger-Kernel's `module`, a baseline only: the case skips when it is not installed."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip("liger-kernel is not installed")
