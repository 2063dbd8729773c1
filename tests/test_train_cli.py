"""`python -m fasttrain.train`: the main job end to end, its outputs, and `python -m fasttrain.plot`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttrain import cli
from fasttrain.compute.device import resolve_precision
from fasttrain.config import load_config
from fasttrain.plot import latest_run, plot_run, read_metrics
from fasttrain.system.errors import run_cli
from fasttrain.train import main as train_main
from fasttrain.training.metrics import MetricsLog
from tests.conftest import HANG_SECONDS, tiny_args

pytestmark = pytest.mark.subprocess  # every test here starts the command-line tools in new processes
ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "train.batch_size=4",
    "train.seq_len=64",
    "train.max_steps=6",
    "train.log_interval=2",
    "train.eval_interval=4",
    "train.eval_steps=2",
    "schedule.warmup_steps=2",
    "train.sample_tokens=8",
    "checkpoint.interval=4",
    "train.tensorboard=false",
]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="module")
def main_job(pydoc_data, tmp_path_factory):
    """The main job on the base config, shrunk by --set, on the already prepared embedded corpus."""
    out = tmp_path_factory.mktemp("run")
    result = run(
        "fasttrain.train",
        "configs/base.toml",
        "--set",
        f"data.dir={pydoc_data}",
        "data.vocab_size=512",
        f"train.out_dir={out}",
        "train.device=cpu",
        *SMALL,
    )
    return result, out


def test_main_job_trains_evaluates_samples_and_saves(main_job):
    result, out = main_job
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for expected in (
        "model: ",
        "step      2/~6",  # at most 6: base.toml's time budget could end the run first
        "eval step 4: val loss",
        "sample: 'The",
        "done: 6 steps",
        str(out / "config.toml"),
        str(out / "metrics.jsonl"),
        "step_0000006.pt",
        str(out / "final" / "model.safetensors"),
        "fasttrain plot",
    ):
        assert expected in text
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["best", "latest", "step_0000004.pt", "step_0000006.pt"]
    assert (out / "checkpoints" / "latest").read_text() == "step_0000006.pt"
    assert sorted(p.name for p in (out / "final").iterdir()) == ["config.toml", "model.safetensors", "tokenizer.json"]
    saved = load_config(out / "config.toml")
    assert saved.model.vocab_size == 512 and saved.train.max_steps == 6  # resolved values, reloadable
    # "auto" resolved: too short a run to compile on CPU; bf16 only on a CPU with native bf16.
    assert saved.train.compile is False and saved.train.precision == resolve_precision("auto", torch.device("cpu"))[0]
    state = torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 64


def test_metrics_jsonl_fields(main_job):
    _, out = main_job
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [2, 4, 6]
    for e in train:
        for key in (
            "loss",
            "ppl",
            "lr",
            "grad_norm",
            "tokens",
            "tokens_per_s",
            "step_ms",
            "data_wait_pct",
            "peak_mem_gb",
            "progress",
        ):
            assert isinstance(e[key], (int, float)), key
        assert "mfu" not in e  # no peak to compare against on a CPU
    assert train[0]["loss"] > train[-1]["loss"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [4, 6]
    assert all({"val_loss", "val_bpb", "val_ppl", "best_val_loss"} <= e.keys() for e in evals)
    samples = [e for e in events if e["event"] == "sample"]
    assert len(samples) == 2 and all(s["text"].startswith("The") for s in samples)


def test_plot_writes_a_png(main_job, tmp_path):
    pytest.importorskip("matplotlib")
    _, out = main_job
    png = plot_run(out, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run("fasttrain.plot", str(tmp_path / "not-a-run"))
    assert (
        result.returncode == 2
        and result.stderr.startswith("error: ")
        and "metrics.jsonl: no such file" in result.stderr
    )


def test_metrics_follow_a_run_across_a_kill_and_a_resume(tmp_path):
    killed = [{"event": "start"}] + [{"event": "train", "step": s, "loss": 9 - s} for s in (1, 2, 3)]
    text = "".join(json.dumps(e) + "\n" for e in killed) + '{"event": "tra'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    log = MetricsLog(tmp_path, 4, tensorboard=False, quiet=True)
    log.event("start", resume_step=2)  # resumed from the checkpoint of step 2: step 3 is trained again
    log.event("train", step=3, loss=0.5)
    log.event("train", step=4, loss=0.25)
    log.close()
    run = latest_run(read_metrics(tmp_path))
    assert [(e.get("step"), e.get("loss")) for e in run if e["event"] == "train"] == [
        (1, 8),
        (2, 7),
        (3, 0.5),
        (4, 0.25),
    ]
    log = MetricsLog(tmp_path, 4, tensorboard=False, quiet=True)
    log.event("start")  # a new run in the same directory starts the plot afresh
    log.close()
    assert latest_run(read_metrics(tmp_path)) == [read_metrics(tmp_path)[-1]]


def test_bad_input_is_one_line_exit_2(tmp_path):
    for args in (
        ["configs/base.toml", "--set", "train.max_steps=0", "train.max_time=0"],  # no limit at all
        ["configs/base.toml", "--set", "train.device=cuda:7"] if not torch.cuda.is_available() else ["nope.toml"],
        ["configs/base.toml", "--set", "train.precision=fp16", "train.device=cpu", f"data.dir={tmp_path}"],
    ):
        result = run("fasttrain.train", *args, "--set", f"train.out_dir={tmp_path / 'out'}")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()  # nothing was written for a run that never started


def limit_address_space(megabytes: int):
    """A preexec_fn: the child's address space (ulimit -v) is its size after importing the trainer, plus `megabytes`.

    That size is measured in a fresh interpreter, as the child will be: the forked test process's own size
    (a pytest worker that may have run many tests before) would give the child a room that varies with it,
    enough at times for pre-flight to pass a run that then cannot allocate."""
    script = (
        "import fasttrain.train\n"
        "print(next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmSize:')))"
    )
    size = int(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    )
    room = size + megabytes * (1 << 20)

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (room, room))

    return limit


@pytest.mark.subprocess
def test_preflight_counts_the_address_space_limit(pydoc_data, tmp_path):
    """Under `ulimit -v` below the run's need, pre-flight refuses in one line; it once read only the
    machine's free memory and the run died in the allocator."""
    args = [
        "fasttrain.train",
        "configs/base.toml",
        "--set",
        f"data.dir={pydoc_data}",
        "data.vocab_size=512",
        f"train.out_dir={tmp_path}",
        "train.device=cpu",
        "model.d_model=1024",
        "model.n_layers=8",
    ]
    result = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        preexec_fn=limit_address_space(512),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: the run needs about") and result.stderr.count("\n") == 1, result.stderr


def test_running_out_of_memory_is_one_line(capsys):
    """An allocation the machine cannot give (past pre-flight's estimate) ends in one line, exit 2."""

    def allocate(argv):
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses it

    with pytest.raises(SystemExit) as done:
        run_cli(allocate, [])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: out of memory (you tried to allocate 1125899906842624 bytes"), err


def test_the_fasttrain_command_runs_each_tool_with_its_own_parser(pydoc_data, tmp_path, capsys):
    """`fasttrain TOOL ARGS` is `python -m fasttrain.TOOL ARGS`; an unknown tool is one line with a hint."""
    with pytest.raises(SystemExit) as done:
        run_cli(cli.main, ["--help"])
    listed = capsys.readouterr().out
    assert done.value.code == 0 and all(f"  {tool} " in listed for tool in cli.TOOLS)
    with pytest.raises(SystemExit) as done:
        run_cli(cli.main, ["trian", "configs/base.toml"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err == (
        "error: fasttrain: unknown tool 'trian'; did you mean train? one of "
        "prepare, configs, init, train, sample, evaluate, export, doctor, plot (see "
        "fasttrain --help)\n"
    )
    with pytest.raises(SystemExit) as done:  # the train tool's own flags: --device and --seed as sample has them
        run_cli(
            cli.main,
            [
                "train",
                *tiny_args(
                    pydoc_data,
                    tmp_path,
                    "train.max_steps=2",
                    "train.sample_tokens=0",
                    flags=["--device", "cpu", "--seed", "7"],
                ),
            ],
        )
    assert done.value.code == 0, capsys.readouterr().err
    recorded = load_config(tmp_path / "config.toml")
    assert recorded.train.seed == 7 and recorded.train.device == "cpu"


@pytest.mark.subprocess
def test_python_m_fasttrain_and_the_console_script(tmp_path):
    """Both spellings of the command reach the same tools; the script is what `pip install` made."""
    shown = run("fasttrain", "sample", "--help")
    assert shown.returncode == 0 and "--max-new-tokens" in shown.stdout, shown.stderr
    script = Path(sys.executable).parent / "fasttrain"
    if not script.exists():
        pytest.skip("fasttrain is not installed in this environment (pip install -e . makes the script)")
    listed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=HANG_SECONDS)
    assert listed.returncode == 0 and "export" in listed.stdout


@pytest.mark.subprocess
@pytest.mark.parametrize("tool", list(cli.TOOLS))
def test_every_tool_is_its_own_module(tool):
    """The README: each `fasttrain TOOL` is also `python -m fasttrain.TOOL` (configs' module was config.shipped, so
    `python -m fasttrain.configs` failed): the table maps each tool onto that module, and it runs as a program."""
    assert cli.TOOLS[tool][0] == f"fasttrain.{tool}"
    shown = run(f"fasttrain.{tool}", "--help")
    assert shown.returncode == 0 and f"usage: python -m fasttrain.{tool}" in shown.stdout, shown.stderr


def test_a_smoke_run_shorter_than_its_warmup_runs_and_says_so(pydoc_data, tmp_path, capsys):
    """A 5-step run of a config with 20 warmup steps was refused; it warms up over its first tenth, but at least
    over 2 steps, the least warmup there is (a 1-step warmup starts at the peak): 5 steps got none ("over 0")."""
    with pytest.raises(SystemExit) as done:
        run_cli(
            train_main,
            tiny_args(
                pydoc_data,
                tmp_path,
                "train.max_steps=5",
                "schedule.warmup_steps=20",
                "train.sample_tokens=0",
                "train.log_interval=1",
            ),
        )
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "note: schedule.warmup_steps = 20 is longer than train.max_steps = 5: warming up over 2 steps instead" in out
    assert load_config(tmp_path / "config.toml").schedule.warmup_steps == 2  # what the run did, so it loads back
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in events if e["event"] == "train"]  # base.toml: lr 2e-3, cosine down to min_lr 2e-4
    assert lrs[:2] == [pytest.approx(1e-3), pytest.approx(2e-3)] and lrs[-1] == pytest.approx(2e-4)
