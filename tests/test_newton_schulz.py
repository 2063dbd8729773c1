"""kernels.newton_schulz: the one-triangle symmetric product against fp64, and the iteration against torch's.

Through the Triton interpreter on a CPU-only machine (see conftest.kernel_device), with
16 x 16 tiles so that small matrices span several tiles on each side of the diagonal
and the last ones are part-full.
"""

from __future__ import annotations

import pytest
import torch

from fasttrain_kernels import newton_schulz, newton_schulz_reference, symmetric_matmul
from fasttrain_kernels._backend import use_triton
from fasttrain_kernels.newton_schulz import COEFFICIENTS, DTYPES
from tests.kernel_checks import assert_matches

# (M, K): one row in a part-full tile, then several tiles a side with a part-full last one, K over one and three tiles.
SHAPES = [(1, 5), (37, 20), (48, 33)]


@pytest.mark.parametrize("with_c", [False, True], ids=["gram", "gram+c"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}".format(*s))
def test_symmetric_matmul_matches_fp64(kernel_device, shape, dtype, with_c):
    x = torch.randn(shape, device=kernel_device).to(dtype)
    c = None
    if with_c:
        c = torch.randn(shape[0], shape[0], device=kernel_device)
        c = (c + c.T).to(dtype)
    ours = symmetric_matmul(x, c, alpha=0.7, beta=-1.3)
    x64 = x.double()
    reference = 0.7 * x64 @ x64.T + (0 if c is None else -1.3 * c.double())
    assert ours.dtype == dtype
    if use_triton(x):  # the mirrored tiles are the computed ones, bit for bit (a plain matmul's need not be)
        assert torch.equal(ours, ours.T)
    # One rounding of a sum of K products: scaled by the largest |x| |x| sum, not by the result.
    scale = (x64.abs() @ x64.abs().T).max().item() * 0.7 + (0 if c is None else 1.3 * c.double().abs().max().item())
    assert_matches(ours, reference, dtype, "out", scale=scale)


def test_newton_schulz_matches_torch_muons(kernel_device):
    shape = (40, 24)  # tall: iterated on its transpose
    g = torch.randn(shape, device=kernel_device)
    ours = newton_schulz(g)
    reference = newton_schulz_reference(g)
    assert ours.shape == shape and ours.dtype == torch.bfloat16
    # bf16 all the way, five iterations: agreement to a few bf16 ulps of the unit-sized entries.
    torch.testing.assert_close(ours.float(), reference.float(), rtol=0.05, atol=0.02)
    singular = torch.linalg.svdvals(ours.float())
    assert singular.min() > 0.5 and singular.max() < 1.3  # roughly orthogonal: what Muon relies on
    torch_muon = getattr(torch.optim, "_muon", None)
    if torch_muon is not None:  # the reference is torch.optim.Muon's own iteration (private, so optional)
        theirs = torch_muon._zeropower_via_newtonschulz(g, COEFFICIENTS, 5, 1e-7)
        torch.testing.assert_close(reference.float(), theirs.float(), rtol=0.05, atol=0.02)
