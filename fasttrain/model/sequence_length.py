"""The training context chosen for the run's planned tokens: `train.seq_len = 0`.

Imports from fasttrain: config, system.errors.

A longer context gives each predicted token more text to be predicted from, but on few tokens a short one
learns faster. Measured at equal shape and tokens (2 x 128, configs/base.toml, the large held-out corpus read
about once; docs/performance.md): context 256 led 512 by 0.075 bits per byte at 4M tokens and by 0.007 / 0.011
(two seeds) at 6M; 512 led by about 0.03 at 8.5M, where it brought the recipe level with nanochat's (which
trains at 512). So a run trains at SHORT tokens until it plans LONG_FROM tokens, and at LONG from there:

    seq_len     = LONG if planned tokens >= LONG_FROM and model.max_seq_len >= LONG, else min(SHORT, max_seq_len)
    batch_size  = train.batch_size x SHORT / seq_len rows (train.batch_size counts rows of SHORT tokens)

so the tokens of a micro-batch, and with them the steps, the accumulation and the schedule, do not depend on
the choice. The planned tokens are the plan's: train.max_steps x the tokens of a step, or what train.max_time
gives at the speed a shape chosen for the budget was timed at (model/sizing.py; that shape is chosen at the
short context and again at the long one when the tokens call for it, at the same speed, which is in FLOP/s),
whichever is fewer. A time budget with a set shape is not timed, so its tokens are not known: the short
context. A resumed or replayed run trains the context and batch its run recorded (recorded_context).
The crossover was measured at one shape on one corpus; nothing here scales it with the model.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fasttrain.config import Config, ModelConfig, TrainConfig
from fasttrain.system.errors import UsageError

SHORT = 256  # tokens: train.batch_size's rows are of this many with train.seq_len = 0
LONG = 512
LONG_FROM = 7e6  # planned training tokens from which LONG trains better (between 6M and 8.5M, measured)


def short_context(t: TrainConfig, m: ModelConfig) -> TrainConfig:
    """`t` (train.seq_len = 0) at the short context: the geometry a run plans and sizes its model at before its
    tokens are known."""
    return replace(t, seq_len=min(SHORT, m.max_seq_len))


def choose_context(t: TrainConfig, m: ModelConfig, tokens: float) -> tuple[TrainConfig, str]:
    """`t` (at short_context) at the context for `tokens` planned training tokens (math.inf: not known), and
    the plan's note saying why."""
    short = t.seq_len
    if math.isinf(tokens):
        return t, (
            f"train.seq_len = 0: {short}, as a train.max_time run of a set model shape is not timed and its tokens "
            f"are not known (a context of {LONG} trains better from ~{LONG_FROM / 1e6:g}M tokens: for a run that "
            f"long set train.seq_len = {LONG} and halve train.batch_size)"
        )
    planned = f"the ~{tokens / 1e6:.2f}M training tokens planned"
    if tokens < LONG_FROM:
        return t, f"train.seq_len = 0: {short} for {planned} ({LONG} trains better from ~{LONG_FROM / 1e6:g}M)"
    if m.max_seq_len < LONG:
        return t, (
            f"train.seq_len = 0: {short} for {planned}, as model.max_seq_len = {m.max_seq_len} allows no longer "
            f"context ({LONG} trains better from ~{LONG_FROM / 1e6:g}M tokens)"
        )
    if t.batch_size * short % LONG:
        return t, (
            f"train.seq_len = 0: {short} for {planned}, as train.batch_size = {t.batch_size} rows of {short} tokens "
            f"are no whole number of {LONG}-token rows ({LONG} trains better from ~{LONG_FROM / 1e6:g}M tokens)"
        )
    rows = t.batch_size * short // LONG
    return replace(t, seq_len=LONG, batch_size=rows), (
        f"train.seq_len = 0: {LONG}, in batches of {rows} rows (train.batch_size = {t.batch_size} rows of {short} "
        f"tokens), for {planned} ({LONG} trains better from ~{LONG_FROM / 1e6:g}M, {short} below)"
    )


def recorded_context(t: TrainConfig, recorded: Config, where: str) -> tuple[TrainConfig, str]:
    """`t` (train.seq_len = 0) at the context and batch a resumed or replayed run recorded (`recorded`, from the
    file `where`), and the note saying so: another budget must not change them part way through a run."""
    r = recorded.train
    if not r.seq_len:
        raise UsageError(
            f"{where}: train.seq_len = 0, but a run's config records the context it trained (above 0); put back the "
            "value the run was started with"
        )
    return replace(t, seq_len=r.seq_len, batch_size=r.batch_size), (
        f"train.seq_len = 0: the run's context, {r.seq_len} in batches of {r.batch_size} rows, as {where} records it"
    )
