"""benchmarks.conftest.record_samples: durations measured outside pytest-benchmark (CUDA events) become a
case's stats, and a pytest-benchmark that no longer lets them fails the case instead of recording wrong ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = """
import time

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks.conftest import record_samples


def test_given_samples(benchmark):
    record_samples(benchmark, lambda: [3e-5, 1e-5, 2e-5], untimed=lambda: None)


def test_a_fixture_that_ignores_its_timer(benchmark, monkeypatch):
    make_runner = BenchmarkFixture._make_runner
    monkeypatch.setattr(BenchmarkFixture, "_make_runner", lambda self, *args: (
        lambda loops, timer=time.perf_counter: make_runner(self, *args)(loops, timer)))
    with pytest.raises(RuntimeError, match="no longer times pedantic rounds"):
        record_samples(benchmark, lambda: [3e-5, 1e-5], untimed=lambda: None)
"""


@pytest.mark.subprocess
def test_samples_are_the_stats_and_a_changed_pytest_benchmark_fails_loudly(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    out = tmp_path / "results.json"
    # Without pytest-xdist's worker variables: pytest-benchmark refuses --benchmark-only where it sees them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "test_cases.py",
            "--benchmark-only",
            f"--benchmark-json={out}",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [case] = json.loads(out.read_text())["benchmarks"]  # the failed one's wrong stats are left out
    assert case["name"] == "test_given_samples" and case["options"]["timer"] == "externally_measured"
    assert case["stats"]["data"] == pytest.approx([3e-5, 1e-5, 2e-5], rel=1e-12)
    assert case["stats"]["min"] == pytest.approx(1e-5) and case["stats"]["median"] == pytest.approx(2e-5)
