"""Which variants of each Triton kernel the launchers compile, over the shapes and dtypes the project uses.

Imports from fasttrain_kernels: nothing.

Triton compiles a kernel once per *specialization*: the values of its tl.constexpr
arguments, num_warps, and the types of the others (a pointer's element type; an
int is i32, or i64 when its value needs it; a float is fp32). Each kernel module's
`specializations()` lists those its launchers choose for the ranges below, by
calling the launchers' own choice functions on every size in them (a size maps to
one BLOCK, many sizes to the same one: the set is deduplicated), so the list cannot
drift from what runs. `python -m fasttrain_kernels.inspect` compiles the list for GPU targets.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

VOCAB_SIZES = range(4096, 262144 + 1)  # 4K (small BPEs) to 256K (Gemma's) words
HIDDEN_SIZES = range(64, 16384 + 1)  # d_model of the smallest test model to that of the largest dense ones
# Rows of one launch (tokens of a batch) in the example arguments: a multiple of 16, as batch x length
# usually is, so Triton marks it divisible by 16 as it would at run time.
EXAMPLE_ROWS = 8192

K = TypeVar("K", bound=Hashable)  # what choices() keys its sizes by


@dataclass(frozen=True)
class Precision:
    """How a model's tensors are typed: activations and logits in `compute`, parameters (and the
    residual stream, which adds into fp32 when they are fp32) in `param`."""

    compute: torch.dtype
    param: torch.dtype


# fasttrain's train.precision settings (fp32, or bf16/fp16 autocast over fp32 parameters), and a pure
# bf16 model: FusedAdamW keeps fp32 masters of bf16 parameters.
PRECISIONS = (
    Precision(torch.float32, torch.float32),
    Precision(torch.bfloat16, torch.float32),  # bf16 autocast
    Precision(torch.float16, torch.float32),  # fp16 autocast
    Precision(torch.bfloat16, torch.bfloat16),  # a bf16 model
)
COMPUTE_DTYPES = tuple(dict.fromkeys(p.compute for p in PRECISIONS))

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}


def triton_type(value: Any) -> str:
    """The type Triton's launcher gives an argument: `value` is a torch.dtype for a tensor (a pointer to
    it) or the Python int / float passed."""
    if isinstance(value, torch.dtype):
        return "*" + _TRITON_DTYPES[value]
    if isinstance(value, bool):
        raise TypeError("the kernels take no bool arguments at run time")
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def divisible_by_16(value: Any) -> bool:
    """Triton's other specialization, on values: a pointer 16-byte aligned (every tensor torch allocates
    is) or an int a multiple of 16 is marked so, which lets the compiler vectorize loads. (An int equal
    to 1 becomes a constant; the example values avoid 1, as the common launches do.)"""
    return isinstance(value, torch.dtype) or (isinstance(value, int) and value % 16 == 0)


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: example run-time arguments (a torch.dtype for each tensor,
    an int or float for the rest), constexpr values, and num_warps (None: Triton's default)."""

    kernel: Any  # a triton.JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    args: tuple[tuple[str, Any], ...]
    constexprs: tuple[tuple[str, int], ...]
    num_warps: int | None

    @classmethod
    def of(cls, kernel: Any, num_warps: int | None, constexprs: dict[str, int], **args: Any) -> Specialization:
        """Checks that every argument of `kernel` is given once, as the launcher passes them."""
        given = [*args, *constexprs]
        if sorted(given) != sorted(kernel.arg_names):
            raise ValueError(f"{kernel.__name__}: arguments {sorted(given)} do not match {sorted(kernel.arg_names)}")
        return cls(kernel, tuple(args.items()), tuple(constexprs.items()), num_warps)

    def __reduce__(self) -> tuple[Callable[..., Specialization], tuple[Any, ...]]:
        # A JITFunction does not pickle: send worker processes its module and name instead.
        return _rebuild, (self.kernel.fn.__module__, self.name, self.args, self.constexprs, self.num_warps)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def key(self) -> tuple:
        """What Triton compiles a separate binary for (less the divisibility marks, which follow the values)."""
        return self.name, tuple((n, triton_type(v)) for n, v in self.args), self.constexprs, self.num_warps

    @property
    def label(self) -> str:
        """e.g. 'x,y=bf16 HAS_RESIDUAL BLOCK_ROWS=4 BLOCK=1024': the tensors not in fp32 grouped by dtype
        ('fp32' when there are none), then the constexprs (flags by name when set)."""
        narrow: dict[str, list[str]] = {}
        for name, value in self.args:
            if isinstance(value, torch.dtype) and value not in (torch.float32, torch.int64):
                narrow.setdefault(triton_type(value)[1:], []).append(name.removesuffix("_ptr"))
        dtypes = [",".join(names) + "=" + dtype for dtype, names in narrow.items()] or ["fp32"]
        flags = [n if v is True else f"{n}={v}" for n, v in self.constexprs if v is not False]
        return " ".join(dtypes + flags)


def _rebuild(module: str, kernel: str, *fields: Any) -> Specialization:
    return Specialization(getattr(importlib.import_module(module), kernel), *fields)


@functools.cache  # a sweep takes seconds, and several kernels share one
def choices(choose: Callable[[int], K], sizes: Iterable[int]) -> dict[K, int]:
    """Every distinct `choose(size)` over `sizes`, each with the largest size that gets it (so that an
    argument which grows with the size takes its widest type)."""
    chosen: dict[K, int] = {}
    for size in sizes:
        chosen[choose(size)] = size
    return chosen
