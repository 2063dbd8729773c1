"""The tokens an update trains on, chosen for a time budget's planned tokens: train.batch_size's rows grown.

Imports from fasttrain: config.

An update of more tokens averages its gradient over more text, so each update goes further, but there are fewer of
them: a run of few tokens needs the updates more than their precision, a long one the other way round (and on a CPU
fewer, larger matmuls run faster too). Measured at the context chosen (sequence_length.py) on configs/base.toml's
rates (docs/performance.md): 16K tokens an update lost to 4K by 0.32 / 0.41 bits per byte at 60 s (0.38-0.52M
tokens, 23-32 updates); at 30 minutes on the large held-out corpus it won by 0.053 at 3 x 192 (0.9649 against
1.0177: 755 updates of 16K, 12.4M tokens) and by 0.054 at 2 x 128 (1,557 updates). On the main job 8K won at 30
minutes (1.1249 against 1.1507: 791 updates) and lost at 10 (1.2751 against 1.2517: 579 updates). So:

    growth      = the largest of 1, 2, ..., MOST_GROWTH whose updates, planned tokens / (growth x a step's tokens),
                  are at least MIN_UPDATES
    batch_size  = train.batch_size x growth rows

for a train.max_time run with train.seq_len = 0 whose tokens are known (a speed timed) and which sets no
train.max_steps (a run of steps keeps the tokens of its steps) and no train.tokens_per_update (an update's size set
is kept). The learning rates are not scaled: the measurements above kept base.toml's. The warmup and the schedule
count updates, so they span more tokens. A resumed or replayed run keeps the rows it recorded
(sequence_length.recorded_context).
"""

from __future__ import annotations

import math
from dataclasses import replace

from fasttrain.config import TrainConfig

MIN_UPDATES = 700  # the fewest updates a grown batch leaves (measured above)
MOST_GROWTH = 4  # 16K tokens an update at base.toml's 4K: nothing larger was measured


def update_tokens(t: TrainConfig, accumulation: int, world_size: int) -> int:
    """Token slots an optimizer update of `t` (train.seq_len chosen) trains on over all ranks, pads included:
    `accumulation` micro-batches of train.batch_size rows of train.seq_len on each of `world_size` ranks."""
    return accumulation * t.batch_size * t.seq_len * world_size


def growth(tokens: float, tokens_per_step: int) -> int:
    """The power of two, 1 to MOST_GROWTH, that train.batch_size's rows are multiplied by for `tokens` planned
    training tokens at `tokens_per_step` (math.inf: not known, 1)."""
    if math.isinf(tokens):
        return 1
    g = 1
    while g * 2 <= MOST_GROWTH and tokens / (g * 2 * tokens_per_step) >= MIN_UPDATES:
        g *= 2
    return g


def choose_batch(t: TrainConfig, tokens_per_step: int, tokens: float) -> tuple[TrainConfig, str]:
    """`t` (its context chosen, train.seq_len = 0) with train.batch_size grown for `tokens` training tokens planned
    at `tokens_per_step` a step (math.inf: not known), and the plan's note saying why ("" where it stays and no
    setting stopped it)."""
    g = growth(tokens, tokens_per_step)
    if g == 1 or not t.max_time:
        return t, ""
    rows = t.batch_size * g
    grown = f"{g}x the tokens an update ({tokens_per_step * g:,}) leaves {tokens / (tokens_per_step * g):,.0f} updates"
    usual = (
        f"for the ~{tokens / 1e6:.2f}M training tokens planned (larger updates train better where {MIN_UPDATES} remain)"
    )
    if t.max_steps:
        return t, f"train.batch_size: {t.batch_size} rows kept, as train.max_steps is set; {grown} {usual}"
    if t.tokens_per_update:
        return t, f"train.batch_size: {t.batch_size} rows kept, as train.tokens_per_update is set; {grown} {usual}"
    note = f"train.batch_size: {t.batch_size} -> {rows} rows of {t.seq_len} tokens, as {grown} {usual}"
    return replace(t, batch_size=rows), note
