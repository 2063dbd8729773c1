"""fasttrain: a compact, performance-first trainer for transformer language models.

Imports from fasttrain: training.plain_loop, training.trainer.

The commands, in reading order: train (a run from a TOML config), prepare (a corpus into token shards), sample,
evaluate, export (a trained run's weights), init (a shipped config to edit), doctor (why a loss does not go down),
plot (a run's curves), lm_eval (lm-eval's command line with fasttrain's model), cli and __main__ (all of them
under the one `fasttrain` command). Below them, lowest first: system, config, data and preparation, model, then
training, checkpoints and evaluation; a module imports its own layer and those below (tests/test_layout.py).
docs/architecture.md has the tour.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["Trainer", "train_loop"]


def _check_kernels_package() -> None:
    """ImportError (one line) unless `import fasttrain_kernels` finds the kernels beside this fasttrain.

    The kernels ship as `fasttrain_kernels`, a name this project owns, so Hugging Face's `kernels` package
    installs beside it. What can still go wrong is two fasttrains: a clone on PYTHONPATH while an older wheel's
    fasttrain_kernels comes first, and the trainer would run on kernels of another version. This only looks at
    files, it imports nothing.
    """
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
