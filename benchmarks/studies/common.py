"""What the studies share: the repository's root, the machine's load, and the first keys of a results file.

Imports benchmarks.conftest (the machine's description) and nothing of fasttrain.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from benchmarks.conftest import environment

ROOT = Path(__file__).resolve().parents[2]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def result_header(what: str, module: str, argv: Sequence[str] | None, today: str) -> dict:
    """The first keys of a study's results file: what it measured, when, at which commit, on which machine, and
    the command (`python -m module` with `argv`, default this process's arguments)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "what": what,
        "date": today,
        "commit": commit.stdout.strip(),
        "machine": environment(),
        "command": shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]),
    }
