"""Cross-entropy and linear + cross-entropy, forward + backward, against stock PyTorch and Liger-Kernel.

Cross-entropy is memory-bound: its floor is 4 bytes per logit in bf16 (read the
logits once, write their gradient once), reported against a measured device copy
bandwidth. Linear + cross-entropy is compute-bound: its floor is the 6 N H V FLOPs
of the three GEMMs (forward, grad hidden, grad weight) at the GPU's peak bf16
rate; we also record the peak memory beyond the inputs, against the unfused path.
"torch" is torch's own fused head, F.linear_cross_entropy chunked (torch 2.13 on; skipped before).
GPU only; Liger-Kernel's cases run when it is importable (never a dependency).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import (
    bandwidth,
    compiled,
    liger,
    median_seconds,
    peak_extra_memory,
    require,
    sizes,
    time_device,
)
from fasttrain.training.metrics import peak_flops
from fasttrain_kernels import cross_entropy, linear_cross_entropy

CE_SHAPES = sizes([(8192, 50304), (8192, 131072), (16384, 131072)], [(64, 1000)])  # (N, V)
LINEAR_SHAPES = sizes([(8192, 2048, 131072), (16384, 768, 50304)], [(64, 32, 1000)])  # (N, H, V)
LIGER = "liger_kernel.transformers.functional"


def eager_cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def unfused_linear_cross_entropy(hidden, weight, target):
    return F.cross_entropy(hidden @ weight.t(), target)


def torch_linear_cross_entropy(hidden, weight, target):
    """torch's own fused head (2.13 on): F.linear_cross_entropy on its chunked path, options at "auto"."""
    return F.linear_cross_entropy(hidden, weight, target, options=torch.nn.LinearCrossEntropyOptions())


CROSS_ENTROPY = {
    "fasttrain": cross_entropy,
    "eager": eager_cross_entropy,
    "compiled": lambda logits, target: compiled(eager_cross_entropy)(logits, target),
    "liger": lambda logits, target: liger(LIGER, "liger_cross_entropy")(logits, target),
}
LINEAR_CROSS_ENTROPY = {
    "fasttrain": linear_cross_entropy,
    "eager": unfused_linear_cross_entropy,
    "compiled": lambda h, w, t: compiled(unfused_linear_cross_entropy)(h, w, t),
    "torch": torch_linear_cross_entropy,
    "liger": lambda h, w, t: liger(LIGER, "liger_fused_linear_cross_entropy")(h, w, t),
}


@pytest.mark.parametrize("impl", CROSS_ENTROPY)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "N{}-V{}".format(*s))
def test_cross_entropy_fwd_bwd(benchmark, record, device, copy_bandwidth, impl, shape):
    require(impl)
    n, vocab = shape
    fn = CROSS_ENTROPY[impl]
    logits = torch.randn(n, vocab, device=device, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, vocab, (n,), device=device)

    def step():  # autograd.grad: no .grad accumulation, which would add a pass over the logits
        torch.autograd.grad(fn(logits, target), logits)

    time_device(benchmark, device, step)
    record(
        impl=impl,
        n=n,
        vocab=vocab,
        dtype="bfloat16",
        **bandwidth(4 * n * vocab, median_seconds(benchmark), copy_bandwidth),
        peak_extra_gib=round(peak_extra_memory(device, step) / 2**30, 3),
    )


@pytest.mark.parametrize("impl", LINEAR_CROSS_ENTROPY)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
def test_linear_cross_entropy_fwd_bwd(benchmark, record, device, impl, shape):
    require(impl)
    if impl == "torch" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip(f"torch {torch.__version__} has no chunked F.linear_cross_entropy (2.13 on)")
    n, hidden_size, vocab = shape
    fn = LINEAR_CROSS_ENTROPY[impl]
    hidden = torch.randn(n, hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (n,), device=device)

    def step():
        torch.autograd.grad(fn(hidden, weight, target), (hidden, weight))

    time_device(benchmark, device, step, rounds=10)
    median = median_seconds(benchmark)
    flops = 6 * n * hidden_size * vocab
    peak = peak_flops(device)
    logits_bytes = 2 * n * vocab
    extra = peak_extra_memory(device, step) - 2 * weight.numel() - 2 * hidden.numel()  # less the returned gradients
    timed = (
        {}
        if median is None
        else {
            "tflop_per_s": round(flops / median / 1e12, 1),
            "fraction_of_floor": round(flops / peak / median, 3) if peak else None,
        }
    )
    record(
        impl=impl,
        n=n,
        hidden=hidden_size,
        vocab=vocab,
        dtype="bfloat16",
        **timed,
        peak_extra_gib=round(extra / 2**30, 3),
        extra_over_logits=round(extra / logits_bytes, 3),
    )
