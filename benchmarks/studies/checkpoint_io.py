"""Checkpoint save and resume cost on the CPU: the gathered file against the sharded folder, under torchrun.

    python -m benchmarks.studies.checkpoint_io --out benchmarks/results/checkpoints/cpu-checkpoint-DATE.json

starts every measurement itself: `torchrun --nproc_per_node=2` trains a few FSDP steps of a ~150M-parameter
model (gpt-350m's width, 12 layers by default, on the embedded corpus) and saves once in each format, timing the save
(the step it blocks: nothing trains during a synchronous save) and sampling every rank's resident memory
every 5 ms during it; an async save is timed until it returns (what blocks the run), a step is run while it
writes, and the whole until it is published; then the sharded checkpoint is resumed on 1, 2 and 3 processes, timing the restore.
The machine's load average is recorded beside the figures: on a shared machine they are rough.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.studies.common import ROOT

MODEL = [
    "train.max_time=0",
    "optim.name=adamw",  # the AdamW run measured before configs/base.toml took Muon (2026-11-25)
    "model.d_model=1024",
    "train.tokens_per_update=0",
    "model.n_heads=16",
    "model.max_seq_len=128",
    "train.seq_len=128",
    "train.batch_size=1",
    "train.device=cpu",
    'train.precision="fp32"',
    "data.prefetch=0",
    "train.sample_tokens=0",
    "train.tensorboard=false",
    "train.compile=false",
    "data.vocab_size=512",
    "train.eval_steps=1",
    "train.eval_interval=1000",
    "checkpoint.interval=1000",
    "train.log_interval=1",
]


def resident() -> int:
    """This process's resident memory, bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The highest resident memory seen, sampled every 5 ms on a thread, while the `with` block runs."""

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = resident()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, resident())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident())


def timed_step(trainer) -> float:
    """Seconds of one training step."""
    start = time.perf_counter()
    trainer.step()
    return time.perf_counter() - start


def worker(mode: str, out_dir: str, data_dir: str, result: str, layers: str) -> None:
    """One rank: train and save in each format ("save"), or resume the latest save ("resume")."""
    from fasttrain.compute import distributed
    from fasttrain.config import load_config
    from fasttrain.training.trainer import Trainer

    cfg = load_config(
        "configs/base.toml",
        [
            *MODEL,
            f"model.n_layers={layers}",
            f'data.dir="{data_dir}"',
            f'train.out_dir="{out_dir}"',
            'data.inputs=["builtin:pydoc"]',
            'train.parallel="fsdp"',
            "train.max_steps=10",
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    rows = {"rank": trainer.world.rank, "world": trainer.world.size}
    if mode == "save":
        for _ in range(2):
            trainer.step()
        # The saves are at step 3 (6 batches over 2 ranks: a position 1, 2 and 3 processes all continue from),
        # each replacing the one before; this step has no save under way, for comparison.
        rows["step_s"] = round(timed_step(trainer), 3)
        for name, sharded in (("file", False), ("sharded", True)):
            trainer.checkpoints.sharded = sharded
            distributed.barrier(trainer.world)
            with PeakMemory() as memory:
                start = time.perf_counter()
                trainer.checkpoints.save(trainer.run, trainer.train_loader)
                seconds = time.perf_counter() - start
            rows[name] = {
                "save_s": round(seconds, 3),
                "step_blocked_s": round(seconds, 3),
                "peak_rss_gb": round(memory.peak / 2**30, 3),
                "rss_growth_gb": round((memory.peak - memory.before) / 2**30, 3),
            }
        # Async: the save returns after the copy to CPU memory; a step runs while the write goes on.
        checkpoints = trainer.checkpoints
        checkpoints.background, checkpoints.write_group = True, distributed.new_group(trainer.world)
        distributed.barrier(trainer.world)
        with PeakMemory() as memory:
            start = time.perf_counter()
            checkpoints.save(trainer.run, trainer.train_loader)
            blocked = time.perf_counter() - start
            step = timed_step(trainer)
            checkpoints.wait()
            seconds = time.perf_counter() - start
        rows["async"] = {
            "save_s": round(seconds, 3),
            "step_blocked_s": round(blocked, 3),
            "step_during_write_s": round(step, 3),
            "peak_rss_gb": round(memory.peak / 2**30, 3),
            "rss_growth_gb": round((memory.peak - memory.before) / 2**30, 3),
        }
        rows["params"] = trainer.model.num_params()
    else:
        distributed.barrier(trainer.world)
        start = time.perf_counter()
        trainer.resume("auto")
        rows["resume_s"] = round(time.perf_counter() - start, 3)
    every = distributed.gather(rows, trainer.world)
    if trainer.world.is_main:
        with open(result, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in every)
    trainer.close()
    distributed.barrier(trainer.world)
    distributed.stop()


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "benchmarks.studies.checkpoint_io",
        "--worker",
        *args,
    ]
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the JSON file to write (required unless --worker)")
    parser.add_argument("--layers", type=int, default=12, help="model.n_layers (12: about 150M parameters)")
    parser.add_argument("--worker", nargs=5, metavar=("MODE", "OUT_DIR", "DATA_DIR", "RESULT", "LAYERS"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from fasttrain.preparation.preparation import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data, run, result = f"{tmp}/data", f"{tmp}/run", f"{tmp}/rows.jsonl"
        prepare(["builtin:pydoc"], data, vocab_size=512, quiet=True)
        load_before = os.getloadavg()
        torchrun(2, "save", run, data, result, str(args.layers))
        for nproc in (1, 2, 3):
            torchrun(nproc, "resume", run, data, result, str(args.layers))
        rows = [json.loads(line) for line in Path(result).read_text().splitlines()]
        sizes = {
            p.name: sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
            for p in Path(run, "checkpoints").glob("step_*")
        }
    report = {
        "what": "checkpoint save (2 processes, fsdp, CPU, gloo): gathered file, sharded folder, async sharded; and "
        "resume of the last (sharded) save on 1, 2 and 3 processes; one save each, so rough",
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "command": f"python -m benchmarks.studies.checkpoint_io --out {args.out} --layers {args.layers}",
        "model": [*MODEL, f"model.n_layers={args.layers}"],
        "checkpoint_bytes": sizes,
        "saves": [r for r in rows if "file" in r],
        "resumes": [r for r in rows if "resume_s" in r],
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
