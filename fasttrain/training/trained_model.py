"""A trained model loaded back for use (sampling, scoring): from a run's final weights or a checkpoint.

    load_trained("runs/base")                        # runs/base/final/, else its latest checkpoint
    load_trained("runs/base/final")                  # exported weights (fasttrain layout, see fasttrain/model/weights.py)
    load_trained("runs/base/checkpoints/step_0000100.pt")  # or runs/base/checkpoints, .../checkpoints/latest

The model's config comes with the weights (config.toml beside them, or the one a
checkpoint holds); the tokenizer is the one beside exported weights, else the run's
prepared data's (data.dir), as the trainer records it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttrain.config import Config, check_vocab, load_config
from fasttrain.data.tokenizer import Tokenizer
from fasttrain.model.transformer import Transformer
from fasttrain.model.weights import load_exported
from fasttrain.system.device import resolve_precision
from fasttrain.system.errors import UsageError
from fasttrain.training import checkpoint

WEIGHTS = "model.safetensors"


@dataclass
class Trained:
    """A trained model in eval mode with its run's config and tokenizer, and where they came from."""

    model: Transformer
    cfg: Config
    tokenizer: Tokenizer
    tokenizer_path: Path
    source: Path  # the weights file or checkpoint loaded


def weights_source(spec: str | os.PathLike[str]) -> Path:
    """What `spec` names to load: a weights directory (holding model.safetensors), or a checkpoint file.

    A run directory means its final/ weights when training finished, else its latest checkpoint.
    """
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"{path}: no such run directory or checkpoint")
    for directory in (path, path / "final"):
        if directory.is_dir() and (directory / WEIGHTS).is_file():
            return directory
    return checkpoint.resolve(os.fspath(path), path)


def load_model(spec: str | os.PathLike[str]) -> tuple[Transformer, Config, Path]:
    """The model `spec` names (see `weights_source`) on the CPU, its run's config, and the weights directory
    or checkpoint file it came from; UsageError naming the file if something is missing or does not fit."""
    source = weights_source(spec)
    if source.is_dir():
        return load_exported(source), load_config(source / "config.toml"), source
    state = checkpoint.load(source)
    cfg = checkpoint.saved_config(state, source)
    model = Transformer(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UsageError(f"{source}: its weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model, cfg, source


def load_trained(spec: str | os.PathLike[str], device: torch.device | str = "cpu") -> Trained:
    """The model `spec` names (see `weights_source`) on `device`, in eval mode, with its tokenizer;
    UsageError naming the file if something is missing or does not fit."""
    model, cfg, source = load_model(spec)
    tokenizer_path = source / "tokenizer.json" if source.is_dir() else Path(cfg.data.dir) / "tokenizer.json"
    if not tokenizer_path.is_file():  # weights exported before their data's tokenizer was copied
        tokenizer_path = Path(cfg.data.dir) / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_path)
    check_vocab(cfg.model.vocab_size, tokenizer.vocab_size, str(tokenizer_path))
    return Trained(model.to(device).eval(), cfg, tokenizer, tokenizer_path, source)


def inference_precision(cfg: Config, device: torch.device) -> str:
    """The run's precision on a GPU; fp32 on the CPU, where autocast is slower and fp16 does not exist."""
    return resolve_precision(cfg.train.precision, device) if device.type == "cuda" else "fp32"
