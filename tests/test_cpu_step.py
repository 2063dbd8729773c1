"""benchmarks.studies.cpu_step: the CPU step at a budget's shapes, each measurement a process of its own."""

from __future__ import annotations

import json

import pytest

from benchmarks.studies.cpu_step import main
from fasttrain.system.errors import run_cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "2by128"], "--shape 2by128: not LAYERSxWIDTH, as 2x128"),
        (["--shape", "2x100"], "--shape 2x100: needs at least one layer and a width a multiple of 64"),
        (["--shape", "1x64", "--against", "no-such-commit"], "--against no-such-commit:"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        run_cli(main, [*args, "--out", str(tmp_path / "out.json")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


@pytest.mark.subprocess
def test_each_setting_is_measured_with_the_kernels_the_run_resolves(tmp_path):
    """On a CPU the default ("auto") step fuses the head and the loss; the unfused setting does not: each record says
    which kernels its trainer ran, and the summary gives tokens/s and FLOP/s from it."""
    out = tmp_path / "step.json"
    argv = ["--shape", "1x64", "--setting", "eager", "eager unfused loss", "--rounds", "1", "--steps", "1"]
    assert main([*argv, "--threads", "1", "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    kernels = {r["setting"]: r["kernels"] for r in found["records"]}
    assert kernels == {"eager": ["linear_cross_entropy"], "eager unfused loss": []}
    assert all(r["tokens_per_s"] > 0 and r["gflop_per_s"] > 0 for r in found["summary"])
    assert found["machine"]["torch"] and found["command"].startswith("python -m benchmarks.studies.cpu_step")
