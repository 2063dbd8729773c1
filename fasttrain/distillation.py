"""A distilled run (train.distill): an ensemble trained first, then one model of a member's shape trained on the
ensemble's probabilities, so that final/ holds one model (one model's memory and cost, and it exports).

Imports from fasttrain: config, model.sizing.

It sits with the train command, which runs the phases: each is a Trainer of its own.

    RUN/ensemble/   the members' run: config.toml, checkpoints/, metrics.jsonl, final/ (`fasttrain evaluate RUN/ensemble`)
    RUN/            the student's run: train.teacher = RUN/ensemble/final; its final/ is the run's model

Each phase is an ordinary run in its own directory, so it saves, resumes and refuses as any run does. Which phase a
start goes on with is read from the directories (`resumed_phase`): the members' until their metrics.jsonl ends with
its end event, then the student's. Under train.max_time the members train for `sizing.ensemble_share` of it and
the student for what they left, to the same train.max_steps (the same tokens as one member).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from fasttrain.config import Config, load_config
from fasttrain.model.sizing import ensemble_share

ENSEMBLE_DIR = "ensemble"  # the members' run, inside the run directory


def ensemble_config(cfg: Config) -> Config:
    """The members' run of a distilled plan's `cfg` (RunPlan.cfg with train.distill resolved true): its members, in
    RUN/ensemble, for their share of train.max_time."""
    t = cfg.train
    return replace(
        cfg,
        train=replace(
            t,
            distill=False,
            max_time=round(t.max_time * ensemble_share(cfg.model.members), 3),
            out_dir=str(Path(t.out_dir) / ENSEMBLE_DIR),
        ),
    )


def student_config(ensemble: Config, out_dir: str, max_time: float, spent: float) -> Config:
    """The student's run: `ensemble` (the members' run's config, as it recorded it) with one member taught by the
    members' final/, in `out_dir`, for what their `spent` training seconds left of `max_time` (the whole run's)."""
    t = ensemble.train
    left = round(max(max_time - spent, 1.0), 3) if max_time else 0.0
    teacher = os.path.abspath(Path(t.out_dir) / "final")
    return replace(
        ensemble,
        model=replace(ensemble.model, members=1),
        train=replace(t, out_dir=out_dir, teacher=teacher, max_time=left),
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


def resumed_phase(cfg: Config) -> tuple[Config, bool] | None:
    """Where `--resume auto` of `cfg` (the user's config, train.distill set) goes on in a distilled run: the members'
    run's recorded config and True while it has not ended, else the student's config and False. None where
    train.out_dir holds no distilled run (an ordinary resume): no members' run, or another run trained there since."""
    out = Path(cfg.train.out_dir)
    members, recorded = out / ENSEMBLE_DIR / "config.toml", out / "config.toml"
    if not (cfg.train.distill and members.is_file()):
        return None
    if recorded.is_file() and load_config(recorded).train.teacher != os.path.abspath(out / ENSEMBLE_DIR / "final"):
        return None  # not this distillation's student
    ensemble = load_config(members)
    spent = members_spent(out / ENSEMBLE_DIR)
    if spent is None:
        return ensemble, True
    return student_config(ensemble, cfg.train.out_dir, cfg.train.max_time, spent), False
