"""A distilled run (train.distill): an ensemble trained first, then one model of a member's shape trained on the
ensemble's probabilities, so that final/ holds one model (one model's memory and cost, and it exports).

Imports from fasttrain: checkpoints.saves, config, planning.members.

It sits with the train command, which runs the phases: each is a Trainer of its own.

    RUN/ensemble/   the members' run: config.toml, checkpoints/, metrics.jsonl, final/ (`fasttrain evaluate RUN/ensemble`)
    RUN/            the student's run: train.teacher = RUN/ensemble/final (with train.teacher_init it starts from the
                    first member's weights); its final/ is the run's model

Each phase is an ordinary run in its own directory, so it saves, resumes and refuses as any run does. Which phase a
start goes on with is read from the directories (`resumed_phase`): the members' until their metrics.jsonl ends with
its end event, then the student's. Under train.max_time the members train for `members.ensemble_share` of it and
the student for what they left, to the same train.max_steps (the same tokens as one member).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from fasttrain.checkpoints.saves import has_saves
from fasttrain.config import Config, Seconds, load_config
from fasttrain.planning.members import ensemble_share

ENSEMBLE_DIR = "ensemble"  # the members' run, inside the run directory
# In RUN/ensemble: the whole run began with --overwrite, so its student replaces the earlier run in RUN (which stays
# whole until then: the members' phase touches only RUN/ensemble)
REPLACES = "replaces-earlier-run"
# What makes a distilled run's phases, which a resume's --set items do not change (the rest they do, as a resume)
PHASE_KEYS = ("model.", "data.", "train.out_dir", "train.max_", "train.teacher", "train.distill", "train.seq_len")


def members_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where a distilled run in `run_dir` trains its members: absolute, so that a resume from anywhere finds them."""
    return Path(os.path.abspath(run_dir)) / ENSEMBLE_DIR


def ensemble_config(cfg: Config) -> Config:
    """The members' run of a distilled plan's `cfg` (RunPlan.cfg with train.distill resolved true): its members, in
    RUN/ensemble, for their share of train.max_time."""
    t = cfg.train
    share = Seconds(round(t.max_time * ensemble_share(cfg.model.members), 3))
    members = replace(t, distill=False, teacher_init=False, max_time=share, out_dir=str(members_dir(t.out_dir)))
    return replace(cfg, train=members)


def phase_items(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """A resume's --set items split into those its phases take (device, intervals, rates, ...) and those that would
    remake a phase (PHASE_KEYS: the shape, data and budget the members recorded, the student's teacher)."""
    remakes = [item.partition("=")[0].strip().startswith(PHASE_KEYS) for item in overrides]
    return [i for i, r in zip(overrides, remakes) if not r], [i for i, r in zip(overrides, remakes) if r]


def kept_phase_items(run_dir: str | os.PathLike[str], overrides: Sequence[str]) -> list[str]:
    """The items of a resume's `overrides` that would remake the phases (`phase_items`; the last of each key) and
    are not what the members recorded already, which the resume says it leaves out. train.out_dir names the run,
    train.max_time is the whole run's budget and train.distill what made it two phases: none of them is one."""
    path = members_dir(run_dir) / "config.toml"
    whole = ("train.out_dir", "train.max_time", "train.distill")
    last = {item.partition("=")[0].strip(): item for item in phase_items(overrides)[1]}
    remakes = {key: item for key, item in last.items() if key not in whole}
    recorded, applied = load_config(path), load_config(path, list(remakes.values()))

    def value(cfg: Config, key: str) -> object:
        section, _, name = key.partition(".")
        return getattr(getattr(cfg, section), name, None)

    return [item for key, item in remakes.items() if value(applied, key) != value(recorded, key)]


def recorded_members(run_dir: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """The members' run's config as RUN/ensemble/config.toml records it, in RUN/ensemble wherever the run began,
    with the `overrides` (a resume's --set items) a phase takes (`phase_items`)."""
    cfg = load_config(members_dir(run_dir) / "config.toml", phase_items(overrides)[0])
    return replace(cfg, train=replace(cfg.train, out_dir=str(members_dir(run_dir))))


def student_config(ensemble: Config, run_dir: str, max_time: float, spent: float, teacher_init: bool) -> Config:
    """The student's run: `ensemble` (the members' run's config, as it recorded it) with one member's shape, its value
    embeddings off, taught by the members' final/, in `run_dir`, for what their `spent` training seconds left of
    `max_time` (the whole run's), starting from the first member's weights if `teacher_init` (the user's
    train.teacher_init, which the members' run, teaching nothing, records false)."""
    t = ensemble.train
    left = Seconds(round(max(max_time - spent, 1.0), 3) if max_time else 0.0)
    return replace(
        ensemble,
        # No value embeddings, where members set them: a Llama cannot hold them, so final/ exports (--hf, --gguf),
        # and a student of a corpus read to its limit is no worse without them (docs/performance.md)
        model=replace(ensemble.model, members=1, value_embeddings=False),
        train=replace(
            t, out_dir=run_dir, teacher=str(members_dir(run_dir) / "final"), max_time=left, teacher_init=teacher_init
        ),
    )


def members_spent(ensemble_dir: Path) -> float | None:
    """The training seconds of the members' run in `ensemble_dir` once it has ended (its metrics.jsonl's last event
    is its end event, written after final/); None while it has not."""
    try:
        lines = (ensemble_dir / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return None
    return float(last["train_seconds"]) if last.get("event") == "end" else None


def newer(path: Path, than: Path) -> bool:
    """Whether `path` was last written after `than` (which exists)."""
    return path.stat().st_mtime_ns >= than.stat().st_mtime_ns


def resumed_phase(cfg: Config, overrides: Sequence[str] = ()) -> tuple[Config, bool] | None:
    """Where `--resume auto` of `cfg` (the user's config, train.distill set; `overrides`: its --set items) goes on in
    a distilled run: the members' run's recorded config and True while it has not ended, else the student's config
    and False. None where train.out_dir holds no distilled run (an ordinary resume): no members' run, or an ordinary
    run started there after it (its config.toml newer and teaching nothing)."""
    out, members = Path(cfg.train.out_dir), members_dir(cfg.train.out_dir)
    recorded = out / "config.toml"
    if not (cfg.train.distill and (members / "config.toml").is_file()):
        return None
    if recorded.is_file() and newer(recorded, members / "config.toml"):
        if load_config(recorded).train.teacher != str(members / "final"):
            return None
    ensemble = recorded_members(out, overrides)
    spent = members_spent(members)
    if spent is None:
        return ensemble, True
    return student_config(ensemble, str(out), cfg.train.max_time, spent, cfg.train.teacher_init), False


def students_saves(run_dir: Path) -> bool | None:
    """Whether `run_dir` holds the saves of the student of the members' run beside it: its config.toml names their
    final/ as its teacher and was written after they ended. False: no saves, or an earlier run's, which the student
    replaces where the whole run began with --overwrite (REPLACES); None: an earlier run's, not ours to replace."""
    members, recorded = members_dir(run_dir), run_dir / "config.toml"
    if not has_saves(run_dir / "checkpoints"):
        return False
    if recorded.is_file() and newer(recorded, members / "metrics.jsonl"):
        if load_config(recorded).train.teacher == str(members / "final"):
            return True
    return False if (members / REPLACES).is_file() else None
