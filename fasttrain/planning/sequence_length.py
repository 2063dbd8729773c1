"""The training context chosen for the run's planned tokens: `train.seq_len = 0`.

Imports from fasttrain: config, system.errors.

A longer context gives each token more text to be predicted from, but on few tokens a short one learns faster. Measured
at equal shape and tokens (2 x 128, configs/base.toml, the large held-out corpus read about once; docs/performance.md):
256 led 512 by 0.075 bits per byte at 4M tokens and by 0.007 / 0.011 (two seeds) at 6M; 512 led by about 0.03 at 8.5M,
level with nanochat's recipe (which trains at 512). So:

    seq_len     = LONG if planned tokens >= LONG_FROM and model.max_seq_len >= LONG, else min(SHORT, max_seq_len)
    batch_size  = train.batch_size x min(SHORT, max_seq_len) / seq_len rows

so a packed micro-batch's tokens, and with them the steps and the schedule, do not depend on the choice (rows of one
document each, "padded" or "aligned", stay short). The planned tokens are the plan's: train.max_steps x a step's tokens,
or what train.max_time gives at the speed the shape was timed at (sizing.py), whichever is fewer; a time
budget with no speed takes the short context. model.max_seq_len becomes the context chosen (unless it is
model.init_from's), so generation, lm-eval and an export use only trained positions. A resumed or replayed run keeps its
recorded context (recorded_context). The crossover was measured at one shape on one corpus; nothing here scales it with
the model.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fasttrain.config import Config, ModelConfig, TrainConfig
from fasttrain.system.errors import UsageError

SHORT = 256  # tokens: train.batch_size's rows are of this many with train.seq_len = 0 (fewer if max_seq_len is)
LONG = 512
LONG_FROM = 7e6  # planned training tokens from which LONG trains better (between 6M and 8.5M, measured)


def contexts(batch_size: int, seq_len: int, max_seq_len: int = LONG) -> list[tuple[int, int]]:
    """The (seq_len, rows) a packed run of train.batch_size `batch_size` and train.seq_len `seq_len` may train
    at: its own, or with seq_len 0 the short context and, where the rows halve evenly, the long one."""
    if seq_len:
        return [(seq_len, batch_size)]
    short = min(SHORT, max_seq_len)
    long = [(LONG, batch_size * short // LONG)] if max_seq_len >= LONG and batch_size * short % LONG == 0 else []
    return [(short, batch_size), *long]


def short_context(t: TrainConfig, m: ModelConfig) -> TrainConfig:
    """`t` (train.seq_len = 0) at the short context: the geometry a run plans and sizes its model at before its
    tokens are known."""
    return replace(t, seq_len=contexts(t.batch_size, 0, m.max_seq_len)[0][0])


def choose_context(t: TrainConfig, m: ModelConfig, batching: str, tokens: float) -> tuple[TrainConfig, str]:
    """`t` (at short_context) at the context for `tokens` training tokens planned at it (math.inf: not known),
    `m` the model's config and `batching` data.batching, and the plan's note saying why."""
    short, usual = t.seq_len, f"{LONG} trains better from ~{LONG_FROM / 1e6:g}M tokens"
    if math.isinf(tokens):
        return t, (
            f"train.seq_len = 0: {short}, as a train.max_time run whose speed was not timed (a set model shape, or "
            f"a timing that failed) does not know its tokens ({usual}: for a run that long set train.seq_len = "
            f"{LONG} and halve train.batch_size)"
        )
    planned = f"the ~{tokens / 1e6:.2f}M training tokens planned at {short}"
    if tokens < LONG_FROM:
        return t, f"train.seq_len = 0: {short} for {planned} ({usual})"
    if batching != "packed":
        return t, (
            f"train.seq_len = 0: {short} for {planned}, as data.batching = {batching!r} rows hold a document each "
            f"and half as many would halve a step's documents ({usual} of packed rows)"
        )
    if m.max_seq_len < LONG:
        return t, (
            f"train.seq_len = 0: {short} for {planned}, as model.max_seq_len = {m.max_seq_len} allows no longer "
            f"context ({usual})"
        )
    geometries = contexts(t.batch_size, 0, m.max_seq_len)
    if len(geometries) == 1:
        return t, (
            f"train.seq_len = 0: {short} for {planned}, as train.batch_size = {t.batch_size} rows of {short} tokens "
            f"are no whole number of {LONG}-token rows ({usual})"
        )
    rows = geometries[1][1]
    return replace(t, seq_len=LONG, batch_size=rows), (
        f"train.seq_len = 0: {LONG}, in batches of {rows} rows (train.batch_size = {t.batch_size} rows of {short} "
        f"tokens), for {planned} ({usual}, {short} below)"
    )


def trained_context(m: ModelConfig, t: TrainConfig) -> ModelConfig:
    """`m` whose max_seq_len is the context `t` trains at (train.seq_len was 0), unless `m` is model.init_from's
    (a Llama trained on positions beyond it keeps them)."""
    return m if m.init_from else replace(m, max_seq_len=t.seq_len)


def recorded_context(t: TrainConfig, recorded: Config, where: str) -> tuple[TrainConfig, str]:
    """`t` (train.seq_len = 0) at the context and rows a resumed or replayed run recorded (`recorded`, from the
    file `where`), and the note saying so: another budget or batch must not change them part way through a run."""
    r = recorded.train
    if not r.seq_len:
        raise UsageError(
            f"{where}: train.seq_len = 0, but a run's config records the context it trained (above 0); put back the "
            "value the run was started with"
        )
    return replace(t, seq_len=r.seq_len, batch_size=r.batch_size), (
        f"train.seq_len = 0: the run's context, {r.seq_len} in batches of {r.batch_size} rows, as {where} records it"
    )
