"""fasttrain: a compact, performance-first trainer for transformer language models.

Imports from fasttrain: training.plain_loop, training.trainer.

The commands, in reading order: train (a run from a TOML config, a distilled run's phases included), prepare (a
corpus into token shards), sample, evaluate, export (a trained run's weights), configs (the shipped configs listed),
init (one to edit), doctor (why a loss does not go down), plot (a run's curves), lm_eval (lm-eval's command line with
fasttrain's model), cli and __main__ (all of them under the one `fasttrain` command). Below them, one folder a
floor, lowest first: system, config, compute, formats, preparation, data, model, checkpoints, evaluation,
optimization, planning, training (the doctor's checks among them); a module imports its own folder and those below,
never one above (tests/test_layout.py). docs/architecture.md has the tour.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["Trainer", "train_loop"]


def _check_kernels_package() -> None:
    """ImportError (one line) unless `import fasttrain_kernels` finds the kernels beside this fasttrain, not another
    fasttrain's (a clone on PYTHONPATH, an older wheel); looks at files, importing nothing."""
    spec = importlib.util.find_spec("fasttrain_kernels")
    found = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    ours = Path(__file__).resolve().parent.parent / "fasttrain_kernels"
    if found != ours:
        raise ImportError(
            f"fasttrain needs the fasttrain_kernels beside it ({ours}), but `import fasttrain_kernels` finds "
            f"{found or 'nothing'}: another fasttrain's comes first on the path; uninstall one of them"
        )


def _started_as_command() -> bool:
    """Whether this process is a fasttrain command being started: `python -m fasttrain[.TOOL]` (while it finds
    the module to run, Python sets sys.argv[0] to "-m" and imports this package) or the `fasttrain` script."""
    return sys.argv[0] == "-m" or Path(sys.argv[0]).stem == "fasttrain"


# A command's OpenMP threads spin at most this many times before they sleep (GOMP_SPINCOUNT, which libgomp reads
# when torch loads it, so it is set before anything imports torch). By default a thread that finishes its share
# of a parallel region spins on, and beside another busy process on the same cores those spinning threads take
# the time slices the working ones need: a 2 x 128 step took 2.2-5.4x as long (issue 64 saw 10-20x) where its
# share of the CPU gives 2x. Bounded, it took 2.0x, and no longer on a quiet machine (benchmarks/studies/busy_machine.py at ecc6e19,
# results/cpu-step/cpu-busy-machine-2026-11-25.json; OMP_WAIT_POLICY=PASSIVE took 1.5x beside it but 10% longer quiet).
# A GOMP_SPINCOUNT or OMP_WAIT_POLICY the user set is theirs; `import fasttrain` in a program changes nothing.
OPENMP_SPIN_COUNT = "10000"


def _bound_openmp_spin() -> None:
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


if _started_as_command():
    _bound_openmp_spin()

try:
    _check_kernels_package()
except ImportError as e:
    if not _started_as_command():
        raise  # `import fasttrain` from Python: the caller sees an ImportError
    print(f"error: {e}", file=sys.stderr)  # a command says it in one line and exits 2, as on any bad input
    sys.exit(2)


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m fasttrain.prepare` and friends do not pay for the trainer.
    if name == "Trainer":
        from fasttrain.training.trainer import Trainer

        return Trainer
    if name == "train_loop":
        from fasttrain.training.plain_loop import train_loop

        return train_loop
    raise AttributeError(f"module 'fasttrain' has no attribute {name!r}")
