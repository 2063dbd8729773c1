"""Where and how a run computes: the device, mixed precision and seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` (nothing for fp32): matmuls in half precision, reductions in fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def configure_cuda() -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (a 10-bit mantissa, plenty for training)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch.manual_seed covers every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
