"""Which implementation a kernel call runs: Triton or plain PyTorch.

CUDA tensors run the Triton kernels. CPU tensors run a PyTorch implementation of
the same math, unless TRITON_INTERPRET=1 was set when the kernels were imported:
then `triton.jit` built every kernel for Triton's interpreter, and CPU tensors
run them through it (slow, but it checks the kernels themselves on a machine
without a GPU; CI tests them that way).
"""

from __future__ import annotations

import os

import torch

# Read once, like triton.jit does when it decorates the kernels: the two must agree.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True if an op on `t` should launch its Triton kernel rather than the PyTorch path."""
    return t.is_cuda or (INTERPRETING and t.device.type == "cpu")


def num_warps_for(block: int) -> int:
    """Warps for a program that streams `block` elements at a time: enough threads to cover it."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
