"""Pre-flight: estimate a run's memory from its config and refuse one that cannot fit, before allocating.

Imports from fasttrain: config, model.transformer, system.errors.

A model too large for the machine otherwise ends in an allocator traceback, deep
in construction or in the first step, or (a million layers) in a construction
that seems to hang. The estimate is arithmetic on the config, with the parameter count
from the model's own modules on the meta device, so it answers at once for any shape;
it is rough (within a factor of about two of the real peak) and only meant to catch
shapes that cannot possibly fit.
"""

from __future__ import annotations

import os
import resource

import torch

from fasttrain.config import Config
from fasttrain.model.transformer import ffn_hidden_size, num_params
from fasttrain.system.errors import UsageError

# fp32 weights (4) + their gradients (4) + AdamW's two moments (8); autocast keeps the weights in fp32.
STATE_BYTES_PER_PARAM = 16
# Values per token per block kept for the backward pass: the two norms' inputs and outputs (4 x d_model),
# q, k, v and the attention output (4 x d_model) and the residual branches (2 x d_model); then the MLP's
# hidden values: SwiGLU's gate and up, the gate's silu and their product (4 x its width), ReLU²'s up and its
# square (2 x). Fused attention keeps no T x T scores.
ACTIVATIONS_PER_TOKEN_LAYER = 10  # x d_model, plus MLP_HIDDEN_VALUES x the MLP's hidden width
MLP_HIDDEN_VALUES = {"swiglu": 4, "relu2": 2}
GIB = 1 << 30


def estimate_bytes(cfg: Config, activation_bytes: int, shards: int = 1) -> dict[str, int]:
    """Bytes one rank needs, by part: parameter state (split over `shards` ranks under FSDP), the RoPE
    tables, the activations of one micro-batch at `activation_bytes` per value, and its logits in fp32."""
    m, t = cfg.model, cfg.train
    tokens = t.batch_size * t.seq_len
    return {
        "parameters, gradients and AdamW state": num_params(m) * STATE_BYTES_PER_PARAM // shards,
        # cos and sin in fp32, and the fp64 angles they are computed from
        "RoPE tables": m.max_seq_len * (m.d_model // m.n_heads) // 2 * 16,
        "activations": tokens
        * m.n_layers
        * (m.d_model * ACTIVATIONS_PER_TOKEN_LAYER + MLP_HIDDEN_VALUES[m.mlp] * ffn_hidden_size(m))
        * activation_bytes,
        "logits": tokens * m.vocab_size * 4,
    }


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


def check_fits(cfg: Config, device: torch.device, precision: str, shards: int = 1) -> tuple[dict[str, int], int]:
    """The estimate (`estimate_bytes`) and the bytes `device` has available (`available_bytes`); a run that
    cannot fit is refused, naming both and the config keys behind the estimate."""
    parts = estimate_bytes(cfg, 4 if precision == "fp32" else 2, shards)
    need, have = sum(parts.values()), available_bytes(device)
    if need <= have:
        return parts, have
    m, t = cfg.model, cfg.train
    biggest = ", ".join(
        f"{name} {size / GIB:,.1f} GiB" for name, size in sorted(parts.items(), key=lambda p: -p[1])[:2]
    )
    keys = [f"model.n_layers = {m.n_layers}", f"model.d_model = {m.d_model}"]
    if ffn_hidden_size(m) > 4 * m.d_model:  # wider than the usual 8/3 x d_model: name what made it so
        keys.append(f"model.ffn_hidden = {m.ffn_hidden}" if m.ffn_hidden else f"model.multiple_of = {m.multiple_of}")
    keys += [
        f"model.vocab_size = {m.vocab_size}",
        f"model.max_seq_len = {m.max_seq_len}",
        f"train.batch_size = {t.batch_size}",
        f"train.seq_len = {t.seq_len}",
    ]
    raise UsageError(
        f"the run needs about {need / GIB:,.1f} GiB ({biggest}) but {device} has {have / GIB:,.1f} GiB "
        f"available; reduce {', '.join(keys[:-1])} or {keys[-1]}"
    )
