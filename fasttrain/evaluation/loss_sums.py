"""A batch's next-token loss as sums that add up across micro-batches, batches and ranks (`LossSums`), and
perplexity, what a mean of them reads as: what the training step and validation both count in.

Imports from fasttrain: nothing.

The objective (fasttrain/optimization/objective.py) returns these sums, never a mean; the step adds an update's
micro-batches' sums and divides once by its counted targets, validation a split's (validation.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LossSums(NamedTuple):
    """A batch's next-token loss as sums over its counted targets (every target but IGNORE_INDEX)."""

    loss: torch.Tensor  # summed cross-entropy, a scalar (fp32 under autocast) that carries the gradient
    correct: torch.Tensor  # top-1 hits: counted targets whose logit is the largest of their row (ties count)
    counted: torch.Tensor  # targets counted, as an fp32 scalar

    def detached(self) -> torch.Tensor:
        """[loss, correct, counted] as one fp32 tensor (3,) without gradient: to add up, and reduce over ranks."""
        return torch.stack([self.loss.detach().float(), self.correct, self.counted])


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverged run logs a large number rather than inf."""
    return math.exp(min(loss, 50.0))
