"""What a resumed or replayed run's plan recorded, read back so that the plan keeps it instead of deciding or
measuring it again.

Imports from fasttrain: checkpoints.checkpoint_files, config.

    earlier = recorded_run(out_dir, progress_from, resume)   # None for a new run
    earlier.config                        # its config.toml: the shape, context, decay and epoch limit it trained
    earlier.overlap                       # its start event's most-read source and verbatim overlap, if measured

A run's config.toml holds what its plan chose; its metrics.jsonl's start event (RunPlan.record) holds what the plan
measured to choose it, the verbatim overlap among them, which a resume would otherwise measure again over the whole
training split (repeats.verbatim_overlap).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fasttrain.checkpoints import checkpoint_files
from fasttrain.config import Config


@dataclass(frozen=True)
class Recorded:
    """A resumed or replayed run, as its files record it."""

    config: Config  # the run's config.toml (or its checkpoint's config, where the run's folder has none)
    where: str  # the file `config` was read from, as the plan's notes name it
    resumed: bool  # resumed with --resume; False: replayed (schedule.progress_from)
    overlap: tuple[str, float] | None  # the most-read source's name and overlap its plan measured; None: not recorded


def recorded_run(out_dir: str, replayed: str, resume: str | None) -> Recorded | None:
    """The run that a run in train.out_dir `out_dir` resumes (`resume`, a --resume spec) or replays (`replayed`:
    schedule.progress_from) as its files record it; None for a new run (checkpoint_files.recorded_config)."""
    found = checkpoint_files.recorded_config(out_dir, replayed, resume)
    if found is None:
        return None
    config, where = found
    return Recorded(config, where, resume is not None, recorded_overlap(Path(where)))


def recorded_overlap(config_file: Path) -> tuple[str, float] | None:
    """The overlap the last start event records in the metrics.jsonl beside a run's `config_file`; None where none
    does (a plan that measured none, a checkpoint away from its run, an event a crash cut short is skipped)."""
    if config_file.name != "config.toml":
        return None
    found = None
    for event in start_events(config_file.parent / "metrics.jsonl"):
        try:
            overlap = event.get("overlap")
            found = (str(overlap["source"]), float(overlap["fraction"])) if overlap else found
        except (ValueError, TypeError, KeyError, AttributeError):  # not an event of ours: measured again instead
            continue
    return found


def start_events(metrics: Path) -> list[dict]:
    """The start events of a run's `metrics` (its metrics.jsonl), in order; [] where it cannot be read. A new run
    writes one, and so does each resume; a line that is not a JSON object (the last one of a run killed mid-write) is
    passed over."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        if '"start"' not in line:  # the log's many other events need no parsing
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "start":
            found.append(event)
    return found
