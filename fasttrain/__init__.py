"""fasttrain: a compact, performance-first trainer for transformer language models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["Trainer", "train_loop"]


def _check_kernels_package() -> None:
    """ImportError (one line) unless `import kernels` would find fasttrain's own kernels package.

    PyPI has another package named `kernels` (Hugging Face's kernel hub). Installed beside fasttrain it
    can come first on sys.path (an editable install) or overwrite our files (a wheel install); either
    way the trainer would import the wrong code. Ours is installed beside this package and holds
    rms_norm.py and linear_cross_entropy.py; this only looks at files, it imports nothing.
    """
    spec = importlib.util.find_spec("kernels")
    found = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    ours = Path(__file__).resolve().parent.parent / "kernels"
    if found != ours or not all((found / name).is_file() for name in ("rms_norm.py", "linear_cross_entropy.py")):
        raise ImportError(
            f"fasttrain needs its own `kernels` package ({ours}), but `import kernels` finds "
            f"{found or 'nothing'}: another package named `kernels` (Hugging Face's?) shadows or replaced it; "
            "uninstall that one (pip uninstall kernels) and reinstall fasttrain"
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
