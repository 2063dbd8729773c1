"""What the studies share: the repository's root, the machine's load, the first keys of a results file, a results
file that later runs add to, and the corpora, each prepared once.

Imports benchmarks.conftest (the machine's description) and nothing of fasttrain.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

from benchmarks.conftest import environment

ROOT = Path(__file__).resolve().parents[2]
# The corpora `prepared` knows (recipe_sweep's, time_to_quality's and many_epochs' docstrings describe them): the
# builtin ones, and those of the running Python's standard library, the .py files of some packages or of all (()).
BUILTINS = {
    "pydoc": ["builtin:pydoc"],
    "docstrings": ["builtin:docstrings"],
    "prose": ["builtin:pydoc", "builtin:docstrings"],
}
SMALL_PACKAGES = ("asyncio", "email", "json", "http")
PACKAGES = {
    "large": (),
    "small": SMALL_PACKAGES,
    "code-small": SMALL_PACKAGES,
    "code-1m": (*SMALL_PACKAGES, "concurrent", "multiprocessing", "unittest", "xml", "logging", "importlib"),
}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def result_header(what: str, module: str, argv: Sequence[str] | None, today: str) -> dict:
    """The first keys of a study's results file: what it measured, when, at which commit, on which machine, and
    the command (`python -m module` with `argv`, default this process's arguments). The commit is the one checked out
    when it is written, "-dirty" after it where tracked files differ from it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    changed = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
    return {
        "what": what,
        "date": today,
        "commit": commit.stdout.strip() + ("-dirty" if changed.stdout.strip() else ""),
        "machine": environment(),
        "command": shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]),
    }


def add_runs(out: Path, runs: list[dict], what: str, module: str, argv: Sequence[str] | None, today: str) -> None:
    """Append `runs` to the results file `out` (made with result_header's keys first if it is not there yet), so a
    study run in parts, or cut short, keeps every part; a part whose date, commit or command is not the header's
    carries its own in each of its runs."""
    header = result_header(what, module, argv, today)
    result = json.loads(out.read_text()) if out.exists() else header | {"runs": []}
    own = {key: header[key] for key in ("date", "commit", "command") if result.get(key) != header[key]}
    result["runs"] += [run | own for run in runs]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def prepared_corpus(out: Path, inputs: Sequence[str] = (), files: Sequence[Path] = (), vocab: int = 4096) -> Path:
    """`out`, a folder of `inputs` (builtin:NAME or paths) or of `files` (a document each, written as JSONL beside
    `out` first) prepared at vocab `vocab`; prepared only if it is not there yet."""
    if (out / "meta.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if files:
        source = out.parent / f"{out.name}.jsonl"
        with open(source, "w") as f:
            for path in files:
                f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
        inputs = [str(source)]
    prepare = [sys.executable, "-m", "fasttrain.prepare", "--input", *inputs, "--out", str(out)]
    subprocess.run([*prepare, "--vocab-size", str(vocab)], check=True)
    return out


def prepared(corpus: str, cache: Path, vocab: int = 4096) -> Path:
    """The folder `corpus` (a key of BUILTINS or PACKAGES) is prepared in under `cache` at vocab `vocab`, prepared
    first if it is not there yet: the standard library's files as a document each (site-packages left out), "large"
    and "small" into stdlib-large and stdlib-small (what a lent GPU's .quality/ carries), the others into their own
    name; a vocabulary other than 4096 adds -vN to the folder's name."""
    suffix = "" if vocab == 4096 else f"-v{vocab}"
    if corpus in BUILTINS:
        return prepared_corpus(cache / f"{corpus}{suffix}", inputs=BUILTINS[corpus], vocab=vocab)
    lib = Path(sysconfig.get_paths()["stdlib"])
    roots = [lib / package for package in PACKAGES[corpus]] or [lib]
    files = sorted(p for root in roots for p in root.rglob("*.py") if "site-packages" not in p.parts)
    name = f"stdlib-{corpus}" if corpus in ("large", "small") else corpus
    return prepared_corpus(cache / f"{name}{suffix}", files=files, vocab=vocab)
