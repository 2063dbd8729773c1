"""Checkpointer: what a run's checkpoint holds, and saving and restoring it on every rank.

A checkpoint file (files, pointers and retention: checkpoint.py) is a dict of

    model, optimizer      full (unsharded) state dicts
    scaler                the fp16 GradScaler's state
    step, tokens_seen...  the RunState's fields, at the top level
    ranks                 each rank's training-loader position and random generator states
    parallel              "none", "ddp" or "fsdp": with len(ranks), what a resume must match
    config                the run's resolved config, as TOML
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fasttrain import checkpoint, distributed
from fasttrain.config import Config, config_to_toml
from fasttrain.data import TokenLoader
from fasttrain.errors import UsageError
from fasttrain.optim import Updater
from fasttrain.run_state import RunState


class Checkpointer:
    """Saves and restores the state of `model` and `updater`, with the RunState and loader given per
    call, in `cfg.train.out_dir`/checkpoints. Every rank must call `save` and `restore`: FSDP gathers
    and re-shards the full state, rank 0 alone writes and the others wait for it."""

    def __init__(self, cfg: Config, model: nn.Module, updater: Updater, world: distributed.World, parallel: str,
                 device: torch.device):
        self.cfg, self.model, self.updater, self.world, self.parallel = cfg, model, updater, world, parallel
        self.device = device  # where a restored state's tensors go
        self.directory = Path(cfg.train.out_dir) / "checkpoints"

    def state_dict(self, run: RunState, loader: TokenLoader) -> dict:
        """Everything needed to continue the run exactly: what a checkpoint file holds."""
        model, optimizer = distributed.full_state(self.model, self.updater.optimizer, self.parallel == "fsdp")
        return {
            "model": model,
            "optimizer": optimizer,
            "scaler": self.updater.scaler.state_dict(),
            **run.state_dict(),  # "step" is the LR schedule's position too
            "ranks": distributed.gather({"train_loader": loader.state_dict(), "rng": checkpoint.rng_state()},
                                        self.world),
            "parallel": self.parallel,
            "config": config_to_toml(self.cfg),
        }

    def save(self, run: RunState, loader: TokenLoader, best: bool = False, keep: Path | None = None) -> Path:
        """Save the run at `run.step`; returns the file. Keeps the newest `checkpoint.keep_last` saves,
        the best one (this save if `best`) and `keep`."""
        state = self.state_dict(run, loader)
        path = checkpoint.path_for(self.directory, run.step)
        if self.world.is_main:
            path = checkpoint.save(state, self.directory, run.step, self.cfg.checkpoint.keep_last, best, keep)
        distributed.barrier(self.world)
        return path

    def restore(self, path: str | Path, loader: TokenLoader) -> RunState:
        """Load the checkpoint at `path` into the model, optimizer, scaler, `loader` and the random
        generators; returns its RunState. UsageError if it comes from a model of another shape, another
        optimizer, or another number of ranks or parallel mode, or cannot be loaded."""
        state = checkpoint.load(path, self.device)
        checkpoint.check_same_model(state, self.cfg, path)
        checkpoint.check_same_optimizer(state, self.cfg, path)
        checkpoint.check_same_world(state, self.world.size, self.parallel, path)
        try:
            distributed.load_full_state(self.model, self.updater.optimizer, state["model"], state["optimizer"],
                                        self.parallel == "fsdp")
            self.updater.scaler.load_state_dict(state["scaler"])
            mine = state["ranks"][self.world.rank]
            loader.load_state_dict(mine["train_loader"])
            checkpoint.set_rng_state(mine["rng"])
            return RunState.from_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, UsageError) as e:
            raise UsageError(f"{path}: cannot continue from it ({str(e).splitlines()[0]})") from None

    def point_latest(self, path: Path) -> None:
        """Make `latest` name `path` again (after a rollback to it), so a resume starts there too."""
        if self.world.is_main:
            checkpoint.point(self.directory, "latest", path)
        distributed.barrier(self.world)

    def latest(self) -> Path | None:
        """The newest complete save, or None before the first."""
        return checkpoint.pointed(self.directory, "latest")

    def claim(self, overwrite: bool) -> None:
        """Make the run directory ready for a new run (see checkpoint.claim); every rank checks first."""
        checkpoint.claim(self.directory.parent, overwrite, delete=self.world.is_main)
        distributed.barrier(self.world)
