"""What the kernel tests share: random inputs and how close to an fp64 reference each dtype must come."""

from __future__ import annotations

import torch

import fasttrain_kernels._backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (rtol, atol as a fraction of the reference's largest magnitude) for tensors stored in each dtype.
# Losses are computed and returned in fp32 whatever the input dtype, so they use the fp32 row.
# bf16/fp16 allow two roundings: the gradient is stored, then scaled by the incoming gradient.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 2e-3), torch.float16: (2e-3, 2e-4)}


def assert_matches(
    ours: torch.Tensor,
    reference: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    min_rtol: float = 0.0,
    min_atol: float = 0.0,
    scale: float | None = None,
) -> None:
    """`ours` equals the fp64 `reference` within `dtype`'s row of TOLERANCE, loosened to the minimums given.

    atol is a fraction of `scale`: by default the reference's largest magnitude; pass the size
    of the terms when the result is a difference of larger ones that can cancel.
    """
    assert ours.shape == reference.shape, what
    assert torch.isfinite(ours).all(), f"{what}: not finite"
    rtol, atol = TOLERANCE[dtype]
    rtol, atol = max(rtol, min_rtol), max(atol, min_atol)
    scale = scale or reference.abs().max().item() or 1.0
    torch.testing.assert_close(ours.double(), reference, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_fp32_sums_close(ours: torch.Tensor, theirs: torch.Tensor, what: str = "", rtol: float = 1e-6) -> None:
    """Two fp32 results of the same sums taken in another order (another kernel, batching or CPU instruction
    set: oneDNN and ATen sum in other orders on AMX, AVX-512 and AVX2 machines) agree within `rtol`, and
    absolutely within 1e-6 of the largest |theirs|: an element near zero is the difference of larger terms and
    keeps their rounding (some ulp of the largest, 1.2e-7 each), not an ulp of its own small size."""
    scale = theirs.abs().max().item() or 1.0
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


def random_targets(n: int, vocab: int, ignore_every: int, device, ignore_index: int = -100) -> torch.Tensor:
    """n targets in [0, vocab), every `ignore_every`-th (from a random offset) set to ignore_index; 0 = none."""
    target = torch.randint(0, vocab, (n,), device=device)
    if ignore_every:
        target[torch.randint(0, ignore_every, ()).item() :: ignore_every] = ignore_index
    return target


def stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` rounded to `dtype` as a kernel under test stores it, back in `t`'s dtype. Round to nearest,
    except that Triton's interpreter truncates fp32 to bf16 (toward zero) where a GPU rounds."""
    if dtype == torch.bfloat16 and t.device.type == "cpu" and fasttrain_kernels._backend.INTERPRETING:
        bits = t.float().view(torch.int32) & -65536  # keep sign, exponent and the top 7 mantissa bits
        return bits.view(torch.float32).to(t.dtype)
    return t.to(dtype).to(t.dtype)
