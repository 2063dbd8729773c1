"""fasttrain: a compact, performance-first trainer for transformer language models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
            "uninstall that one (pip uninstall kernels) and reinstall fasttrain")


_check_kernels_package()


def __getattr__(name: str):
    # Imported on first use, so `python -m fasttrain.prepare` and friends do not pay for the trainer.
    if name == "Trainer":
        from fasttrain.training.trainer import Trainer
        return Trainer
    if name == "train_loop":
        from fasttrain.training.plain_loop import train_loop
        return train_loop
    raise AttributeError(f"module 'fasttrain' has no attribute {name!r}")
