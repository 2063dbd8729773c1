"""RMSNorm, alone and fused with the residual add, against stock PyTorch and Liger-Kernel.

Memory-bound: the floor is the bytes that must move, in bf16 per element of x
(M x H): the forward reads x and writes y (4 B), the backward reads x and dy and
writes dx (6 B). With the residual the forward reads x and residual and writes
h and y (8 B), the backward reads h, dy and dh and writes dx (8 B). The dweight
partials and rstd (per row, not per element) are left out. GB/s is of that floor;
fraction_of_floor is against a measured device copy. GPU only; Liger-Kernel's
cases run when it is importable (never a dependency).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import bandwidth, compiled, liger, median_seconds, require, sizes, time_device
from fasttrain_kernels import rms_norm, rms_norm_reference

ROWS = sizes(32768, 64)
HIDDEN = sizes([768, 2048, 4096, 8192, 16384], [768])
EPS = 1e-6
FLOOR_BYTES = {  # per element: (forward, backward)
    False: (4, 6),
    True: (8, 8),
}


def torch_rms_norm(x, weight, residual):
    """What torch.nn.RMSNorm runs (F.rms_norm, fused on CUDA), after a separate add."""
    if residual is None:
        return F.rms_norm(x, x.shape[-1:], weight, EPS)
    h = x + residual
    return F.rms_norm(h, h.shape[-1:], weight, EPS), h


def liger_rms_norm(x, weight, residual):
    return liger("liger_kernel.ops.rms_norm", "LigerRMSNormFunction").apply(x, weight, EPS)  # its defaults


RMS_NORM = {
    "fasttrain": lambda x, weight, residual: rms_norm(x, weight, EPS, residual),
    "eager": lambda x, weight, residual: rms_norm_reference(x, weight, EPS, residual),
    "compiled": lambda x, weight, residual: compiled(rms_norm_reference)(x, weight, EPS, residual),
    "torch": torch_rms_norm,
    "liger": liger_rms_norm,
}


@pytest.mark.parametrize("impl", RMS_NORM)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("hidden", HIDDEN, ids=lambda h: f"H{h}")
def test_rms_norm(benchmark, record, device, copy_bandwidth, impl, backward, residual, hidden):
    require(impl)
    if impl == "liger" and residual:
        pytest.skip("only Liger's RMSNorm alone is compared")
    fn = RMS_NORM[impl]
    x = torch.randn(ROWS, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).bfloat16().requires_grad_()
    r = torch.randn_like(x, requires_grad=True) if residual else None
    inputs = [t for t in (x, weight, r) if t is not None]
    # Incoming gradients made once, outside the timing: of y, and of h when there is one.
    grads = [torch.randn_like(x) for _ in range(1 + residual)]

    def step():
        out = fn(x, weight, r)
        if backward:  # autograd.grad: no .grad accumulation, which would add passes of its own
            torch.autograd.grad(out, inputs, grads)

    time_device(benchmark, device, step)
    floor_bytes = ROWS * hidden * (FLOOR_BYTES[residual][0] + backward * FLOOR_BYTES[residual][1])
    record(
        impl=impl,
        rows=ROWS,
        hidden=hidden,
        dtype="bfloat16",
        residual=residual,
        passes="forward+backward" if backward else "forward",
        **bandwidth(floor_bytes, median_seconds(benchmark), copy_bandwidth),
    )
