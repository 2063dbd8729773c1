"""Issue 43's command-line and schedule items, each through the entry point a user runs: a run's recorded
paths, `fasttrain --version`, `--set` before the config path, another fasttrain's kernels package, and the
learning-rate schedule at the ends of a run (the last step, a smoke run's warmup, extending and shortening a
finished run)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrain import cli, export, sample
from fasttrain.config import load_config
from fasttrain.system.errors import run_cli
from fasttrain.train import main as train_main
from fasttrain.training.trainer import Trainer
from tests.conftest import HANG_SECONDS, tiny_args, tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as done:
        run_cli(main, argv)
    return done.value.code


def lrs_logged(run: Path) -> dict[int, float]:
    """step -> learning rate of the `train` events of the run's latest start in metrics.jsonl."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = max(i for i, e in enumerate(events) if e["event"] == "start")
    return {e["step"]: e["lr"] for e in events[start:] if e["event"] == "train"}


def test_a_run_records_absolute_data_paths_so_tools_work_from_another_directory(pydoc_data, tmp_path, monkeypatch):
    """data.dir, data.inputs and data.tokenizer given relative to where the run started were recorded so: sample
    from another directory could not find the tokenizer, and export silently left tokenizer.json out."""
    from pydoc_data.topics import topics

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    docs = [text for text in list(topics.values())[:60]]
    (here / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shutil.copy(pydoc_data / "tokenizer.json", here / "tok.json")
    monkeypatch.chdir(here)
    config = str(ROOT / "configs" / "base.toml")
    args = [
        *tiny_args("data", "run", "train.max_steps=2", "train.sample_tokens=0", config=config),
        'data.inputs=["corpus.jsonl"]',
        'data.tokenizer="tok.json"',
        "data.vocab_size=0",
    ]
    assert exit_code(train_main, args) == 0
    recorded = load_config(here / "run" / "config.toml").data
    assert (recorded.dir, recorded.inputs, recorded.tokenizer) == (
        str(here / "data"),
        [str(here / "corpus.jsonl")],
        str(here / "tok.json"),
    )

    monkeypatch.chdir(elsewhere)
    checkpoint = here / "run" / "checkpoints" / "step_0000002.pt"
    assert exit_code(sample.main, [str(checkpoint), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert exit_code(export.main, [str(here / "run")]) == 0
    assert (here / "run" / "export" / "tokenizer.json").read_bytes() == (here / "tok.json").read_bytes()


def test_builtin_inputs_and_unset_paths_are_recorded_as_they_are(pydoc_data, tmp_path):
    trainer = Trainer(tiny_config(pydoc_data, tmp_path / "run"), quiet=True)
    assert trainer.cfg.data.inputs == ["builtin:pydoc"] and trainer.cfg.data.tokenizer == ""
    trainer.close()


def test_version_prints_the_version_and_exits_0(capsys):
    import fasttrain

    assert exit_code(cli.main, ["--version"]) == 0
    assert capsys.readouterr().out == f"fasttrain {fasttrain.__version__}\n"


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "args",
    [["fasttrain", "--help"], ["fasttrain", "--version"], ["fasttrain.train", "--help"]],
    ids=["help", "version", "argparse-help"],
)
def test_output_to_a_reader_that_went_away_ends_quietly(args):
    """`fasttrain --help | head -1`: the reader closes the pipe, and the tool ended in a BrokenPipeError traceback
    (or, its output buffered, "Exception ignored ... BrokenPipeError" and status 120 at exit). It stops quietly
    with SIGPIPE's status, as a shell tool does, whether its output is buffered or not."""
    for unbuffered in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"
        tool = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            tool.stdout.close()  # before the tool writes: its output finds no reader
            code, err = tool.wait(timeout=HANG_SECONDS), tool.stderr.read()
            # argparse's own --help ignores a failed write itself, and exits 0, when the write is unbuffered
            assert err == b"" and code == (0 if unbuffered and args[0] == "fasttrain.train" else 141), (args, code)
        finally:
            tool.kill()
            tool.stderr.close()


@pytest.mark.subprocess
def test_an_error_keeps_its_status_when_the_reader_went_away_and_a_closed_stdout_is_no_crash(tmp_path):
    """A failing command whose reader went away ended with 120 ("Exception ignored ... BrokenPipeError"), which hid
    its own status; one started with standard output closed (`cmd >&-`) crashed flushing it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    tool = subprocess.Popen(
        [sys.executable, "-m", "fasttrain", "sample", str(tmp_path / "nope")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        tool.stdout.close()
        assert tool.wait(timeout=HANG_SECONDS) == 2
        assert tool.stderr.read().decode().endswith("nope: no such run directory or checkpoint\n")
    finally:
        tool.kill()
        tool.stderr.close()
    closed = subprocess.run(
        ["bash", "-c", f"{shlex.quote(sys.executable)} -m fasttrain --version >&-"],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_SECONDS,
    )
    assert (closed.returncode, closed.stderr) == (0, "")


def test_set_before_the_config_path_takes_the_path_as_the_config(pydoc_data, tmp_path):
    """`fasttrain train --set ... configs/base.toml`: --set took the path as one more item ("required: config")."""
    args = [
        "--set",
        *tiny_overrides(pydoc_data, tmp_path),
        "train.max_steps=1",
        "schedule.warmup_steps=1",
        "train.sample_tokens=0",
        "configs/base.toml",
    ]
    assert exit_code(cli.main, ["train", *args]) == 0
    recorded = load_config(tmp_path / "config.toml")
    assert recorded.train.max_steps == 1 and recorded.optim.lr == 2e-3  # both the --set and the file (not the default)


@pytest.mark.subprocess
def test_another_fasttrain_kernels_is_one_line_and_exit_2_from_every_command(tmp_path):
    """Another fasttrain's kernels first on the path (an older wheel's, with this clone on PYTHONPATH): every
    command said so in an ImportError traceback."""
    (tmp_path / "fasttrain_kernels").mkdir()
    (tmp_path / "fasttrain_kernels" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    script = Path(sys.executable).parent / "fasttrain"  # the console script of an installed fasttrain
    commands = [
        [sys.executable, "-m", "fasttrain", "--version"],
        [sys.executable, "-m", "fasttrain.train", "x.toml"],
        [sys.executable, "-m", "fasttrain.export", "runs/x"],
    ] + ([[str(script), "--help"]] * script.is_file())
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith("error: fasttrain needs the fasttrain_kernels beside it"), (
            command,
            result.stderr,
        )
        assert result.stderr.count("\n") == 1 and str(tmp_path / "fasttrain_kernels") in result.stderr, result.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import fasttrain"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert (
        imported.returncode == 1 and "ImportError: fasttrain needs the fasttrain_kernels beside it" in imported.stderr
    )


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd"])
def test_the_last_update_uses_min_lr(pydoc_data, tmp_path, decay):
    """schedule.min_lr is the rate of the last step, as its comment says; the last step got (T-1)/T of the way."""
    trainer = Trainer(
        tiny_config(
            pydoc_data,
            tmp_path,
            "train.max_steps=5",
            "schedule.warmup_steps=1",
            f'schedule.decay="{decay}"',
            "optim.lr=1e-3",
            "schedule.min_lr=1e-4",
        ),
        quiet=True,
    )
    rates = [trainer.step().lr for _ in range(5)]
    assert rates[0] == 1e-3 and rates[1] == pytest.approx(1e-3) and rates[-1] == 1e-4
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # decays from the peak, never back up
    assert trainer.updater.optimizer.param_groups[0]["lr"] == 1e-4  # what the optimizer used for it
    trainer.close()


def test_the_floor_and_constant_schedules_keep_their_meaning(pydoc_data, tmp_path):
    """step decay: min_lr is a floor, not the end; constant: the peak to the end (min_lr unused)."""
    for decay, last in (('"step"', 5e-4), ('"constant"', 1e-3)):
        extra = ["schedule.step_every=2"] if decay == '"step"' else []
        trainer = Trainer(
            tiny_config(
                pydoc_data,
                tmp_path,
                "train.max_steps=5",
                "schedule.warmup_steps=1",
                f"schedule.decay={decay}",
                "optim.lr=1e-3",
                "schedule.min_lr=1e-4",
                *extra,
            ),
            quiet=True,
        )
        assert [trainer.step().lr for _ in range(5)][-1] == pytest.approx(last)
        trainer.close()


def test_extending_a_smoke_run_says_it_warms_up_again(pydoc_data, tmp_path, capsys):
    """A 5-step smoke run of a config with 20 warmup steps warms up over 2; resumed to 8 steps with 7 warmup
    steps, the config's warmup applies again from step 5 on, which the resume did not say."""
    smoke = tiny_args(
        pydoc_data,
        tmp_path,
        "train.max_steps=5",
        "schedule.warmup_steps=20",
        "train.sample_tokens=0",
        "train.log_interval=1",
    )
    assert exit_code(train_main, smoke) == 0
    capsys.readouterr()
    assert exit_code(train_main, [*smoke, "train.max_steps=8", "schedule.warmup_steps=7"] + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("resume: train.max_steps 5 -> 8"))
    assert (
        "back in a warmup until step 7 (schedule.warmup_steps = 7; the saved run warmed up over 2 steps: "
        "--set schedule.warmup_steps=2 keeps that)"
    ) in line
    lrs = lrs_logged(tmp_path)
    assert lrs[6] == pytest.approx(2e-3 * 6 / 7) and lrs[7] == pytest.approx(2e-3)  # as it says (base.toml's lr)
