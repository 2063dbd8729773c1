"""Where and how a run computes: the device, mixed precision, the Triton kernels switched on, and seeding."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, fields

import numpy as np
import torch

from fasttrain.config import KernelsConfig
from fasttrain.errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`name` ("auto", "cpu", "cuda", "cuda:N") as a torch.device; UsageError if it is not there.

    `local_rank`: this process's index on its machine under torchrun, which picks its GPU
    (cuda:local_rank) when `name` is "auto" or "cuda".
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested, but CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} requested, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:  # "cuda" means the current device; torch.cuda.set_device needs its index
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: "auto" is bf16 on CUDA and fp32 elsewhere. fp16 needs CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(f"train.precision = \"fp16\" needs a CUDA device, not {device.type} (use bf16 or fp32)")
    return precision


def switched_on(setting: bool | str, device: torch.device) -> bool:
    """A true / false / "auto" setting (train.compile, [kernels]) resolved: "auto" is on CUDA only."""
    return setting is True or (setting == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class Kernels:
    """Which of the Triton kernels (kernels/, see KernelsConfig) a run uses."""

    linear_cross_entropy: bool = False
    rms_norm: bool = False
    adamw: bool = False

    def names(self) -> list[str]:
        """The kernels switched on, by name, as a run's start event and line list them."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


def kernels_on(cfg: KernelsConfig, device: torch.device, sharded: bool = False) -> Kernels:
    """[kernels] resolved for `device` ("auto" is on CUDA). The AdamW kernel takes whole tensors, not
    FSDP's DTensor shards, so `sharded` turns "auto" off and refuses true."""
    if sharded and cfg.adamw is True:
        raise UsageError('kernels.adamw = true does not work with train.parallel = "fsdp" yet; set it to "auto" or false')
    return Kernels(linear_cross_entropy=switched_on(cfg.linear_cross_entropy, device),
                   rms_norm=switched_on(cfg.rms_norm, device),
                   adamw=switched_on(cfg.adamw, device) and not sharded)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` (nothing for fp32): matmuls in half precision, reductions in fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def use_device(name: str, local_rank: int | None = None) -> torch.device:
    """`resolve_device(name, local_rank)`, made this process's current CUDA device if it is one, with
    fp32 matmuls and convolutions on TF32 tensor cores (a 10-bit mantissa, plenty for training)."""
    device = resolve_device(name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch.manual_seed covers every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
