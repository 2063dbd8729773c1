"""The host's cost of a call: each public kernel entry point's Python, dispatch and launches, against stock PyTorch's.

The GPU cases of the other files time the GPU's work alone (CUDA events, see conftest.time_device), so a
kernel whose wrapper costs more host time than the op it replaces does not show there; in a training step it
costs GPU time only where the host falls behind the GPU. Here the inputs are tiny (16 rows of 256, a
256-token vocabulary, the parameters of a 2-layer 64-wide model), so each call's GPU work is a few
microseconds, and a round is many calls back to back with one sync at the end: its time divided by the
calls is the host's time per call (`host_us_per_call`, also the case's stats), were the GPU infinitely fast.

Entry points: kernels.rms_norm alone and with the residual (against F.rms_norm, after a separate add),
kernels.cross_entropy (F.cross_entropy), kernels.linear_cross_entropy (a matmul and F.cross_entropy), each
forward and forward + backward (autograd.grad, incoming gradients made once); FusedAdamW.step
(torch.optim.AdamW(fused=True).step). GPU only; in a dry run the kernels take their PyTorch path on
the CPU, so the figures are those of that fallback, not of the Triton launches.

The norms again compiled (`mode` compiled): a chain of CHAIN norms, each normalising the last one's output,
in one torch.compile'd function, its host time shared out per norm, so that the compiled region's fixed cost
(guards, entering the graph) weighs as little as in a model's step. Inductor's own norm is a launch from its
generated code; ours is inlined the same way on CUDA (fasttrain_kernels/_backend.py, LibraryOp), so this is
where a wrapper that falls back to an opaque op would show. Skipped in a dry run, as the compiled baselines
are (minutes of CPU compiling).
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_adamw import parameter_shapes
from benchmarks.bench_cross_entropy import unfused_linear_cross_entropy
from benchmarks.bench_rms_norm import EPS, torch_rms_norm
from benchmarks.conftest import compiled, median_seconds, record_samples, require, sizes, synchronize
from fasttrain_kernels import FusedAdamW, cross_entropy, linear_cross_entropy, rms_norm

ROWS, HIDDEN, VOCAB = 16, 256, 256
DTYPE = sizes(torch.bfloat16, torch.float32)  # the GPU cases' dtype; fp32 for the CPU fallback
CALLS = sizes(200, 10)  # per round, back to back
ROUNDS = sizes(20, 3)
WARMUP = 3  # calls first: compilation, autotuning, the allocator's first blocks
TARGET = "target"  # an argument of ROWS class indices, not a float tensor

OPS = {  # op: implementation: the function; called with the arguments ARGUMENTS[op] makes
    "rms_norm": {"fasttrain": lambda x, w: rms_norm(x, w, EPS), "torch": lambda x, w: torch_rms_norm(x, w, None)},
    "add_rms_norm": {"fasttrain": lambda x, w, r: rms_norm(x, w, EPS, r), "torch": torch_rms_norm},
    "cross_entropy": {"fasttrain": cross_entropy, "torch": F.cross_entropy},
    "linear_cross_entropy": {"fasttrain": linear_cross_entropy, "torch": unfused_linear_cross_entropy},
}
ARGUMENTS = {  # op: its arguments' shapes
    "rms_norm": [(ROWS, HIDDEN), (HIDDEN,)],
    "add_rms_norm": [(ROWS, HIDDEN), (HIDDEN,), (ROWS, HIDDEN)],
    "cross_entropy": [(ROWS, VOCAB), TARGET],
    "linear_cross_entropy": [(ROWS, HIDDEN), (VOCAB, HIDDEN), TARGET],
}
NORMS = ("rms_norm", "add_rms_norm")  # the ops also timed compiled
CHAIN = 12  # norms a compiled call
CASES = (  # (op, passes, mode)
    [(op, passes, "eager") for op in OPS for passes in ("fwd", "fwd_bwd")]
    + [(op, passes, "compiled") for op in NORMS for passes in ("fwd", "fwd_bwd")]
    + [("adamw", "step", "eager")]
)


def argument(shape: tuple[int, ...] | str, device: torch.device) -> torch.Tensor:
    if shape == TARGET:
        return torch.randint(0, VOCAB, (ROWS,), device=device)
    return torch.randn(shape, device=device, dtype=DTYPE, requires_grad=True)


def kernel_call(op: str, impl: str, passes: str, device: torch.device) -> tuple[Callable[[], object], dict]:
    """One call of `op` on its tiny arguments, forward or forward + backward, and what to record of it."""
    fn = OPS[op][impl]
    args = [argument(shape, device) for shape in ARGUMENTS[op]]
    info = {"shapes": [list(a.shape) for a in args], "dtype": str(DTYPE)[6:]}
    if passes == "fwd":
        return lambda: fn(*args), info
    inputs = [a for a in args if a.requires_grad]
    out = fn(*args)
    grads = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]  # made once, untimed
    return lambda: torch.autograd.grad(fn(*args), inputs, grads), info


def compiled_chain(op: str, impl: str, passes: str, device: torch.device) -> tuple[Callable[[], object], dict]:
    """CHAIN calls of the norm `op` in one compiled function, each on the previous one's output (and, with
    the residual, on its sum), forward or forward + backward, and what to record of it."""
    fn = OPS[op][impl]
    args = [argument(shape, device) for shape in ARGUMENTS[op]]

    def chain(x: torch.Tensor, weight: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        for _ in range(CHAIN):
            out = fn(x, weight, *residual)
            x, residual = (out[0], out[1:]) if residual else (out, ())
        return x

    compiled_fn = compiled(chain)
    info = {"shapes": [list(a.shape) for a in args], "dtype": str(DTYPE)[6:], "chain": CHAIN}
    if passes == "fwd":
        return lambda: compiled_fn(*args), info
    grad = torch.randn_like(args[0])  # made once, untimed
    return lambda: torch.autograd.grad(compiled_fn(*args), args, grad), info


def optimizer_step(impl: str, device: torch.device) -> tuple[Callable[[], object], dict]:
    """The step of FusedAdamW or torch's fused AdamW over a tiny model's parameters, and what to record of it."""
    params = [torch.randn(shape, device=device, requires_grad=True) for shape in parameter_shapes("tiny")]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = FusedAdamW(params) if impl == "fasttrain" else torch.optim.AdamW(params, fused=True)
    return optimizer.step, {"tensors": len(params), "parameters": sum(p.numel() for p in params), "dtype": "float32"}


def host_seconds_per_call(fn: Callable[[], object], device: torch.device, ops_per_call: int = 1) -> list[float]:
    """Per round, on the host clock: CALLS calls of `fn` back to back and one sync, divided by CALLS and by
    the `ops_per_call` each makes. The sync makes a GPU slower than the host show (the time would then be
    the GPU's), not hide."""
    for _ in range(WARMUP):
        fn()
    synchronize(device)
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / CALLS / ops_per_call)
    return samples


@pytest.mark.parametrize("impl", ["fasttrain", "torch"])
@pytest.mark.parametrize("op, passes, mode", CASES, ids=lambda v: v)
def test_host_overhead(benchmark, record, device, op, passes, mode, impl):
    if mode == "compiled":
        require("compiled")
        fn, info = compiled_chain(op, impl, passes, device)
    else:
        fn, info = optimizer_step(impl, device) if op == "adamw" else kernel_call(op, impl, passes, device)
    per = info.get("chain", 1)
    record_samples(benchmark, lambda: host_seconds_per_call(fn, device, per), untimed=fn)
    median = median_seconds(benchmark)
    record(
        impl=impl,
        op=op,
        passes=passes,
        mode=mode,
        calls=CALLS,
        timing="host",
        l2_flushed=False,
        **info,
        **({} if median is None else {"host_us_per_call": round(median * 1e6, 2)}),
    )
