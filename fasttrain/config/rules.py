"""What a config may hold beyond its types: each value's range, the settings that must agree, a mixture's
[[data.sources]] and [[data.mix]] tables, and the keys that apply only with some value of another setting.
Every problem is a one-line UsageError naming where the value came from (`_blame`).

Imports from fasttrain: config.sections, config.values, system.errors.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from fasttrain.config.sections import Config, DataConfig
from fasttrain.config.values import _show, toml_value
from fasttrain.system.errors import UsageError

MAX_SEED = 2**32 - 1  # NumPy's generator takes 32-bit seeds; every tool accepts the same range
MAX_PROMPT_CHARS = 65_536  # the model reads at most max_seq_len tokens of a prompt; tokenizing more costs memory
MAX_PREFETCH = 64  # batches read ahead, each held in memory until used

# Allowed values, checked once all types are right: "section.key" -> (test, "must be ...").
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.vocab_size": _NON_NEGATIVE,
    "model.max_seq_len": _POSITIVE,
    # 0: 64 x n_layers (planning/sizing.py); odd never works: d_model = n_heads x an even head size (RoPE rotates pairs)
    "model.d_model": (lambda v: v >= 0 and v % 2 == 0, "even and >= 0 (each head's size is even: RoPE rotates pairs)"),
    "model.n_layers": _NON_NEGATIVE,  # 0: chosen for the run's compute (planning/sizing.py)
    "model.n_heads": _NON_NEGATIVE,  # 0: d_model / 64
    "model.n_kv_heads": _NON_NEGATIVE,
    "model.ffn_hidden": _NON_NEGATIVE,
    "model.multiple_of": _POSITIVE,
    "model.rope_theta": _POSITIVE,
    "model.norm_eps": _POSITIVE,
    "model.dropout": _FRACTION,
    "model.members": _NON_NEGATIVE,  # 0: chosen with the shape (planning/plan.py)
    "data.inputs": (lambda v: all(v), "a list of non-empty paths"),
    "data.text_field": (bool, "a non-empty field name"),
    "data.vocab_size": (
        lambda v: v == 0 or v > 256,
        "0 or > 256 (a byte-level BPE needs the 256 bytes plus an end-of-text token)",
    ),
    "data.val_fraction": _FRACTION,
    "data.prefetch": (
        lambda v: 0 <= v <= MAX_PREFETCH,
        f"in [0, {MAX_PREFETCH}] (batches held in memory ahead of use)",
    ),
    "data.max_epochs": _POSITIVE,
    "model.logit_softcap": _NON_NEGATIVE,
    "optim.embedding_lr": _NON_NEGATIVE,
    "optim.head_lr": _NON_NEGATIVE,
    "optim.head_lr_width": _NON_NEGATIVE,
    "optim.lr": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.max_weight_decay": _NON_NEGATIVE,
    "optim.weight_decay_chosen": _NON_NEGATIVE,
    "optim.beta1": _FRACTION,
    "optim.beta2": _FRACTION,
    "optim.eps": _POSITIVE,
    "optim.max_grad_norm": _NON_NEGATIVE,
    "optim.muon.lr": _POSITIVE,
    "optim.muon.momentum": _FRACTION,
    "optim.muon.ns_steps": (lambda v: 0 < v < 100, "in [1, 99]"),  # torch.optim.Muon's own limit
    "optim.muon.second_moment_beta2": _FRACTION,
    "optim.sgd.momentum": _FRACTION,
    "optim.adafactor.beta2_decay": (lambda v: v <= 0, "<= 0"),
    "optim.adafactor.eps1": _NON_NEGATIVE,
    "optim.adafactor.eps2": _NON_NEGATIVE,
    "optim.adafactor.d": _POSITIVE,
    "schedule.warmup_steps": _NON_NEGATIVE,
    "schedule.min_lr": _NON_NEGATIVE,
    "schedule.cooldown_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "schedule.step_every": _POSITIVE,
    "schedule.step_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "train.max_steps": (lambda v: v >= 0, ">= 0 (0: no step limit, for a run with train.max_time)"),
    # a year at most: a budget the plan turns into steps at the speed timed (1e308 s is no count of steps)
    "train.max_time": (lambda v: 0 <= v <= 366 * 24 * 3600, ">= 0 and at most a year (31,622,400 s)"),
    "train.device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    "train.out_dir": (bool, "a directory path"),
    "train.batch_size": _POSITIVE,
    "train.seq_len": _NON_NEGATIVE,  # 0: chosen for the run's planned tokens (planning/sequence_length.py)
    "train.tokens_per_update": _NON_NEGATIVE,
    "train.log_interval": _POSITIVE,
    "train.eval_interval": _POSITIVE,
    "train.eval_steps": _POSITIVE,
    "train.early_stop_patience": _NON_NEGATIVE,
    "train.early_stop_min_delta": _NON_NEGATIVE,
    "train.teacher_weight": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.sample_prompt": (
        lambda v: 0 < len(v) <= MAX_PROMPT_CHARS,
        f"non-empty (generation starts from it) and at most {MAX_PROMPT_CHARS:,} characters",
    ),
    "train.seed": (lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]"),
    "train.sample_tokens": _NON_NEGATIVE,
    "train.shard_group_size": _NON_NEGATIVE,
    "eval.num_fewshot": _NON_NEGATIVE,
    "eval.limit": _NON_NEGATIVE,  # that it divides the world is checked at launch
    "checkpoint.interval": _POSITIVE,
    "checkpoint.keep_last": _POSITIVE,
    "recovery.max_skips": _POSITIVE,
    "recovery.lr_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "recovery.max_rollbacks": _NON_NEGATIVE,
    "log.project": (bool, "a W&B project name"),
}

# Settings that must agree, checked after the ranges (so n_heads > 0 here):
# "key <relation> other key" -> (is_broken(cfg), why), said as "key = 1 <relation> other = 2 (why)".
_CONFLICTS: dict[str, tuple[Callable[[Config], bool], str]] = {
    "model.members does not go with model.init_from": (
        lambda c: c.model.members > 1 and bool(c.model.init_from),
        "an ensemble's members each start from an initialization of their own",
    ),
    "train.distill does not go with train.teacher": (
        lambda c: c.train.distill and bool(c.train.teacher),
        "a distilled ensemble is its own student's teacher",
    ),
    "train.teacher_init does not go with model.init_from": (
        lambda c: c.train.teacher_init and bool(c.train.teacher) and bool(c.model.init_from),
        "two sources of the first weights: choose one",
    ),
    "train.seq_len exceeds model.max_seq_len": (
        lambda c: c.train.seq_len > c.model.max_seq_len,
        "the model has no positions beyond its context",
    ),
    "train.max_steps and train.max_time": (
        lambda c: c.train.max_steps == 0 and c.train.max_time == 0,
        "0 is no limit, and a run needs one: steps, a time budget or both",
    ),
    "schedule.progress_from does not go with train.max_time": (
        lambda c: bool(c.schedule.progress_from) and c.train.max_time > 0,
        "a replay follows the recorded progress, not a clock: set train.max_time = 0",
    ),
    "schedule.min_lr exceeds optim.lr": (
        lambda c: c.schedule.min_lr > c.optim.lr,
        "the schedule decays from lr down to min_lr",
    ),
    "model.d_model is not divisible by model.n_heads": (
        lambda c: c.model.n_heads > 0 and c.model.d_model % c.model.n_heads != 0,
        "each head gets d_model / n_heads dimensions",
    ),
    "model.n_heads is not divisible by model.n_kv_heads": (
        lambda c: c.model.n_kv_heads > 0 and c.model.n_heads > 0 and c.model.n_heads % c.model.n_kv_heads != 0,
        "each key/value head serves the same number of query heads",
    ),
    "model.d_model / model.n_heads": (
        lambda c: c.model.n_heads > 0 and (c.model.d_model // c.model.n_heads) % 2 != 0,
        "an odd head size, but RoPE rotates pairs of dimensions",
    ),
    "train.compile_mode does not work with data.padding": (
        lambda c: (
            c.train.compile_mode in ("reduce-overhead", "max-autotune")
            and c.data.batching != "packed"
            and c.data.padding != "fixed"
        ),
        'CUDA graphs replay fixed shapes; use data.padding = "fixed"',
    ),
    # model.vocab_size against the tokenizer: check_vocab, once the tokenizer is known (data.vocab_size is
    # what a BPE is asked for; it may learn fewer, so it cannot be checked here).
}

# Settings that need another to have some value, checked with the pairs above: (key, other key, what the other
# must be, is_broken(cfg), why) -> "key = 1 needs other = true, not false (why)": the value needed, then the one set.
_NEEDS: list[tuple[str, str, str, Callable[[Config], bool], str]] = [
    (
        "checkpoint.final_weights",
        "checkpoint.keep_best",
        "= true",
        lambda c: c.checkpoint.final_weights == "best" and not c.checkpoint.keep_best,
        "the best weights are the best save's",
    ),
    (
        "optim.sgd.nesterov",
        "optim.sgd.momentum",
        "> 0",
        lambda c: c.optim.sgd.nesterov and c.optim.sgd.momentum == 0,
        "Nesterov momentum without momentum is plain SGD",
    ),
]


# Keys that mean something only for some values of another setting: (key or table, the setting, those values).
# Setting one for another value is an error, not silently ignored; config_to_toml leaves it out.
_APPLIES: list[tuple[str, str, tuple[str, ...]]] = [
    *[(f"optim.{key}", "optim.name", ("adamw", "muon")) for key in ("beta1", "beta2", "eps")],
    *[(f"optim.{name}", "optim.name", (name,)) for name in ("muon", "sgd", "adafactor")],
    *[(f"schedule.{key}", "schedule.decay", ("step",)) for key in ("step_every", "step_factor")],
    ("schedule.cooldown_fraction", "schedule.decay", ("wsd",)),
    ("train.shard_group_size", "train.parallel", ("hsdp",)),
    ("optim.weight_decay_chosen", "optim.weight_decay_rule", ("repeats",)),
]


def _check_update(cfg: Config, sources: dict[str, str]) -> None:
    """UsageError where train.tokens_per_update is not a whole number of micro-batches (with seq_len 0 the plan checks
    it at the context it chooses: accumulation_steps); the world size is only known at launch, where the trainer
    checks the rest."""
    t = cfg.train
    micro = t.batch_size * t.seq_len
    if t.seq_len > 0 and t.tokens_per_update % micro != 0:
        where = _blame(sources, "train.tokens_per_update", "train.batch_size", "train.seq_len")
        raise UsageError(
            f"{where}: train.tokens_per_update = {t.tokens_per_update} is not a multiple of train.batch_size x "
            f"train.seq_len = {t.batch_size} x {t.seq_len} = {micro} (it must be a whole number of micro-batches)"
        )


def _check_mixture(cfg: Config, sources: dict[str, str]) -> None:
    """UsageError for [[data.sources]] and [[data.mix]] tables that cannot make a mixture: the sources first (each
    table, then their weights), then the mix's changes."""
    d, where = cfg.data, _blame(sources, "data.sources", "data.mix")
    if not d.sources:
        if d.mix:
            raise UsageError(f"{where}: data.mix changes the weights of [[data.sources]] tables, but there are none")
        return
    if d.dir or d.inputs:
        raise UsageError(
            f"{_blame(sources, 'data.sources', 'data.dir', 'data.inputs')}: data.sources names the prepared folders of "
            "a mixture; leave data.dir and "
            "data.inputs unset (or give data.dir alone)"
        )
    _check_sources(d, where)
    _check_weights(where, "data.sources[{}].weight", [s.weight for s in d.sources])
    # the changes are placed at steps: a --set of the run's length can be what breaks them
    _check_mix(d, cfg.train.max_steps, _blame(sources, "data.sources", "data.mix", "train.max_steps", "train.max_time"))


def _check_weights(where: str, name: str, weights: list[float]) -> None:
    """UsageError, blaming `where`, for a negative weight or weights that are all 0. `name`: "...{}..." with the
    index in {} ("*" for all of them)."""
    for i, w in enumerate(weights):
        if w < 0:
            raise UsageError(f"{where}: {name.format(i)}: must be >= 0, got {_show(w)}")
    if not sum(weights) > 0:
        raise UsageError(f"{where}: {name.format('*')}: every weight is 0; give a source a weight above 0")


def _check_sources(d: DataConfig, where: str) -> None:
    """UsageError, blaming `where`, for the first [[data.sources]] table with a name metrics cannot record or
    another table's, no folder, or another table's folder."""
    seen: dict[str, int] = {}
    named: dict[str, int] = {}
    for i, s in enumerate(d.sources):
        if s.name and not re.fullmatch(r"\S+", s.name):
            raise UsageError(
                f"{where}: data.sources[{i}].name = {_show(s.name)}: a name without spaces, as "
                "metrics record it (val_loss.NAME)"
            )
        if s.name in named:
            raise UsageError(
                f"{where}: data.sources[{i}].name = {_show(s.name)} is the name of "
                f"data.sources[{named[s.name]}] too; give each source a name of its own"
            )
        if s.name:
            named[s.name] = i
        if not s.dir:
            raise UsageError(f'{where}: data.sources[{i}].dir: expected a prepared folder, got ""')
        real = os.path.realpath(s.dir)
        if real in seen:
            raise UsageError(
                f"{where}: data.sources[{i}].dir = {_show(s.dir)} is the folder of "
                f"data.sources[{seen[real]}] again; name each folder once, with its whole weight"
            )
        seen[real] = i


def _check_mix(d: DataConfig, max_steps: int, where: str) -> None:
    """UsageError, blaming `where`, for the first [[data.mix]] change that cannot be placed at a step of its own
    within train.max_steps (`max_steps`), in order, or whose weights do not fit d.sources."""
    last = 0
    if d.mix and not max_steps:  # a run on train.max_time alone: its last step is known only at its end
        raise UsageError(
            f"{where}: data.mix: changes need train.max_steps to be placed at their steps; a run on "
            "train.max_time alone has none (give train.max_steps too)"
        )
    for i, change in enumerate(d.mix):
        name = f"data.mix[{i}]"
        if (change.step > 0) == (change.fraction > 0) or change.step < 0 or not change.fraction < 1:
            raise UsageError(
                f"{where}: {name}: give step (>= 1) or fraction (in (0, 1)) of train.max_steps, one of "
                f"them, got step = {change.step}, fraction = {_show(change.fraction)}"
            )
        step = change.step or round(change.fraction * max_steps)
        placed = f"fraction {_show(change.fraction)} of train.max_steps = {max_steps} is step {step}"
        if step == 0:  # a fraction rounded down to the first step, where data.sources' weights hold
            raise UsageError(
                f"{where}: {name}: {placed}, the run's first, where the data.sources weights "
                "apply; give a larger fraction or a step >= 1 (or these weights to data.sources)"
            )
        if step >= max_steps:
            raise UsageError(
                f"{where}: {name}: the change at step {step} is past the run's last step "
                f"(train.max_steps = {max_steps})"
            )
        if step <= last:
            raise UsageError(
                f"{where}: {name}: at step {step}{f' ({placed})' if change.fraction else ''}, not "
                f"after the change before it (step {last}); list the changes in the order of their "
                "steps, far enough apart to fall on different steps"
            )
        last = step
        if len(change.weights) != len(d.sources):
            raise UsageError(
                f"{where}: {name}.weights: {len(change.weights)} weights for {len(d.sources)} "
                "[[data.sources]] tables; give one per source, in their order"
            )
        _check_weights(where, name + ".weights[{}]", change.weights)


def _validate(cfg: Config, sources: dict[str, str]) -> None:
    """Raise UsageError for the first value out of range, then for the first pair that disagrees, then for the
    first setting another needs."""
    for name, (ok, requirement) in _RANGES.items():
        value = _get(cfg, name)
        if not ok(value):
            raise UsageError(f"{_blame(sources, name)}: {name}: must be {requirement}, got {_show(value)}")
    for rule, (is_broken, why) in _CONFLICTS.items():
        name, *relation, other = rule.split()
        if is_broken(cfg):
            raise UsageError(
                f"{_blame(sources, name, other)}: {name} = {_show(_get(cfg, name))} {' '.join(relation)} "
                f"{other} = {_show(_get(cfg, other))} ({why})"
            )
    for name, other, needed, is_broken, why in _NEEDS:
        if is_broken(cfg):
            raise UsageError(
                f"{_blame(sources, name, other)}: {name} = {_show(_get(cfg, name))} needs {other} {needed}, "
                f"not {_show(_get(cfg, other))} ({why})"
            )
    _check_update(cfg, sources)
    _check_mixture(cfg, sources)


def _check_applicable(cfg: Config, sources: dict[str, str], order: list[str]) -> None:
    """UsageError for the first key given that does not apply (_APPLIES), unless a later source (`order`) chose that
    setting: a moot [optim.muon] under `--set optim.name=adamw` goes back to its default."""
    for name in list(sources):
        rule = _applies(cfg, name)
        if rule is not None:
            setting, allowed = rule
            if setting in sources and order.index(sources[setting]) > order.index(sources[name]):
                section, _, key = name.rpartition(".")
                setattr(_get(cfg, section), key, getattr(type(_get(cfg, section))(), key))
                del sources[name]
                continue
            only = " or ".join(map(toml_value, allowed))
            raise UsageError(
                f"{_blame(sources, name, setting)}: {name}: applies only with {setting} = {only}, "
                f"not {_show(_get(cfg, setting))}"
            )


def _applies(cfg: Config, name: str) -> tuple[str, tuple[str, ...]] | None:
    """None if key or table `name` applies to `cfg`, else the (setting, values) it needs."""
    for key, setting, allowed in _APPLIES:
        if (name == key or name.startswith(key + ".")) and _get(cfg, setting) not in allowed:
            return setting, allowed
    return None


def _get(cfg: Config, name: str) -> Any:
    """The value of "section.key" (or "section.table.key") in `cfg`."""
    value = cfg
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _blame(sources: dict[str, str], *names: str) -> str:
    """Where to send the user about a problem with `names`: the source that set one of them last (--set
    over files, a file over the base it extends: the most recent edit), else the defaults."""
    order = list(sources)
    given = [n for n in names if n in sources]
    return sources[max(given, key=order.index)] if given else "defaults"
