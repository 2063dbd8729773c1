"""Issue 49, round five, checkpoints: an interrupted --overwrite keeps the earlier run, a save that meets the
file size limit is one line, the resume command of a stopped mixture run works from anywhere, and a checkpoint
whose bytes changed on disk is refused, naming the file. Each through the real entry point."""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrain import train
from tests.conftest import tiny_args
from tests.test_checkpoint import ENDLESS, ROOT, events, run_cli_code, wait_for
from tests.test_mixture import code_data, mixture  # noqa: F401 (code_data: a fixture)
from tests.test_reliability_start import QUICK, snapshot


@pytest.fixture(scope="module")
def trained(pydoc_data, tmp_path_factory) -> Path:
    """A finished tiny run saved at steps 1 and 2 (read-only: cases copy it)."""
    run = tmp_path_factory.mktemp("round5") / "run"
    assert run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, "checkpoint.interval=1")) == 0
    return run


def train_process(args: list[str], cwd: Path = ROOT, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`python -m fasttrain.train ARGS` run to its end from `cwd`, its files limited to `limit_bytes` each
    (RLIMIT_FSIZE, as `ulimit -f`: set in the child only)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "fasttrain.train", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
                          preexec_fn=limit if limit_bytes else None)


@pytest.mark.subprocess
def test_a_save_beyond_the_file_size_limit_is_one_line_and_keeps_the_earlier_saves(pydoc_data, trained, tmp_path):
    """Item 9: under `ulimit -f` torch.save's write failed with EFBIG and the run ended in a RuntimeError
    traceback, its temporary file left in checkpoints/. Now it is one line, as a full disk is."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = {name: snapshot(run / "checkpoints")[name] for name in ("step_0000001.pt", "step_0000002.pt", "latest")}
    size = (run / "checkpoints" / "step_0000002.pt").stat().st_size
    done = train_process(tiny_args(pydoc_data, run, *QUICK, "train.max_steps=4", flags=["--resume", "auto"]),
                         limit_bytes=size // 2)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "step_0000004.pt: cannot save checkpoint (File too large)" in done.stderr
    now = snapshot(run / "checkpoints")
    assert {name: now[name] for name in saved} == saved
    assert not list((run / "checkpoints").glob(".*"))  # no temporary file left


@pytest.mark.subprocess
def test_the_resume_command_of_a_stopped_mixture_run_works_from_another_directory(
        pydoc_data, code_data, tmp_path):  # noqa: F811 (the fixture imported above)
    """Item 11: SIGTERM of a mixture run printed a command that set data.dir to the working directory, which a
    mixture refuses (and its sources, named relative to where it started, were not found from elsewhere)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(pydoc_data, work / "web")
    shutil.copytree(code_data, work / "code")
    elsewhere.mkdir()
    run = tmp_path / "run"
    sets = [*mixture(Path("web"), Path("code"), run), *ENDLESS, "checkpoint.interval=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "fasttrain.train", str(ROOT / "configs/base.toml"), "--set", *sets],
                            cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and events(run, "train"), proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and "resume with: " in stderr, stderr
    step = int(stderr.split("at step ")[1].split(";")[0])
    command = shlex.split(stderr.split("resume with: ")[1])
    resumed = train_process([*command[3:], "--set", f"train.max_steps={step + 2}"], cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert events(run, "start")[-1]["resume_step"] == step and events(run, "end")[-1]["step"] == step + 2
