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
import torch

from fasttrain import evaluate, export, sample, train
from fasttrain.checkpoints import checkpoint_files, saves
from fasttrain.plot import read_metrics
from fasttrain.system.errors import UsageError, run_cli
from fasttrain.training.trainer import Trainer
from tests.conftest import HANG_SECONDS, tiny_args
from tests.test_checkpoint import ENDLESS, ROOT, events, run_cli_code, wait_for
from tests.test_mixture import mixture
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

    return subprocess.run(
        [sys.executable, "-m", "fasttrain.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        preexec_fn=limit if limit_bytes else None,
    )


@pytest.mark.subprocess
def test_a_save_beyond_the_file_size_limit_is_one_line_and_keeps_the_earlier_saves(pydoc_data, trained, tmp_path):
    """Item 9: under `ulimit -f` torch.save's write failed with EFBIG and the run ended in a RuntimeError
    traceback, its temporary file left in checkpoints/. Now it is one line, as a full disk is."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = {name: snapshot(run / "checkpoints")[name] for name in ("step_0000001.pt", "step_0000002.pt", "latest")}
    size = (run / "checkpoints" / "step_0000002.pt").stat().st_size
    done = train_process(
        tiny_args(pydoc_data, run, *QUICK, "train.max_steps=4", flags=["--resume", "auto"]), limit_bytes=size // 2
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "step_0000004.pt: cannot save checkpoint (File too large)" in done.stderr
    now = snapshot(run / "checkpoints")
    assert {name: now[name] for name in saved} == saved
    assert not list((run / "checkpoints").glob(".*"))  # no temporary file left


@pytest.mark.subprocess
def test_the_resume_command_of_a_stopped_mixture_run_works_from_another_directory(pydoc_data, code_data, tmp_path):
    """Item 11: SIGTERM of a mixture run printed a command that set data.dir to the working directory, which a
    mixture refuses (and its sources, named relative to where it started, were not found from elsewhere)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(pydoc_data, work / "web")
    shutil.copytree(code_data, work / "code")
    elsewhere.mkdir()
    run = tmp_path / "run"
    sets = [*mixture(Path("web"), Path("code"), run), *ENDLESS, "checkpoint.interval=1000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fasttrain.train", str(ROOT / "configs/base.toml"), "--set", *sets],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and events(run, "train"), proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=HANG_SECONDS)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and "resume with: " in stderr, stderr
    step = int(stderr.split("at step ")[1].split(";")[0])
    command = shlex.split(stderr.split("resume with: ")[1])
    resumed = train_process([*command[3:], "--set", f"train.max_steps={step + 2}"], cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert events(run, "start")[-1]["resume_step"] == step and events(run, "end")[-1]["step"] == step + 2


def kill_an_overwrite_after_its_first_step(pydoc_data, trained: Path, run: Path) -> None:
    """A copy of `trained` in `run`, then `kill -9` of an --overwrite start there (a one-layer run, saving
    rarely) once its first step is logged, before any save."""
    shutil.copytree(trained, run)
    earlier = events(trained, "start")[0]["params"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fasttrain.train",
            *tiny_args(pydoc_data, run, *ENDLESS, "checkpoint.interval=100000", flags=["--overwrite"]),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def new_run_trains() -> bool:  # the new run's metrics.jsonl, not the earlier run's before the start moved it
        # (nor the new one before its start event is written: a loaded machine can read it in between)
        try:  # one read of the file for both questions
            metrics = read_metrics(run)
        except UsageError:  # no metrics.jsonl: the earlier run's moved aside, the new one's not yet written
            return False
        starts = [e["params"] for e in metrics if e["event"] == "start"][:1]
        return starts not in ([], [earlier]) and any(e["event"] == "train" for e in metrics)

    try:
        wait_for(new_run_trains, proc)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.subprocess
def test_an_overwrite_killed_before_its_first_save_keeps_the_earlier_run(pydoc_data, trained, tmp_path, capsys):
    """kill -9 of an --overwrite start after its first step, before its first save: the earlier run was deleted
    at the first step (and after a kill during it, left in .replaced-by-overwrite/, which the tools never named
    and the next start, `--resume auto-or-new` too, deleted without a word). Now it is kept until the new run's
    first complete save, the tools name it, and the next start puts it back: auto-or-new (the torchrun restart)
    continues it."""
    run = tmp_path / "run"
    before = snapshot(trained / "checkpoints")
    kill_an_overwrite_after_its_first_step(pydoc_data, trained, run)
    code = run_cli_code(export.main, [str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{run / '.replaced-by-overwrite' / 'checkpoints'} (the next `python -m fasttrain.train`" in err

    code = run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK))  # a plain start: the earlier run is back
    out, err = capsys.readouterr()
    assert code == 2 and "holds checkpoints of an earlier run (up to step 2)" in err, err
    assert "put back the run an --overwrite start had set aside" in out
    assert snapshot(run / "checkpoints") == before and not (run / ".replaced-by-overwrite").exists()

    shutil.rmtree(run)  # once more, for a torchrun restart: auto-or-new continues the earlier run
    kill_an_overwrite_after_its_first_step(pydoc_data, trained, run)
    code = run_cli_code(
        train.main, tiny_args(pydoc_data, run, *QUICK, "train.max_steps=3", flags=["--resume", "auto-or-new"])
    )
    assert code == 0, capsys.readouterr().err
    assert events(run, "start")[-1]["resume_step"] == 2 and events(run, "end")[-1]["step"] == 3


@pytest.mark.parametrize(
    "sets", [[], ['checkpoint.format="sharded"', "checkpoint.async_save=true"]], ids=["file", "async"]
)
def test_an_overwrite_that_fails_after_its_first_step_before_its_first_save_keeps_the_earlier_run(
    pydoc_data, trained, tmp_path, monkeypatch, sets
):
    """The earlier run was deleted at the new run's first step: a failure at its second, before any save, left
    neither run. Now the earlier run is put back as it was; and a first save that completes replaces it."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    step = Trainer.step

    def fail_at_the_second(trainer: Trainer):
        if trainer.run.step == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(trainer)

    monkeypatch.setattr(Trainer, "step", fail_at_the_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_cli(train.main, tiny_args(pydoc_data, run, *QUICK, *sets, "checkpoint.interval=2", flags=["--overwrite"]))
    assert snapshot(run) == before
    monkeypatch.setattr(Trainer, "step", step)
    assert (
        run_cli_code(
            train.main,
            tiny_args(
                pydoc_data, run, *QUICK, *sets, "checkpoint.interval=1", "train.max_steps=3", flags=["--overwrite"]
            ),
        )
        == 0
    )
    assert not (run / ".replaced-by-overwrite").exists()
    assert [p.name for p in saves.saved_steps(run / "checkpoints")][-1].startswith("step_0000003")


def flip_a_bit(file: Path, at: float = 0.6) -> None:
    """Change one bit of `file`, `at` of the way into it (in the tensors' bytes, for a checkpoint)."""
    data = bytearray(file.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    file.write_bytes(bytes(data))


def the_largest_file(saved: Path) -> Path:
    """The checkpoint file `saved`, or the largest of a sharded folder's tensor files."""
    return saved if saved.is_file() else max(saved.glob("*.distcp"), key=lambda f: f.stat().st_size)


FORMATS = pytest.mark.parametrize(
    "sets",
    [[], ['checkpoint.format="sharded"'], ['checkpoint.format="sharded"', "checkpoint.async_save=true"]],
    ids=["file", "sharded", "async"],
)


@FORMATS
def test_a_bit_changed_in_a_saved_checkpoint_is_found_by_resume_export_sample_and_evaluate(
    pydoc_data, tmp_path, capsys, sets
):
    """A flipped bit in a .pt's or a .distcp's tensor bytes loaded silently: a different model, no word. Each file's
    CRC-32 is recorded when it is saved (a background save's once its write is done) and compared by every load:
    the untouched save exports, the damaged one is one line naming the file, exit 2, as a truncated one is, and
    nothing in the run is deleted or moved (the earlier save is there to resume from)."""
    run = tmp_path / "run"
    assert run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, *sets, "checkpoint.interval=1")) == 0
    saved = checkpoint_files.resolve("auto", run)
    assert run_cli_code(export.main, [str(saved), "--out", str(tmp_path / "untouched")]) == 0
    capsys.readouterr()
    damaged = the_largest_file(saved)
    flip_a_bit(damaged)
    before = snapshot(run / "checkpoints")
    for program, args in (
        (train, tiny_args(pydoc_data, run, *QUICK, *sets, "train.max_steps=3", flags=["--resume", "auto"])),
        (export, [str(saved)]),
        (sample, [str(saved), "--max-new-tokens", "2"]),
        (evaluate, [str(saved), "--split", "val"]),
    ):
        code = run_cli_code(program.main, args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {damaged}: checksum mismatch, damaged since it was saved ("), err
    assert snapshot(run / "checkpoints") == before and not (run / "export").exists()
    earlier = saves.saved_steps(run / "checkpoints")[-2]
    assert (
        run_cli_code(
            train.main, tiny_args(pydoc_data, run, *QUICK, *sets, "train.max_steps=3", flags=["--resume", str(earlier)])
        )
        == 0
    )
    assert (run / "checkpoints" / "latest").read_text().startswith("step_0000003")


def test_a_sharded_checkpoint_saved_before_checksums_still_loads(pydoc_data, tmp_path, capsys):
    """A folder whose state.pt records no checksums (saved before they were) resumes and exports without a word
    about them: its files are taken as they are."""
    run = tmp_path / "run"
    assert run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, 'checkpoint.format="sharded"')) == 0
    saved = checkpoint_files.resolve("auto", run)
    state = torch.load(saved / checkpoint_files.STATE_FILE, weights_only=True)
    assert set(state.pop("checksums")) == {p.name for p in saved.iterdir()} - {checkpoint_files.STATE_FILE}
    torch.save(state, saved / checkpoint_files.STATE_FILE)
    capsys.readouterr()
    assert run_cli_code(export.main, [str(saved)]) == 0
    assert (
        run_cli_code(
            train.main,
            tiny_args(
                pydoc_data, run, *QUICK, 'checkpoint.format="sharded"', "train.max_steps=3", flags=["--resume", "auto"]
            ),
        )
        == 0
    )
    assert "checksum" not in capsys.readouterr().err
