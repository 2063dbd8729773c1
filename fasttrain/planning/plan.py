"""A run's plan: everything a run of a config decides before it allocates anything, decided once.

Imports from fasttrain: compute.device, compute.distributed, compute.kernel_table, config, data.mixture,
formats.tokenizer, model.transformer, model.weights, optimization.optimizers, optimization.schedule,
planning.batch_size, planning.members, planning.preflight, planning.recorded, planning.repeats,
planning.sequence_length, planning.shape, planning.sizing, preparation.cache, system.errors.

    plan = plan_run(cfg, world, device)   # reads meta.json, tokenizer.json, shard headers, init_from's config.json
    plan.record()                         # the start event of metrics.jsonl: params, tokens_per_step, ...

`plan_run` is the one place that answers "what will this run do": the device and precision, the model's
shape, context and weight decay (`size_run`, planning/repeats.py), the batch, the schedule and budget, how often
each source is read, the mix phases, each kernel's choice and why, the parallel mode and checkpoint format, the
memory estimate, the cadence. It refuses, in the one line the run would stop with, what the run would refuse;
it prepares nothing, writes nothing and builds no model (data not prepared yet is planned from an estimate).
`fasttrain train --dry-run` prints it (plan_table.py); the Trainer assembles its parts from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from fasttrain.compute import distributed
from fasttrain.compute.device import Kernels, check_attention, check_fp8, kernels_on, resolve_train
from fasttrain.compute.kernel_table import run_shapes
from fasttrain.config import Config, ModelConfig, TrainConfig, resolve
from fasttrain.data.mixture import Blend, Source, open_sources, phases
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.transformer import flops_per_token, num_params
from fasttrain.model.weights import check_hf_tokenizer
from fasttrain.optimization.optimizers import tied_head_note
from fasttrain.optimization.schedule import Budget, budget_note, fit_warmup, recorded_progress
from fasttrain.planning import sizing
from fasttrain.planning.batch_size import update_tokens
from fasttrain.planning.members import distill_note, distilled
from fasttrain.planning.preflight import Machine, check_fits
from fasttrain.planning.recorded import Recorded, recorded_run
from fasttrain.planning.repeats import Measured, choose_weight_decay, epoch_cap
from fasttrain.planning.sequence_length import recorded_context, short_context
from fasttrain.planning.shape import Sized, SizingInputs, init_shape, size_run
from fasttrain.planning.sizing import Speed
from fasttrain.preparation.cache import pending, prepared_dir, stale_cache_note
from fasttrain.system.errors import UsageError

Phases = tuple[tuple[int, tuple[float, ...]], ...]  # (first micro-batch, normalized weights), see mixture.phases


@dataclass(frozen=True)
class Reading:
    """What a run reads of its sources, laid out to a step (Budget.horizon)."""

    epochs: tuple[float, ...] | None  # how many times over it reads each source; None: not known yet
    end: int | None  # the step that is laid out to
    words: str  # how to say that end: "by this run", "in 200 steps, if train.max_time lets the run get that far"
    changes: Phases  # each [[data.mix]] change: (first step, normalized weights)


@dataclass(frozen=True)
class RunPlan:
    """Every derived value a run of `cfg` uses (see the module docstring). Frozen: made once, by `plan_run`."""

    cfg: Config  # resolved: what config.toml records ("auto"s, warmup, model shape, data paths and vocabulary)
    world: distributed.World
    device: torch.device
    sources: tuple[Source, ...]  # the prepared data; () while it is not prepared yet (`prepare`)
    prepare: str  # "" or what will be prepared before the run: "builtin:pydoc into DIR (a 4096-token BPE)"
    rows_per_epoch: tuple[int, ...]  # training rows of each source one epoch reads, whole rounds of all ranks
    accumulation: int  # micro-batches per optimizer step
    mix: Phases  # the mix of the run's rounds, for the loader's Blend
    kernels: Kernels
    kernel_reasons: tuple[str, ...]  # why each of kernel_table.OPS is on or off
    parallel: str  # "none" in a world of one, else train.parallel
    shard_group: int  # ranks one parameter is split over
    checkpoint_format: str  # "file" or "sharded"
    params: int
    flops_per_token: float
    memory: tuple[tuple[str, int], ...]  # the estimate of one rank's bytes, by part (preflight.estimate_bytes)
    available: int  # bytes the device had available as the plan was made (preflight.Machine)
    recorded: tuple[float, ...]  # schedule.progress_from's progress per update (a replay); () otherwise
    init_missing: str  # model.init_from gone since the run in train.out_dir began: the error a new run gets
    notes: tuple[str, ...]  # the "note: ..." lines the run prints before it starts
    speed: Speed | None  # the machine's training speed a shape chosen for a time budget used (sizing.py)
    overlap: tuple[str, float] | None  # the most-read source and its verbatim overlap, where the plan read it
    epoch_limit: float  # data.max_epochs, or the repeats rule's lower limit for new text (repeats.limit_epochs)
    # A distilled run's phase (training/phases.py): its kind, the run it is part of, and in its first round the
    # whole run's plan (its record: distill, members, the speed timed, the overlap, the epoch limit); None: a run
    phase: dict | None = None

    @property
    def precision(self) -> str:
        return self.cfg.train.precision

    @property
    def compiled(self) -> bool:
        return bool(self.cfg.train.compile)

    @property
    def sharded(self) -> bool:
        return self.parallel in distributed.SHARDED

    @property
    def names(self) -> list[str]:
        """The sources' names, as metrics name them (val_loss.NAME)."""
        return [s.name for s in self.sources]

    @property
    def tokens_per_step(self) -> int:
        """Token slots per optimizer update, over all ranks (pads included; a run's `tokens_seen` counts real ones)."""
        return update_tokens(self.cfg.train, self.accumulation, self.world.size)

    def reading(self, step: int = 0, seconds: float = 0.0, mix: Phases | None = None) -> Reading:
        """What the run reads from `step` after `seconds` of training on (a resumed run projects its end from
        its speed so far) with `mix` (default: the plan's; a resumed loader keeps the changes it had begun)."""
        t = self.cfg.train
        a = self.accumulation
        mix = tuple(mix or self.mix)
        end, words = planned_end(t, self.cfg.model, self.tokens_per_step, self.speed, step, seconds)
        epochs = planned_epochs(mix, t.batch_size * self.world.size, self.rows_per_epoch, end, a)
        return Reading(epochs, end, words, tuple((first // a, w) for first, w in mix[1:]))

    def check_new_start(self) -> None:
        """UsageError if a new run cannot start from this plan's weights: model.init_from is gone since the run in
        train.out_dir began (init_shape). train() of a new run and the doctor ask."""
        if self.init_missing:
            raise UsageError(self.init_missing)

    def record(self, reading: Reading | None = None) -> dict:
        """The run's start event (metrics.jsonl), as `--dry-run --json` prints it too: `reading` (default: a new
        run's) says how often each source is read. Token counts are None while the data is not prepared."""
        t, c = self.cfg.train, self.cfg
        reading = reading or self.reading()
        epochs = reading.epochs or (None,) * len(self.sources)
        tokens = {
            split: sum(s.data.meta["tokens"][split] for s in self.sources) if self.sources else None
            for split in ("train", "val")
        }
        return {
            "params": self.params,
            "flops_per_token": self.flops_per_token,
            "device": str(self.device),
            "precision": self.precision,
            "compile": self.compiled,
            "kernels": self.kernels.names(),
            "world_size": self.world.size,
            "parallel": self.parallel,
            "accumulation": self.accumulation,
            "tokens_per_step": self.tokens_per_step,
            "train_tokens": tokens["train"],
            "val_tokens": tokens["val"],
            "sources": [
                {
                    "name": s.name,
                    "dir": s.dir,
                    "weight": s.weight,
                    "train_tokens": s.data.meta["tokens"]["train"],
                    "val_tokens": s.data.meta["tokens"]["val"],
                    "planned_epochs": None if e is None else round(e, 4),
                }
                for s, e in zip(self.sources, epochs)
            ],
            "planned_to_step": reading.end,
            "prepare": self.prepare,
            "batch_size": t.batch_size,
            "seq_len": t.seq_len,
            "max_steps": t.max_steps,
            "max_time": t.max_time,
            "warmup_steps": c.schedule.warmup_steps,
            "decay": c.schedule.decay,
            "lr": c.optim.lr,
            "mix_changes": [[step, list(w)] for step, w in reading.changes],
            "kernel_reasons": list(self.kernel_reasons),
            "shard_group": self.shard_group,
            "checkpoint_format": self.checkpoint_format,
            "memory_bytes": sum(b for _, b in self.memory),
            "available_bytes": self.available,
            "log_interval": t.log_interval,
            "eval_interval": t.eval_interval,
            "checkpoint_interval": c.checkpoint.interval,
            "out_dir": t.out_dir,
            "members": c.model.members,
            "distill": t.distill,
            # What the plan chose and what it measured to choose it; `notes` says why, as the run prints them
            "shape": {"n_layers": c.model.n_layers, "d_model": c.model.d_model, "n_heads": c.model.n_heads},
            "weight_decay": c.optim.decay(),
            "epoch_limit": self.epoch_limit,
            "overlap": None if self.overlap is None else {"source": self.overlap[0], "fraction": self.overlap[1]},
            "speed": None if self.speed is None else {"points": [list(p) for p in self.speed.points]},
            "notes": list(self.notes),
            "phase": self.phase,
        }


def planned_end(
    t: TrainConfig, model: ModelConfig, tokens_per_step: int, speed: Speed | None, step: int = 0, seconds: float = 0.0
) -> tuple[int | None, str]:
    """The step a run of `t` and `model` (`tokens_per_step` token slots an update) is laid out to from `step` after
    `seconds` of training, and the words saying so (Budget.horizon; None: not known); a new run under train.max_time
    whose shape was timed (`speed`) ends where that speed projects the clock's end, if that comes first."""
    end, words = Budget.of(t).horizon(step, seconds)
    # the updates the clock holds at the speed the shape was chosen at; from a later step, the speed so far (horizon)
    by_time = None if step else sizing.budget_steps(speed, model, t, tokens_per_step)
    if by_time is not None and (end is None or int(by_time) < end):
        return int(by_time), f"in the ~{int(by_time)} steps train.max_time gives at the speed timed for the shape"
    return end, words


def planned_epochs(
    mix: Sequence[tuple[int, Sequence[float]]],
    rows_per_round: int,
    rows_per_epoch: Sequence[int],
    end: int | None,
    accumulation: int,
) -> tuple[float, ...] | None:
    """How many times over a run to step `end` reads each source: the rows the loader's Blend of `mix` plans for
    those updates (of `accumulation` rounds of `rows_per_round` rows) over the rows one epoch of it reads. The one
    count of a run's epochs: the start event, the dry-run table, the warnings and the weight decay read it. None
    where `end` is not known or the data not prepared (no `rows_per_epoch`)."""
    if end is None or not rows_per_epoch:
        return None
    rows = Blend(mix, rows_per_round).planned_rows(end * accumulation)
    return tuple(r / n for r, n in zip(rows, rows_per_epoch))


def plan_run(
    cfg: Config, world: distributed.World, device: torch.device, resume: str | None = None, speed: Speed | None = None
) -> RunPlan:
    """The plan of a run of `cfg` (validated) by `world` on `device` (this rank's). UsageError, in one line, for
    what the run would refuse before its first step; writes nothing. A new run with model.n_layers = 0 times the
    machine (unless given an earlier plan's `speed`); one resumed from the save `resume` names (a --resume spec),
    or a replay, trains the shape, context and weight decay its run recorded, and reads the overlap its start event
    recorded rather than measuring it again (planning/recorded.py). Its stages, each handing the next a frozen
    record, are docs/architecture.md's questions in order: before the data, the data, the sizing and decay, the
    machine's checks."""
    settled = settle_before_data(cfg, device, resume)
    t = settled.cfg.train
    shard_group = distributed.shard_group(world, t.parallel, t.shard_group_size)
    data = plan_data(settled)
    accumulation = accumulation_steps(t, world.size)
    machine = Machine.of(device)  # its free memory read once: every choice bounded by memory weighs the same bytes
    given = SizingInputs(
        world,
        machine,
        data.sources,
        data.estimate,
        accumulation,
        shard_group,
        settled.earlier,
        speed,
        settled.context_set,
    )
    decided = size_and_decay(data, given, resume)
    return checked_plan(device, given, settled, data, decided)


@dataclass(frozen=True)
class Settled:
    """What a plan settles before it reads the data (`settle_before_data`): the config the data is planned with."""

    cfg: Config  # train resolved (no "auto"), the warmup fitted, the model's shape as set or init_from's, the context
    notes: tuple[str, ...]
    recorded: tuple[float, ...]  # RunPlan.recorded: a replay's progress per update; () otherwise
    init_missing: str  # RunPlan.init_missing: "" or the error a new run gets (init_shape)
    earlier: Recorded | None  # what a resumed or replayed run recorded, where this config leaves a choice to the plan
    context_set: bool  # train.seq_len set, not chosen

    @property
    def choose_seq_len(self) -> bool:
        """Whether the plan chooses the context once the run's tokens are known (sequence_length.py)."""
        return not self.context_set and self.earlier is None


def settle_before_data(cfg: Config, device: torch.device, resume: str | None) -> Settled:
    """The first stage of `plan_run`: `cfg` resolved on `device` before any data is read (the device, precision and
    compile; the warmup; a replay's progress; a Hugging Face model's shape; what the run resumed from `resume` or
    replayed recorded; the context set, recorded or short), with the notes said so far."""
    notes: list[str] = []
    schedule = cfg.schedule
    if schedule.progress_from:  # config.toml records where, for a resume from any directory
        schedule = replace(schedule, progress_from=os.path.abspath(schedule.progress_from))
    shape, init_note, init_missing = init_shape(cfg)
    chosen = not (shape.n_layers and cfg.train.seq_len and shape.members) or cfg.optim.weight_decay_rule == "repeats"
    # A resumed or replayed run's config: the shape and context it trained, where this config leaves them to the plan,
    # and its precision, where "auto" would time the machine again
    found = (
        recorded_run(cfg.train.out_dir, schedule.progress_from, resume)
        if chosen or cfg.train.precision == "auto"
        else None
    )
    # t has no "auto" left to record; `precision` says why "auto" chose fp32 where bf16 was there to choose
    t, precision = resolve_train(cfg.train, device, found.config.train.precision if found else "")
    budgeted = t.max_time > 0 or schedule.progress_from  # a replay keeps the warmup it replays
    schedule, note = fit_warmup(schedule, 0 if budgeted else t.max_steps)
    budget = budget_note(cfg.schedule, t.max_time)
    tied = tied_head_note(cfg.optim, cfg.model)
    notes += [line for line in (note, budget, tied, compile_mode_note(t, device), precision) if line]
    recorded = tuple(recorded_progress(schedule.progress_from, t.max_steps)) if schedule.progress_from else ()
    notes += [init_note] if init_note else []
    cfg = replace(cfg, train=t, schedule=schedule, model=shape)
    earlier = found if chosen else None
    context_set = bool(t.seq_len)
    if not context_set:  # chosen once the run's tokens are known, unless the run recorded it: planned short till then
        t, note = recorded_context(t, earlier.config, earlier.where) if earlier else (short_context(t, shape), "")
        notes += [note] if note else []
        cfg = replace(cfg, train=t)
    return Settled(cfg, tuple(notes), recorded, init_missing, earlier, context_set)


@dataclass(frozen=True)
class Data:
    """The run's data as the plan finds it (`plan_data`)."""

    cfg: Config  # resolved on the data (prepared.resolve): its folder and paths, the model's vocabulary
    sources: tuple[Source, ...]  # RunPlan.sources: () while the data is not prepared yet
    prepare: str  # RunPlan.prepare: "" or what will be prepared before the run
    estimate: float  # the training tokens of a folder not prepared yet (0 once it is)
    notes: tuple[str, ...]


def plan_data(settled: Settled) -> Data:
    """The second stage of `plan_run`: the data `settled.cfg` names, opened where it is prepared (else what preparing
    it will need, checked now and estimated), the config resolved on it; UsageError for a train.monitor that is not a
    validation loss of the run, or a Hugging Face model whose ids are not the data's."""
    cfg = settled.cfg
    notes: list[str] = []
    sources = tuple(open_sources(cfg.data))  # data.dir, or each [[data.sources]] folder
    prepare = ""
    estimate = 0.0
    if sources:
        vocab = sources[0].data.vocab_size
        note = stale_cache_note(cfg.data)
        notes += [note] if note else []
    else:  # one folder, not prepared yet: what preparing it will need is checked now, nothing is read
        prepare, vocab, estimate, estimated = pending(cfg.data)
        if not cfg.model.n_layers or settled.choose_seq_len:  # planned at the estimate, as again once prepared
            notes.append(f"the data is not prepared yet: the model's shape and context are planned for {estimated}")
    losses = ["val_loss", *(f"val_loss.{s.name}" for s in sources if len(sources) > 1)]
    if cfg.train.monitor not in losses:
        raise UsageError(
            f"train.monitor = {cfg.train.monitor!r}: not a validation loss of this run; one of {', '.join(losses)}"
        )
    directory = sources[0].dir if sources else prepared_dir(cfg.data)
    cfg = resolve(cfg, directory, vocab, sources[0].data.meta["request"] if sources else None)
    if sources and cfg.model.init_from and not settled.init_missing:  # the model's ids must be the data's
        tokenizer_file = f"{directory}/tokenizer.json"
        tokenizer_note = check_hf_tokenizer(cfg.model.init_from, Tokenizer.load(tokenizer_file), tokenizer_file)
        notes += [tokenizer_note] if tokenizer_note else []
    return Data(cfg, sources, prepare, estimate, tuple(notes))


@dataclass(frozen=True)
class Decided:
    """The run's shape, context, budget, members, mix and weight decay (`size_and_decay`)."""

    cfg: Config  # the model, train, data.max_epochs and optim sections as the run trains them
    sized: Sized  # what size_run decided and weighed: the rows an epoch, the speed, the epoch limit
    mix: Phases  # RunPlan.mix
    overlap: Measured | None  # the most-read source's index and verbatim overlap, where the plan read it
    notes: tuple[str, ...]


def size_and_decay(data: Data, given: SizingInputs, resume: str | None) -> Decided:
    """The third stage of `plan_run`: the run of `data.cfg` sized (`size_run`: shape, context, budget, members), a
    new run's distillation and its teacher's start, the mix's phases and the weight decay for the epochs planned (a
    run resumed from `resume` or replayed keeps the decay its `given.earlier` recorded)."""
    cfg = data.cfg
    sized = size_run(cfg, given)
    model = sized.model
    t = sized.train
    notes = list(sized.notes)
    tokens_per_step = given.tokens_per_step(t)
    if t.distill:  # resolved: only a new run's members are distilled, and config.toml records whether this run is one
        # one model is a first round only where its stop is the epoch limit (not a train.max_steps set)
        limit = bool(sized.speed) and epoch_cap(sized.corpus, tokens_per_step, sized.epoch_limit) == t.max_steps
        t = replace(t, distill=resume is None and distilled(model, t, tokens_per_step, sized.speed if limit else None))
        notes += [distill_note(model.members, t)] if t.distill else []
    # Resolved too: a run with no teacher, or one left one model, has nothing to start from
    if t.teacher_init and not (t.teacher or t.distill):
        t = replace(t, teacher_init=False)
    # data.max_epochs as the plan applied it (the repeats rule's lower limit for new text): what config.toml records
    cfg = replace(cfg, model=model, train=t, data=replace(cfg.data, max_epochs=sized.epoch_limit))
    mix, mix_notes = phases(cfg.data, t.max_steps, given.accumulation)
    notes += mix_notes
    end, _ = planned_end(t, cfg.model, tokens_per_step, sized.speed)  # None: a time budget with no speed timed
    epochs = planned_epochs(mix, t.batch_size * given.world.size, sized.rows_per_epoch, end, given.accumulation)
    recorded = given.earlier.config if given.earlier else None
    optim, note, overlap = choose_weight_decay(cfg, data.sources, epochs, recorded, sized.overlap)
    notes += [note] if note else []
    return Decided(replace(cfg, optim=optim), sized, tuple(mix), overlap, tuple(notes))


def checked_plan(device: torch.device, given: SizingInputs, settled: Settled, data: Data, decided: Decided) -> RunPlan:
    """The last stage of `plan_run`: the machine's checks of the run `decided` on `device` (the parallel mode, each
    kernel's choice, the memory estimate against `given.machine`, attention, fp8, the checkpoint format), refused in
    one line where the run would refuse it; then the plan, its notes those of each stage in order."""
    cfg = decided.cfg
    t = cfg.train
    parallel = t.parallel if given.world.distributed else "none"  # what a checkpoint records too
    sharded = parallel in distributed.SHARDED
    m = cfg.model  # the shapes the measured dispatch table is read at ("auto" on a GPU)
    shapes = run_shapes(m.d_model, m.vocab_size, num_params(m))
    kernels = kernels_on(
        cfg.kernels,
        device,
        sharded,
        shapes,
        compiled=bool(t.compile),
        fp8=t.fp8,
        softcap=m.logit_softcap,
        optimizer=cfg.optim.name,
    )
    memory = check_fits(cfg, given.machine, t.precision, given.shard_group)
    if t.distill:  # the student, its teacher of the first round's members beside it, refused now if it cannot fit
        student = replace(cfg, model=replace(m, members=1))
        check_fits(student, given.machine, t.precision, given.shard_group, teachers=m.members)
    check_attention(t.attention, device)
    check_fp8(t.fp8, device)
    k = cfg.checkpoint
    sharded_saves = k.format == "sharded" or (k.format == "auto" and sharded) or k.async_save  # as Checkpointer
    overlap = decided.overlap
    return RunPlan(
        cfg=cfg,
        world=given.world,
        device=device,
        sources=data.sources,
        prepare=data.prepare,
        rows_per_epoch=decided.sized.rows_per_epoch,
        accumulation=given.accumulation,
        mix=decided.mix,
        kernels=kernels,
        kernel_reasons=kernel_reasons(cfg, kernels),
        parallel=parallel,
        shard_group=given.shard_group,
        checkpoint_format="sharded" if sharded_saves else "file",
        params=num_params(m) * m.members,
        flops_per_token=flops_per_token(m, t.seq_len),
        memory=tuple(memory.items()),
        available=given.machine.available,
        recorded=settled.recorded,
        init_missing=settled.init_missing,
        notes=settled.notes + data.notes + decided.notes,
        speed=decided.sized.speed,
        overlap=None if overlap is None else (data.sources[overlap[0]].name, overlap[1]),
        epoch_limit=decided.sized.epoch_limit,
    )


def accumulation_steps(t: TrainConfig, world_size: int = 1) -> int:
    """Micro-batches per optimizer step: tokens_per_update / (batch_size x seq_len x world_size), of a planned `t`
    (train.seq_len chosen: RunPlan.cfg.train; the plan asks at the short context, whose rows hold the tokens of
    either)."""
    if not t.seq_len:
        raise UsageError("train.seq_len = 0 is chosen by the run's plan: pass its config (RunPlan.cfg.train)")
    per_micro_batch = t.batch_size * t.seq_len * world_size
    if t.tokens_per_update == 0:
        return 1
    if t.tokens_per_update % per_micro_batch:
        raise UsageError(
            f"train.tokens_per_update = {t.tokens_per_update} is not a multiple of batch_size x seq_len x "
            f"world size = {t.batch_size} x {t.seq_len} x {world_size} = {per_micro_batch}"
        )
    return t.tokens_per_update // per_micro_batch


def compile_mode_note(t: TrainConfig, device: torch.device) -> str:
    """A note where train.compile_mode (resolved `t`) would change nothing: the run does not compile, or on a CPU
    "reduce-overhead", which only adds CUDA graphs to the default compile (max-autotune still tunes a CPU's
    matmul templates, so its modes do something there)."""
    mode = t.compile_mode
    if mode == "default":
        return ""
    if not t.compile:
        return f'train.compile_mode = "{mode}" does nothing: train.compile is off'
    if device.type != "cuda" and mode == "reduce-overhead":
        return (
            f'train.compile_mode = "reduce-overhead" adds only CUDA graphs, which a {device.type.upper()} has none of: '
            "the compile is the default one"
        )
    return ""


def kernel_reasons(cfg: Config, kernels: Kernels) -> tuple[str, ...]:
    """Why each kernel (kernel_table.OPS order) is on or off: compute/device.kernels_on's reasons, and for Muon
    which parameters the AdamW kernel would update."""
    reasons = list(kernels.reasons)
    if cfg.optim.name == "muon":  # Muon's own update is not the kernel's: only the AdamW half would run it
        reasons[-1] += " (for the parameters Muon leaves to AdamW: embeddings, head, norms)"
    return tuple(reasons)
