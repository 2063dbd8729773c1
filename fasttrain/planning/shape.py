"""The model a run trains, and the stop that goes with it: what `plan_run` asks once the data is opened.

Imports from fasttrain: compute.distributed, config, data.mixture, model.llama, planning.batch_size, planning.members,
planning.preflight, planning.recorded, planning.repeats, planning.sequence_length, planning.sizing, planning.speed,
planning.timed_pass, system.errors.

    sized = size_run(cfg, SizingInputs(...))   # Sized: the model and train sections, what they were weighed on, notes

The shape is the one set (model.n_layers and the width the depth gives), model.init_from's (`init_shape`), the one
the run being resumed or replayed recorded, or under model.n_layers = 0 the one sizing.py chooses for the run's
compute at the machine's timed speed; then the context and a time budget's tokens an update for the tokens that
shape will read (sequence_length.py, batch_size.py; then the shape again), the members where one model would read a
small corpus out early (members.py), and under a time budget the stop at the epoch limit (repeats.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from fasttrain.compute import distributed
from fasttrain.config import Config, ModelConfig, Seconds, TrainConfig, config_to_toml, load_config, parse_config
from fasttrain.data.mixture import Source, phases, token_shares
from fasttrain.model.llama import hf_llama_model_config
from fasttrain.planning import repeats, sizing
from fasttrain.planning.batch_size import choose_batch, update_tokens
from fasttrain.planning.members import ensemble_members, ensemble_share
from fasttrain.planning.preflight import Machine, depths_in_memory, members_in_memory
from fasttrain.planning.recorded import Recorded
from fasttrain.planning.repeats import Corpus, Measured, epoch_rows, limit_epochs
from fasttrain.planning.sequence_length import choose_context, trained_context
from fasttrain.planning.speed import Speed
from fasttrain.planning.timed_pass import timed_loss, timed_teacher, timed_update, times_compiled
from fasttrain.system.errors import UsageError


@dataclass(frozen=True)
class SizingInputs:
    """What the plan has answered before it sizes the run, besides the config: what `size_run` and `shape_of` read.
    Frozen: made once a plan, by `plan_run`."""

    world: distributed.World
    machine: Machine  # the device and the bytes it had available, read once a plan
    sources: tuple[Source, ...]  # the prepared data; () while it is not prepared yet
    estimate: float  # the training tokens of a folder not prepared yet (0 once it is)
    accumulation: int  # micro-batches per optimizer step
    shard_group: int  # ranks one parameter is split over: the memory a depth needs is weighed on them
    earlier: Recorded | None  # what the run being resumed or replayed recorded (None: a new run)
    speed: Speed | None  # the machine's training speed, timed already (None: timed here where a budget needs it)
    context_set: bool  # train.seq_len set, not chosen (sequence_length.py)

    def tokens_per_step(self, t: TrainConfig) -> int:
        """Token slots an optimizer update of `t` trains on, over all ranks."""
        return update_tokens(t, self.accumulation, self.world.size)


@dataclass(frozen=True)
class Sized:
    """What `size_run` decided, and what it weighed: the plan records all of it (RunPlan.record)."""

    model: ModelConfig  # no 0 left in its shape; max_seq_len the context trained; the members
    train: TrainConfig  # train.seq_len chosen; train.max_steps a time budget's stop at the epoch limit
    corpus: Corpus  # each source's share of the run and its training tokens an epoch, as the loader reads them
    rows_per_epoch: tuple[int, ...]  # each source's training rows an epoch, whole rounds of all ranks (the tokens')
    speed: Speed | None  # the machine's speed the shape was chosen at (None: not timed)
    overlap: Measured | None  # the most-read source's index and verbatim overlap, if the limit read it
    epoch_limit: float  # data.max_epochs, or the repeats rule's lower limit for new text: where a budget stops
    notes: tuple[str, ...]


def size_run(cfg: Config, given: SizingInputs) -> Sized:
    """The model and train sections a run of `cfg` (its train.seq_len the short or recorded context) trains: the
    shape (model.n_layers = 0: chosen for the run's compute, sizing.py) and members (model.members = 0: those
    `earlier` recorded, else more than one where the epoch limit stops one early), the context (unless `context_set`
    or `earlier` recorded it: chosen for the tokens planned at the short one, sequence_length.py, with a time
    budget's rows grown for them, batch_size.py), the model's max_seq_len the context trained unless `context_set`,
    and a time budget's stop at data.max_epochs or the repeats rule's lower limit (train.max_steps); with the
    corpus they were weighed on (each source's share of the run and its tokens an epoch, as the loader reads them;
    `estimate` for a folder not prepared yet), the speed timed, the source index and verbatim overlap the repeats
    rule read (None: none; the overlap `earlier` recorded is not measured again), the epoch limit and the notes.
    `given`'s fields are the names above."""
    t, notes, earlier = cfg.train, [], given.earlier
    choose_seq_len = not given.context_set and earlier is None
    mix, _ = phases(cfg.data, t.max_steps, given.accumulation)
    shares = token_shares(mix, t.max_steps * given.accumulation)

    def corpus_at(c: Config) -> tuple[tuple[int, ...], Corpus]:  # a folder not prepared yet: its estimate
        rows = tuple(epoch_rows(s, c, given.world.size) for s in given.sources)
        return rows, tuple(zip(shares, [r * c.train.seq_len for r in rows])) or ((1.0, given.estimate),)

    rows, corpus = corpus_at(cfg)
    names = [s.name for s in given.sources]
    recorded = earlier.overlap if earlier else None
    measured = (names.index(recorded[0]), recorded[1]) if recorded and recorded[0] in names else None
    # The shape chosen, or set and timed: either stops at the epoch limit. A set shape untimed (several ranks, a budget
    # too short to time, a student, a run of set steps too) reads as it did before
    chosen = not cfg.model.n_layers
    budgeted = t.max_time and not cfg.schedule.progress_from and (chosen or times_set_shape(cfg, given.world.size))
    if budgeted:
        cfg, limit_note, measured = limit_epochs(cfg, given.sources, corpus, measured)
    else:
        limit_note = ""
    tokens_per_step = given.tokens_per_step(t)  # the same at either context; a grown batch's counted again below
    # A run that compiles on a GPU and chooses its context is timed twice: eagerly here, to choose the context and
    # rows, then compiled at them below (each shape compiled costs the timing seconds, which the first need not)
    provisional = choose_seq_len and bool(t.max_time) and not given.speed and times_compiled(t, given.machine.device)
    first = replace(cfg, train=replace(t, compile=False)) if provisional else cfg
    model, note, speed = shape_of(members_time(first), corpus, tokens_per_step, given)
    cap = repeats.epoch_cap(corpus, tokens_per_step, cfg.data.max_epochs) if budgeted else 0
    if choose_seq_len:  # the tokens planned at the short context choose it; a shape chosen for them, again
        known = speed is not None or not t.max_time  # a time budget's tokens come from a speed timed
        tokens = min(
            sizing.run_tokens(members_time(cfg).train, model, tokens_per_step, speed), cap * tokens_per_step or math.inf
        )
        t, context_note = choose_context(t, cfg.model, cfg.data.batching, tokens if known else math.inf)
        t, batch_note = choose_batch(t, tokens_per_step, tokens if known else math.inf)
        notes += [n for n in (context_note, batch_note) if n]
        if t != cfg.train or provisional:  # its rows fill batches a little differently: the epochs counted again
            cfg = replace(cfg, train=t)
            tokens_per_step = given.tokens_per_step(t)
            rows, corpus = corpus_at(cfg)
            cap = repeats.epoch_cap(corpus, tokens_per_step, cfg.data.max_epochs) if budgeted else 0
            # Timed again (unless given a speed) at the rows and context the run trains: a GPU's small step waits
            # on its launches, so 16 x 256 read an H200 at a fifth of its speed at 32 x 512, and the shape chosen,
            # too small, read the corpus to its epoch limit in a third of the budget (results/gpu/h200-2026-11-30b)
            near = model.n_layers if provisional else 0  # timed from the eager timing's choice, not the smallest
            model, note, speed = shape_of(members_time(cfg), corpus, tokens_per_step, given, near)
    read = sizing.run_tokens(members_time(cfg).train, model, tokens_per_step, speed)  # cfg.train is t by now
    reaches = cap and read >= cap * tokens_per_step  # said only if so
    notes += [n for n in (limit_note if reaches else "", note) if n]
    model = model if given.context_set else trained_context(model, t)
    if earlier and not model.members:  # resumed or replayed: the members recorded, whatever set the shape
        model = replace(model, members=earlier.config.model.members)
    members, note = model.members or 1, ""
    if cap and (not t.max_steps or cap < t.max_steps):  # a budget stops before it overfits (sizing.py)
        t = replace(t, max_steps=cap)
        if reaches:
            notes.append(
                f"train.max_steps = {cap}: a budgeted run stops when it has read the corpus "
                f"{cfg.data.max_epochs:g} times ({'the limit above' if limit_note else 'data.max_epochs'}) or earlier"
            )
        most = members_in_memory(replace(cfg, model=model, train=t), given.machine.available, given.shard_group)
        members, note = (members, "") if model.members else ensemble_members(model, t, tokens_per_step, speed, most)
    notes += [note] if note else []
    model = replace(model, members=members)
    return Sized(model, t, corpus, rows, speed, measured, cfg.data.max_epochs, tuple(notes))


def set_shape_speed(cfg: Config, given: SizingInputs) -> Speed | None:
    """The machine's speed at `cfg`'s set shape under a time budget, timed as a chosen shape's is, so that its plan
    weighs the tokens the budget holds as the chosen shape's plan does (the epochs read, and with them the repeats
    rule's weight decay and the members; --set model.n_layers=D is what a plan says keeps its choice). None where
    nothing is timed (`times_set_shape`), for a resumed run (planned from its record) and where the timing failed."""
    if given.earlier is not None or not times_set_shape(cfg, given.world.size):
        return None
    device = given.machine.device
    try:
        return sizing.timed_speed(cfg, device, timed_update(cfg, device), timed_loss(cfg, device), [cfg.model.n_layers])
    except RuntimeError:
        return None  # as an untimed shape plans: the budget's tokens unknown


def times_set_shape(cfg: Config, world_size: int) -> bool:
    """Whether a new run of `cfg`'s set shape is timed under its time budget (`set_shape_speed`) and stops at the
    epoch limit: the budget alone bounds it (train.max_steps 0; a distilled run's later rounds carry the first's
    stop), one long enough to time the machine for (sizing.MIN_BUDGET), on `world_size` = 1 rank, not a replay, and
    no teacher (a student reads on past the limit: soft targets are not the text, phases.student_config). A resume
    of it is planned as it was, untimed."""
    t = cfg.train
    return t.max_time >= sizing.MIN_BUDGET and not (
        t.max_steps or t.teacher or cfg.schedule.progress_from or world_size > 1
    )


def members_time(cfg: Config) -> Config:
    """`cfg` with the train.max_time its members train for: a distilled run of a set model.members > 1 gives them
    members.ensemble_share of it (the rest is the student's), so its shape is chosen for what they read, not for the
    whole budget."""
    t, members = cfg.train, cfg.model.members
    if not (t.distill and members > 1 and t.max_time):
        return cfg
    return replace(cfg, train=replace(t, max_time=Seconds(t.max_time * ensemble_share(members))))


def shape_of(
    cfg: Config, corpus: Corpus, tokens_per_step: int, given: SizingInputs, near: int = 0
) -> tuple[ModelConfig, str, Speed | None]:
    """cfg.model with no 0 left in its shape, a note ("" if none) and the speed it was chosen at: model.d_model or
    n_heads 0 are derived from the depth; model.n_layers = 0 is the shape the run being resumed or replayed
    recorded (given.earlier), else chosen for the run's compute (sizing.size_model, at given.speed or timed there,
    from depth `near` and the one below where given: an earlier timing's choice) on `corpus` (each source's share
    of the run and its training tokens), of the depths whose memory split over given.shard_group ranks fits
    given.machine. UsageError for a shape whose heads do not fit its width."""
    m = cfg.model
    recorded = given.earlier
    if m.n_layers:
        shape = m if m.d_model and m.n_heads else sizing.ladder_shape(m, m.n_layers)
        width = f"model.d_model = {m.d_model}" if m.d_model else f"width {shape.d_model} (64 x model.n_layers)"
        if not sizing.fits(replace(shape, n_kv_heads=0)):  # a set n_heads the derived width does not split evenly
            raise UsageError(
                f"model.n_heads = {m.n_heads} does not divide {width} into even head sizes; set model.d_model too"
            )
        if not sizing.fits(shape):
            raise UsageError(
                f"model.n_kv_heads = {m.n_kv_heads} does not divide the {sizing.plural(shape.n_heads, 'head')} of "
                f"{width} (heads of {sizing.HEAD_DIM}); set model.n_heads too"
            )
        return shape, "", given.speed or set_shape_speed(replace(cfg, model=shape), given)
    if recorded is None:  # no shape is timed or chosen whose memory estimate leaves the device no margin
        depths = depths_in_memory(cfg, given.machine.available, sizing.fitting_depths(m), given.shard_group)
        device = given.machine.device
        update, loss = timed_update(cfg, device), timed_loss(cfg, device, timed_teacher(cfg, given.sources, device))
        return sizing.size_model(
            cfg, corpus, tokens_per_step, given.world.size, device, given.speed, update, loss, depths, near
        )
    r, where = recorded.config.model, recorded.where
    if unset := [k for k in ("n_layers", "d_model", "n_heads") if not getattr(r, k)]:
        raise UsageError(
            f"{where}: model.{unset[0]} = 0, but a run's config records the shape it trained (n_layers, d_model and "
            "n_heads, each above 0); put back the value the run was started with"
        )
    shape = replace(m, n_layers=r.n_layers, d_model=r.d_model, n_heads=r.n_heads)
    return (
        shape,
        (
            f"model.n_layers = 0: the {'resumed' if recorded.resumed else 'replayed'} run's shape, "
            f"{shape.n_layers} x {shape.d_model} with {sizing.plural(shape.n_heads, 'head')}, as {where} records it"
        ),
        given.speed,
    )


def init_shape(cfg: Config) -> tuple[ModelConfig, str, str]:
    """cfg.model, or with model.init_from the shape of that Hugging Face model (its config.json), with a note
    saying which of its values it replaced ("" if none); UsageError if the config does not hold with that shape
    (train.seq_len beyond its context, say), as config.py checks any config. Third, the error a new run gets
    if the source is gone since the run in train.out_dir began ("" if not): then the shape is the one that run
    recorded, and only a resume can go on."""
    m, missing = cfg.model, ""
    if not m.init_from:
        return m, "", ""
    source, recorded = Path(m.init_from) / "config.json", Path(cfg.train.out_dir) / "config.toml"
    run = load_config(recorded).model if not os.path.lexists(source) and recorded.is_file() else None
    if run is not None and run.init_from == m.init_from:  # its checkpoints hold the weights
        missing = (
            f"{source}: no such file (model.init_from); a new run starts from its weights, only --resume "
            "continues the run without them"
        )
        shaped = replace(run, dropout=m.dropout)
        what = f"{recorded}'s, as {m.init_from} is gone"
    else:
        shaped = hf_llama_model_config(m.init_from, m)
        what = f"{source}'s"
    parse_config(config_to_toml(replace(cfg, model=shaped)), f"model.init_from {source}")  # validated whole
    changed = [
        f"{f.name} {getattr(m, f.name)} -> {getattr(shaped, f.name)}"
        for f in fields(m)
        if getattr(m, f.name) != getattr(shaped, f.name)
    ]
    note = f"model.init_from: the shape is {what} ({', '.join(changed)})" if changed else ""
    return shaped, note, missing
