"""Which implementation a kernel call runs: Triton or plain PyTorch, and Triton itself where it is installed.

Imports from fasttrain_kernels: nothing.

CUDA tensors run the Triton kernels. CPU tensors run a PyTorch implementation of
the same math, unless TRITON_INTERPRET=1 was set when the kernels were imported:
then `triton.jit` built every kernel for Triton's interpreter, and CPU tensors
run them through it (slow, but it checks the kernels themselves on a machine
without a GPU; CI tests them that way).

Only that Triton path needs triton, so it is not a dependency of the base install
(torch's CUDA build brings it; the `triton` extra adds it for the interpreter). The
kernel modules take `triton` and `tl` from here: the real ones, or, where triton is
not installed, stand-ins under which they still import, each `@triton.jit` kernel
unlaunchable. A call that would take the Triton path then raises `missing_triton()`,
one line naming the package and the pip command, as does any other use of a stand-in.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

# Read once, like triton.jit does when it decorates the kernels: the two must agree.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

MISSING_TRITON = (
    "the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) need triton, which is not "
    "installed: pip install 'triton>=3.0' (in a fasttrain clone: pip install -e '.[triton]')"
)


def missing_triton() -> ModuleNotFoundError:
    """The error for a Triton path taken where triton is not installed."""
    return ModuleNotFoundError(MISSING_TRITON, name="triton")


class _MissingKernel:
    """What `triton.jit` gives where triton is not installed: the Python function, which raises when launched."""

    def __init__(self, fn: Callable) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn

    def __getitem__(self, grid: Any) -> Any:
        raise missing_triton()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise missing_triton()


class _MissingModule:
    """`triton` or `triton.language` where triton is not installed: `jit` (either form) and `constexpr` (a
    module-level constant a kernel reads) let the kernel modules import, and `cdiv` and `next_power_of_2` are
    triton's host-side arithmetic (the launchers' choices of blocks and grids); any other name raises."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def jit(self, fn: Callable | None = None, **options: Any) -> Any:
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    @staticmethod
    def constexpr(value: Any) -> Any:
        return value

    @staticmethod
    def cdiv(x: int, y: int) -> int:
        return (x + y - 1) // y

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << (n - 1).bit_length() if n > 0 else 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # what hasattr, copy and inspect probe: absent, not an error
            raise AttributeError(name)
        raise missing_triton()


try:
    import triton
    import triton.language as tl
except ModuleNotFoundError as e:
    if e.name != "triton":  # triton is there but broken (a module it imports is missing): its own error says so
        raise
    triton, tl = _MissingModule("triton"), _MissingModule("triton.language")
TRITON_INSTALLED = not isinstance(triton, _MissingModule)


TRACED_TENSORS = (FakeTensor, FunctionalTensor)  # what torch.compile traces an op's launcher with


def use_triton(t: torch.Tensor) -> bool:
    """True if an op on `t` should launch its Triton kernel rather than the PyTorch path; `missing_triton()`
    where it should but triton is not installed."""
    if t.is_cuda or (INTERPRETING and t.device.type == "cpu"):
        if not TRITON_INSTALLED:
            raise missing_triton()
        return True
    return False


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

    An op made `inline` is also registered as a `torch.library.triton_op` (`inlined`), which compiled code calls
    on CUDA tensors: torch.compile traces its launcher, whose launches are wrapped for the trace (`traced`), and
    Inductor then launches the kernels from its own generated code. An opaque op costs the compiled graph a hop
    back into Python and the launcher's host work on every call (an H200 with torch 2.11: 150 us a RMSNorm
    forward against 39 us for a prototype of the inlined op, 3 us for Inductor's own norm), time the GPU spends
    idle when the step is short. The opaque op stays for CPU tensors, where the launcher runs PyTorch or
    Triton's interpreter, which Inductor does not launch. The triton_op is made only where a GPU is visible
    (counted through NVML, which leaves the process safe to fork) and the kernels are not built for the
    interpreter: making it imports Inductor (2-3 s), which `import fasttrain_kernels` on a machine without a GPU
    need not pay. An inlined op's first argument is a tensor on the op's device.
    """

    def __init__(self, launcher: Callable, name: str, mutates_args: Sequence[str], inline: bool):
        self.launcher = launcher
        self.op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(launcher)
        self.inlined = (
            torch.library.triton_op(f"{name}_inlined", mutates_args=tuple(mutates_args))(launcher)
            if inline and TRITON_INSTALLED and not INTERPRETING and torch.cuda.device_count() > 0
            else None
        )
        names = list(inspect.signature(launcher).parameters)
        self.mutated = [names.index(name) for name in mutates_args]

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            if self.inlined is not None and args[0].is_cuda:
                return self.inlined(*args)
            return self.op(*args)
        out = self.launcher(*args)
        for i in self.mutated:
            if args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        return out

    def register_fake(self, fake: Callable) -> Callable:
        """The opaque op's fake; the inlined op's is its launcher, traced with fake tensors."""
        return self.op.register_fake(fake)


def library_op(name: str, mutates_args: Sequence[str] = (), inline: bool = False) -> Callable[[Callable], LibraryOp]:
    """Decorator: `torch.library.custom_op(name, mutates_args=...)` for torch.compile, the function itself
    (with the op's version bumps) in eager calls; with `inline`, a triton_op for compiled CUDA calls too,
    whose launcher must wrap its launches for the trace (`traced`). See LibraryOp."""

    def register(launcher: Callable) -> LibraryOp:
        return LibraryOp(launcher, name, mutates_args, inline)

    return register


def traced(t: torch.Tensor) -> bool:
    """True for the fake and functional tensors with which torch.compile traces an inlined op's launcher
    (LibraryOp): its launches must then go through `torch.library.wrap_triton`, which makes each one a node
    of the compiled graph, where a real tensor launches the kernel itself. Launchers spell that out as
    `(wrap_triton(kernel) if traced(x) else kernel)[grid](...)`, the kernel named in the call, so that torch
    finds the kernels an op launches and keys its compile cache on their source."""
    return isinstance(t, TRACED_TENSORS)
