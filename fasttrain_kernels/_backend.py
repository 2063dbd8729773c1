"""Which implementation a kernel call runs: Triton or plain PyTorch.

Imports from fasttrain_kernels: nothing.

CUDA tensors run the Triton kernels. CPU tensors run a PyTorch implementation of
the same math, unless TRITON_INTERPRET=1 was set when the kernels were imported:
then `triton.jit` built every kernel for Triton's interpreter, and CPU tensors
run them through it (slow, but it checks the kernels themselves on a machine
without a GPU; CI tests them that way).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Read once, like triton.jit does when it decorates the kernels: the two must agree.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True if an op on `t` should launch its Triton kernel rather than the PyTorch path."""
    return t.is_cuda or (INTERPRETING and t.device.type == "cpu")


@functools.cache
def gpu_properties(device: torch.device) -> Any:
    """The CUDA properties of the GPU behind `device` (capability, SM count, L2 size), read once."""
    return torch.cuda.get_device_properties(device)


def num_warps_for(block: int) -> int:
    """Warps for a program that streams `block` elements at a time: enough threads to cover it."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class LibraryOp:
    """A launcher registered as a torch.library op, called as the op only while torch.compile traces.

    torch.compile needs the op: it sees a call with a schema and a fake (shapes and dtypes), where it
    could not trace into a Triton launch. Eager code calls the launcher itself: the op's dispatch
    (schema checks, the hop into Python) costs host time on every call, 20-30 us on a CPU, and buys
    nothing outside a compiled graph but one thing, kept here: the op bumps the version counter of each
    tensor it writes, so autograd still refuses a backward whose saved tensor a kernel overwrote in place
    (Triton writes through raw pointers, which autograd does not see). Arguments are positional.
    """

    def __init__(self, launcher: Callable, op: torch.library.CustomOpDef, mutates_args: Sequence[str]):
        self.launcher, self.op = launcher, op
        names = list(inspect.signature(launcher).parameters)
        self.mutated = [names.index(name) for name in mutates_args]

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.op(*args)
        out = self.launcher(*args)
        for i in self.mutated:
            if args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        return out

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)


def library_op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], LibraryOp]:
    """Decorator: `torch.library.custom_op(name, mutates_args=...)` for torch.compile, the function itself
    (with the op's version bumps) in eager calls; see LibraryOp."""

    def register(launcher: Callable) -> LibraryOp:
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(launcher)
        return LibraryOp(launcher, op, mutates_args)

    return register
