"""Data-parallel training under torchrun: 2 CPU processes over gloo against a single process.

Each run is a real `torchrun --nproc_per_node=2 -m fasttrain.train`, on the tiny
model and the prepared embedded corpus of the other tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from fasttrain.config import load_config
from fasttrain.model.weights import read_safetensors
from fasttrain.optimization.optimizers import head_rate
from fasttrain.plot import read_metrics
from tests.conftest import HANG_SECONDS, tiny_args

pytestmark = pytest.mark.subprocess  # every test here starts the command-line tools in new processes
ROOT = Path(__file__).resolve().parents[1]
# 2 steps of 2 accumulated micro-batches: the gradient all-reduce is skipped on the first of each.
RUN = [
    "train.max_steps=4",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.eval_steps=2",
    "checkpoint.interval=2",
    "train.sample_tokens=0",
    "data.prefetch=0",
    'train.device="cpu"',
]  # gloo on the CPU: two ranks need no two GPUs, and fp32 without TF32 compares tightly
# PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack, so a rare failure explains itself.
ENV = {"FASTTRAIN_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def torchrun(args: list[str], nproc: int = 2, module: str = "fasttrain.train") -> subprocess.CompletedProcess:
    """`python -m module args` on `nproc` ranks of one torchrun job, which picks its own free port."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            module,
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
    )


def single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fasttrain.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
    )


def values(run_dir: Path, kind: str, key: str) -> list[float]:
    return [e[key] for e in read_metrics(run_dir) if e["event"] == kind]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Callable[..., Path]:
    """`one_process(data, *sets)`: the run directory of `python -m fasttrain.train` on one process with those
    --set items, trained the first time a test asks for it and shared after that (read-only): a single-process
    run of one config is the same whichever test compares against it (the ddp and fsdp cases use one)."""
    runs: dict[tuple, Path] = {}

    def run(data: Path, *sets: str) -> Path:
        if (data, sets) not in runs:
            out = tmp_path_factory.mktemp("one") / "run"
            done = single(tiny_args(data, out, *sets))
            assert done.returncode == 0, done.stderr
            runs[data, sets] = out
        return runs[data, sets]

    return run


@pytest.mark.parametrize(
    "parallel,batching",
    [
        ("ddp", []),
        ("fsdp", []),
        ("ddp", ["data.batching=padded", "data.padding=longest"]),
        (
            "fsdp",
            ["model.members=2", "train.final_eval=true", "checkpoint.fit_temperature=true", "train.sample_tokens=4"],
        ),
    ],
    # an ensemble (model/ensemble.py): its members' blocks sharded; samples after each evaluation (the plain model,
    # which reads the root's gathered weights); final/'s output layers scaled by one factor fitted on the eval rows,
    # each rank its share (training/calibration.py); and final/ scored on the whole val split
    ids=["ddp", "fsdp", "ddp-padded", "fsdp-ensemble"],
)
def test_two_ranks_train_like_one_process_with_the_same_global_batch(
    pydoc_data, paragraph_data, one_process, tmp_path, parallel, batching
):
    """4 sequences per micro-batch in one process = 2 on each of 2 ranks: the same rows, so the same
    losses, gradient norms and validation loss (up to the order of fp32 sums; validation reads eval_steps x
    batch_size rows, 2 x 4 = 4 x 2), and final/'s on the whole split at the end where asked (every rank its share).
    Padded, the ranks hold different numbers of real tokens, and every one still weighs the same."""
    data = paragraph_data if "data.batching=padded" in batching else pydoc_data
    one = one_process(data, *RUN, *batching, "train.batch_size=4", "train.tokens_per_update=256")
    two = torchrun(
        tiny_args(
            data,
            tmp_path / "two",
            *RUN,
            *batching,
            "train.batch_size=2",
            "train.eval_steps=4",
            "train.tokens_per_update=256",
            f'train.parallel="{parallel}"',
        )
    )
    assert two.returncode == 0, two.stderr
    assert values(tmp_path / "two", "train", "tokens") == values(one, "train", "tokens")
    scored = [("end", "final_val_loss")] if "train.final_eval=true" in batching else []
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss"), *scored):
        assert values(tmp_path / "two", kind, key) == pytest.approx(values(one, kind, key), rel=1e-5)
    ours, theirs = (read_safetensors(run / "final" / "model.safetensors") for run in (tmp_path / "two", one))
    assert ours.keys() == theirs.keys()  # FSDP gathered the shards back into the whole model
    scale = values(one, "end", "weights_scale")
    assert values(tmp_path / "two", "end", "weights_scale") == scale and (scale != [1.0]) == ("fit" in str(batching))
    assert_weights_agree(ours, theirs, adam_movement_bound(one) * max(scale[0], 1.0))
    start = [e for e in read_metrics(tmp_path / "two") if e["event"] == "start"][0]
    assert start["tokens_per_step"] == 256 and start["accumulation"] == 2  # counted over both ranks
    assert two.stdout.count("model: ") == 1  # only rank 0 prints


def adam_step_bound(step: int, beta1: float, beta2: float) -> float:
    """The most an AdamW step `step` (from 1) can move one element, over its rate: |m_hat| / sqrt(v_hat) for any
    gradients, by Cauchy-Schwarz over m's and v's sums of the same gradients: (1 - b1) / (1 - b1^t) x
    sqrt((1 - b2^t) / (1 - b2)) x sqrt(sum_k<t (b1^2 / b2)^k); 1 at the first step."""
    ratio = beta1**2 / beta2
    history = sum(ratio**k for k in range(step))
    return (1 - beta1) / (1 - beta1**step) * ((1 - beta2**step) / (1 - beta2)) ** 0.5 * history**0.5


def adam_movement_bound(run: Path) -> float:
    """How far apart two AdamW runs of `run`'s config and schedule can leave one element from the same start,
    whatever their gradients: twice the sum over steps of the largest rate of any group (a lookup table's, the
    head's) times `adam_step_bound`. Decoupled weight decay scales both by the same factor, at most 1."""
    cfg = load_config(run / "config.toml")
    optim = cfg.optim
    assert optim.name == "adamw"  # the bound is AdamW's (Muon's orthogonalised steps have another)
    largest = max(optim.lr, optim.embedding_lr, head_rate(optim, cfg.model.d_model)) / optim.lr
    rates = [e["lr"] * largest for e in read_metrics(run) if e["event"] == "train"]
    return 2 * sum(lr * adam_step_bound(t, optim.beta1, optim.beta2) for t, lr in enumerate(rates, 1))


def assert_weights_agree(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], bound: float) -> None:
    """Two runs' weights, trained on the same rows with sums in another order, agree at fp32's tolerance but for a
    few elements, each within `bound` (`adam_movement_bound`). Those few are why: an element whose gradient sums to
    nearly zero (a rare token's embedding row: a few terms that almost cancel) has a direction m / sqrt(v) made of
    rounding, which another order of the same sums can turn, and AdamW moves it by a full step either way (1.8e-4
    seen on an AVX2 EPYC where AVX-512 gave under 1e-5). A wrong shard, gradient or reduction moves most elements
    of a tensor, so more than 1 in 1,000 beyond fp32's tolerance fails, as does any beyond the bound."""
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=bound)
        apart = ~torch.isclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
        assert apart.sum().item() <= apart.numel() / 1000, f"{name}: {apart.sum().item()} of {apart.numel()} differ"


# One sequence per micro-batch on every rank and 192 tokens a step: 6 micro-batches accumulated on 1 process, 3 on
# 2, 2 on 3, the same rows each step. eval_steps=5: 5 validation rows, which neither 2 nor 3 ranks split evenly.
ANY_WORLD = [
    "train.max_steps=4",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.eval_steps=5",
    "checkpoint.interval=100",
    "train.sample_tokens=0",
    "data.prefetch=0",
    'train.device="cpu"',
    "train.batch_size=1",
    "train.tokens_per_update=192",
]


@pytest.mark.parametrize(
    "nproc,parallel",
    [
        (2, "ddp"),
        pytest.param(3, "fsdp", marks=pytest.mark.second_tier),  # 3 ranks: 30 s more on 2 cores
    ],
)
def test_validation_reads_the_same_rows_in_every_world(pydoc_data, one_process, tmp_path, nproc, parallel):
    """The same config trained on 1 process and on `nproc` (the same rows each step) validates over the same
    eval_steps x batch_size rows of the split, shared out among the ranks: the same val_loss up to the order
    of fp32 sums. It read eval_steps batches per rank, nproc times the rows (5.8876 on 1 process, 5.8669 on
    2), so `best` and early stopping compared other rows after a resume on another world."""
    one = one_process(pydoc_data, *ANY_WORLD)
    many = torchrun(tiny_args(pydoc_data, tmp_path / "many", *ANY_WORLD, f'train.parallel="{parallel}"'), nproc=nproc)
    assert many.returncode == 0, many.stderr
    assert values(tmp_path / "many", "train", "loss") == pytest.approx(values(one, "train", "loss"), rel=1e-5)
    for key in ("val_loss", "val_accuracy"):
        ours, theirs = values(tmp_path / "many", "eval", key), values(one, "eval", key)
        assert len(ours) == 2 and ours == pytest.approx(theirs, rel=1e-5), key


def test_a_dead_rank_ends_the_job_with_an_error(pydoc_data, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "fasttrain.train",
            *tiny_args(
                pydoc_data,
                tmp_path,
                "train.max_steps=100000",
                "train.log_interval=1",
                "train.eval_interval=100000",
                "checkpoint.interval=100000",
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
    )
    deadline = time.monotonic() + HANG_SECONDS
    while not ((tmp_path / "metrics.jsonl").exists() and values(tmp_path, "train", "loss")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"no training step within {HANG_SECONDS} s"
        time.sleep(0.1)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies mid-run
    _, stderr = proc.communicate(timeout=HANG_SECONDS)  # the survivor must not hang
    assert proc.returncode != 0
    assert "Signal 9" in stderr or "SIGKILL" in stderr or "exitcode" in stderr, stderr[-2000:]


@pytest.mark.second_tier  # two processes and a torchrun job, 8-15 s: the first tier is near its 10 minutes
def test_a_dry_run_under_torchrun_plans_the_whole_world_once_and_writes_nothing(pydoc_data, tmp_path):
    """Every rank plans the run; rank 0 prints the world's plan, once: 2 ranks halve the accumulation of one
    process for the same tokens per step. --measure starts the process group and times real steps on both
    ranks. Nothing is written: not train.out_dir, not the data folder."""
    out = tmp_path / "run"
    args = tiny_args(pydoc_data, out, *RUN, "train.batch_size=2", "train.tokens_per_update=256")
    before = sorted(p.name for p in pydoc_data.rglob("*"))
    one = single([*args, "--dry-run", "--json"])
    two = torchrun([*args, "--dry-run", "--json", "--measure", "1"])
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    (alone,) = [json.loads(line) for line in one.stdout.splitlines() if line.startswith("{")]
    (world,) = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert (alone["world_size"], world["world_size"]) == (1, 2)
    assert alone["tokens_per_step"] == world["tokens_per_step"] == 256
    assert alone["accumulation"] == 2 * world["accumulation"]
    assert world["measured_steps"] == 1 and world["tokens_per_s"] > 0
    assert not out.exists() and sorted(p.name for p in pydoc_data.rglob("*")) == before


@pytest.mark.second_tier  # a distilled run's two phases and a resume under torchrun: ~40 s on 2 cores
def test_a_distilled_run_under_torchrun_takes_each_phase_from_rank_0(pydoc_data, tmp_path):
    """Rank 0 decides each next phase and the others follow it (distributed.decided_by_main): the members' round,
    then the student, each on both ranks; a --resume auto of the ended run decides nothing is left on both."""
    out = tmp_path / "run"
    args = tiny_args(pydoc_data, out, *RUN, "model.members=2", "train.distill=true", config="configs/base.toml")
    done = torchrun(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_config(out / "ensemble" / "config.toml").model.members == 2
    assert load_config(out / "config.toml").train.teacher == str(out / "ensemble" / "final")
    assert (out / "final" / "model.safetensors").is_file()
    again = torchrun([args[0], "--resume", "auto", *args[1:]])
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.second_tier  # about 15 s of torchrun on 2 cores
def test_mfu_on_two_processes_is_against_both_devices_peaks(pydoc_data, tmp_path):
    """tokens_per_s counts every rank's tokens, and MFU divided it by one device's peak: N processes read N times their
    real utilisation. Here a device's peak is patched to 1e12 FLOP/s (a CPU has none in the table)."""
    script = tmp_path / "patched_peak.py"
    script.write_text(
        "import sys\n"
        "from fasttrain.training import reporting\n"
        "reporting.peak_flops = lambda device, devices=1: devices * 1e12\n"
        "from fasttrain.train import main\n"
        "from fasttrain.system.errors import run_cli\n"
        "run_cli(main, sys.argv[1:])\n"
    )
    args = tiny_args(pydoc_data, tmp_path / "run", *RUN, "train.log_interval=1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    events = read_metrics(tmp_path / "run")
    start = next(e for e in events if e["event"] == "start")
    trained = [e for e in events if e["event"] == "train"]
    assert start["world_size"] == 2 and trained
    for e in trained:
        assert e["mfu"] == pytest.approx(start["flops_per_token"] * e["tokens_per_s"] / 2e12, rel=1e-3, abs=1e-4)
