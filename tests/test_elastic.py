"""Elastic restarts: `torchrun --max-restarts=K ... --resume auto-or-new` runs the same command again after a
rank dies, and the run continues from its latest checkpoint as if nothing had happened.

`--resume auto-or-new` is a new run while train.out_dir has no checkpoint (the job's first attempt) and
`--resume auto` from then on. The kill test SIGKILLs one rank, then the other, each at a step drawn from
a seeded generator (a fixed seed, in every failure message; FASTTRAIN_KILL_SEED=N runs another).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from benchmarks.studies.elastic_restarts import trial, workers
from fasttrain import train
from fasttrain.checkpoints.checkpoint_files import resolve
from fasttrain.compute import distributed
from fasttrain.compute.distributed import World
from fasttrain.model.weights import read_safetensors
from fasttrain.plot import latest_run, read_metrics
from tests.conftest import HANG_SECONDS, tiny_args
from tests.test_checkpoint import run_cli_code
from tests.test_distributed import ENV, ROOT, torchrun
from tests.test_scale_out import ended, free_port, wait_all

# dropout: each rank's random state must come back too; 4 steps between saves, so a kill loses some steps
ELASTIC = [
    "train.max_steps=40",
    "train.log_interval=1",
    "train.eval_interval=20",
    "train.eval_steps=1",
    "checkpoint.interval=4",
    "train.sample_tokens=0",
    "data.prefetch=0",
    'train.device="cpu"',
    "train.batch_size=2",
    "model.dropout=0.1",
]

# torchrun's workaround for pytorch/pytorch#135712: the store its agent shares with the workers outlives a
# restart, so a restarted group could read the dead attempt's gloo addresses and fail to connect
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_resume_auto_or_new_starts_a_new_run_then_continues_it(pydoc_data, tmp_path, capsys):
    """The same command line twice: the first finds no checkpoint and starts (saying so), the second
    continues from the first's latest save. `--resume auto` still refuses a directory with no checkpoint."""
    run = ["train.max_steps=4", "checkpoint.interval=2", "train.sample_tokens=0", "train.eval_interval=4"]
    assert run_cli_code(train.main, tiny_args(pydoc_data, tmp_path, *run, flags=["--resume", "auto"])) == 2
    assert "no checkpoint saved there yet" in capsys.readouterr().err and not (tmp_path / "metrics.jsonl").exists()
    same = tiny_args(pydoc_data, tmp_path, *run, flags=["--resume", "auto-or-new"])
    assert run_cli_code(train.main, same) == 0
    assert f"resume: no checkpoint in {tmp_path} yet, so a new run starts there" in capsys.readouterr().out
    assert run_cli_code(train.main, [*same, "train.max_steps=6"]) == 0
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_0000004.pt'} at step 4" in capsys.readouterr().out
    starts = [e for e in read_metrics(tmp_path) if e["event"] == "start"]
    assert "resumed_from" not in starts[0] and starts[1]["resume_step"] == 4
    assert [e["step"] for e in latest_run(read_metrics(tmp_path)) if e["event"] == "train"][-1] == 6


def test_a_first_save_without_its_pointer_is_resumed(pydoc_data, tmp_path, capsys):
    """A kill after the first save was renamed into place and before `latest` was written left a run that
    auto-or-new took for none: the new run then refused the directory (it holds checkpoints) on every restart.
    The newest save is the latest; `--resume auto` and the tools read it too."""
    run = ["train.max_steps=4", "checkpoint.interval=2", "train.sample_tokens=0", "train.eval_interval=4"]
    same = tiny_args(pydoc_data, tmp_path, *run, flags=["--resume", "auto-or-new"])
    assert run_cli_code(train.main, [*same, "train.max_steps=2"]) == 0
    (tmp_path / "checkpoints" / "latest").unlink()
    capsys.readouterr()
    assert run_cli_code(train.main, same) == 0
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_0000002.pt'} at step 2" in capsys.readouterr().out
    (tmp_path / "checkpoints" / "latest").unlink()
    assert resolve("auto", tmp_path) == resolve(str(tmp_path), "") == tmp_path / "checkpoints" / "step_0000004.pt"


def attempts(run_dir: Path) -> list[list[dict]]:
    """The events of each attempt in run_dir/metrics.jsonl (each begins with a "start"), none before it exists."""
    if not (run_dir / "metrics.jsonl").exists():
        return []
    found: list[list[dict]] = []
    for event in read_metrics(run_dir):
        if event["event"] == "start":
            found.append([])
        if found:
            found[-1].append(event)
    return found


def last_step(attempt: list[dict]) -> int:
    return max((e["step"] for e in attempt if e["event"] == "train"), default=0)


@pytest.mark.second_tier  # two torchrun jobs, the second started three times: about 60 s on the 2 shared cores
def test_a_rank_killed_mid_run_is_restarted_and_the_run_ends_as_if_never_killed(pydoc_data, tmp_path):
    """torchrun --max-restarts=2: attempt 0 loses one rank to SIGKILL, the restarted group (attempt 1) the
    other; each restart resumes from the latest checkpoint, taking over the lock a killed rank 0 left and
    appending to its metrics.jsonl, and attempt 2 finishes. The final weights are bitwise those of a job
    never killed, and the losses, read as `fasttrain plot` reads them (each resume drops the steps trained
    again), are that job's."""
    seed = int(os.environ.get("FASTTRAIN_KILL_SEED", 20261124))  # fixed: CI runs the same kills every time
    rng = random.Random(seed)
    victims = rng.sample([0, 1], 2)  # one rank each attempt, rank 0 first or second
    straight = torchrun(tiny_args(pydoc_data, tmp_path / "straight", *ELASTIC, flags=["--resume", "auto-or-new"]))
    assert straight.returncode == 0, straight.stderr
    run_dir, logs = tmp_path / "elastic", tmp_path / "logs"
    logs.mkdir()
    killed = []  # (rank, the step it was to die after, the last step attempt logged)
    with ended() as agents, open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        agents.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node=2",
                    "--max-restarts=2",
                    "-m",
                    "fasttrain.train",
                    *tiny_args(pydoc_data, run_dir, *ELASTIC, flags=["--resume", "auto-or-new"]),
                ],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                env={**os.environ, **ENV, **RESTARTABLE},
                start_new_session=True,
            )
        )
        agent = agents[0]
        for attempt, rank in enumerate(victims):
            deadline, step = time.monotonic() + HANG_SECONDS, None
            while True:  # until this attempt has trained past its step to die at
                runs = attempts(run_dir)
                where = f"seed {seed}, attempt {attempt}, {len(runs)} started: {(logs / 'err').read_text()[-3000:]}"
                assert agent.poll() is None and len(runs) <= attempt + 1, f"{where}: an attempt ended unkilled"
                assert time.monotonic() < deadline, f"{where}: no progress in {HANG_SECONDS} s"
                if len(runs) == attempt + 1:
                    if step is None:  # past a checkpoint (the first is at step 4), and not too near the end
                        step = max(runs[-1][0].get("resume_step", 0), 4) + rng.randint(1, 10)
                    if last_step(runs[-1]) >= step:
                        break
                time.sleep(0.02)
            pid, restart = workers(agent.pid)[rank]
            assert restart == attempt, f"seed {seed}"
            os.kill(pid, signal.SIGKILL)
            killed.append((rank, step, last_step(attempts(run_dir)[-1])))
        codes = wait_all(agents, 300)
    report = f"seed {seed}: killed (rank, at step, last step logged) {killed}"
    assert codes == [0], f"{report}: {(logs / 'err').read_text()[-3000:]}"
    runs = attempts(run_dir)
    assert len(runs) == 3, report
    for (after, *_), (_, _, died_at) in zip(runs[1:], killed):
        assert after["resume_step"] % 4 == 0 and after["resume_step"] <= died_at < 40, report  # killed mid-run
        assert after["resumed_from"].endswith(f"step_{after['resume_step']:07d}.pt"), report
    assert runs[-1][-1]["event"] == "end" and runs[-1][-1]["step"] == 40, report

    def losses(directory: Path) -> list[tuple[int, float]]:
        return [(e["step"], e["loss"]) for e in latest_run(read_metrics(directory)) if e["event"] == "train"]

    assert losses(run_dir) == losses(tmp_path / "straight"), report
    ours, theirs = (read_safetensors(d / "final" / "model.safetensors") for d in (run_dir, tmp_path / "straight"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{report}: {name} differs"
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), report


@pytest.mark.subprocess
@pytest.mark.parametrize("rank", [0, 1], ids=["host-waits-for-a-peer", "peer-finds-no-host"])
def test_a_rank_that_cannot_join_its_group_says_so_in_one_line_within_the_timeout(pydoc_data, tmp_path, rank):
    """A restarted rank whose peers never come (rank 0, which hosts the store) or whose store is gone (rank 1,
    nothing listens on MASTER_PORT) gives up after FASTTRAIN_DIST_TIMEOUT seconds with one line naming the
    address and the timeout, exit status 1, no traceback (torch's C++ log may say more before it); it ended in a
    Python traceback (after 600 s by default)."""
    env = {
        **os.environ,
        **ENV,
        "FASTTRAIN_DIST_TIMEOUT": "3",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCHELASTIC_RESTART_COUNT": "1",
    }
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fasttrain.train", *tiny_args(pydoc_data, tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_SECONDS,
    )
    assert time.monotonic() - began < 60
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: rank {rank} of 2 could not join the process group at "
            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} within FASTTRAIN_DIST_TIMEOUT=3 s: "
        )
    ), proc.stderr[-3000:]


@pytest.mark.subprocess
@pytest.mark.second_tier  # 4 torchrun jobs restarted once each: about 2 minutes on the 2 shared cores
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_documented_restart_command_recovers_from_every_kill(pydoc_data, tmp_path, parallel):
    """docs/multi-gpu.md's restart command (torchrun's static rendezvous, --max-restarts, --resume
    auto-or-new), one worker SIGKILLed mid-run, rank 0 then rank 1: each job restarts once, resumes from its
    checkpoint and finishes. Before each attempt met under a prefix of its own, the restarted group met in the
    store the dead one left behind and read its gloo addresses: 1 of 4 kills recovered under ddp and 1 of 4
    under fsdp; since, 20 of 20 each (benchmarks/studies/elastic_restarts.py,
    benchmarks/results/checkpoints/cpu-elastic-restarts-2026-11-24.json)."""
    for rank in (0, 1):
        found = trial(pydoc_data, tmp_path / f"rank{rank}", parallel, rank)
        assert found["ok"], found


def test_each_torchrun_attempt_meets_under_a_prefix_of_its_own(monkeypatch):
    """torchrun's static rendezvous hands every attempt the store its agent hosts, which outlives a restart:
    what attempt 0 wrote there (a rank's gloo address, a barrier's count) must not be what attempt 1 reads.
    On several nodes (an agent and a restart count each) the store is used as it is."""
    store, one_node = dist.HashStore(), World(0, 2, 0, 2)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    distributed._attempt_store(one_node, store).set("rank_1", "the dead attempt's address")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = distributed._attempt_store(one_node, store)
    assert not again.check(["rank_1"]) and store.check(["fasttrain/attempt_0/rank_1"])
    again.set("rank_1", "the new address")
    assert store.get("fasttrain/attempt_1/rank_1") == b"the new address"
    assert distributed._attempt_store(World(0, 2, 0, 1), store) is store


@pytest.mark.subprocess
def test_a_join_that_hangs_inside_torch_ends_in_one_line_after_the_timeout_and_10_s(tmp_path):
    """Gloo's full-mesh connect once hung past its own timeout after a restart, where no exception reaches
    fasttrain: a timer ends the rank FASTTRAIN_DIST_TIMEOUT + 10 s into the join, with the one line and exit
    status 1, so torchrun can restart it. Here the group's constructor never returns."""
    script = """if True:
        import threading, torch, torch.distributed as dist
        from fasttrain.compute import distributed
        dist.rendezvous = lambda *args, **kwargs: iter([(dist.HashStore(), 0, 2)])
        dist.init_process_group = lambda *args, **kwargs: threading.Event().wait()  # never returns
        distributed.start(distributed.World(0, 2, 0, 2), torch.device("cpu"))
        print("joined")
    """
    port = free_port()
    env = {**os.environ, **ENV, "FASTTRAIN_DIST_TIMEOUT": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env, timeout=HANG_SECONDS
    )
    assert 11 <= time.monotonic() - began < 60
    assert proc.returncode == 1 and "joined" not in proc.stdout, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: rank 0 of 2 could not join the process group at 127.0.0.1:{port} within FASTTRAIN_DIST_TIMEOUT=1 s: "
        "no answer from its peers"
    ], proc.stderr[-3000:]
