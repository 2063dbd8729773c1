"""Checkpoints and faults: exact resume, pointers and retention, crashes mid-save, signals, non-finite steps."""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fasttrain import Trainer, train
from fasttrain.checkpoints import checkpoint_files, saves
from fasttrain.config import load_config
from fasttrain.plot import read_metrics
from fasttrain.system.errors import RunStopped, UsageError, run_cli
from fasttrain.training import metrics
from fasttrain.training.policies import Recovery
from fasttrain.training.trainer import Interrupted
from tests.conftest import HANG_SECONDS, tiny_args, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# Dropout (torch's RNG), accumulation, random windows read ahead by the prefetch thread: all must resume exactly.
EXACT = [
    "model.dropout=0.1",
    "train.tokens_per_update=256",
    "data.prefetch=2",
    "train.max_steps=8",
    "train.log_interval=1",
    "train.eval_interval=4",
    "train.eval_steps=2",
    "checkpoint.interval=3",
]
CHEAP = ["train.tokens_per_update=0", "train.sample_tokens=0", "train.eval_steps=1", "train.max_steps=6"]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(run_dir) if e["event"] == kind]  # tolerates a line being written


def plant(trainer: Trainer, at_steps: set[int], action) -> None:
    """Make `action(trainer)` happen after each step whose number (1-based) is in `at_steps`."""
    original = trainer.step

    def step():
        out = original()
        if trainer.run.step in at_steps:
            action(trainer)
        return out

    trainer.step = step


def nan_losses(trainer: Trainer, at_steps: set[int], every_attempt: bool = False) -> None:
    """Make the loss of the steps numbered in `at_steps` (1-based; first attempt only, unless
    `every_attempt`) NaN."""
    loss, attempts = trainer.loss, set()

    def poisoned(x, y, **options):
        step = trainer.run.step + 1
        sums = loss(x, y, **options)
        if step in at_steps and (every_attempt or step not in attempts):
            attempts.add(step)
            return sums._replace(loss=sums.loss * float("nan"))
        return sums

    trainer.loss = poisoned


@pytest.mark.parametrize(
    "batching",
    [
        [],
        ["data.batching=padded", "data.padding=bucketed"],
        ["data.batching=aligned", "data.padding=longest", "data.document_mask=true"],
        # Each other optimizer's state (Muon's momentum, SGD's, Adafactor's factored moments) must resume too;
        # without accumulation or samples, and 6 steps, to keep them cheap.
        *[
            [*CHEAP, *opt]
            for opt in (
                ["optim.name=muon"],
                ["optim.name=adafactor"],
                ["optim.name=sgd", "optim.sgd.nesterov=true", "schedule.decay=step", "schedule.step_every=3"],
                ["optim.name=muon", "model.members=2"],  # an ensemble (model/ensemble.py): every member's state
            )
        ],
    ],
    ids=["packed", "padded-bucketed", "aligned-masked", "muon", "adafactor", "sgd-step-decay", "muon-ensemble"],
)
def test_resumed_training_is_bitwise_identical(pydoc_data, paragraph_data, tmp_path, batching):
    data = paragraph_data if any(s.startswith("data.") for s in batching) else pydoc_data
    exact = [*EXACT, *batching]
    straight = Trainer(tiny_config(data, tmp_path / "straight", *exact), quiet=True)
    straight.train()

    interrupted = Trainer(tiny_config(data, tmp_path / "resumed", *exact), quiet=True)
    plant(interrupted, {5}, lambda t: signal.raise_signal(signal.SIGINT))
    with pytest.raises(Interrupted, match="stopped by SIGINT at step 5; saved .*step_0000005.pt") as stop:
        interrupted.train()
    assert stop.value.exit_code == 130
    resumed = Trainer(tiny_config(data, tmp_path / "resumed", *exact), quiet=True)
    torch.manual_seed(99)
    resumed.model.reset_parameters()  # the checkpoint, not the seed, must bring the weights back
    assert resumed.resume("auto").name == "step_0000005.pt"
    tokens = {e["step"]: e["tokens"] for e in events(tmp_path / "straight", "train")}[5]
    assert resumed.run.step == 5 and resumed.run.tokens_seen == tokens
    if "data.batching=padded" in batching:
        assert tokens < 5 * 256  # pads do not count
    resumed.train()

    def losses(run, kind, key):
        return [(e["step"], e[key]) for e in events(tmp_path / run, kind)]

    assert losses("resumed", "train", "loss") == losses("straight", "train", "loss")  # floats compared exactly
    assert losses("resumed", "train", "grad_norm") == losses("straight", "train", "grad_norm")
    assert losses("resumed", "eval", "val_loss") == losses("straight", "eval", "val_loss")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_pointers_and_retention(tmp_path):
    for step in range(1, 7):
        checkpoint_files.save({"step": step}, tmp_path, step, keep_last=2, best=step in (2, 3))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "latest", "step_0000003.pt", "step_0000005.pt", "step_0000006.pt"]
    assert saves.pointed(tmp_path, "latest").name == "step_0000006.pt"
    assert saves.pointed(tmp_path, "best").name == "step_0000003.pt"
    assert checkpoint_files.resolve(str(tmp_path), "elsewhere") == tmp_path / "step_0000006.pt"


def test_steps_past_seven_digits_still_sort_by_number(tmp_path):
    for step in (9_999_999, 10_000_000):
        checkpoint_files.save({"step": step}, tmp_path, step, keep_last=1, best=False)
    assert [p.name for p in saves.saved_steps(tmp_path)] == ["step_10000000.pt"]


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(pydoc_data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(pydoc_data, tmp_path), quiet=True)
    trainer.step()
    first = trainer.save_checkpoint()
    trainer.step()

    def full_disk(obj, f):
        f.write(b"x" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_files.torch, "save", full_disk)
    with pytest.raises(
        UsageError, match=r"step_0000002.pt: cannot save checkpoint \(no space left on the device holding "
    ):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert sorted(p.name for p in trainer.checkpoints.directory.iterdir()) == ["latest", "step_0000001.pt"]
    assert checkpoint_files.resolve("auto", tmp_path) == first
    assert checkpoint_files.load(first)["step"] == 1


def test_unwritable_run_directory_is_a_clear_error(pydoc_data, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    trainer = Trainer(tiny_config(pydoc_data, tmp_path / "file" / "run"), quiet=True)
    with pytest.raises(UsageError, match=r"file/run: .*/file is a file, not a folder"):
        trainer.train()
    trainer.step()
    with pytest.raises(UsageError, match=r"step_0000001.pt: cannot save checkpoint"):
        trainer.save_checkpoint()


# A one-layer tiny run that goes on until it is stopped, logging every step and never evaluating.
ENDLESS = [
    "model.n_layers=1",
    "train.batch_size=2",
    "train.max_steps=100000",
    "train.log_interval=1",
    "train.eval_interval=100000",
    "train.sample_tokens=0",
]


def train_cli(args: list[str]) -> subprocess.Popen:
    """`python -m fasttrain.train ARGS`, left running."""
    return subprocess.Popen(
        [sys.executable, "-m", "fasttrain.train", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = HANG_SECONDS) -> None:
    """Poll until `condition()` while `proc` keeps running."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.subprocess
@pytest.mark.second_tier  # 24 s of kills at random moments, per format
@pytest.mark.parametrize(
    "kind",
    [[], ['checkpoint.format="sharded"'], ['checkpoint.format="sharded"', "checkpoint.async_save=true"]],
    ids=["file", "sharded", "async"],
)
def test_kill_9_at_any_moment_leaves_a_loadable_latest_checkpoint(pydoc_data, tmp_path, kind):
    saving = [*ENDLESS, "checkpoint.interval=1", "checkpoint.keep_last=1", *kind]
    latest = None
    for attempt in range(2):
        proc = train_cli(tiny_args(pydoc_data, tmp_path, *saving, flags=["--resume", "auto"] if attempt else []))
        wait_for(lambda: saves.pointed(tmp_path / "checkpoints", "latest") not in (None, latest), proc)
        time.sleep(random.uniform(0.2, 1.0))  # somewhere in a step or in the middle of a save
        proc.kill()
        proc.wait()
        latest = checkpoint_files.resolve("auto", tmp_path)
        state = checkpoint_files.load(latest)
        assert state["step"] == saves.step_of(latest) > 0
    finish = subprocess.run(
        [
            sys.executable,
            "-m",
            "fasttrain.train",
            *tiny_args(
                pydoc_data, tmp_path, *saving, f"train.max_steps={state['step'] + 1}", flags=["--resume", "auto"]
            ),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))  # a killed save's leftovers are cleaned up


def stopped_by_sigterm(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """(exit status, stderr) of an endless run in `tmp_path` sent SIGTERM after its first step; killed in any case."""
    proc = train_cli(args)
    try:
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and events(tmp_path, "train"), proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=HANG_SECONDS)
        return proc.returncode, stderr
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.subprocess
def test_sigterm_saves_and_prints_how_to_resume(pydoc_data, tmp_path):
    code, stderr = stopped_by_sigterm(tiny_args(pydoc_data, tmp_path, *ENDLESS, "checkpoint.interval=1000"), tmp_path)
    assert code == 143, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("stopped by SIGTERM at step "), stderr
    step = int(stderr.split("at step ")[1].split(";")[0])
    assert f"saved {tmp_path / 'checkpoints' / f'step_{step:07d}.pt'}" in stderr
    command = shlex.split(stderr.split("resume with: ")[1])
    assert command[:4] == ["python", "-m", "fasttrain.train", str(ROOT / "configs/base.toml")]
    assert command[-2:] == ["--resume", "auto"]
    elsewhere = tmp_path / "elsewhere"  # the command works from any directory
    elsewhere.mkdir()
    resumed = subprocess.run(
        [sys.executable, *command[1:], "--set", f"train.max_steps={step + 2}"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    start = events(tmp_path, "start")[-1]
    assert start["resume_step"] == step and events(tmp_path, "end")[-1]["step"] == step + 2


@pytest.mark.subprocess
def test_sigterm_with_async_saves_publishes_the_save_before_exiting(pydoc_data, tmp_path):
    """The SIGTERM's save was written in the background and the process exited first: the folder stayed a
    temporary one, `latest` did not name it, and the next start deleted it. It is waited for, then published."""
    code, stderr = stopped_by_sigterm(
        tiny_args(pydoc_data, tmp_path, *ENDLESS, "checkpoint.interval=1000", "checkpoint.async_save=true"), tmp_path
    )
    assert code == 143 and stderr.startswith("stopped by SIGTERM at step "), stderr
    step = int(stderr.split("at step ")[1].split(";")[0])
    assert saves.pointed(tmp_path / "checkpoints", "latest") == tmp_path / "checkpoints" / f"step_{step:07d}"
    assert (tmp_path / "checkpoints" / f"step_{step:07d}" / "state.pt").is_file()
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_sigterm_during_an_evaluation_stops_at_once_and_the_resume_evaluates_first(
    pydoc_data, tmp_path, capsys, monkeypatch
):
    """A SIGTERM once waited for the whole evaluation (27 s in the report). It stops after the batch in
    flight; the checkpoint says the evaluation is due, and the resumed run does it before its first
    step, so its evaluations and weights are those of a run never stopped."""
    run_args = [
        "train.max_steps=4",
        "train.eval_interval=2",
        "train.eval_steps=50",
        "checkpoint.interval=100",
        "train.sample_tokens=0",
    ]
    assert run_cli_code(train.main, tiny_args(pydoc_data, tmp_path / "whole", *run_args)) == 0
    batches = []
    loss = Trainer.loss

    def counting_loss(self, x, y, **options):
        if not self.model.training:  # an evaluation batch
            batches.append(self.run.step)
            if len(batches) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # caught: the run stops at the next check
        return loss(self, x, y, **options)

    monkeypatch.setattr(Trainer, "loss", counting_loss)
    assert run_cli_code(train.main, tiny_args(pydoc_data, tmp_path / "cut", *run_args)) == 143
    assert batches == [2]  # one evaluation batch of 50, then the stop
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().err
    assert checkpoint_files.load(tmp_path / "cut" / "checkpoints" / "step_0000002.pt")["eval_due"] is True
    monkeypatch.undo()
    assert run_cli_code(train.main, tiny_args(pydoc_data, tmp_path / "cut", *run_args, flags=["--resume", "auto"])) == 0
    for kind in ("eval", "end"):
        whole, cut = events(tmp_path / "whole", kind), events(tmp_path / "cut", kind)
        assert [(e["step"], e["val_loss"]) for e in whole] == [(e["step"], e["val_loss"]) for e in cut], kind


def test_a_resume_from_nan_weights_rolls_back_to_the_clean_checkpoint_before(pydoc_data, tmp_path, capsys):
    """Resumed from a checkpoint whose weights are NaN, the run said there was no checkpoint to roll back
    to, while the clean one of two steps earlier was still there. It goes back to that one."""
    run_args = ["checkpoint.interval=2", "train.sample_tokens=0", "recovery.max_skips=2"]
    assert run_cli_code(train.main, tiny_args(pydoc_data, tmp_path, *run_args, "train.max_steps=4")) == 0
    poisoned = tmp_path / "checkpoints" / "step_0000004.pt"
    state = checkpoint_files.load(poisoned)
    state["model"] = {
        k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in state["model"].items()
    }
    torch.save(state, poisoned)
    args = tiny_args(pydoc_data, tmp_path, *run_args, "train.max_steps=8", flags=["--resume", "auto"])
    assert run_cli_code(train.main, args) == 0, capsys.readouterr().err
    [rollback] = events(tmp_path, "rollback")
    assert rollback["from_step"] == 6 and rollback["path"] == str(tmp_path / "checkpoints" / "step_0000002.pt")
    assert events(tmp_path, "end")[-1]["step"] == 8


def test_extending_a_finished_run_says_what_the_schedule_does(pydoc_data, tmp_path, capsys):
    """--resume with a longer train.max_steps re-lays the cosine over the new length: the learning rate
    jumps back up. It once did so silently; the resume now says so in one line."""
    cheap = ["checkpoint.interval=2", "train.sample_tokens=0", "schedule.warmup_steps=1"]
    Trainer(tiny_config(pydoc_data, tmp_path, *cheap, "train.max_steps=4"), quiet=True).train()
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, *cheap, "train.max_steps=8"))
    capsys.readouterr()
    trainer.resume("auto")
    said = capsys.readouterr().out
    assert (
        "resume: train.max_steps 4 -> 8: the cosine schedule now runs over 8 steps, so the learning rate "
        f"at step 4 is {trainer.lr():.3g}"
        in said
        and "docs/training.md (extending a run)" in said
    )
    same = Trainer(tiny_config(pydoc_data, tmp_path, *cheap, "train.max_steps=4"))
    capsys.readouterr()
    same.resume("auto")
    assert "schedule" not in capsys.readouterr().out


def run_cli_code(main, args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        run_cli(main, args)
    return done.value.code


@pytest.mark.parametrize(
    "changed", [["optim.weight_decay=0.5"], ["optim.beta2=0.9", "optim.eps=1e-6"]], ids=["weight_decay", "betas-eps"]
)
def test_a_resume_applies_the_configs_optimizer_settings_and_says_so(pydoc_data, tmp_path, capsys, changed):
    """The checkpoint brings the optimizer's state; the settings are the config's. Once they silently kept
    the saved ones: the weights were bitwise those of a resume with the old values."""
    cheap = ["train.max_steps=4", "checkpoint.interval=2", "train.sample_tokens=0"]
    Trainer(tiny_config(pydoc_data, tmp_path / "run", *cheap, "train.max_steps=2"), quiet=True).train()
    finals = {}
    for name, sets in (("same", []), ("changed", changed)):
        run = tmp_path / name
        shutil.copytree(tmp_path / "run", run)
        trainer = Trainer(tiny_config(pydoc_data, run, *cheap, *sets))
        capsys.readouterr()
        trainer.resume("auto")
        said = capsys.readouterr().out
        group = trainer.updater.optimizer.param_groups[0]
        if name == "changed":
            assert "the config's optimizer settings replace the checkpoint's" in said
            assert (group["weight_decay"], group["betas"][1], group["eps"]) == (
                trainer.cfg.optim.weight_decay,
                trainer.cfg.optim.beta2,
                trainer.cfg.optim.eps,
            )
        else:
            assert "optimizer settings" not in said
        trainer.train()
        finals[name] = [p.detach().clone() for p in trainer.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(finals["same"], finals["changed"]))


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_run_file_that_is_a_link_is_refused_and_its_target_untouched(pydoc_data, tmp_path, capsys, name):
    """A .lock planted as a link truncated its target; a metrics.jsonl link had its target's last line cut
    and events appended. Run files are opened without following links: one line, exit 2."""
    victim = tmp_path / "victim.txt"
    victim.write_text("first line\nno newline at the end")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(victim, run_dir / name)
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, tiny_args(pydoc_data, run_dir, "train.max_steps=2", "train.sample_tokens=0"))
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and f"{name}: a symbolic link" in err
    assert victim.read_text() == "first line\nno newline at the end"


@pytest.mark.parametrize("unwritable", ["directory", "link"])
def test_a_resume_that_cannot_write_its_metrics_changes_nothing(pydoc_data, tmp_path, capsys, unwritable):
    """Every write target is checked first: a resume refused for its metrics.jsonl had already rewritten
    config.toml (here with the longer run's max_steps)."""
    run_dir = tmp_path / "run"
    cheap = ["checkpoint.interval=2", "train.sample_tokens=0"]
    Trainer(tiny_config(pydoc_data, run_dir, *cheap, "train.max_steps=2"), quiet=True).train()
    (run_dir / "metrics.jsonl").unlink()
    if unwritable == "directory":
        (run_dir / "metrics.jsonl").mkdir()
    else:
        os.symlink(tmp_path / "elsewhere.jsonl", run_dir / "metrics.jsonl")
    before = {p.name: p.read_bytes() for p in [run_dir / "config.toml", *run_dir.glob("checkpoints/*")]}
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, tiny_args(pydoc_data, run_dir, *cheap, "train.max_steps=4", flags=["--resume", "auto"]))
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "metrics.jsonl" in err, err
    assert {p.name: p.read_bytes() for p in [run_dir / "config.toml", *run_dir.glob("checkpoints/*")]} == before


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s lock (as a run training there does) until it is killed."""
    code = (
        "import sys, time\nfrom fasttrain.system import run_lock\n"
        "with run_lock.locked(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


@pytest.mark.subprocess
def test_a_run_whose_directory_was_removed_and_reused_touches_nothing_there(pydoc_data, tmp_path):
    """rm -rf of a live run's directory, then a new run there: the first run's pruning deleted the second's
    checkpoints and moved its latest. Now it stops at its next save with one line, touching nothing."""
    run_dir = tmp_path / "run"
    trainer = Trainer(
        tiny_config(
            pydoc_data,
            run_dir,
            "train.max_steps=6",
            "checkpoint.interval=1",
            "checkpoint.keep_last=1",
            "train.sample_tokens=0",
        ),
        quiet=True,
    )
    holders = []

    def replaced(t: Trainer) -> None:  # the directory removed, and a new run holding a new one by the name
        shutil.rmtree(run_dir)
        holders.append(hold_lock(run_dir))
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "step_0000001.pt").write_bytes(b"the new run's save")
        (run_dir / "checkpoints" / "latest").write_text("step_0000001.pt\n")

    plant(trainer, {3}, replaced)
    try:
        with pytest.raises(
            UsageError, match=r"now held by another run \(pid \d+ on host .*\), so this run's directory"
        ):
            trainer.train()
        files = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
        assert files == {"step_0000001.pt": b"the new run's save", "latest": b"step_0000001.pt\n"}
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


@pytest.mark.subprocess
def test_a_run_directory_in_use_is_refused_until_its_holder_dies(pydoc_data, tmp_path, capsys):
    args = tiny_args(pydoc_data, tmp_path, "train.max_steps=2", "schedule.warmup_steps=1", "train.sample_tokens=0")
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, args)
    assert done.value.code == 0
    holder = hold_lock(tmp_path)
    try:
        saved = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        capsys.readouterr()
        for flags in ([], ["--overwrite"], ["--resume", "auto"]):
            with pytest.raises(SystemExit) as refused:
                run_cli(train.main, [args[0], *flags, *args[1:]])
            err = capsys.readouterr().err
            assert refused.value.code == 2 and err == (
                f"error: {tmp_path}: another run (pid {holder.pid} on host {socket.gethostname()}) is using it; "
                "wait for it to end, stop it, or set train.out_dir elsewhere\n"
            ), (flags, err)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == saved
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the lock goes with the process
        holder.wait()
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, [args[0], "--resume", "auto", *args[1:]])
    assert done.value.code == 0


def test_the_resume_command_names_the_run_by_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(
        config="base.toml", set=["train.max_steps=9", "train.out_dir=runs/a"], quiet=True, device="cpu", seed=None
    )
    cfg = load_config(None, ["train.out_dir=runs/a", "data.dir=data/b"])
    assert shlex.split(train.resume_command(args, cfg)) == [
        "python",
        "-m",
        "fasttrain.train",
        str(tmp_path / "base.toml"),
        "--quiet",
        "--set",
        "train.max_steps=9",
        "train.device=cpu",
        f"train.out_dir={tmp_path / 'runs/a'}",
        f"data.dir={tmp_path / 'data/b'}",
        "--resume",
        "auto",
    ]


def test_the_resume_command_of_a_mixture_keeps_its_sources_names(tmp_path, monkeypatch):
    """A mixture's sources went into the command as folder and weight only: their names (the metrics' val_loss.NAME,
    train.monitor's) fell back to the folders', so the resume was refused or logged under other names."""
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config="base.toml", set=[], quiet=True, device="cpu", seed=None)
    sources = '[{dir = "a", name = "web", weight = 0.7}, {dir = "b", weight = 0.3}]'
    cfg = load_config(None, ["train.out_dir=runs/a", f"data.sources={sources}", 'train.monitor="val_loss.web"'])
    command = shlex.split(train.resume_command(args, cfg))
    given = next(item for item in command if item.startswith("data.sources="))
    again = load_config(None, [given])
    assert again.data.sources == [replace(s, dir=str(tmp_path / s.dir)) for s in cfg.data.sources]


def test_a_metrics_log_or_a_save_damaged_by_hand_is_one_line(tmp_path):
    """A metrics.jsonl with a byte that is not UTF-8, and a save whose config entry is not the config's text (edited
    by hand), were tracebacks (UnicodeDecodeError, AttributeError from tomllib)."""
    (tmp_path / "metrics.jsonl").write_bytes(b'{"event": "start"}\n\xff\n')
    with pytest.raises(UsageError, match="metrics.jsonl: not UTF-8 text"):
        read_metrics(tmp_path)
    with pytest.raises(UsageError, match="step_1.pt: its saved config is NoneType, not a config's text"):
        checkpoint_files.saved_config({"config": None}, tmp_path / "step_1.pt")


def full_disk_after(lines: int):
    """`open`, but a file opened to append takes `lines` writes, then writes half of one and raises ENOSPC."""

    def open_(path, mode="r", **kwargs):
        f = open(path, mode, **kwargs)
        if "a" in mode:
            write, count = f.write, itertools.count()

            def filling(text: str) -> int:
                if next(count) < lines:
                    return write(text)
                write(text[: len(text) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            f.write = filling
        return f

    return open_


def test_a_full_disk_while_logging_is_one_line_and_the_resumed_log_parses(pydoc_data, tmp_path, monkeypatch, capsys):
    args = tiny_args(
        pydoc_data,
        tmp_path,
        "train.max_steps=4",
        "train.log_interval=1",
        "checkpoint.interval=1",
        "train.sample_tokens=0",
    )
    # Written: start, train, checkpoint, train; then step 2's checkpoint event fails, after its save.
    monkeypatch.setattr(metrics, "open", full_disk_after(4), raising=False)
    with pytest.raises(SystemExit) as full:
        run_cli(train.main, args)
    err = capsys.readouterr().err
    assert full.value.code == 2
    assert err == f"error: {tmp_path / 'metrics.jsonl'}: cannot write (No space left on device)\n"  # no traceback
    assert not (tmp_path / "metrics.jsonl").read_text().endswith("\n")  # half a line made it to disk
    monkeypatch.undo()
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, [args[0], "--resume", "auto", *args[1:]])
    assert done.value.code == 0, capsys.readouterr().err
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["event"] for line in lines]  # every line parses
    assert kinds[:5] == ["start", "train", "checkpoint", "train", "start"] and kinds[-1] == "end"


def test_a_non_finite_step_is_skipped(pydoc_data, tmp_path):
    trainer = Trainer(tiny_config(pydoc_data, tmp_path), quiet=True)
    trainer.step()
    nan_losses(trainer, {2})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.updater.optimizer.state.values()]
    recovery = Recovery(trainer.cfg.recovery)  # what the training loop asks after each step
    result = trainer.step()
    assert result.loss.isnan() and result.skipped and trainer.run.step == 2
    assert trainer.run.skipped_steps == 1 and not recovery.after_step(result.skipped) and recovery.in_a_row == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, trainer.updater.optimizer.state.values()))
    assert all(p.grad is None for p in trainer.model.parameters())
    result = trainer.step()
    assert not recovery.after_step(result.skipped) and recovery.in_a_row == 0 and trainer.run.skipped_steps == 1


def test_repeated_non_finite_steps_roll_back_with_a_lower_lr(pydoc_data, tmp_path):
    cfg = tiny_config(
        pydoc_data,
        tmp_path,
        "train.max_steps=8",
        "checkpoint.interval=2",
        "train.log_interval=1",
        "recovery.max_skips=2",
        "recovery.lr_factor=0.25",
        "schedule.decay=constant",
    )
    trainer = Trainer(cfg, quiet=True)
    nan_losses(trainer, {5, 6})
    summary = trainer.train()
    (rollback,) = events(tmp_path, "rollback")
    # Back to step 2's save, not step 4's: the step after step 4 diverged, so its weights are suspect.
    assert rollback["from_step"] == 6 and rollback["step"] == 2 and rollback["lr_scale"] == 0.25
    assert [e["step"] for e in events(tmp_path, "skip")] == [5, 6]
    train = events(tmp_path, "train")
    assert [e["step"] for e in train] == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]  # 3 to 6 trained again after the rollback
    assert [e["lr"] for e in train[-6:]] == [0.25 * cfg.optim.lr] * 6
    assert summary["rollbacks"] == 1 and summary["skipped_steps"] == 2 and summary["step"] == 8


def test_a_rollback_skips_the_save_that_holds_the_diverging_weights(pydoc_data, tmp_path):
    """Weights broken by step 4's update diverge at every later step; step 4's save holds them. The run
    must return to step 2's save, point latest there (a resume must not land on step 4's), and finish."""
    cfg = tiny_config(
        pydoc_data,
        tmp_path,
        "train.max_steps=10",
        "checkpoint.interval=2",
        "checkpoint.keep_last=1",
        "recovery.max_skips=2",
        "recovery.max_rollbacks=1",
        "train.log_interval=1",
    )
    trainer = Trainer(cfg, quiet=True)
    broken = set()

    def break_weights(t: Trainer) -> None:  # once: the rolled-back run passes step 4 unharmed
        if not broken:
            broken.add(True)
            with torch.no_grad():
                t.model.parameters().__next__().fill_(float("inf"))

    plant(trainer, {4}, break_weights)
    rolled_back_to = []
    original = trainer.checkpoints.point_latest
    trainer.checkpoints.point_latest = lambda path: (rolled_back_to.append(path.name), original(path))
    summary = trainer.train()
    assert rolled_back_to == ["step_0000002.pt"]  # kept although keep_last=1: the safe save is never pruned
    assert [e["step"] for e in events(tmp_path, "skip")] == [5, 6]
    # Saves at 2 and 4, none at 6 during the streak, then 4, 6, 8, 10 again after the rollback to 2.
    assert [e["step"] for e in events(tmp_path, "checkpoint")] == [2, 4, 4, 6, 8, 10]
    assert summary["step"] == 10 and summary["rollbacks"] == 1 and math.isfinite(summary["val_loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_divergence_without_a_way_back_stops_with_a_clear_message(pydoc_data, tmp_path):
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, "recovery.max_skips=3"), quiet=True)
    nan_losses(trainer, set(range(1, 100)))
    with pytest.raises(
        RunStopped,
        match="stopped at step 3: .* not finite for 3 steps in a row, and there is no "
        "checkpoint from before the divergence to roll back to; lower optim.lr",
    ) as stop:
        trainer.train()
    assert stop.value.exit_code == 1

    trainer = Trainer(
        tiny_config(
            pydoc_data, tmp_path / "b", "recovery.max_skips=1", "recovery.max_rollbacks=1", "checkpoint.interval=1"
        ),
        quiet=True,
    )
    nan_losses(trainer, set(range(3, 100)), every_attempt=True)
    with pytest.raises(RunStopped, match="stopped at step 3: .* and after 1 rollbacks"):
        trainer.train()
    assert trainer.run.rollbacks == 1 and trainer.run.lr_scale == 0.5
