"""Muon's Newton-Schulz iteration, with its symmetric products computed one triangle at a time.

Imports from fasttrain_kernels: _backend, _specialization.

Muon replaces a weight matrix's update G (M x K, M <= K, else transposed) by roughly
its orthogonal factor U Vᵀ (G = U S Vᵀ), with a few steps of a quintic iteration on
X = G / |G|:

    A = X Xᵀ                 (M x M, symmetric)
    B = b A + c A A          (symmetric: A A = A Aᵀ)
    X = a X + B X

in bf16, with torch.optim.Muon's coefficients (a, b, c). Two of the three products
make a symmetric M x M matrix, so only the tiles on and above the diagonal need
computing: the kernel below computes each of those once and writes it to both
places, which halves those products' FLOPs (A: M²K of 2M²K, B: M³ of 2M³). The third
product is an ordinary matmul (torch's).

`symmetric_matmul(x, c, alpha, beta)` = alpha x xᵀ + beta c, for a symmetric c.
`newton_schulz(g)` runs the iteration on it; `newton_schulz_reference(g)` is the same
iteration with plain matmuls, the math of torch.optim.Muon's own (private) one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from fasttrain_kernels._backend import INTERPRETING, tl, triton, use_triton
from fasttrain_kernels._specialization import Specialization

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's: (a, b, c) above
# Polar Express (Amsel, Persson, Musco and Gower, 2025, arXiv 2505.16932; nanochat's Muon): step i's (a, b, c)
# is the odd quintic that best maps the interval of singular values the steps before it leave onto 1, solved
# for five steps with a 2% safety margin. The first steps lift small singular values ~8x each where the fixed
# quintic gives ~3.4x, and the last ones settle near 1 where the fixed one leaves them anywhere in ~[0.7, 1.2].
# A step past the fifth repeats the last. Its input is divided by 1.01 times its norm (POLAR_EXPRESS_MARGIN),
# so a norm rounded low (bf16) cannot put a singular value past 1, where the first quintic grows fast.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_MARGIN = 0.01
# 128 x 128 output tiles, K in steps of 64: two 16 KB input tiles per pipeline stage.
BLOCK_M, BLOCK_K, NUM_WARPS = 128, 64, 8
DTYPES = (torch.bfloat16, torch.float16)  # the iteration runs in bf16; tl.dot would round fp32 to tf32
# Triton's interpreter multiplies 16-bit tiles as their raw bits: it gets them in fp32, which holds their
# products exactly, as a GPU's 16-bit dot with fp32 accumulation does. Compiled, the branch is gone.
_DOT_IN_FP32 = tl.constexpr(INTERPRETING)


@triton.jit
def _symmetric_matmul_kernel(
    x_ptr, c_ptr, out_ptr, M, K, alpha, beta, HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """out[I, J] = alpha x[I] x[J]ᵀ + beta c[I, J] for the tile (I, J) of this program, if I <= J, and its
    transpose into out[J, I]. x is (M, K), c and out (M, M), all contiguous. Programs below the diagonal
    return at once: launching them costs far less than mapping a 1-D grid onto the triangle."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    if i > j:
        return
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = j * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + ks
        a = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(x_ptr + cols[:, None] * K + kk[None, :], mask=(cols[:, None] < M) & (kk[None, :] < K), other=0.0)
        if _DOT_IN_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
    acc = acc * alpha
    mask = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_C:
        acc += beta * tl.load(c_ptr + rows[:, None] * M + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tile = acc.to(out_ptr.dtype.element_ty)
    # A diagonal tile computes both x_r . x_c and x_c . x_r, which a dot may round differently: keep its upper
    # triangle and mirror that, so the result is exactly symmetric. (Above the diagonal every row < every
    # column: those tiles go whole to out[I, J] and, transposed, to out[J, I].)
    mask = mask & (rows[:, None] <= cols[None, :])
    tl.store(out_ptr + rows[:, None] * M + cols[None, :], tile, mask=mask)
    tl.store(out_ptr + cols[None, :] * M + rows[:, None], tile, mask=mask)


def specializations() -> list[Specialization]:
    """What `symmetric_matmul` compiles: per input dtype, with and without the added c."""
    return [
        Specialization.of(
            _symmetric_matmul_kernel,
            NUM_WARPS,
            dict(HAS_C=has_c, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K),
            x_ptr=dtype,
            c_ptr=dtype,
            out_ptr=dtype,
            M=4096,
            K=4096,
            alpha=2.0,
            beta=2.0,
        )
        for dtype in DTYPES
        for has_c in (False, True)
    ]


def symmetric_matmul(x: Tensor, c: Tensor | None = None, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """alpha x xᵀ + beta c (x: M x K, bf16 or fp16; c: M x M and symmetric, or None), in x's dtype,
    accumulated in fp32.

    On CUDA (or under TRITON_INTERPRET=1) only the tiles on and above the diagonal are computed;
    otherwise torch.addmm, which computes them all.
    """
    if not use_triton(x):
        return _gram_reference(x, c, alpha, beta)
    if x.dtype not in DTYPES:
        raise ValueError(f"symmetric_matmul: x must be bfloat16 or float16, not {x.dtype}")
    x = x.contiguous()
    M, K = x.shape
    out = torch.empty(M, M, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, BLOCK_M)
    _symmetric_matmul_kernel[(tiles, tiles)](
        x,
        out if c is None else c.contiguous(),
        out,
        M,
        K,
        float(alpha),
        float(beta),
        HAS_C=c is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )
    return out


def _gram_reference(x: Tensor, c: Tensor | None = None, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """What symmetric_matmul computes, with a full matmul everywhere."""
    return alpha * (x @ x.T) if c is None else torch.addmm(c, x, x.T, beta=beta, alpha=alpha)


Coefficients = tuple[float, float, float] | Sequence[Sequence[float]]


def per_step(coefficients: Coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` steps: one triple is every step's; a sequence of triples gives step i
    its i-th, the last repeating."""
    if all(isinstance(v, (int, float)) for v in coefficients):
        return [cast(tuple[float, float, float], tuple(coefficients))] * steps
    triples = [cast(tuple[float, float, float], tuple(t)) for t in cast(Sequence[Sequence[float]], coefficients)]
    return [triples[min(i, len(triples) - 1)] for i in range(steps)]


def _iterate(
    g: Tensor,
    steps: int,
    coefficients: Coefficients,
    eps: float,
    gram,
    dtype: torch.dtype = torch.bfloat16,
    margin: float = 0.0,
) -> Tensor:
    """The iteration of the module docstring in `dtype`, with `gram` computing alpha x xᵀ + beta c; the input
    divided by (1 + `margin`) times its norm."""
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / (x.norm() * (1 + margin)).clamp(min=eps)  # the spectral norm is at most the Frobenius norm: now <= 1
    for a, b, c in per_step(coefficients, steps):
        s = gram(x)
        x = torch.addmm(x, gram(s, s, alpha=c, beta=b), x, beta=a)
    return x.T if tall else x


def newton_schulz(
    g: Tensor, steps: int = 5, coefficients: Coefficients = COEFFICIENTS, eps: float = 1e-7, margin: float = 0.0
) -> Tensor:
    """Roughly the orthogonal factor of the 2-D `g`, in bf16: Muon's update direction (see the module docstring).
    `coefficients`: one (a, b, c) for every step, or one per step (POLAR_EXPRESS, with POLAR_EXPRESS_MARGIN)."""
    return _iterate(g, steps, coefficients, eps, symmetric_matmul, margin=margin)


def newton_schulz_reference(
    g: Tensor,
    steps: int = 5,
    coefficients: Coefficients = COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    margin: float = 0.0,
) -> Tensor:
    """newton_schulz with plain matmuls (torch.optim.Muon's math): the baseline it is tested and timed against.
    `dtype` float32 for CPUs without native bf16, where bf16 matmuls are emulated (~100x slower)."""
    return _iterate(g, steps, coefficients, eps, _gram_reference, dtype, margin)
