"""benchmarks.conftest.record_samples: durations measured outside pytest-benchmark (CUDA events) become a
case's stats, and a pytest-benchmark that no longer lets them fails the case instead of recording wrong ones;
benchmarks.conftest's summary: a timed run ends with each case's speed against stock and its throughput."""

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


SUMMARY_CASES = """
import pytest

from benchmarks.conftest import record_samples

SECONDS = {"fasttrain": 1e-3, "eager": 4e-3, "compiled": 2e-3}


@pytest.mark.parametrize("impl", SECONDS)
def test_step(benchmark, record, impl):
    record_samples(benchmark, lambda: [SECONDS[impl]] * 3, untimed=lambda: None)
    record(per_call=1000, impl=impl)
"""


def timed_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`pytest --benchmark-only ARGS` in `folder`, with the repository importable."""
    # Without pytest-xdist's worker variables: pytest-benchmark refuses --benchmark-only where it sees them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pytest", "--benchmark-only", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.subprocess
def test_samples_are_the_stats_and_a_changed_pytest_benchmark_fails_loudly(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    out = tmp_path / "results.json"
    timed_pytest(tmp_path, "test_cases.py", f"--benchmark-json={out}")
    [case] = json.loads(out.read_text())["benchmarks"]  # the failed one's wrong stats are left out
    assert case["name"] == "test_given_samples" and case["options"]["timer"] == "externally_measured"
    assert case["stats"]["data"] == pytest.approx([3e-5, 1e-5, 2e-5], rel=1e-12)
    assert case["stats"]["min"] == pytest.approx(1e-5) and case["stats"]["median"] == pytest.approx(2e-5)


@pytest.mark.subprocess
def test_a_timed_run_ends_with_speed_against_stock_and_throughput(tmp_path):
    (tmp_path / "conftest.py").write_text("from benchmarks.conftest import pytest_terminal_summary, record  # noqa\n")
    (tmp_path / "test_cases.py").write_text(SUMMARY_CASES)
    out = timed_pytest(tmp_path, "test_cases.py").stdout
    rows = [line for line in out.splitlines() if line.startswith("| step |")]
    assert rows == [
        "| step | fasttrain | 1.00 ms | 1.00 ms | 2.00x | 1,000,000 |",  # against compiled, the faster stock case
        "| step | eager | 4.00 ms | 4.00 ms | 0.50x | 250,000 |",
        "| step | compiled | 2.00 ms | 2.00 ms | 1.00x | 500,000 |",
    ], out[-3000:]
    assert "| case | implementation | median | min | vs stock | tokens/s |" in out
