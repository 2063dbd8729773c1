"""What every benchmark records beside its timings, so a results file says where it came from."""

from __future__ import annotations

import contextlib
import platform

import numpy as np
import pytest
import torch


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
        stats = getattr(benchmark, "stats", None)
        if per_call is not None and stats is not None:  # None when benchmarks are disabled
            benchmark.extra_info[f"{unit}_per_s"] = round(per_call / stats.stats.median)

    return _record
