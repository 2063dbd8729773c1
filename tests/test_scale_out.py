"""Scale-out under torchrun on the CPU (gloo): HSDP against FSDP and DDP with 4 processes, two torchrun
agents on this machine as the two nodes of one run, and a node that never joins.

The helpers of tests/test_distributed.py run `torchrun --standalone` and read the metrics; here two
agents meet through a c10d rendezvous on a free local port, each in its own process group so that
whatever happens the test ends it and its workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttrain.model.weights import read_safetensors
from fasttrain.plot import read_metrics
from tests.conftest import tiny_args
from tests.test_distributed import ENV, ROOT, RUN, single, torchrun, values

pytestmark = pytest.mark.subprocess  # every test here starts torchrun in new processes
# 4 ranks of 1 sequence, 2 accumulated micro-batches a step: the global batch of test_distributed's runs.
FOUR = ["train.batch_size=1", "train.tokens_per_update=256"]
# Records the mesh an HSDP parameter lives on, through the Python API a user calls (every rank writes its own).
MESH_SCRIPT = """
import json, sys
from pathlib import Path
from fasttrain.config import load_config
from fasttrain.compute import distributed
from fasttrain.training.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1], sys.argv[3:]), quiet=True)
trainer.train()
p = next(trainer.model.parameters())
mesh = {"mesh": p.device_mesh.mesh.tolist(), "names": list(p.device_mesh.mesh_dim_names),
        "coordinate": p.device_mesh.get_coordinate(), "placements": [str(x) for x in p.placements]}
Path(trainer.cfg.train.out_dir, f"mesh_{trainer.world.rank}.json").write_text(json.dumps(mesh))
trainer.close()
del trainer, p  # freed before the process group is left (distributed.stop)
distributed.stop()
"""


@pytest.mark.second_tier  # 4 runs of 4 processes: about 60 s on 2 idle cores
def test_hsdp_trains_like_fsdp_and_ddp_and_resumes(pydoc_data, tmp_path):
    """Two shard groups of two ranks (train.shard_group_size = 2 of 4) step like FSDP over all 4 and DDP:
    the same losses, gradient norms, validation losses and final weights up to fp32 rounding. The HSDP
    run stops at step 2 and resumes from its (sharded) checkpoint, then continues on one process."""
    runs = {}
    for parallel in ("ddp", "fsdp"):
        proc = torchrun(
            tiny_args(pydoc_data, tmp_path / parallel, *RUN, *FOUR, f'train.parallel="{parallel}"'), nproc=4
        )
        assert proc.returncode == 0, proc.stderr
        runs[parallel] = tmp_path / parallel
    hsdp = [*RUN, *FOUR, 'train.parallel="hsdp"', "train.shard_group_size=2"]
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=4",
            str(script),
            *tiny_args(pydoc_data, tmp_path / "hsdp", *hsdp, "train.max_steps=2"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    for rank in range(4):  # a 2 x 2 mesh: rank r holds shard r % 2 in replica r // 2
        mesh = json.loads((tmp_path / "hsdp" / f"mesh_{rank}.json").read_text())
        assert mesh == {
            "mesh": [[0, 1], [2, 3]],
            "names": ["replicate", "shard"],
            "coordinate": [rank // 2, rank % 2],
            "placements": ["R", "S(0)"],
        }  # Replicate(), Shard(0)
    resumed = torchrun(tiny_args(pydoc_data, tmp_path / "hsdp", *hsdp, flags=["--resume", "auto"]), nproc=4)
    assert resumed.returncode == 0, resumed.stderr
    runs["hsdp"] = tmp_path / "hsdp"
    assert len(values(runs["hsdp"], "train", "loss")) == 4  # steps 1-2, then 3-4 after the resume
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        for other in ("fsdp", "ddp"):
            assert values(runs["hsdp"], kind, key) == pytest.approx(values(runs[other], kind, key), rel=1e-5), other
    ours = read_safetensors(runs["hsdp"] / "final" / "model.safetensors")
    for other in ("fsdp", "ddp"):
        theirs = read_safetensors(runs[other] / "final" / "model.safetensors")
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
    # One process continues what 4 saved under HSDP (test_sharded_checkpoint.py compares such losses).
    alone = single(
        tiny_args(
            pydoc_data,
            tmp_path / "hsdp",
            *hsdp,
            "train.max_steps=6",
            "train.shard_group_size=1",
            flags=["--resume", "auto"],
        )
    )  # a group of 1 divides a world of 1
    assert alone.returncode == 0, alone.stderr
    assert "saved by 4 process(es) (hsdp), continued by 1 (none)" in alone.stdout


def test_an_hsdp_group_that_does_not_divide_the_world_stops_every_rank_before_it_joins(pydoc_data, tmp_path):
    """Groups of 3 in a world of 2: each rank says so in one line and exits 2 before joining the process
    group (no rank waits for another), then torchrun reports the failed ranks; nothing is written."""
    proc = torchrun(tiny_args(pydoc_data, tmp_path / "run", 'train.parallel="hsdp"', "train.shard_group_size=3"))
    assert proc.returncode != 0
    line = "error: train.shard_group_size = 3 does not divide the world of 2 process(es) into whole replicas"
    assert proc.stderr.count(line) == 2 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def free_port() -> int:
    """A port no one listens on now: the kernel's pick for port 0 (a clash later is retried, see run_nodes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(node: int, nodes: int, port: int, args: list[str], logs: Path, conf: str = "") -> subprocess.Popen:
    """Start the torchrun agent of node `node` of `nodes` (one process each), meeting at 127.0.0.1:`port`.

    Node 0 hosts the rendezvous store (is_host=1), so a port taken since free_port() makes it fail at
    once with RendezvousConnectionError instead of joining someone else's store. Output goes to files
    (`logs`/node{N}.out, .err): a full pipe would stall an agent the test is not reading yet. The agent
    leads a new process group, its workers with it, so `ended` can end them all."""
    out, err = (open(logs / f"node{node}.{kind}", "w") for kind in ("out", "err"))
    with out, err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={nodes}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id=test-{port}",
                f"--rdzv-conf=is_host={int(node == 0)}{conf}",
                "-m",
                "fasttrain.train",
                *args,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=err,
            env={**os.environ, **ENV},
            start_new_session=True,
        )


@contextlib.contextmanager
def ended():
    """A list to put started agents in; whatever happens in the block, each one still running is then
    killed with its workers (its process group), and reaped."""
    agents: list[subprocess.Popen] = []
    try:
        yield agents
    finally:
        for proc in agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_all(agents: list[subprocess.Popen], timeout: float) -> list[int]:
    """The agents' exit statuses, or a failed test once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    for proc in agents:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun agents still running after {timeout:.0f} s")
    return [proc.returncode for proc in agents]


def run_nodes(args: list[str], logs: Path, timeout: float = 300) -> list[int]:
    """Run two agents as two nodes of one job to the end: their exit statuses. A rendezvous port taken by
    another test between free_port() and node 0's start is retried on a new port."""
    for _ in range(3):
        port = free_port()
        with ended() as agents:
            agents += [agent(node, 2, port, args, logs) for node in range(2)]
            first = wait_all(agents[:1], timeout)
            if "RendezvousConnectionError" not in (logs / "node0.err").read_text():
                return first + wait_all(agents[1:], timeout)
            # else node 1 may have joined the other store: ended() kills it, and both start again
    pytest.fail(f"no free rendezvous port in 3 tries: {(logs / 'node0.err').read_text()[-2000:]}")


@pytest.mark.second_tier  # 3 torchrun agents and 4 workers: 45-50 s on the 2 shared cores, about 20 s idle
def test_two_nodes_train_like_one_node_with_two_processes(pydoc_data, tmp_path):
    """The same command on one node of 2 processes and on two nodes of 1 (two agents, one c10d rendezvous):
    the same losses. Under hsdp the default shard group is a node's processes: one group of 2 on one node
    (FSDP), two replicas of 1 on two nodes; a step is the same either way."""
    run = [*RUN, "train.batch_size=2", "train.tokens_per_update=256", 'train.parallel="hsdp"']
    one = torchrun(tiny_args(pydoc_data, tmp_path / "one", *run), nproc=2)
    assert one.returncode == 0, one.stderr
    logs = tmp_path / "logs"
    logs.mkdir()
    assert run_nodes(tiny_args(pydoc_data, tmp_path / "two", *run), logs) == [0, 0], (logs / "node0.err").read_text()
    start = [e for e in read_metrics(tmp_path / "two") if e["event"] == "start"][0]
    assert start["world_size"] == 2 and start["parallel"] == "hsdp"
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        assert values(tmp_path / "two", kind, key) == pytest.approx(values(tmp_path / "one", kind, key), rel=1e-5)
    assert values(tmp_path / "two", "train", "tokens") == values(tmp_path / "one", "train", "tokens")
    assert (logs / "node0.out").read_text().count("model: ") == 1  # rank 0 prints, on node 0
    assert "model: " not in (logs / "node1.out").read_text()


def test_a_node_that_never_joins_ends_the_agent_after_the_join_timeout(pydoc_data, tmp_path):
    """Node 0 of 2 waits for node 1 only join_timeout seconds (here 5, by default 600), then torchrun exits
    with status 1 and RendezvousTimeoutError as its last line: no hang, no worker started, nothing written."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for _ in range(3):  # a port taken since free_port(): node 0 cannot host the store, and tries another
        began = time.monotonic()
        with ended() as agents:
            agents.append(agent(0, 2, free_port(), tiny_args(pydoc_data, tmp_path / "run"), logs, ",join_timeout=5"))
            assert wait_all(agents, 120) == [1]
        err = (logs / "node0.err").read_text()
        if "RendezvousConnectionError" not in err:
            break
    assert err.splitlines()[-1] == "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError", err[-2000:]
    assert time.monotonic() - began >= 5
    assert not (tmp_path / "run").exists()
