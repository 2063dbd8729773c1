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

import torch
from torch import Tensor

from fasttrain_kernels._backend import INTERPRETING, tl, triton, use_triton
from fasttrain_kernels._specialization import Specialization

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's: (a, b, c) above
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


def _iterate(
    g: Tensor,
    steps: int,
    coefficients: tuple[float, float, float],
    eps: float,
    gram,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """The iteration of the module docstring in `dtype`, with `gram` computing alpha x xᵀ + beta c."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # the spectral norm is at most the Frobenius norm: now <= 1
    for _ in range(steps):
        s = gram(x)
        x = torch.addmm(x, gram(s, s, alpha=c, beta=b), x, beta=a)
    return x.T if tall else x


def newton_schulz(
    g: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = COEFFICIENTS, eps: float = 1e-7
) -> Tensor:
    """Roughly the orthogonal factor of the 2-D `g`, in bf16: Muon's update direction (see the module docstring)."""
    return _iterate(g, steps, coefficients, eps, symmetric_matmul)


def newton_schulz_reference(
    g: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """newton_schulz with plain matmuls (torch.optim.Muon's math): the baseline it is tested and timed against.
    `dtype` float32 for CPUs without native bf16, where bf16 matmuls are emulated (~100x slower)."""
    return _iterate(g, steps, coefficients, eps, _gram_reference, dtype)
