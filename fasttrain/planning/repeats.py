"""A corpus read many times: optim.weight_decay_rule = "repeats" chooses the weight decay and the epoch limit.

Imports from fasttrain: config, data.documents, data.mixture, data.sampling, formats.shards.

A run that reads a small corpus over and over can learn the training text itself instead of the language: its
validation loss turns up while the training loss goes on falling. Weight decay holds it back, but how much a run
needs depends on the corpus as well as on the epochs (docs/performance.md, "Weight decay for repeats"): on held-out
code read 7 times, decay 2 ended 0.17 bits per byte ahead of 0.1 and its validation loss fell to the last step,
where 0.1's rose for the second half of the run; on the Python documentation topics read 10 times, decay 1 cost
0.04, because their validation text repeats the training text (53% of its 16-token spans are in it) and recalling
that text is what validation rewards there.

So the plan measures both, as it times the machine's speed:

    epochs   E   how many times over the run reads the source it reads most (the loader's count)
    overlap  o   the fraction of that source's validation 16-token spans found verbatim in its training split
    novelty  n = clamp(1 - o / MEMORISED, 0, 1)       (0: validation is training text over again)
    target     = min(PER_EPOCH x (min(E, LINEAR_TO) - REPEATS_FREE) + PER_DOUBLING x log2(max(E / LINEAR_TO, 1)),
                     optim.max_weight_decay)
    decay      = optim.weight_decay + n x (target - optim.weight_decay), where target is the larger

and below REPEATS_FREE epochs (Muennighoff et al. 2023: to about 4, repeated tokens are worth nearly as much as new
ones) the decay stays as set. The overlap also sets how many times a time budget reads the
corpus before it stops (`epoch_limit`: NOVEL_EPOCHS where validation text is new, data.max_epochs from an overlap of
RECALLED, linear between), because decay does not make more epochs of new text worth reading: on held-out code
(0.7% overlap, depth 2, equal tokens) 4 epochs ended at 1.483 bits per byte, 8 at 1.519 and 16 at 1.537 with the
rule's decay, and a 10-minute budget's 3 x 192 read 10 times ended at 1.508 where a 2-minute one's best, at its
fourth epoch, was 1.47. Where validation rewards recall, more epochs still help: the topics with the docstrings (20%
overlap) scored their best at the end of a 30-minute run that read them 8.3 times. PER_EPOCH and MEMORISED are
fitted to the sweeps (benchmarks/studies/many_epochs.py): the best decay on held-out code read 3.5, 5 and 7 times was
0.1-0.3, 1 and 2; on the topics read 10 times, 0.1; read 16 and 32 times, 4.5 and 6.3 (so PER_DOUBLING).
A run whose tokens are not known (a time budget with no speed timed) keeps the decay as set, and a resumed or
replayed run the decay its config.toml records, so a longer budget never changes it part way through.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from fasttrain.config import Config, OptimConfig
from fasttrain.data.documents import Rows
from fasttrain.data.mixture import Source
from fasttrain.data.sampling import rows_per_epoch
from fasttrain.formats.shards import find_shards, token_blocks

REPEATS_FREE = 3.0  # epochs up to which repeats need no more decay than new data
NOVEL_EPOCHS = 4.0  # the most epochs of a corpus whose validation text is new that a time budget reads
RECALLED_EPOCHS = 10.0  # data.max_epochs' default: the limit from an overlap of RECALLED where a lower one is set
RECALLED = 0.2  # an overlap from which data.max_epochs epochs still help (topics and docstrings: 20%, read 8.3 times)
PER_EPOCH = 0.5  # the target decay's rise per epoch beyond REPEATS_FREE, to LINEAR_TO
LINEAR_TO = 8.0  # epochs from which the target rises by PER_DOUBLING each time the epochs double
PER_DOUBLING = 2.0  # 2.5 at 8 epochs, 4.5 at 16, 6.5 at 32 (the ceiling, optim.max_weight_decay, holds it at 6.4)
MEMORISED = 0.5  # an overlap at which validation is taken to reward recall as much as generalising (novelty 0)
SPAN = 16  # tokens: a span this long found verbatim is the training text, not a common phrase
MAX_TRAIN_TOKENS = 1 << 23  # of the training split hashed (64 MB): a longer one is compared by its start
REPEAT_WORTH = 15.0  # R: epochs over which a repeated token's worth falls by e (Muennighoff et al.)

# Per source: (its share of the run's tokens, the training tokens one epoch of the loader reads: its rows that fill
# whole batches, so the epochs counted here are the loader's)
Corpus = Sequence[tuple[float, float]]


def effective_tokens(tokens: float, unique: float | None) -> float:
    """What `tokens` of training on a corpus of `unique` tokens (None: unknown, taken as unlimited) are worth in
    tokens seen once (the module docstring's `worth`)."""
    if not unique or tokens <= unique:
        return tokens
    return unique * (1 + REPEAT_WORTH * (1 - math.exp(-(tokens / unique - 1) / REPEAT_WORTH)))


def corpus_worth(tokens: float, corpus: Corpus) -> float:
    """What `tokens` of training are worth over the run's sources (`corpus`; empty while it is not prepared:
    taken as unlimited): each source's share of them, discounted by that source's own epochs."""
    return sum(effective_tokens(tokens * share, unique) for share, unique in corpus) if corpus else tokens


def first_reads(tokens: float, corpus: Corpus) -> float:
    """The tokens of a run of `tokens` over `corpus`'s sources (empty: not known, taken as unlimited) that are read
    for the first time: each source's share, up to its size."""
    return sum(min(tokens * share, unique) for share, unique in corpus) if corpus else tokens


def epoch_tokens(corpus: Corpus) -> float:
    """The run's tokens per epoch of the source it reads most often (share, training tokens in `corpus`); 0 when
    the corpus is not known yet."""
    return min((unique / share for share, unique in corpus if share > 0), default=0.0)


def epoch_cap(corpus: Corpus, tokens_per_step: int, max_epochs: float) -> int:
    """The updates (of `tokens_per_step` tokens) after which the run has read one of `corpus`'s sources `max_epochs`
    times, the one it reads most often; 0 when the corpus is not known yet."""
    per_epoch = epoch_tokens(corpus)
    return max(int(max_epochs * per_epoch / tokens_per_step), 1) if per_epoch else 0


def span_hashes(tokens: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each SPAN-token window of `tokens` (polynomial, wrapping: collisions at 2^-64 are noise)."""
    if len(tokens) < SPAN:
        return np.zeros(0, dtype=np.uint64)
    t = tokens.astype(np.uint64)
    h = np.zeros(len(t) - SPAN + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(SPAN):
            h = h * np.uint64(1_000_003) + t[i : len(t) - SPAN + 1 + i]
    return h


def split_tokens(directory: str, split: str, limit: int) -> np.ndarray:
    """The first `limit` tokens of `directory`'s `split` shards, in order."""
    blocks: list[np.ndarray] = []
    left = limit
    for info in find_shards(directory, split):
        for block in token_blocks(info):
            blocks.append(block[:left])
            left -= len(blocks[-1])
            if left <= 0:
                return np.concatenate(blocks)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.uint16)


def verbatim_overlap(directory: str) -> float:
    """The fraction of the validation split's SPAN-token windows found verbatim in the training split (its first
    MAX_TRAIN_TOKENS) of the prepared folder `directory`."""
    val = span_hashes(split_tokens(directory, "val", MAX_TRAIN_TOKENS))
    train = np.sort(span_hashes(split_tokens(directory, "train", MAX_TRAIN_TOKENS)))
    if not len(val) or not len(train):
        return 0.0
    at = np.searchsorted(train, val).clip(max=len(train) - 1)  # a binary search: np.isin took 4x as long
    return float((train[at] == val).mean())


def novelty(overlap: float) -> float:
    """How new a validation text that overlaps its training text by `overlap` is: 1 all new, 0 (at MEMORISED or
    more) the training text over again."""
    return min(max(1 - overlap / MEMORISED, 0.0), 1.0)


def repeat_decay(o: OptimConfig, epochs: float, overlap: float) -> float:
    """The module docstring's rule: the weight decay for a run reading its corpus `epochs` times whose validation
    text overlaps its training text by `overlap`."""
    rise = PER_EPOCH * (min(epochs, LINEAR_TO) - REPEATS_FREE) + PER_DOUBLING * math.log2(max(epochs / LINEAR_TO, 1))
    target = min(rise, o.max_weight_decay)
    if epochs <= REPEATS_FREE or target <= o.weight_decay:
        return o.weight_decay
    return o.weight_decay + novelty(overlap) * (target - o.weight_decay)


def epoch_limit(max_epochs: float, overlap: float) -> float:
    """The most times a time budget reads a source whose validation text overlaps its training text by
    `overlap`: NOVEL_EPOCHS where none of it is in the training text, data.max_epochs (`max_epochs`) from RECALLED,
    linear between (to RECALLED_EPOCHS at least, so that a limit the plan applied, as config.toml records it, is
    applied as it is by a run of that config); never more than data.max_epochs."""
    top = max(max_epochs, RECALLED_EPOCHS)
    return min(max_epochs, NOVEL_EPOCHS + min(overlap / RECALLED, 1.0) * (top - NOVEL_EPOCHS))


def most_read(epochs: Sequence[float]) -> int:
    """The index of the largest of `epochs` (each source's, or any measure in proportion), the first of equals."""
    return max(range(len(epochs)), key=lambda i: epochs[i])


Measured = tuple[int, float]  # a source's index and its verbatim overlap


def choose_weight_decay(
    cfg: Config,
    sources: Sequence[Source],
    epochs: Sequence[float] | None,
    recorded: Config | None,
    measured: Measured | None = None,
) -> tuple[OptimConfig, str, Measured | None]:
    """cfg.optim with its weight decay for the run (cfg.optim itself unless optim.weight_decay_rule = "repeats"),
    the plan's note saying why ("" for "fixed") and the most-read source's overlap the rule read (else `measured`).
    `epochs`: how many times over the run reads each source (None: not known), the loader's count that the run's
    start event records (plan.planned_epochs); `recorded`: a resumed or replayed run's config.toml, whose decay it
    keeps (said where the rule would now choose another); `measured`: a source's index and overlap the plan has
    measured (`limit_epochs`) or its run recorded, not measured again."""
    o = cfg.optim
    if o.weight_decay_rule == "fixed":
        return o, "", measured
    decay, why, measured = rule_decay(o, sources, epochs, measured)
    if recorded is None:  # weight_decay stays as set: what a new run from this run's config.toml starts from
        return replace(o, weight_decay_chosen=round(decay, 3)), f"optim.weight_decay_rule = repeats: {why}", measured
    kept = recorded.optim.decay()
    if math.isclose(kept, round(decay, 3)):
        return replace(o, weight_decay_chosen=kept), "", measured
    return (
        replace(o, weight_decay_chosen=kept),
        (
            f"optim.weight_decay_rule = repeats: weight decay {kept:g}, as the run recorded it (for this run's length "
            f"the rule would choose {decay:g}; a decay is not changed part way through)"
        ),
        measured,
    )


def rule_decay(
    o: OptimConfig, sources: Sequence[Source], epochs: Sequence[float] | None, measured: Measured | None
) -> tuple[float, str, Measured | None]:
    """The weight decay the rule chooses for a new run reading `sources` `epochs` times over, why in words, and the
    most-read source's overlap it read (else `measured`): measured here unless `measured` (index, overlap) holds it."""
    if not sources:
        why = f"weight decay {o.weight_decay:g} until the data is prepared, when the run chooses it"
        return o.weight_decay, why, measured
    if epochs is None:
        return (
            o.weight_decay,
            f"weight decay {o.weight_decay:g}, as the run's tokens are not known before it trains",
            measured,
        )
    most = most_read(epochs)
    e = epochs[most]
    read = f"it reads {sources[most].name} {e:.1f} times over"
    if e <= REPEATS_FREE:
        why = f"weight decay {o.weight_decay:g}, as {read} (repeats need more from {REPEATS_FREE:g})"
        return o.weight_decay, why, measured
    measured = overlap_of(sources, most, measured)
    decay = round(repeat_decay(o, e, measured[1]), 3)  # as the plan records it, and says it
    spans = f"{measured[1]:.0%} of its validation {SPAN}-token spans are in its training text"
    if math.isclose(decay, o.weight_decay):
        return decay, f"weight decay {decay:g} kept though {read}: {spans}, which recalling serves", measured
    return decay, f"weight decay {o.weight_decay:g} -> {decay:g}: {read} and {spans}", measured


def overlap_of(sources: Sequence[Source], most: int, measured: Measured | None) -> Measured:
    """Source `most`'s index and verbatim overlap: `measured`'s where it is that source's, else measured now."""
    if measured is not None and measured[0] == most:
        return measured
    return most, verbatim_overlap(sources[most].dir)


def limit_epochs(
    cfg: Config, sources: Sequence[Source], corpus: Sequence[tuple[float, float]], measured: Measured | None = None
) -> tuple[Config, str, Measured | None]:
    """`cfg` with data.max_epochs lowered to `epoch_limit` for a time budget reading `sources` (`corpus`: each
    one's share of the run and training tokens an epoch), the plan's note, and the most-read source's (index, overlap),
    which `choose_weight_decay` reuses: `measured`'s where it is that source's (a resumed run's record), else measured
    here; `cfg`, "" and `measured` unless the "repeats" rule applies. Data not prepared yet (no `sources`) is planned
    as new text, what a text the run has never seen mostly is: the limit the prepared run applies to it, said to be
    assumed (the prepared run measures it and plans again)."""
    if cfg.optim.weight_decay_rule != "repeats":
        return cfg, "", measured
    if not sources:  # planned as new text
        measured, limit = None, round(epoch_limit(cfg.data.max_epochs, 0.0), 1)
        reads = "the estimate reads the corpus"
        why = (
            ", as for validation text new to the training text (assumed until the data is prepared; a text that "
            "repeats itself lets the run read it more, and a larger model)"
        )
    else:
        most = most_read([share / tokens if tokens else math.inf for share, tokens in corpus])
        most, overlap = measured = overlap_of(sources, most, measured)
        # the topics with the docstrings, 19.9%: 9.98, so 10
        limit = round(epoch_limit(cfg.data.max_epochs, overlap), 1)
        reads = f"the budget reads {sources[most].name}"
        why = (
            f": {overlap:.1%} of its validation {SPAN}-token spans are in its training text, and more epochs of new "
            "text teach the text, not the language"
        )
    if limit >= cfg.data.max_epochs:
        return cfg, "", measured
    note = (
        f"optim.weight_decay_rule = repeats: {reads} at most {limit:g} times, not data.max_epochs = "
        f"{cfg.data.max_epochs:g}{why}"
    )
    return replace(cfg, data=replace(cfg.data, max_epochs=limit)), note, measured


def epoch_rows(source: Source, cfg: Config, world_size: int) -> int:
    """Training rows of `source` one epoch of the run's loader reads (data/sampling.py's `rows_per_epoch`, with
    its UsageError if they fill not even one round of batch_size x world_size). Reads shard headers, and for
    document rows the shards' document index (never cached here: see documents.document_starts)."""
    t, d = cfg.train, cfg.data
    rows = Rows(find_shards(source.dir, "train"), t.seq_len, d.batching, source.data.meta["eot_id"], cache=False)
    return rows_per_epoch(rows, t.batch_size, world_size, source.dir, "train")
