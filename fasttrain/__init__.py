"""fasttrain: a compact, performance-first trainer for transformer language models."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Trainer", "train_loop"]


def __getattr__(name: str):
    # Imported on first use, so `python -m fasttrain.prepare` and friends do not pay for the trainer.
    if name == "Trainer":
        from fasttrain.training.trainer import Trainer
        return Trainer
    if name == "train_loop":
        from fasttrain.training.plain_loop import train_loop
        return train_loop
    raise AttributeError(f"module 'fasttrain' has no attribute {name!r}")
