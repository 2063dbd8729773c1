"""How fast `fasttrain prepare` tokenizes a corpus, against the tokenizer libraries alone.

    python benchmarks/studies/prepare_speed.py [--rounds 5] [--mb 27.5] [--out benchmarks/results/data/cpu-prepare-speed-2026-11-24.json]

The corpus is like issue 47's: ~27.5 MB of JSONL, Python source documents cut from the CPython standard
library's .py files (cut at blank lines into documents of 2,000 characters or a little more). Two byte-level BPEs are learned from it
(4096 and 32768 tokens). For each, every round runs every case once, alternating, and the median of the
rounds is kept: `tokenizers`' encode_batch of all the documents (its own threads), tiktoken alone (the
Encoding prepare builds, on one thread and on every core), `prepare --tokenizer T` with 1 and with all
workers, and 2 parts run at once on this machine plus the merge. MB/s are of the JSONL file's bytes for
every case. prepare's cases run as subprocesses, each one's peak RSS taken by /usr/bin/time. The 100 GB
projection is the case's seconds per MB times 100,000, on this machine's cores; parts on M machines divide it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.studies.common import ROOT  # noqa: E402
from fasttrain.formats.tokenizer import Tokenizer  # noqa: E402
from fasttrain.preparation.encoder import fast_encoder  # noqa: E402


def make_corpus(path: Path, mb: float) -> int:
    """Python source documents into `path` (JSONL) until it holds `mb` MB; returns the number of documents."""
    root = Path(sysconfig.get_paths()["stdlib"])
    budget, count = int(mb * 1e6), 0
    with open(path, "w") as f:
        for source in sorted(root.rglob("*.py")):
            if "site-packages" in source.parts:
                continue
            text = source.read_text(errors="replace")
            chunk = ""
            for block in text.split("\n\n"):  # at blank lines
                chunk += block + "\n\n"
                if len(chunk) >= 2000:
                    line = json.dumps({"text": chunk}) + "\n"
                    if f.tell() + len(line.encode()) > budget:
                        return count
                    f.write(line)
                    count, chunk = count + 1, ""
            if chunk.strip():
                f.write(json.dumps({"text": chunk}) + "\n")
                count += 1
    return count


def spawn(args: list[str], rss_file: Path) -> subprocess.Popen:
    """`args` under /usr/bin/time, which writes its peak RSS (KB) into `rss_file`. Not wait4's own figure:
    Linux carries the spawning process's high-water mark across exec, and this process holds the corpus."""
    return subprocess.Popen(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def finish(proc: subprocess.Popen, rss_file: Path) -> int:
    """Wait for `proc`; its peak RSS in MB."""
    if proc.wait() != 0:
        raise SystemExit(f"failed: {' '.join(map(str, proc.args))}")
    return int(rss_file.read_text().split()[-1]) // 1024


def run_measured(args: list[str], rss_file: Path) -> tuple[float, int]:
    """(seconds, peak RSS in MB) of a command."""
    start = time.perf_counter()
    rss = finish(spawn(args, rss_file), rss_file)
    return time.perf_counter() - start, rss


def prepare_args(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fasttrain.prepare",
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--tokenizer",
        str(tokenizer),
        *extra,
    ]


def parts_case(corpus: Path, tokenizer: Path, out: Path) -> tuple[float, int]:
    """2 parts at once (one worker each) and the merge: wall seconds from the first start to the merge's end,
    and the largest peak RSS of the three."""
    start = time.perf_counter()
    rss_files = [out.parent / f"rss-part-{k}" for k in range(2)]
    procs = [
        spawn(prepare_args(corpus, tokenizer, out, "--part", f"{k}/2", "--workers", "1"), rss_files[k])
        for k in range(2)
    ]
    rss = max(finish(p, f) for p, f in zip(procs, rss_files))
    _, merge_rss = run_measured(
        [sys.executable, "-m", "fasttrain.prepare", "--out", str(out), "--merge"], out.parent / "rss-merge"
    )
    return time.perf_counter() - start, max(rss, merge_rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=float, default=27.5)
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/data/cpu-prepare-speed-2026-11-24.json"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="prepare-speed-"))
    try:
        corpus = work / "corpus.jsonl"
        documents = make_corpus(corpus, args.mb)
        mb = corpus.stat().st_size / 1e6
        texts = [json.loads(line)["text"] for line in open(corpus)]
        results = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "corpus": {
                "what": "CPython standard library .py files cut at blank lines into documents of >= 2,000 characters, as JSONL",
                "documents": documents,
                "jsonl_mb": round(mb, 2),
            },
            "cores": cores,
            "rounds": args.rounds,
            "load_average_before": os.getloadavg(),
            "python": platform.python_version(),
            "vocabularies": {},
        }
        for vocab in args.vocab:
            tok = Tokenizer.train(texts[::3], vocab)  # learning is not measured
            tokenizer = work / f"tokenizer-{vocab}.json"
            tok.save(tokenizer)
            fast = fast_encoder(tok.tok)
            batches = [texts[i : i + 200] for i in range(0, len(texts), 200)]

            def tiktoken_alone(threads: int) -> float:
                start = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(fast, batches))
                return time.perf_counter() - start

            def tokenizers_alone() -> float:
                start = time.perf_counter()
                tok.tok.encode_batch(texts, add_special_tokens=False)
                return time.perf_counter() - start

            def prepare(workers: int) -> tuple[float, int]:
                out = work / f"out-{vocab}-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                return run_measured(prepare_args(corpus, tokenizer, out, "--workers", str(workers)), work / "rss")

            def parts() -> tuple[float, int]:
                out = work / f"parts-{vocab}"
                shutil.rmtree(out, ignore_errors=True)
                return parts_case(corpus, tokenizer, out)

            cases = {
                "tokenizers encode_batch alone": lambda: (tokenizers_alone(), None),
                "tiktoken alone, 1 thread": lambda: (tiktoken_alone(1), None),
                f"tiktoken alone, {cores} threads": lambda: (tiktoken_alone(cores), None),
                "prepare --workers 1": lambda: prepare(1),
                f"prepare --workers {cores}": lambda: prepare(cores),
                "2 parts at once (--workers 1 each) + merge": parts,
            }
            runs: dict[str, list] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, case in cases.items():
                    runs[name].append(case())
            table = {}
            for name, measured in runs.items():
                seconds = statistics.median(s for s, _ in measured)
                rss = [r for _, r in measured if r is not None]
                table[name] = {
                    "seconds": [round(s, 3) for s, _ in measured],
                    "median_s": round(seconds, 3),
                    "mb_per_s": round(mb / seconds, 1),
                    "peak_rss_mb": max(rss) if rss else None,
                    "hours_for_100_gb": round(seconds / mb * 1e5 / 3600, 2),
                }
            base = table["tokenizers encode_batch alone"]["median_s"]
            for row in table.values():
                row["x_tokenizers_encode_batch"] = round(base / row["median_s"], 2)
            results["vocabularies"][str(vocab)] = table
            print(
                json.dumps(
                    {
                        vocab: {
                            k: (v["mb_per_s"], v["x_tokenizers_encode_batch"], v["peak_rss_mb"])
                            for k, v in table.items()
                        }
                    },
                    indent=1,
                )
            )
        results["load_average_after"] = os.getloadavg()
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
