"""Elastic restarts, repeated: the restart command of docs/multi-gpu.md, one worker SIGKILLed mid-run, N times.

    python -m benchmarks.studies.elastic_restarts --trials 20 --out benchmarks/results/checkpoints/cpu-elastic-restarts-DATE.json

Each trial runs the documented command on the CPU (gloo, 2 processes, static rendezvous on a free port,
`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=3 ... --resume auto-or-new`) in a fresh
train.out_dir, SIGKILLs one worker (rank 0 and rank 1 in turn) a few steps after the first checkpoint, and
counts the trial a success when the job exits 0 after a restart that resumed from a checkpoint and trained
to the last step; "restarts" is how many torchrun used (1 but when a restarted group failed to meet). A
failure keeps the tail of torchrun's stderr. `trial` is also what
tests/test_elastic.py repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.studies.common import ROOT

# The tiny model of the tests, one sequence per rank, a save every 4 steps; dropout: each rank's random state
# must come back too.
RUN = [
    "train.max_time=0",
    "optim.name=adamw",  # the AdamW run measured before configs/base.toml took Muon (2026-11-25)
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=32",
    "train.seq_len=32",
    "train.batch_size=2",
    "train.max_steps=24",
    "train.log_interval=1",
    "train.eval_interval=1000",
    "train.eval_steps=1",
    "checkpoint.interval=4",
    "train.sample_tokens=0",
    "data.prefetch=0",
    "train.device=cpu",
    'train.precision="fp32"',
    "train.tensorboard=false",
    "train.compile=false",
    "model.dropout=0.1",
    "schedule.warmup_steps=2",
    "data.vocab_size=512",
]
# The documented command's environment; FASTTRAIN_DIST_TIMEOUT: a rank that cannot reach its peers gives up
# within a minute, so a failed trial ends instead of hanging. OMP_NUM_THREADS=1: 2 workers on a shared CPU.
ENV = {
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "FASTTRAIN_DIST_TIMEOUT": "60",
    "OMP_NUM_THREADS": "1",
    "PYTHONFAULTHANDLER": "1",
}


def free_port() -> int:
    """A port no one listens on now: the kernel's pick for port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(data_dir: Path, out_dir: Path, parallel: str, port: int) -> list[str]:
    """The restart command of docs/multi-gpu.md for 2 CPU processes: torchrun's default (static) rendezvous,
    on 127.0.0.1:`port` rather than 29500, so trials and tests side by side do not meet."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=3",
        f"--master-port={port}",
        "-m",
        "fasttrain.train",
        "configs/base.toml",
        "--resume",
        "auto-or-new",
        "--set",
        f'data.dir="{data_dir}"',
        'data.inputs=["builtin:pydoc"]',
        f'train.out_dir="{out_dir}"',
        *RUN,
        f'train.parallel="{parallel}"',
    ]


def workers(agent: int) -> dict[int, tuple[int, int]]:
    """The agent's worker processes, read from /proc: rank -> (pid, torchrun restart count)."""
    found = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                env = dict(
                    item.split(b"=", 1)
                    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    if b"=" in item
                )
            except OSError:
                continue
            if b"RANK" in env:  # exec'd as a worker, not a fork still on its way there
                found[int(env[b"RANK"])] = (int(pid), int(env[b"TORCHELASTIC_RESTART_COUNT"]))
    return found


def events(out_dir: Path) -> list[dict]:
    """metrics.jsonl's events so far (a line still being written left out)."""
    try:
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            found.append(json.loads(line))
    return found


def trial(data_dir: Path, work: Path, parallel: str, rank: int, kill_after: int = 6, timeout: float = 240) -> dict:
    """One run of the documented command in `work`, its worker of `rank` SIGKILLed once the run has logged
    step `kill_after` (past the first save at step 4): what happened, "ok" true if the job recovered. A port
    taken by another process between free_port() and the agent's start (its store fails to listen, before
    any worker runs) is tried again on a new one, twice at most ("port_retries")."""
    work.mkdir(parents=True)
    for retry in range(3):
        result = _run(data_dir, work, parallel, rank, kill_after, timeout)
        if not (
            result.get("error") == "ended before the kill"
            and result["attempts"] == 0
            and "EADDRINUSE" in (work / "err").read_text()
        ):
            break
        shutil.rmtree(work / "run", ignore_errors=True)
    result["port_retries"] = retry
    if not result["ok"]:
        result["stderr_tail"] = (work / "err").read_text()[-2500:]
    return result


def _run(data_dir: Path, work: Path, parallel: str, rank: int, kill_after: int, timeout: float) -> dict:
    """trial's job, on a port free_port() picked."""
    port = free_port()
    argv = command(data_dir, work / "run", parallel, port)
    began = time.monotonic()
    result: dict = {"parallel": parallel, "killed_rank": rank, "port": port}
    with open(work / "out", "w") as out, open(work / "err", "w") as err:
        agent = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=err, env={**os.environ, **ENV}, start_new_session=True
        )
    try:
        while not any(e.get("event") == "train" and e["step"] >= kill_after for e in events(work / "run")):
            if agent.poll() is not None or time.monotonic() - began > timeout:
                result["error"] = "ended before the kill" if agent.poll() is not None else "no progress"
                break
            time.sleep(0.05)
        else:
            victim = workers(agent.pid).get(rank)
            if victim is None:  # gone since its step was logged: the job failed or already ended
                result["error"] = f"no worker of rank {rank} to kill"
            else:
                os.kill(victim[0], signal.SIGKILL)
                result["killed_at"] = round(time.monotonic() - began, 1)
                agent.wait(timeout=max(1.0, timeout - (time.monotonic() - began)))
    except subprocess.TimeoutExpired:
        result["error"] = f"still running after {timeout:.0f} s"
    finally:
        if agent.poll() is None:  # its workers lead process groups of their own
            for pid, _ in workers(agent.pid).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
    starts = [e for e in events(work / "run") if e.get("event") == "start"]
    ends = [e for e in events(work / "run") if e.get("event") == "end"]
    notes = re.findall(r"^note: torchrun restart (\d+) of", (work / "out").read_text(), re.MULTILINE)
    result.update(
        exit_code=agent.returncode,
        seconds=round(time.monotonic() - began, 1),
        attempts=len(starts),
        load_average=round(os.getloadavg()[0], 2),
        restarts=max(map(int, notes), default=0),
        resume_step=starts[-1].get("resume_step") if len(starts) > 1 else None,
        end_step=ends[-1]["step"] if ends else None,
    )
    result["ok"] = (
        agent.returncode == 0
        and len(starts) == 2
        and bool(result["resume_step"])
        and result["end_step"] == 24
        and "error" not in result
    )
    return result


def summary(results: list[dict]) -> dict:
    """Kills recovered, how many restarts the jobs used (restarts: jobs), seconds per trial (mean, max)."""
    seconds = [r["seconds"] for r in results]
    used: dict[int, int] = {}
    for r in results:
        used[r["restarts"]] = used.get(r["restarts"], 0) + 1
    return {
        "recovered": f"{sum(r['ok'] for r in results)} of {len(results)} kills",
        "restarts_used": {str(k): used[k] for k in sorted(used)},
        "seconds_mean": round(sum(seconds) / max(len(seconds), 1), 1),
        "seconds_max": max(seconds, default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per parallel mode")
    parser.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--notes", default="", help="what else ran on the machine meanwhile, recorded as given")
    parser.add_argument("--keep", type=Path, help="copy a failed trial's stdout and stderr into this folder")
    args = parser.parse_args()
    load_before = os.getloadavg()
    from fasttrain.preparation.preparation import prepare

    with tempfile.TemporaryDirectory(prefix="fasttrain-elastic-") as tmp:
        data = Path(tmp) / "data"
        prepare(["builtin:pydoc"], data, vocab_size=512, quiet=True)
        results = {}
        for parallel in args.parallel:
            results[parallel] = []
            for i in range(args.trials):
                found = trial(data, Path(tmp) / f"{parallel}-{i}", parallel, rank=i % 2)
                results[parallel].append(found)
                print(json.dumps({k: v for k, v in found.items() if k != "stderr_tail"}), flush=True)
                if not found["ok"]:
                    print(found["stderr_tail"], file=sys.stderr, flush=True)
                    if args.keep:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        for name in ("out", "err"):
                            shutil.copy(Path(tmp) / f"{parallel}-{i}" / name, args.keep / f"{parallel}-{i}.{name}")
        example = command(Path("DATA"), Path("OUT"), "PARALLEL", 0)
        report = {
            "command": " ".join(f"{k}={v}" for k, v in ENV.items())
            + " "
            + shlex.join(example[1:])
            .replace("-m torch.distributed.run", "torchrun")
            .replace("--master-port=0", "--master-port=FREE_PORT"),
            "summary": {p: summary(rs) for p, rs in results.items()},
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average_before": load_before,
                "load_average": os.getloadavg(),
            },
            "notes": args.notes,
            "trials": results,
        }
        import torch

        report["machine"]["torch"] = torch.__version__
    print(json.dumps(report["summary"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
