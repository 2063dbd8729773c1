"""Muon's Newton-Schulz iteration (5 steps, bf16): torch's, eager, compiled, and the one-triangle Triton kernel.

Compute-bound: a step on X (M x K, M <= K) multiplies X Xᵀ (2M²K FLOPs), A A (2M³)
and B X (2M²K). TFLOP/s is of those full counts for every implementation, so the
kernel, which skips the lower triangles of the two symmetric products (M²K + M³ of
the FLOPs), shows its saving as a higher rate. Implementations: "torch" is the
function torch.optim.Muon calls (private, skipped where absent); "eager" the same
math in kernels.newton_schulz_reference; "compiled" that under torch.compile;
"fasttrain" kernels.newton_schulz. Shapes: the block matrices of the GPT-2-small
config (124M) and of a 1B model of the same family (fasttrain_kernels/ benchmarks' sizes). GPU only.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_adamw import MODELS
from benchmarks.conftest import compiled, median_seconds, require, sizes, time_device
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import hidden_matrices
from fasttrain_kernels import newton_schulz, newton_schulz_reference

STEPS = 5


def torch_newton_schulz(g: torch.Tensor) -> torch.Tensor:
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(g, (DEFAULT_A, DEFAULT_B, DEFAULT_C), STEPS, EPS)


NEWTON_SCHULZ = {
    "fasttrain": newton_schulz,
    "eager": newton_schulz_reference,
    "compiled": lambda g: compiled(newton_schulz_reference)(g),
    "torch": torch_newton_schulz,
}


def matrix_shapes(model: str) -> list[tuple[int, int]]:
    """The distinct shapes of the matrices Muon orthogonalises in `model` (one of bench_adamw.MODELS)."""
    with torch.device("meta"):
        return sorted({tuple(p.shape) for p in hidden_matrices(Transformer(MODELS[model]()))})


SHAPES = sizes([(m, s) for m in ("124M", "1B") for s in matrix_shapes(m)], [("tiny", s) for s in matrix_shapes("tiny")])


def flops(shape: tuple[int, int]) -> int:
    m, k = sorted(shape)
    return STEPS * (4 * m * m * k + 2 * m**3)


@pytest.mark.parametrize("impl", NEWTON_SCHULZ)
@pytest.mark.parametrize("model, shape", SHAPES, ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_newton_schulz(benchmark, record, device, impl, model, shape):
    require(impl)
    if impl == "torch" and not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    g = torch.randn(shape, device=device)
    time_device(benchmark, device, lambda: NEWTON_SCHULZ[impl](g))
    median = median_seconds(benchmark)
    record(
        impl=impl,
        model=model,
        shape=list(shape),
        steps=STEPS,
        dtype="bfloat16",
        **({} if median is None else {"tflop_per_s": round(flops(shape) / median / 1e12, 1)}),
    )
