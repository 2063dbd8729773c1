"""What checkpoint checksums cost on the CPU, next to the save and the load they guard.

    python -m benchmarks.studies.checkpoint_checksum --out benchmarks/results/checkpoints/cpu-checkpoint-checksum-DATE.json

A checkpoint's tensors (a model's weights and AdamW's two moments, fp32) for a ~150M-parameter model (gpt-350m's
width, 12 layers, vocabulary 4096) and the base config's, each saved in one process as a file and as a sharded
folder, each timing `--repeats` times (min and median recorded):

- file: the save as today (torch.save, which computes each record's CRC-32 as it writes, fsync'd and renamed)
  and with torch's CRC-32 turned off (what those checksums already cost today); the check (`check_records`);
  torch.load.
- sharded: DCP's write; the checksums a save adds (`of_folder`: the files read back, from the page cache, on
  rank 0; a synchronous save waits for them, an async save does not); an async save's return (what blocks the
  run) and its end, with and without them; the check (`verify`) and DCP's read of every tensor.
- a load from the page cache (a resume right after the save) and a cold one (the files' pages dropped first,
  posix_fadvise DONTNEED, as a resume on a fresh machine reads them): the check and the load together against
  the load alone; a cold check reads the files from disk, the load after it from the cache.
- zlib.crc32, hashlib.blake2b and hashlib.sha256 over the largest file's bytes in memory: why CRC-32.

The machine's load average is recorded beside the figures: on a shared machine they are rough.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from fasttrain.checkpoints import checksums, sharded_files
from fasttrain.config import ModelConfig
from fasttrain.model.transformer import Transformer
from fasttrain.system.atomic import write_atomically

SHAPES = {
    "~150M (d_model 1024, 12 layers)": ModelConfig(
        vocab_size=4096, max_seq_len=256, d_model=1024, n_layers=12, n_heads=16
    ),
    "base (configs/base.toml)": ModelConfig(vocab_size=4096, max_seq_len=256, d_model=192, n_layers=4, n_heads=4),
}


def timed(work: Callable[[], object], repeats: int, before: Callable[[], object] = lambda: None) -> dict:
    """`work` run `repeats` times, `before` (not timed) ahead of each: the seconds of each, their min and median."""
    runs = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        work()
        runs.append(time.perf_counter() - start)
    return {
        "min_s": round(min(runs), 3),
        "median_s": round(statistics.median(runs), 3),
        "runs_s": [round(r, 3) for r in runs],
    }


def drop_cache(*paths: Path) -> None:
    """Evict the files under `paths` from the page cache (written and fsync'd: their pages are clean), so the next
    read comes from the disk."""
    os.sync()
    for path in paths:
        for file in [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@contextlib.contextmanager
def torch_crc32(on: bool) -> Iterator[None]:
    """torch.save with (its default) or without the CRC-32 of each record."""
    torch.serialization.set_crc32_options(on)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(True)


def state_of(cfg: ModelConfig) -> tuple[dict, int]:
    """A checkpoint's tensors for a model of `cfg`: its weights and AdamW's two moments; and its parameter count."""
    model = Transformer(cfg)
    weights = model.state_dict()
    moments = {name: {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)} for name, p in weights.items()}
    return {"model": weights, "optimizer": {"state": moments}}, sum(p.numel() for p in model.parameters())


def measure_file(state: dict, file: Path, repeats: int) -> dict:
    def save() -> None:
        write_atomically(file, lambda f: torch.save(state, f))

    with torch_crc32(False):
        without = timed(save, repeats)
    out = {
        "save (today: torch's CRC-32 of each record)": timed(save, repeats),
        "save with torch's CRC-32 turned off": without,
        "bytes": file.stat().st_size,
    }

    def load() -> None:
        torch.load(file, weights_only=True)

    def check_and_load() -> None:
        checksums.check_records(file)
        load()

    out["check (check_records), cached"] = timed(lambda: checksums.check_records(file), repeats)
    out["load (torch.load), cached"] = timed(load, repeats)
    out["load, cold"] = timed(load, repeats, lambda: drop_cache(file))
    out["check + load, cold"] = timed(check_and_load, repeats, lambda: drop_cache(file))
    return out


def measure_sharded(state: dict, folder: Path, repeats: int) -> dict:
    def clear() -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def write_async(checksum: bool) -> dict:
        """An async save's time to return (what blocks the run) and to be done, min and median."""
        returns, done = [], []
        for _ in range(repeats):
            clear()
            start = time.perf_counter()
            future = sharded_files.write_async(folder, state, checksum=checksum)
            returns.append(time.perf_counter() - start)
            future.result()
            done.append(time.perf_counter() - start)
        return {
            "returns": {"min_s": round(min(returns), 3), "median_s": round(statistics.median(returns), 3)},
            "done": {"min_s": round(min(done), 3), "median_s": round(statistics.median(done), 3)},
        }

    sharded_files.write_async(folder, state).result()  # untimed: the first async save starts DCP's machinery
    out = {
        "write (DCP)": timed(lambda: sharded_files.write(folder, state), repeats, clear),
        "checksums at save (of_folder), cached": timed(lambda: checksums.of_folder(folder), repeats),
        "async save without checksums": write_async(False),
        "async save with checksums": write_async(True),
        "bytes": sum(f.stat().st_size for f in folder.iterdir()),
    }
    sums = checksums.of_folder(folder)  # the last write's: each save's .metadata differs (DCP's save id)

    def read() -> None:
        sharded_files.read_whole(folder, "model", folder)
        sharded_files.read_whole(folder, "optimizer", folder)

    def check_and_read() -> None:
        checksums.verify(folder, sums)
        read()

    out["check (verify), cached"] = timed(lambda: checksums.verify(folder, sums), repeats)
    out["read (DCP, every tensor), cached"] = timed(read, repeats)
    out["read, cold"] = timed(read, repeats, lambda: drop_cache(folder))
    out["check + read, cold"] = timed(check_and_read, repeats, lambda: drop_cache(folder))
    return out


def hash_rates(file: Path) -> dict[str, float]:
    """GiB/s of each checksum over `file`'s bytes in memory (16 MiB pieces, as checksums.crc32 reads), best of 3."""
    data = memoryview(file.read_bytes())
    pieces = [data[i : i + checksums.PIECE] for i in range(0, len(data), checksums.PIECE)]

    def crc() -> None:
        value = 0
        for piece in pieces:
            value = zlib.crc32(piece, value)

    def digest(name: str) -> Callable[[], None]:
        def run() -> None:
            h = hashlib.new(name)
            for piece in pieces:
                h.update(piece)
            h.digest()

        return run

    gib = len(data) / 2**30
    return {
        name: round(gib / timed(work, 3)["min_s"], 2)
        for name, work in (
            ("zlib.crc32", crc),
            ("hashlib.blake2b", digest("blake2b")),
            ("hashlib.sha256", digest("sha256")),
        )
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the checkpoints are written (default: a temporary directory)"
    )
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    results = {
        "what": " ".join(__doc__.split("\n\n", 2)[2].split()),
        "command": " ".join(["python -m benchmarks.studies.checkpoint_checksum", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "zlib": zlib.ZLIB_RUNTIME_VERSION,
            "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "shapes": {},
    }
    torch.manual_seed(0)
    for name, cfg in SHAPES.items():
        state, params = state_of(cfg)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            file, folder = Path(tmp) / "step_0000001.pt", Path(tmp) / "step_0000001"
            shape = {
                "params": params,
                "file": measure_file(state, file, args.repeats),
                "sharded": measure_sharded(state, folder, args.repeats),
            }
            shape["checksum GiB/s (in memory)"] = hash_rates(
                max(folder.glob("*.distcp"), key=lambda f: f.stat().st_size)
            )
        results["shapes"][name] = shape
        del state
        print(name, json.dumps(shape), flush=True)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
