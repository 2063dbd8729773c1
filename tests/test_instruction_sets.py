"""The numerics-sensitive tests under older instruction sets, on whatever CPU runs them (second tier).

oneDNN and ATen choose their kernels by what the CPU offers (AMX tiles, AVX-512 with bf16, AVX-512, AVX2),
and each sums in its own order, so a tolerance or a pinned value that holds on one machine may not on
another. ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY cap what both may use, so one machine runs as the older
ones too: each level below runs the tests that compare floats (pinned losses, kernels against eager and fp64,
accumulation and clipping, exact resume) in a fresh pytest process. The machine as it is, its best, is the
first tier's: a level that would run as the machine does anyway skips.

Each level gets its own inductor cache: inductor's cache key does not hold ATEN_CPU_CAPABILITY, and a kernel
compiled under one capability and loaded under another aborted the process here (torch 2.13).
ATEN_CPU_CAPABILITY=default is left out: inductor's C++ does not compile under it (torch 2.13 and 2.11).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.studies.isa_spread import cpu_flags

ROOT = Path(__file__).resolve().parents[1]

# What a level caps: (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, the /proc/cpuinfo flags it needs).
LEVELS = {
    "avx2": ("avx2", "AVX2", {"avx2", "fma"}),
    "avx512": ("avx512", "AVX512_CORE", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
}

# What a CPU must offer for its best to differ from the avx2 level (oneDNN's AVX2_VNNI levels sit above AVX2 too).
ABOVE_AVX2 = {"avx512f", "avx_vnni", "amx_bf16"}

# The files that compare floats; test_checkpoint only for its bitwise resume. The kernels' Triton cases are left
# out (-k below): Triton's interpreter computes with numpy, which neither variable steers, and the first tier
# runs them. About 60 s a level in one process.
NUMERICS = [
    "tests/test_pinned_losses.py",
    "tests/test_model.py",
    "tests/test_training.py",
    "tests/test_cross_entropy.py",
    "tests/test_linear_cross_entropy.py",
    "tests/test_rms_norm.py",
    "tests/test_adamw.py",
    "tests/test_clip_grad_norm.py",
    "tests/test_newton_schulz.py",
    "tests/test_fp8.py",
    "tests/test_checkpoint.py::test_resumed_training_is_bitwise_identical",
    "tests/test_train_cli.py::test_main_job_trains_evaluates_samples_and_saves",  # the main job end to end
]


@pytest.mark.second_tier
@pytest.mark.subprocess
@pytest.mark.parametrize("level", LEVELS)
def test_the_numerics_hold_at_every_instruction_set(level, tmp_path):
    aten, onednn, needs = LEVELS[level]
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to tell which instruction sets this CPU has")
    if missing := needs - flags:
        pytest.skip(f"this CPU lacks {sorted(missing)}: it cannot run as an {level} machine")
    if level == "avx512" and not flags & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU's best is AVX-512 without bf16: the first tier runs these tests on it as it is")
    if level == "avx2" and not flags & ABOVE_AVX2:
        pytest.skip("this CPU's best is AVX2: the first tier runs these tests on it as it is")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "ATEN_CPU", "ONEDNN_MAX"))}
    env |= {"PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env |= {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}
    command = [sys.executable, "-m", "pytest", *NUMERICS, "-k", "not triton", "-q", "-p", "no:cacheprovider"]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            command + ["-n", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )  # one process: this test is itself one of pytest-xdist's workers
    except subprocess.TimeoutExpired as e:  # run() has killed it
        pytest.fail(f"{level}: still running after {e.timeout} s\n{(e.stdout or b'')[-4000:]!r}")
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{level} ({aten}, {onednn}) failed after {time.monotonic() - start:.0f} s:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
