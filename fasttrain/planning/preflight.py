"""Pre-flight: estimate a run's memory from its config and refuse one that cannot fit, before allocating.

Imports from fasttrain: config, model.transformer, optimization.optimizers, planning.sizing, system.errors.

A model too large for the machine otherwise ends in an allocator traceback, deep
in construction or in the first step, or (a million layers) in a construction
that seems to hang. The estimate is arithmetic on the config, with the parameter count
from the model's own modules on the meta device, so it answers at once for any shape;
it is rough (within a factor of about two of the real peak) and only meant to catch
shapes that cannot possibly fit.
"""

from __future__ import annotations

import itertools
import os
import resource
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from fasttrain.config import Config, ModelConfig, OptimConfig, TrainConfig, load_config
from fasttrain.model.transformer import Transformer, ffn_hidden_size, num_params
from fasttrain.optimization.optimizers import hidden_matrices
from fasttrain.planning.sizing import MEMORY_SHARE, ladder_shape
from fasttrain.system.errors import UsageError

# Per parameter, its fp32 weight and gradient (autocast keeps the weights in fp32); the optimizer's state is
# fp32 values too (see state_values).
WEIGHT_AND_GRADIENT_BYTES = 8
STATE_VALUE_BYTES = 4
# Values per token per block kept for the backward pass: the two norms' inputs and outputs (4 x d_model),
# q, k, v and the attention output (4 x d_model) and the residual branches (2 x d_model); then the MLP's
# hidden values: SwiGLU's gate and up, the gate's silu and their product (4 x its width), ReLU²'s up and its
# square (2 x). Fused attention keeps no T x T scores.
ACTIVATIONS_PER_TOKEN_LAYER = 10  # x d_model, plus MLP_HIDDEN_VALUES x the MLP's hidden width
MLP_HIDDEN_VALUES = {"swiglu": 4, "relu2": 2}
GIB = 1 << 30


def estimate_bytes(cfg: Config, activation_bytes: int, shards: int = 1, teachers: int | None = None) -> dict[str, int]:
    """Bytes one rank needs, by part: parameter state (split over `shards` ranks under FSDP), the RoPE
    tables, the activations of one micro-batch at `activation_bytes` per value, and its logits in fp32; an
    ensemble's members each need their own; a student's teacher of `teachers` models (default: those
    train.teacher names) its own (`teacher_bytes`)."""
    m, t = cfg.model, cfg.train
    tokens = t.batch_size * t.seq_len * max(m.members, 1)
    state, state_bytes = parameter_state(cfg)
    teacher = teacher_bytes(m, t, teacher_members(t.teacher) if teachers is None else teachers)
    return {
        state: state_bytes * max(m.members, 1) // shards,
        # cos and sin in fp32, and the fp64 angles they are computed from
        "RoPE tables": m.max_seq_len * (m.d_model // m.n_heads) // 2 * 16 * max(m.members, 1),
        "activations": tokens
        * m.n_layers
        * (m.d_model * ACTIVATIONS_PER_TOKEN_LAYER + MLP_HIDDEN_VALUES[m.mlp] * ffn_hidden_size(m))
        * activation_bytes,
        "logits": tokens * m.vocab_size * 4,
        **({"the teacher": teacher} if teacher else {}),
    }


def teacher_bytes(m: ModelConfig, t: TrainConfig, members: int) -> int:
    """What a student of shape `m` (its micro-batches `t`'s) needs for a teacher of `members` models of that shape (a
    distilled run's members): their fp32 weights, each member's final hidden states of one micro-batch and one
    member's fp32 logits at a time (model/ensemble.py), the mean probabilities the loss reads, and the largest
    layer's values of one member's forward (no gradients: nothing is kept for a backward)."""
    if not members:
        return 0
    tokens = t.batch_size * t.seq_len
    weights = 4 * num_params(replace(m, members=1))
    layer = tokens * (m.d_model * ACTIVATIONS_PER_TOKEN_LAYER + MLP_HIDDEN_VALUES[m.mlp] * ffn_hidden_size(m)) * 4
    return members * (weights + tokens * m.d_model * 4) + 2 * tokens * m.vocab_size * 4 + layer


def teacher_members(spec: str) -> int:
    """How many models train.teacher `spec` names (each folder's config.toml's model.members; a folder not read: 1,
    as loading it says what is wrong)."""
    total = 0
    for part in spec.split(os.pathsep) if spec else ():
        try:
            total += max(load_config(Path(part) / "config.toml").model.members, 1)
        except (OSError, UsageError):
            total += 1
    return total


def parameter_state(cfg: Config) -> tuple[str, int]:
    """What the model's parameters, their gradients and optim.name's state are, in words, and their bytes. The
    parameters are counted on the model built on the meta device, one block standing for all (as num_params)."""
    m, o = cfg.model, cfg.optim
    with torch.device("meta"):
        one = Transformer(replace(m, n_layers=1))
    in_blocks, hidden = {id(p) for p in one.blocks.parameters()}, {id(p) for p in hidden_matrices(one)}
    size = sum(
        (m.n_layers if id(p) in in_blocks else 1)
        * (WEIGHT_AND_GRADIENT_BYTES * p.numel() + STATE_VALUE_BYTES * state_values(p, o, id(p) in hidden))
        for p in one.parameters()
    )
    names = {
        "adamw": ["AdamW state"],
        "muon": ["Muon momentum", "AdamW state"],
        "sgd": ["SGD momentum"] if o.sgd.momentum else [],
        "adafactor": ["Adafactor state"],
    }[o.name]
    parts = ["parameters", "gradients", *names]
    return f"{', '.join(parts[:-1])} and {parts[-1]}", size


def state_values(p: torch.Tensor, o: OptimConfig, hidden: bool) -> int:
    """The values the optimizer of `o` keeps for parameter `p` (`hidden`: one of the blocks' matrices, which
    Muon updates): AdamW two moments; Muon one momentum, and with NorMuon one value per neuron of the longer side
    (AdamW's two for the rest); SGD one momentum, if any; Adafactor a matrix's second moment factored into a row
    and a column, a vector's whole."""
    if o.name == "muon" and hidden:
        return p.numel() + (max(p.shape) if o.muon.second_moment_beta2 else 0)
    if o.name in ("adamw", "muon"):
        return 2 * p.numel()
    if o.name == "sgd":
        return p.numel() if o.sgd.momentum else 0
    if p.ndim < 2:
        return p.numel()
    rows, columns = p.shape[-2:]
    return p.numel() // (rows * columns) * (rows + columns)


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free memory; on the host its MemAvailable (else its physical
    memory), or less where the process's address-space limit (`ulimit -v`) leaves less room."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    have = _meminfo("/proc/meminfo", "MemAvailable:")
    if have is None:  # not Linux
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        have = min(have, max(0, limit - (_meminfo("/proc/self/status", "VmSize:") or 0)))
    return have


def _meminfo(path: str, key: str) -> int | None:
    """The size in bytes on the line of /proc file `path` that starts with `key` (a "... kB" line)."""
    try:
        with open(path) as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key)), None)
    except OSError:  # not Linux
        return None


@dataclass(frozen=True)
class Machine:
    """The device a run is planned for and the bytes it has available, read once a plan (`Machine.of`): every
    choice bounded by memory weighs the same figure, and the plan records it."""

    device: torch.device
    available: int

    @classmethod
    def of(cls, device: torch.device) -> Machine:
        return cls(device, available_bytes(device))


def depths_in_memory(cfg: Config, available: int, depths: Sequence[int], shards: int = 1) -> list[int]:
    """Of the ladder's `depths` (ascending; sizing.ladder_shape of cfg.model), those whose estimate is at most
    sizing.MEMORY_SHARE of the `available` bytes: the shapes a sizing may time and choose. The smallest alone where
    none is: check_fits then refuses it if it cannot fit at all."""
    room, value_bytes = MEMORY_SHARE * available, 4 if cfg.train.precision == "fp32" else 2
    teachers = teacher_members(cfg.train.teacher)  # a student's teacher: its folders read once, not at each depth

    def need(depth: int) -> int:
        shape = replace(cfg, model=ladder_shape(cfg.model, depth))
        return sum(estimate_bytes(shape, value_bytes, shards, teachers).values())

    return list(itertools.takewhile(lambda d: need(d) <= room, depths)) or list(depths[:1])  # grows with the depth


def members_in_memory(cfg: Config, available: int, shards: int = 1) -> int:
    """How many models of cfg.model's shape (an ensemble's members, model/ensemble.py) fit in sizing.MEMORY_SHARE of
    the `available` bytes, as the depths offered do (`depths_in_memory`); at least 1."""
    one = replace(cfg, model=replace(cfg.model, members=1))
    need = sum(estimate_bytes(one, 4 if cfg.train.precision == "fp32" else 2, shards).values())
    return max(int(MEMORY_SHARE * available // need), 1)


def teachers_in_memory(cfg: Config, available: int, most: int, shards: int = 1) -> int:
    """The most models of cfg.model's shape (at most `most`) a student of that shape can learn from at once, its
    teacher beside it (`estimate_bytes`) in sizing.MEMORY_SHARE of the `available` bytes; at least 1."""
    one, value_bytes = replace(cfg, model=replace(cfg.model, members=1)), 4 if cfg.train.precision == "fp32" else 2
    fits = [
        k
        for k in range(1, most + 1)
        if sum(estimate_bytes(one, value_bytes, shards, k).values()) <= MEMORY_SHARE * available
    ]
    return max(fits, default=1)


def check_fits(
    cfg: Config, machine: Machine, precision: str, shards: int = 1, teachers: int | None = None
) -> dict[str, int]:
    """The estimate (`estimate_bytes`, with a teacher of `teachers` models if given), by part; a run that cannot fit
    in what `machine` has available is refused, naming both and the config keys behind the estimate."""
    parts = estimate_bytes(cfg, 4 if precision == "fp32" else 2, shards, teachers)
    need, have = sum(parts.values()), machine.available
    if need <= have:
        return parts
    m, t = cfg.model, cfg.train
    biggest = ", ".join(
        f"{name} {size / GIB:,.1f} GiB" for name, size in sorted(parts.items(), key=lambda p: -p[1])[:2]
    )
    keys = [f"model.members = {m.members}"] if m.members > 1 else []  # an ensemble's members each need their own
    keys += [f"model.n_layers = {m.n_layers}", f"model.d_model = {m.d_model}"]
    if ffn_hidden_size(m) > 4 * m.d_model:  # wider than the usual 8/3 x d_model: name what made it so
        keys.append(f"model.ffn_hidden = {m.ffn_hidden}" if m.ffn_hidden else f"model.multiple_of = {m.multiple_of}")
    keys += [
        f"model.vocab_size = {m.vocab_size}",
        f"model.max_seq_len = {m.max_seq_len}",
        f"train.batch_size = {t.batch_size}",
        f"train.seq_len = {t.seq_len}",
    ]
    raise UsageError(
        f"the run needs about {need / GIB:,.1f} GiB ({biggest}) but {machine.device} has {have / GIB:,.1f} GiB "
        f"available; reduce {', '.join(keys[:-1])} or {keys[-1]}"
    )
