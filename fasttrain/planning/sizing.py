"""The model's shape chosen for the run's compute: `model.n_layers = 0`.

Imports from fasttrain: compute.device, config, model.transformer, planning.repeats, planning.speed, system.errors,
system.machine_load.

A model too large for its budget sees too few tokens; one too small stops learning early. Which is best
depends on how many tokens the run will train on, and that on the machine's speed, the budget and, for a
small corpus read many times over, how much a repeated token is still worth. So the run picks, from a ladder
of shapes (depth d, width 64 d, heads of 64: nanochat's one-knob rule), the depth whose tokens per parameter
come closest to TOKENS_PER_PARAM, a ratio fitted to this project's sweeps (benchmarks/studies/recipe_sweep.py's
`depth N` cases, benchmarks/results/sizing/cpu-ladder-*.json, docs/performance.md):

    tokens(d)    = min(max_steps x tokens per step, max_time x tokens/s(d))   (whichever the run has)
    worth(T, U)  = T while it is at most the corpus U; beyond, U (1 + R (1 - exp(-(T/U - 1) / R)))
    effective(d) = the sum over the run's sources of worth(share x tokens(d), U): each source, of U training
                   tokens, read for its share of the run (a mixture's weights), is discounted by its own epochs
    new(d)       = the sum over the sources of min(share x tokens(d), U): the tokens read for the first time
    aim(N)       = TOKENS_PER_PARAM while N is at most FITTED_TO, beyond it TOKENS_PER_PARAM (N / FITTED_TO)^GROWTH,
                   at most CHINCHILLA
    choice       = the d minimising |log(effective(d) / params(d)) - log(aim(new(d)))|, of the depths
                   offered that read no source more than data.max_epochs times; under a time budget where every
                   one would, the deepest offered (each stops at the limit: the deepest puts the most compute
                   into the tokens there are)
    offered      = the depths whose memory estimate (planning/preflight.py) is at most MEMORY_SHARE of what the
                   device has available, and under a time budget whose params(d) are at most the tokens of
                   data.max_epochs epochs / FED_TOKENS_PER_PARAM (the data bound)

params(d) counts what a token's compute runs through (transformer.matmul_params: the lookup tables, an untied
embedding and the value embeddings, left out, as nanochat counts), so a table that costs no FLOPs does not
move the choice; the sweeps the ratio was fitted to had tied heads, whose params(d) is every parameter.

`worth` is Muennighoff et al.'s (2023) value of repeated data: the k-th epoch is worth exp(-(k-1)/R) of the
first, R = repeats.REPEAT_WORTH epochs. Past about ten epochs a small corpus is worth less than nothing: the model
learns it by heart and validation gets worse (on the documentation topics, 93K tokens, equal tokens: depth 2 scored
1.269 bits per byte after 10 epochs and 1.551 after 20, depth 3 1.271 after 6.6 and 1.333 after 13, depth 1
1.576 after 20; results/recipe/cpu-recipe-pydoc-epochs-2026-11-25.json). A deeper model, which reads it fewer times in
the same budget, does better there, so no depth that would read it more than data.max_epochs times is chosen.
And a run under train.max_time stops once it has read a source data.max_epochs times (`repeats.epoch_cap`, which
the plan sets as train.max_steps; optim.weight_decay_rule = "repeats" lowers the limit for new text, repeats.py):
where every depth offered would read it more often, all train on the same tokens, so the deepest offered trains until
then (on held-out code read 4.2 times, 3 x 192 scored 1.461 bits per byte against 2 x 128's 1.477).
A shallower depth stopped at data.max_epochs is not chosen over a deeper one that reads the corpus less: it won on
the documentation topics (depth 2 at 10 epochs 1.271 against depth 3 at 6.4, 1.283) but lost badly on a corpus
of 254K tokens (depth 1 at 10 epochs 1.763 against 1.568 at 3.9; docs/performance.md). But that preference
runs away on a long budget: the deepest shapes, slow enough to read the corpus fewer times, were chosen whatever
their size (140M parameters for 0.8M tokens in an hour; timing a shape of 1B parameters for 8 hours killed the
machine). A shape whose parameters exceed the tokens of data.max_epochs epochs / FED_TOKENS_PER_PARAM falls
far short of the ratio even were every repeated token worth a new one, so a time budget never offers it; nor is
a shape offered, or timed, whose memory estimate does not leave the device a margin.

tokens/s(d) under a time budget comes from `calibrate`: the forward, backward and optimizer step (the run's loss
and optimizer, given by the plan: compiled where the run compiles on a GPU, planning/timed_pass.py) of the ladder's
two smallest shapes, timed on the run's device and precision at its rows and context (a plan that grows them times
again at them: a GPU's small steps wait on their launches) before the run (outside train.max_time, as compiling
is), give FLOP/s at two sizes, and a power law through them the rest (small models use a CPU's or GPU's
arithmetic less well, so the rate grows with size). It grows more slowly beyond them than the two say, so the
shape chosen at that speed is timed too and the choice made again, until it falls on a shape timed (between the
shapes timed, the power law through the nearest two): the run's own shape is always one timed.

What follows from the depth: the width 64 d unless model.d_model is set, the heads d_model / 64 unless
model.n_heads is set (a set key wins, and the plan says so); the learning rates, batch, context and schedule
are the config's. The resolved config records the shape chosen, so a resume or a replay trains the same model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.compute.device import autocast, synchronize
from fasttrain.config import Config, ModelConfig, TrainConfig
from fasttrain.model.transformer import Transformer, flops_per_token, matmul_params, num_params
from fasttrain.planning.repeats import Corpus, corpus_worth, epoch_tokens, first_reads
from fasttrain.planning.speed import Speed
from fasttrain.system.errors import UsageError
from fasttrain.system.machine_load import busy_note

HEAD_DIM = 64  # the ladder's head width, and its width per layer of depth
DEPTHS = tuple(range(1, 33))  # the ladder
# First fitted to the sweeps (see the module docstring; benchmarks/studies/sizing_fit.py at commit ecc6e19, results/sizing/cpu-ladder-fit-2026-11-25.json):
# of ratios 0.1 to 1.71 a quarter apart, 1.455 lost least against the best depth at 30 s to 5 min, 1 and 2 threads,
# both corpora (worst 0.05 bits per byte, mean 0.007), on the recipe then (a tied head, AdamW). Today's recipe wants
# more tokens a parameter: in fp32 on the 2-core AVX-512 BF16 Xeon (2026-11-29) 1.455 chose 4 x 256 for the main job's
# 10 minutes, 0.79 tokens a parameter, 1.2663 bits per byte, where 3 x 192 at 2.9 scored 1.1933
# (results/recipe/cpu-budget-ladder-600s-3x192-xeon-2026-11-29.json), and for held-out code's 30 minutes 4 x 256
# where 3 x 192 was 0.057 better (below). 2.5 chooses 3 x 192 for both and changes no choice at 1 to 5 minutes on the
# main job, nor the small corpora's (their data bound is FED_TOKENS_PER_PARAM's).
TOKENS_PER_PARAM = 2.5
# ... and beyond them the aim grows with the tokens the run reads for the first time. On the held-out code corpus (8.4M
# tokens) at 30 minutes (2-core AVX-512 BF16 Xeon, bf16, 512-token rows, 2026-11-29; results/time-to-quality/
# cpu-time-to-quality-large-1800s-shapes-xeon-2026-11-29.json) 4 x 256 at 1.5 tokens per parameter (the fixed
# ratio's choice, at 256) scored 1.075 bits per byte, 3 x 192 at 5.2 1.018 and 2 x 128 at 24 1.028: the best ratio
# lies between them (a parabola through the three puts it near 9). With GROWTH 1 the aim keeps the model at the size
# the sweeps' top asks for (FITTED_TO / TOKENS_PER_PARAM: 2.3M parameters in matmuls at 1.455, about 3 x 192; 1.3M at
# 2.5, whose ratio puts 3 x 192 nearest for a budget that reads it) until the ratio
# reaches CHINCHILLA, then grows it with the tokens; 0.9 chose 3 x 192 there only where the timing was exact (a
# timing 20% fast chose 4 x 256), 0.8 did not. Only new text moves the aim: on the main job's 2.64M tokens at 30
# minutes an aim grown on repeated tokens too (0.8) chose 3 x 192 for 4.2 epochs, which scored 1.223 against 4 x
# 256's 1.151 at 2.3 (results/recipe/cpu-budget-ladder-1800s-growth-xeon-2026-11-29.json). Fitted to one budget on
# one corpus: on a CPU a small model's faster step buys the tokens a longer budget wants.
FITTED_TO = 3.3e6  # first-read tokens: the top of the sweeps the ratio was fitted on
GROWTH = 1.0
# ... up to the ratio compute-optimal training holds at scale (Hoffmann et al. 2022, ~20 tokens a parameter), reached
# at ~45M new tokens: a GPU's budgets, which the CPU sweeps say nothing about, aim at it.
CHINCHILLA = 20.0
# What the sweeps covered: effective tokens (the ladder to 3.3M, the 30-minute shapes to 23M) and epochs of a corpus
# (the documentation topics to 20); the rule extrapolates beyond (the plan says so).
SWEPT = (1e5, 2.3e7)
SWEPT_EPOCHS = 20.0
MIN_BUDGET = 10.0  # seconds: a shorter train.max_time is not worth timing the machine for (the smallest shape)
CALIBRATION_STEPS = 2  # timed forward-backward passes of each calibration shape, after one untimed
# A timed speed is good to about this much (a short timing on a machine whose load changes): a choice that the
# same rule would make differently at these multiples of the predicted tokens is said to be near a boundary.
SENSITIVITY = (0.8, 1.25)
# The shape a timing chooses is timed too, and the choice made again at its own speed, at most this many times:
# the rate grows with the size more slowly than the two smallest shapes say (2-core AVX2 CPU: predicted 1.11x the
# real step at 3 x 192 and 1.28x at 4 x 256 from depths 1 and 2; benchmarks/results/sizing/cpu-step-calibration-*.json)
RETIMINGS = 3
# The ladder offered (and timed) holds the shapes whose memory estimate is at most this share of what the device has
# available: the estimate is within about 2x of the real peak, and the machine runs other programs too.
MEMORY_SHARE = 0.5
# The data bound: a time budget offers no shape that data.max_epochs epochs give fewer than this many tokens per
# parameter (a quarter of the 1.455 the rule aimed at when it was set). The evidence bounds it from below only: on the
# documentation topics depth 3, at 0.29 (6.6 epochs), scored as well as depth 2 at 10 epochs (the module docstring's
# runs); on 254K tokens of held-out code it keeps the 2- and 10-minute budgets at 3 x 192, 1.465 at 4 epochs.
FED_TOKENS_PER_PARAM = 0.364


@dataclass(frozen=True)
class Sizing:
    """The shape chosen and why (the plan's note)."""

    model: ModelConfig
    tokens: float  # the run's training tokens at this shape
    effective: float  # their worth in first-epoch tokens
    params: int  # transformer.matmul_params of the shape: what the rule weighs its tokens against
    note: str


def ladder_shape(m: ModelConfig, depth: int) -> ModelConfig:
    """`m` at `depth`: width HEAD_DIM x depth unless m.d_model is set, heads of about HEAD_DIM unless m.n_heads
    is set (the most that divide the width into even head widths; a set n_heads or n_kv_heads may not fit the
    width: see fits). m.d_model is even (config rules), so one head always fits."""
    width = m.d_model or HEAD_DIM * depth
    heads = m.n_heads or next(
        h for h in range(max(1, width // HEAD_DIM), 0, -1) if width % h == 0 and (width // h) % 2 == 0
    )
    return replace(m, n_layers=depth, d_model=width, n_heads=heads)


def fits(shape: ModelConfig) -> bool:
    """Whether `shape`'s heads split its width into even sizes (RoPE rotates pairs) and its key/value heads
    divide its heads: the config rules a set model.n_heads or n_kv_heads must meet at a ladder width."""
    d, h, kv = shape.d_model, shape.n_heads, shape.n_kv_heads
    return d % h == 0 and (d // h) % 2 == 0 and (not kv or h % kv == 0)


def tokens_per_s(speed: Speed, shape: ModelConfig, seq_len: int) -> float:
    """The training tokens a second `shape` gets through at `speed` (timed on single models): an ensemble's members
    (model/ensemble.py) each take one model's time."""
    return speed.tokens_per_s(flops_per_token(replace(shape, members=1), seq_len)) / max(shape.members, 1)


def budget_steps(speed: Speed | None, model: ModelConfig, t: TrainConfig, tokens_per_step: int) -> float | None:
    """The updates of `tokens_per_step` token slots that train.max_time holds at the `speed` a run's `model` was chosen
    for (timed, or given by a distilled run's whole plan); None without a time budget or a speed."""
    if speed is None or not t.max_time:
        return None
    return t.max_time * tokens_per_s(speed, model, t.seq_len) / tokens_per_step


def timed_step_seconds(speed: Speed | None, model: ModelConfig, t: TrainConfig, tokens_per_step: int) -> float | None:
    """The seconds an update takes at the `speed` a run's `model` was chosen for, where that speed chose it: the time
    budget holds fewer updates at it than train.max_steps (the epoch limit, or a set count), so the plan expected the
    clock to end the run (plan.planned_end). None otherwise: no speed, or the steps bound the run."""
    steps = budget_steps(speed, model, t, tokens_per_step)
    return t.max_time / steps if steps and (not t.max_steps or steps < t.max_steps) else None


def choose_shape(
    cfg: Config, tokens_at: Callable[[ModelConfig], float], corpus: Corpus, why: str, depths: Sequence[int] = ()
) -> Sizing:
    """The ladder's shape for `cfg` (model.n_layers = 0) whose effective tokens per parameter come closest to
    TOKENS_PER_PARAM, of the depths offered that read no source more than data.max_epochs times; `tokens_at(shape)`
    is how many tokens the run trains on at that shape, `corpus` each source's share and training tokens (empty
    while the data is not prepared), `why` how the tokens were found (for the note), `depths` those the device's
    memory holds (default: every depth that fits the set keys). Under train.max_time the run stops at
    data.max_epochs (`repeats.epoch_cap`): where every depth would read the corpus more often, the ratio chooses and
    the run stops early; and no depth is offered whose parameters exceed the data bound (module docstring)."""
    m, most = cfg.model, cfg.data.max_epochs
    stops = bool(cfg.train.max_time and epoch_tokens(corpus))  # the plan sets epoch_cap as train.max_steps
    fed = most * epoch_tokens(corpus) / FED_TOKENS_PER_PARAM if stops else math.inf  # the data bound

    def distance(shape: ModelConfig) -> float:
        tokens = tokens_at(shape)
        return abs(math.log(corpus_worth(tokens, corpus) / matmul_params(shape) / aim(first_reads(tokens, corpus))))

    def most_epochs(shape: ModelConfig) -> float:  # of the source it reads most often
        return max((tokens_at(shape) * share / unique for share, unique in corpus), default=0.0)

    def choice(candidates: list[ModelConfig]) -> tuple[ModelConfig, list[ModelConfig]]:
        within = [s for s in candidates if most_epochs(s) <= most]
        if not within and stops:  # each stops at the limit, on the same tokens: the deepest learns most from them
            return max(candidates, key=matmul_params), within
        return min(within or candidates, key=distance), within

    shapes = [ladder_shape(m, d) for d in fitting_depths(m)]
    held = [s for s in shapes if not depths or s.n_layers in depths] or shapes[:1]
    offered = [s for s in held if matmul_params(s) <= fed] or held[:1]
    shape, within = choice(offered)
    unbounded = choice(shapes)[0]
    bound = bound_words(shape, unbounded, unbounded in held, fed, most)
    tokens = min(tokens_at(shape), most * epoch_tokens(corpus)) if stops else tokens_at(shape)
    effective, params, total = corpus_worth(tokens, corpus), matmul_params(shape), num_params(shape)
    kept = [f"model.{k} = {getattr(m, k)}" for k in ("d_model", "n_heads", "n_kv_heads") if getattr(m, k)]
    epochs = [tokens * share / unique for share, unique in corpus]
    every = "every depth" if offered == shapes else "every depth offered"
    aimed = min(offered, key=distance).n_layers  # the ratio's choice were there no limit
    shallower = aimed if aimed < shape.n_layers else 0
    overread = overread_words(every, bool(within), stops, shallower, most)
    beyond = (
        f"; beyond the sweeps ({SWEPT[0]:.2g} to {SWEPT[1]:.2g} effective tokens, up to {SWEPT_EPOCHS:g} epochs): "
        "extrapolated"
        if not SWEPT[0] <= effective <= SWEPT[1] or max(epochs, default=0.0) > SWEPT_EPOCHS
        else ""
    )
    read = corpus_words(epochs, corpus)
    note = (
        f"model.n_layers = 0: depth {shape.n_layers} ({shape.n_layers} x {shape.d_model}, "
        f"{plural(shape.n_heads, 'head')}, {params / 1e6:.2f}M parameters"
        + (f" in matmuls, {total / 1e6:.2f}M with the lookup tables" if total != params else "")
        + f") for ~{tokens / 1e6:.2f}M training tokens "
        f"({why}{read}): {effective / params:.2f} training tokens per parameter, a repeated token counted at what it"
        f" still teaches (the sizing rule's aim: {aim(first_reads(tokens, corpus)):.4g})"
        + (f"; {' and '.join(kept)} kept, as set" if kept else "")
        + overread
        + bound
        + beyond
    )
    return Sizing(shape, tokens, effective, params, note)


def aim(new: float) -> float:
    """The effective training tokens per parameter the rule aims at for a run that reads `new` tokens for the first
    time (module docstring): TOKENS_PER_PARAM up to FITTED_TO, growing as their GROWTH power beyond, to CHINCHILLA at
    most."""
    return min(CHINCHILLA, TOKENS_PER_PARAM * max(1.0, new / FITTED_TO) ** GROWTH)


def bound_words(shape: ModelConfig, unbounded: ModelConfig, in_memory: bool, fed: float, most: float) -> str:
    """The note's words for a bound that kept the rule's choice over every depth (`unbounded`) from being chosen
    over `shape`: memory (`in_memory` False: its estimate is over MEMORY_SHARE) or the data bound (`fed` matmul
    parameters at `most` epochs); "" where `unbounded` is no deeper than `shape`."""
    if unbounded.n_layers <= shape.n_layers:
        return ""
    bounds = [
        "" if in_memory else f"its memory estimate is over {MEMORY_SHARE:.0%} of what the device has available",
        f"its {matmul_params(unbounded) / 1e6:.2f}M parameters are more than {most:g} epochs of the corpus can "
        f"feed ({fed / 1e6:.2f}M at {FED_TOKENS_PER_PARAM:g} tokens each)"
        if matmul_params(unbounded) > fed
        else "",
    ]
    return f"; the rule would choose depth {unbounded.n_layers}, but {' and '.join(b for b in bounds if b)}"


def overread_words(every: str, any_within: bool, stops: bool, shallower: int, most: float) -> str:
    """The note's words for depths that would read the corpus more than `most` (data.max_epochs) times: `every`
    ("every depth" or "every depth offered") where none is within it (`any_within` False; `stops`: the run stops
    at the limit), else the `shallower` depth the ratio would choose were there no limit (0: none), which reads it
    too often, so a deeper one trains; "" where the limit did not change the choice."""
    if not any_within and stops:
        return (
            f"; {every} would read the corpus more than {most:g} times (the epoch limit) in the budget, so the "
            "deepest trains and stops there (more overfits): more data would train better"
        )
    if not any_within:
        return (
            f"; {every} would read the corpus more than {most:g} times (the epoch limit), which overfits: more "
            "data or a shorter budget would train better"
        )
    if shallower:
        return (
            f"; the aim alone would choose depth {shallower}, but it would read the corpus more than {most:g} times "
            "(the epoch limit), which overfits"
        )
    return ""


def corpus_words(epochs: Sequence[float], corpus: Corpus) -> str:
    """The note's words for how many times the run reads each source of `corpus` (`epochs`, in its order)."""
    if len(corpus) == 1:
        return f", {epochs[0]:,.1f} epochs of {corpus[0][1] / 1e6:.2f}M"
    if corpus:
        return ", its sources read " + ", ".join(
            f"{e:,.1f} epochs of {unique / 1e6:.2f}M" for e, (_, unique) in zip(epochs, corpus)
        )
    return ", corpus size not known yet"


def fitting_depths(m: ModelConfig) -> list[int]:
    """The ladder's depths whose shape `fits` the set keys of `m` (every depth, where none is set); UsageError
    naming the key that no depth fits."""
    depths = [d for d in DEPTHS if fits(ladder_shape(m, d))]
    if not depths:
        key = "n_kv_heads" if m.n_kv_heads and not m.n_heads else "n_heads"
        width = (
            f"model.d_model = {m.d_model} is no width"
            if m.d_model
            else "no depth of the ladder has a width (64 x depth)"
        )
        raise UsageError(
            f"model.{key} = {getattr(m, key)}: {width} it divides into even head sizes"
            f"{' and key/value groups' * bool(m.n_kv_heads)}; "
            + (f"leave model.{key} at 0" if m.d_model else f"set model.d_model too, or leave model.{key} at 0")
        )
    return depths


def plural(n: int, thing: str) -> str:
    """ "1 head", "2 heads"."""
    return f"{n} {thing}{'s' * (n != 1)}"


Update = Callable[[nn.Module], Callable[[], None]]  # a model -> what a run does after each backward
# a model -> the scalar a run backpropagates for (inputs, targets), each (B, T); called under the run's autocast
Loss = Callable[[Transformer], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def logits_loss(model: Transformer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The plain loss: the model's logits, then F.cross_entropy in fp32."""
    return lambda x, y: F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def calibrate(
    cfg: Config,
    device: torch.device,
    clock: Callable[[], float] | None = None,
    update: Update | None = None,
    loss: Loss = logits_loss,
    depths: Sequence[int] = (),
) -> Speed:
    """The machine's training speed (module docstring): `loss(model)`'s forward and backward (the run's loss: the
    head and cross-entropy fused or not) and `update(model)()` (the run's clipping and optimizer step; None: none)
    of the ladder's shapes at `depths` (default: the smallest two that fit `cfg`'s set keys) at its batch
    geometry, precision and device, each timed with `clock` over CALIBRATION_STEPS passes after an untimed one
    (default: time.perf_counter, looked up when called). One update a pass: a run that accumulates micro-batches
    updates less often. RuntimeError (out of memory, say) propagates."""
    t, clock = cfg.train, clock or time.perf_counter
    points = []
    for depth in depths or fitting_depths(cfg.model)[:2]:
        shape = ladder_shape(cfg.model, depth)
        model = Transformer(shape).to(device)
        step = update(model) if update else model.zero_grad
        objective = loss(model)
        tokens = torch.randint(0, shape.vocab_size, (t.batch_size, t.seq_len + 1), device=device)
        began = 0.0
        for i in range(CALIBRATION_STEPS + 1):
            if i == 1:
                synchronize(device)
                began = clock()
            with autocast(t.precision, device):
                value = objective(tokens[:, :-1], tokens[:, 1:])
            value.backward()
            step()
        synchronize(device)
        seconds = max(clock() - began, 1e-9) / CALIBRATION_STEPS
        flops = flops_per_token(replace(shape, members=1), t.seq_len)  # one model timed
        points.append((flops, flops * t.batch_size * t.seq_len / seconds))
    return Speed(tuple(sorted(points)))


def timed_speed(cfg: Config, device: torch.device, update: Update | None, loss: Loss, depths: Sequence[int]) -> Speed:
    """The machine's speed timed on the ladder's shapes of `cfg` at `depths` (`calibrate`), with busy_note's words
    where other programs were running as it timed (read before this process loads the machine itself).
    RuntimeError (out of memory, say) propagates."""
    busy = busy_note(device)
    return replace(calibrate(cfg, device, update=update, loss=loss, depths=depths), busy=busy)


def size_model(
    cfg: Config,
    corpus: Corpus,
    tokens_per_step: int,
    world_size: int,
    device: torch.device,
    speed: Speed | None,
    update: Update | None = None,
    loss: Loss = logits_loss,
    depths: Sequence[int] = (),
    near: int = 0,
) -> tuple[ModelConfig, str, Speed | None]:
    """cfg.model with its shape chosen (model.n_layers = 0), the plan's note saying why, and the machine's speed it used
    (`speed` if given, else calibrated here on `loss` with `update` after each backward, when the run has a time
    budget: the two smallest shapes, or the two up to `near` (a depth an earlier timing chose: the shapes timed
    where the choice will be, each compiled one costing seconds), then the shape they choose and so on until the
    choice is a shape timed, RETIMINGS more at most; None without a budget). The run's tokens: max_steps x
    `tokens_per_step`, or what train.max_time gives at the speed, whichever is fewer; `corpus`: each source's share
    of them and its training tokens, `depths` those the device's memory holds (choose_shape): no other is timed or
    chosen. A choice that a timing 20% off would change, or one timed on a busy machine, says so: another run (its
    dry run) may time another speed. UsageError when a world of `world_size` ranks would each time its own device."""
    t = cfg.train
    depths = depths or fitting_depths(cfg.model)
    smallest = ladder_shape(cfg.model, depths[0])
    if t.max_time and t.max_time < MIN_BUDGET and not t.max_steps:
        too_short = f"train.max_time = {t.max_time:g} s is too short to time the machine for (under {MIN_BUDGET:g} s)"
        return smallest_instead(smallest, too_short)

    def chosen_at(at: Speed) -> ModelConfig:  # the shape chosen at speed `at`, its note unsaid
        return choose_shape(cfg, tokens_by_shape(t, tokens_per_step, at), corpus, "", depths).model

    if t.max_time and speed is None:
        if world_size > 1:
            raise UsageError(
                "model.n_layers = 0 under train.max_time: every rank would time its own device and could choose "
                "another shape; choose it with a single process (`fasttrain train CONFIG --dry-run` prints it) and "
                "set model.n_layers, or give train.max_steps alone"
            )
        try:
            start = [d for d in depths if d <= near][-2:]
            speed = timed_speed(cfg, device, update, loss, start if len(start) == 2 else depths[:2])
            for _ in range(RETIMINGS):  # the shape chosen timed too, and chosen again at its own speed
                chosen = chosen_at(speed)
                if speed.timed(flops_per_token(replace(chosen, members=1), t.seq_len)):
                    break
                speed = speed.merged(calibrate(cfg, device, update=update, loss=loss, depths=[chosen.n_layers]))
        except RuntimeError as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return smallest_instead(smallest, f"timing the machine failed ({reason})")

    if not speed:
        why = f"{t.max_steps} steps of {tokens_per_step:,} tokens"
        sizing = choose_shape(cfg, tokens_by_shape(t, tokens_per_step, None), corpus, why, depths)
        return sizing.model, sizing.note, None
    first = chosen_at(speed)
    one = flops_per_token(replace(first, members=1), t.seq_len)  # the shapes are timed as one model
    how = "timed" if speed.timed(one) else "scaled by FLOPs from the shapes timed"
    rate = f"~{tokens_per_s(speed, first, t.seq_len):,.0f} tokens/s for depth {first.n_layers}, {how}"
    # a set train.max_steps may end the run first: both bounds said, not a budget it never reaches
    why = (
        f"{t.max_steps} steps or {t.max_time:g} s at {rate}, whichever ends first"
        if t.max_steps
        else f"{t.max_time:g} s at {rate}"
    )
    sizing = choose_shape(cfg, tokens_by_shape(t, tokens_per_step, speed), corpus, why, depths)
    depth = sizing.model.n_layers
    boundary = boundary_words(chosen_at, speed, depth)
    # Another timing may choose another shape: say how to keep this one, so two runs of one config train one model
    keep = f"; --set model.n_layers={depth} keeps this shape whatever a timing reads" if boundary or speed.busy else ""
    return sizing.model, sizing.note + boundary + speed.busy + keep, speed


def smallest_instead(smallest: ModelConfig, why: str) -> tuple[ModelConfig, str, None]:
    """size_model's answer where the machine is not timed (`why`): the `smallest` shape, said in the note, and no
    speed."""
    note = f"model.n_layers = 0: {why}: the smallest shape, {smallest.n_layers} x {smallest.d_model}, trains instead"
    return smallest, note, None


def boundary_words(chosen_at: Callable[[Speed], ModelConfig], speed: Speed, depth: int) -> str:
    """The note's words where a speed SENSITIVITY times `speed` would choose (`chosen_at` a speed) another depth
    than `depth` (the steps, where they bound the run, do not move); "" where none would."""
    near = {chosen_at(speed.scaled(f)).n_layers for f in SENSITIVITY} - {depth}
    if not near:
        return ""
    return (
        f"; near a boundary: a speed 20% off would choose depth {' or '.join(map(str, sorted(near)))}, so another "
        "timing (the run's, or its dry run's) may choose another depth"
    )


def tokens_by_shape(t: TrainConfig, tokens_per_step: int, speed: Speed | None) -> Callable[[ModelConfig], float]:
    """What choose_shape weighs a shape by: the tokens a run of `t` trains it on at `speed` (run_tokens)."""
    return lambda shape: run_tokens(t, shape, tokens_per_step, speed)


def run_tokens(t: TrainConfig, shape: ModelConfig, tokens_per_step: int, speed: Speed | None) -> float:
    """The tokens a run of `t` trains `shape` on: train.max_steps x `tokens_per_step`, or what train.max_time gives
    at `speed`, whichever is fewer; math.inf where neither bounds it (a time budget and no speed)."""
    by_steps = t.max_steps * tokens_per_step if t.max_steps else math.inf
    by_time = t.max_time * tokens_per_s(speed, shape, t.seq_len) if t.max_time and speed else math.inf
    return min(by_steps, by_time)
