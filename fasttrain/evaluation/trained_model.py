"""A trained model loaded back for use (sampling, scoring): from a run's final weights or a checkpoint.

Imports from fasttrain: checkpoints.checkpoint_files, checkpoints.run_directory, checkpoints.saves, compute.device,
config, formats.tokenizer, model.ensemble, model.transformer, model.weights, system.errors.

    load_trained("runs/base")                        # runs/base/final/, else its latest checkpoint
    load_trained("runs/base/final")                  # exported weights (fasttrain layout, see fasttrain/model/weights.py)
    load_trained("runs/base/checkpoints/step_0000100.pt")  # or a sharded step_0000100/, runs/base/checkpoints, .../latest

The config comes with the weights (config.toml beside them, or the checkpoint's). The tokenizer is the one the model
trained with: beside exported weights, or the run's copy (RUN/tokenizer.json), never the data folder's current one,
which `prepare --overwrite` may have replaced; only weights and runs from before those copies fall back to data.dir's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttrain.checkpoints import checkpoint_files, saves
from fasttrain.checkpoints.run_directory import set_aside_note
from fasttrain.compute.device import native_bf16, resolve_precision, use_device
from fasttrain.config import Config, ModelConfig, check_vocab, load_config
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.ensemble import Ensemble, build_model, transformers
from fasttrain.model.transformer import Transformer
from fasttrain.model.weights import load_exported
from fasttrain.system.errors import UsageError

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


@dataclass
class Trained:
    """A trained model in eval mode with its run's config and tokenizer, and where they came from."""

    model: Transformer | Ensemble
    cfg: Config
    tokenizer: Tokenizer
    tokenizer_path: Path
    source: Path  # the weights file or checkpoint loaded


def weights_source(spec: str | os.PathLike[str]) -> Path:
    """What `spec` names to load: a weights directory (holding model.safetensors) or a checkpoint file; a run directory
    means its final/ weights when training finished, else its latest checkpoint (UsageError where final/ is there
    without its weights: the latest save need not be the weights final/ held)."""
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"{path}: no such run directory or checkpoint{set_aside_note(path)}")
    if path.is_symlink():  # a link to checkpoints/latest: the pointer is read beside its target, not the link
        path = path.resolve()
    if path.is_file() and path.name == WEIGHTS:  # RUN/final/model.safetensors: the weights directory it is in
        path = path.parent
    for directory in (path, path / "final"):
        if directory.is_dir() and (directory / WEIGHTS).is_file() and (directory / "config.toml").is_file():
            return directory
    if (path / "meta.json").is_file():
        raise UsageError(f"{path}: a prepared data folder, not a run; name a run directory, its final/ or a checkpoint")
    if (path / "config.json").is_file() and (path / WEIGHTS).is_file():
        raise UsageError(
            f"{path}: a Hugging Face export (config.json), not fasttrain's weights: load it with transformers, or start "
            "a run from it with model.init_from"
        )
    final = path / "final"
    if final.is_dir() and (final / "config.toml").is_file():  # the latest save may not be final/'s weights ("best")
        raise UsageError(
            f"{final}: holds no {WEIGHTS} (removed, or its write cut short); name a checkpoint to load instead, such "
            f"as {path / 'checkpoints' / 'latest'}"
        )
    return checkpoint_files.resolve(os.fspath(path), path)


def load_model(spec: str | os.PathLike[str]) -> tuple[Transformer | Ensemble, Config, Path]:
    """The model `spec` names (see `weights_source`) on the CPU, its run's config, and the weights directory
    or checkpoint file it came from; UsageError naming the file if something is missing or does not fit."""
    source = weights_source(spec)
    if source.is_dir() and not saves.is_sharded(source):
        return load_exported(source), load_config(source / "config.toml"), source
    state = checkpoint_files.load(source)
    cfg = checkpoint_files.saved_config(state, source)
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UsageError(f"{source}: its weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model, cfg, source


def load_trained(spec: str | os.PathLike[str], device: torch.device | str = "cpu") -> Trained:
    """The model `spec` names (see `weights_source`) on `device`, in eval mode, with its tokenizer;
    UsageError naming the file if something is missing or does not fit."""
    model, cfg, source = load_model(spec)
    tokenizer_path = tokenizer_file(source, cfg)
    tokenizer = Tokenizer.load(tokenizer_path)
    check_vocab(cfg.model.vocab_size, tokenizer.vocab_size, str(tokenizer_path))
    return Trained(model.to(device).eval(), cfg, tokenizer, tokenizer_path, source)


def load_teacher(spec: str, tokenizer: Tokenizer, vocab_size: int, device: torch.device) -> Transformer | Ensemble:
    """train.teacher's model (see `weights_source`; several, os.pathsep between them as in PATH, are one ensemble of
    all their members, which must share a shape) on `device`, in eval mode and frozen; UsageError naming
    train.teacher where one cannot be loaded, learned other token ids than `tokenizer`'s (compared by content), has
    another vocabulary than the student's `vocab_size` (model.vocab_size: its probabilities must be over the same
    rows) or differs in shape from the first."""
    members: list[Transformer] = []
    for part in spec.split(os.pathsep):
        try:
            teacher = load_trained(part, device)
        except UsageError as e:
            raise UsageError(f"train.teacher: {e}") from None
        if teacher.tokenizer.tok.to_str() != tokenizer.tok.to_str():
            raise UsageError(
                f"train.teacher: {teacher.tokenizer_path} is not the data's tokenizer, so the teacher's probabilities "
                "are over other token ids; distil a model trained on data of this tokenizer"
            )
        if teacher.cfg.model.vocab_size != vocab_size:
            raise UsageError(
                f"train.teacher: {teacher.source}: its model.vocab_size is {teacher.cfg.model.vocab_size}, this "
                f"model's {vocab_size}: the teacher's probabilities must be over as many token ids; set "
                f"model.vocab_size = {teacher.cfg.model.vocab_size}"
            )
        if members and shape_of(teacher.cfg.model) != shape_of(members[0].cfg):
            raise UsageError(f"train.teacher: {part}: not the shape of {spec.split(os.pathsep)[0]}'s members")
        members += transformers(teacher.model)
    model = members[0] if len(members) == 1 else Ensemble.of(members)
    return model.requires_grad_(False)


def shape_of(m: ModelConfig) -> tuple[int, int, int, int]:
    """What makes models' probabilities comparable members of one ensemble: depth, width, heads, vocabulary."""
    return m.n_layers, m.d_model, m.n_heads, m.vocab_size


def teacher_weights(teacher: Transformer | Ensemble, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors `state` names (a model's state_dict), each `teacher`'s of that name, or its first member's for an
    ensemble (train.teacher_init); UsageError naming the first the teacher lacks or holds in another shape."""
    source = teacher.members[0] if isinstance(teacher, Ensemble) else teacher
    theirs = source.state_dict()
    for name, tensor in state.items():
        if name not in theirs or theirs[name].shape != tensor.shape:
            found = f"of shape {tuple(theirs[name].shape)}" if name in theirs else "none"
            raise UsageError(
                f"train.teacher_init: the model's {name} {tuple(tensor.shape)} is not in the teacher ({found}); "
                "start from a teacher of the model's shape, or set train.teacher_init = false"
            )
    return {name: theirs[name].detach().clone() for name in state}


def run_directory(source: Path) -> Path:
    """The run directory of `source` (as `weights_source` returns it), links resolved: above RUN/final or a checkpoint's
    checkpoints/; else the directory a checkpoint file is in."""
    real = source.resolve()
    saved = real.is_file() or saves.is_sharded(real)
    return real.parent.parent if saved and real.parent.name == "checkpoints" else real.parent


def tokenizer_file(source: Path, cfg: Config) -> Path:
    """The tokenizer.json the model at `source` trained with: a weights directory's own, a checkpoint's run's copy, or
    before those copies existed the data folder's (data.dir)."""
    real = source.resolve()
    if real.is_dir() and not saves.is_sharded(real):
        own = real / TOKENIZER
    elif real.parent.name == "checkpoints":
        own = run_directory(real) / TOKENIZER
    else:  # a checkpoint outside any run's checkpoints/ has no run copy beside it
        own = None
    return own if own is not None and own.is_file() else Path(cfg.data.dir) / TOKENIZER


def inference_device(name: str) -> torch.device:
    """sample's and evaluate's `--device` as a torch.device: checked by the rule train.device has (auto, cpu, cuda
    or cuda:N), then against the machine; UsageError naming --device."""
    try:
        load_config(None, [f"train.device={json.dumps(name)}"])  # the config's own check of train.device
    except UsageError as e:
        raise UsageError(f"--device: {str(e).partition('train.device: ')[2] or e}") from None
    return use_device(name)


def inference_precision(cfg: Config, device: torch.device) -> str:
    """The run's precision on a GPU; on a CPU bf16 where the run trained in it (config.toml records the precision
    "auto" chose) and the CPU multiplies bf16 in hardware, so that `evaluate --split val` gives the run's own
    final_val figures; else fp32 (fp16 does not exist on a CPU, and emulated bf16 is slower than fp32)."""
    if device.type == "cuda":
        return resolve_precision(cfg.train.precision, device)[0]
    return "bf16" if cfg.train.precision == "bf16" and native_bf16(device) else "fp32"
