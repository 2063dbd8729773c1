"""What a resume checks and restores besides the model's and optimizer's tensors: that the checkpoint comes
from a model of the same shape and the same optimizer, the random generators' states, and what it says when
the world that continues is not the one that saved.

Imports from fasttrain: checkpoints.run_state, compute.device, config, system.errors.
"""

from __future__ import annotations

import os
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from fasttrain.checkpoints.run_state import RunState
from fasttrain.compute.device import seed_everything
from fasttrain.config import Config, format_duration
from fasttrain.system.errors import UsageError

RESHAPE_FREE = ("dropout", "init_from")  # [model] keys a resumed run may change: they alter no saved weight
# [model] keys that only choose the weights a new run starts from: a resumed run, which goes on from its checkpoint's
# weights, may change them, and is told that they change nothing for it
INIT_ONLY = ("zero_init_projections",)


def check_same_model(saved_cfg: Config, cfg: Config, path: str | os.PathLike[str]) -> list[str]:
    """UsageError naming every [model] key in which `cfg` differs from `saved_cfg` (the saving run's) but those a resume
    may change; returns a note for each init-only key changed."""
    saved = saved_cfg.model

    def differ(names: list[str]) -> list[str]:
        return [
            f"model.{name} = {getattr(saved, name)!r} there, {getattr(cfg.model, name)!r} here"
            for name in names
            if getattr(saved, name) != getattr(cfg.model, name)
        ]

    shaped = differ([f.name for f in fields(saved) if f.name not in RESHAPE_FREE + INIT_ONLY])
    if shaped:
        raise UsageError(
            f"{path}: saved by a model of another shape ({'; '.join(shaped)}); "
            "resume with the config that run was started with"
        )
    return [
        f"{change}: it chooses only the weights a new run starts from; this run goes on from the checkpoint's"
        for change in differ(list(INIT_ONLY))
    ]


def check_same_optimizer(saved_cfg: Config, cfg: Config, path: str | os.PathLike[str]) -> None:
    """UsageError unless the checkpoint at `path`, saved with `saved_cfg`, comes from a run of `cfg`'s
    optimizer: each keeps a state of its own."""
    saved = saved_cfg.optim.name
    if saved != cfg.optim.name:
        raise UsageError(
            f'{path}: saved by a run with optim.name = "{saved}", this one has "{cfg.optim.name}": '
            "one optimizer cannot continue from another's state; resume with the same optim.name"
        )
    for key in ("embedding_lr", "head_lr"):  # on or off: a group of its own or not, so another state layout
        was, now = getattr(saved_cfg.optim, key), getattr(cfg.optim, key)
        if bool(was) != bool(now):
            raise UsageError(
                f"{path}: saved by a run with optim.{key} = {was:g}, this one has {now:g}: a rate of its own is a "
                f"parameter group of its own, so the saved state does not fit; resume with optim.{key} "
                f"{'set' if was else '= 0'}"
            )


def rng_state() -> dict:
    """Python's, NumPy's and torch's (CPU and every CUDA device) generator states, in types torch.load accepts."""
    state = np.random.get_state(legacy=True)
    if not isinstance(state, tuple):  # legacy=True gives the tuple; numpy's stubs also allow a dict
        raise TypeError(f"numpy.random.get_state(legacy=True) gave a {type(state).__name__}")
    name, keys, pos, has_gauss, gauss = state
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Seed every generator from (train.seed, step, rank): the random state of a rank that has no saved one."""
    seed_everything(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def world_change(saved_size: int, saved_parallel: str | None, size: int, parallel: str) -> list[str]:
    """What a resume on `size` processes in `parallel` mode says about a checkpoint saved by `saved_size`
    in `saved_parallel`: nothing in the same world."""
    if (saved_size, saved_parallel) == (size, parallel):
        return []
    note = (
        f"saved by {saved_size} process(es) ({saved_parallel}), continued by {size} ({parallel}): the model and "
        "optimizer state are whole, and the data stream goes on from the same global batch"
    )
    if size > saved_size:
        note += (
            f"; ranks {saved_size}-{size - 1} have no saved random state, seeded from train.seed, the step and the rank"
        )
    return [note]


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def check_not_past_end(path: Path, run: RunState, saved: Config, cfg: Config) -> None:
    """UsageError if the save at `path` (`run`, config `saved`) is past this train.max_steps, or a train.max_time
    shorter than its own (a run cannot train backwards); at its end it only evaluates again."""
    end, budget, spent = cfg.train.max_steps, cfg.train.max_time, run.train_seconds
    if end and run.step > end:
        raise UsageError(
            f"{path}: the run is at step {run.step}, past train.max_steps = {end}: nothing to train; set "
            f"train.max_steps to more than {run.step} to train on (sample, evaluate and export take the run as it is)"
        )
    if budget and spent >= budget and not 0 < saved.train.max_time <= budget:  # its own budget's end is no past
        raise UsageError(
            f"{path}: the run has trained {format_duration(spent)}, past train.max_time = {format_duration(budget)}: "
            f"nothing to train; set train.max_time to more than {format_duration(spent)} to train on (sample, "
            "evaluate and export take the run as it is)"
        )
