"""Pre-flight: estimate a run's memory from its config and refuse one that cannot fit, before allocating.

A model too large for the machine otherwise ends in an allocator traceback, deep
in construction or in the first step, or (a million layers) in a construction
that seems to hang. The estimate is arithmetic on the config, with the parameter count
from the model's own modules on the meta device, so it answers at once for any shape;
it is rough (within a factor of about two of the real peak) and only meant to catch
shapes that cannot possibly fit.
"""

from __future__ import annotations

import os

import torch

from fasttrain.config import Config
from fasttrain.model.transformer import num_params
from fasttrain.system.errors import UsageError

# fp32 weights (4) + their gradients (4) + AdamW's two moments (8); autocast keeps the weights in fp32.
STATE_BYTES_PER_PARAM = 16
# Values per token per block kept for the backward pass: the two norms' inputs and outputs (4 x d_model),
# q, k, v and the attention output (4 x d_model), the residual branches (2 x d_model) and the SwiGLU's
# gate, up and their product (3 x hidden, about 8 x d_model). Fused attention keeps no T x T scores.
ACTIVATIONS_PER_TOKEN_LAYER = 18  # x d_model
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
        "activations": tokens * m.n_layers * m.d_model * ACTIVATIONS_PER_TOKEN_LAYER * activation_bytes,
        "logits": tokens * m.vocab_size * 4,
    }


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free memory, or the host's MemAvailable (else its physical memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(cfg: Config, device: torch.device, precision: str, shards: int = 1) -> None:
    """Refuse, naming the estimate, what is available and the config keys behind it, a run that cannot fit."""
    parts = estimate_bytes(cfg, 4 if precision == "fp32" else 2, shards)
    need, have = sum(parts.values()), available_bytes(device)
    if need <= have:
        return
    m, t = cfg.model, cfg.train
    biggest = ", ".join(f"{name} {size / GIB:,.1f} GiB" for name, size in sorted(parts.items(), key=lambda p: -p[1])[:2])
    raise UsageError(
        f"the run needs about {need / GIB:,.1f} GiB ({biggest}) but {device} has {have / GIB:,.1f} GiB available; "
        f"reduce model.n_layers = {m.n_layers}, model.d_model = {m.d_model}, model.vocab_size = {m.vocab_size}, "
        f"model.max_seq_len = {m.max_seq_len}, train.batch_size = {t.batch_size} or train.seq_len = {t.seq_len}"
    )
