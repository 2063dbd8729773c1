"""The scale of final/'s output layer, fitted on the validation rows: a temperature folded into the weights.

Imports from fasttrain: model.ensemble.

A model that read a small corpus several times is overconfident on new text: its probabilities are sharper than its
errors deserve. Dividing its logits by a temperature T > 1 (Guo et al. 2017) lowers its validation loss with one
number, and multiplying the output layer's weight by 1 / T does the same inside the model, so final/ stays a plain
model that every export and runtime reads as it is. On 254K tokens of held-out code read four times (3 x 192) the
best T was 1.07-1.11, and fitted on one half of the validation split it lowered the other half's loss by 0.004-0.011
bits per byte (docs/performance.md, "The temperature of final/").

    scale, metrics = fit_head_scale(heads, evaluate, monitor, measured)

The fit asks the run's own evaluation (Trainer.evaluate: the eval rows, under any wrapper, world or mixture, every
rank alike) for the loss at scales s of the head, a parabola through three and the best of what was measured: at
most three evaluations beside the one the run has already made at s = 1, and never a scale that measured worse than
1. The scale multiplies the weight itself, so a logit soft-cap, a tied embedding or an ensemble's members (one scale
for all) are measured as they are, not assumed away.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from fasttrain.model.ensemble import transformers

STEP = 0.1  # the first scales tried beside 1: 0.9, then 0.8 (sharper: 1.1) where it helped
BOUNDS = (0.5, 2.0)  # the parabola's vertex is tried within these, never beyond


def output_weights(model: nn.Module) -> list[torch.Tensor]:
    """The output layer's weight of `model`, a Transformer or an Ensemble (each member's), each tensor once (a tied
    head is the embedding's)."""
    found: dict[int, torch.Tensor] = {}
    for member in transformers(model):
        found.setdefault(id(member.output.weight), member.output.weight)
    return list(found.values())


def vertex(points: Sequence[tuple[float, float]]) -> float | None:
    """The scale at the minimum of the parabola through three (scale, loss) points; None where it opens downward (or
    the points are on a line), so has no minimum."""
    (x0, y0), (x1, y1), (x2, y2) = points
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denominator
    return -b / (2 * a) if a > 0 else None


def fit_head_scale(
    heads: Sequence[torch.Tensor],
    evaluate: Callable[[], dict[str, float] | None],
    monitor: str,
    measured: dict[str, float],
) -> tuple[float, dict[str, float]]:
    """The scale of `heads` (output_weights: multiplied in place) whose evaluation (`evaluate()`, the run's metrics)
    has the lowest `monitor` loss, and those metrics; `measured` are the metrics at scale 1. The heads are left
    multiplied by the scale returned (1: as they were)."""
    originals = [h.detach().clone() for h in heads]
    tried: dict[float, dict[str, float]] = {1.0: measured}

    def scale_heads(scale: float) -> None:
        with torch.no_grad():
            for head, original in zip(heads, originals):
                head.copy_(original * scale)

    def at(scale: float) -> float:
        if scale not in tried:
            scale_heads(scale)
            metrics = evaluate()
            assert metrics is not None  # None only where something cuts it short, and nothing does
            tried[scale] = metrics
        return tried[scale][monitor]

    lower = at(1 - STEP) < at(1.0)
    third = 1 - 2 * STEP if lower else 1 + STEP
    at(third)
    best = vertex([(s, at(s)) for s in sorted(tried)])
    if best is not None:
        at(round(min(max(best, BOUNDS[0]), BOUNDS[1]), 2))  # finer buys nothing where the loss is flat
    scale = min(tried, key=lambda s: tried[s][monitor])
    scale_heads(scale)
    return scale, tried[scale]
