"""A machine's training speed as a model's size changes: what planning/sizing.py times and predicts from.

Imports from fasttrain: nothing.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Speed:
    """Training FLOP/s timed at the FLOPs per token of some shapes (`points`: (FLOPs per token, FLOP/s), ascending,
    one at least). Between two points, the power law through them; beyond the first or the last, the power law of
    the two nearest, its exponent held between 0 and 1 (a small model uses a machine less well, so the rate grows
    with the size, but not faster than it); one point: a rate that does not depend on the size."""

    points: tuple[tuple[float, float], ...]
    busy: str = ""  # "" or busy_note's words on the machine's load as it was timed: each plan at this speed says them

    def flops_per_s(self, flops: float) -> float:
        p = self.points
        if len(p) == 1:
            return p[0][1]
        i = min(max(bisect.bisect_left([f for f, _ in p], flops), 1), len(p) - 1)  # the pair around, or nearest
        (f1, r1), (f2, r2) = p[i - 1], p[i]
        exponent = math.log(r2 / r1) / math.log(f2 / f1)
        if flops < f1 or flops > f2:  # beyond the points timed: from the nearest, at a bounded exponent
            f1, r1 = (f1, r1) if flops < f1 else (f2, r2)
            exponent = min(1.0, max(0.0, exponent))
        return r1 * (flops / f1) ** exponent

    def tokens_per_s(self, flops: float) -> float:
        return self.flops_per_s(flops) / flops

    def scaled(self, factor: float) -> Speed:
        """This speed `factor` times faster at every size."""
        return replace(self, points=tuple((f, r * factor) for f, r in self.points))

    def timed(self, flops: float) -> bool:
        """Whether a shape of `flops` FLOPs per token is one of the points timed."""
        return any(math.isclose(f, flops) for f, _ in self.points)

    def merged(self, other: Speed) -> Speed:
        """The points of both (timed on the same machine; `self`'s where both timed a size), `self`'s note on the
        load."""
        return replace(self, points=tuple(sorted((dict(other.points) | dict(self.points)).items())))
