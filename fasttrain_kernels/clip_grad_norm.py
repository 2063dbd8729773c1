"""Global gradient-norm clipping: the L2 norm over all gradients in one multi-tensor pass.

Imports from fasttrain_kernels: _backend, _multi_tensor, _specialization.

    norm = sqrt(sum over every gradient element of g**2)
    g *= min(1, max_norm / (norm + 1e-6))            (torch.nn.utils.clip_grad_norm_'s rule)

Each program squares and sums one CHUNK of one gradient in fp32 and writes its
partial; the partials are summed on the device (deterministic: no atomics). The
scaling pass reads the factor from the device and exits at once when it is 1, so a
norm under the limit costs only the norm pass, and nothing syncs with the host.
FusedAdamW(max_grad_norm=...) folds the scaling into its update instead.

Both passes walk the same work list. `clip_grad_norm_` keeps it between calls (one per
device and gradient dtype), so clipping the same gradients every step builds and
copies it to the device once, not twice a call.

Layout: Triton kernels -> launchers (Triton or PyTorch foreach) -> `grad_norm`,
`clip_coefficient`, `clip_grad_norm_`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fasttrain_kernels import _multi_tensor
from fasttrain_kernels._backend import tl, triton, use_triton
from fasttrain_kernels._specialization import Specialization


@triton.jit
def _sum_squares_kernel(rows_ptr, chunks_ptr, partials_ptr, grad_type_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """partials[chunk] = sum of g**2 over this program's CHUNK of one gradient, in fp32."""
    chunk = tl.program_id(0)
    row = rows_ptr + tl.load(chunks_ptr + 2 * chunk) * 2
    start = tl.load(chunks_ptr + 2 * chunk + 1)
    grad = tl.load(row).to(tl.pointer_type(grad_type_ptr.dtype.element_ty))  # table row: (grad, numel)
    numel = tl.load(row + 1)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        g = tl.load(grad + index, mask=index < numel, other=0.0).to(tl.float32)
        total += g * g
    tl.store(partials_ptr + chunk, tl.sum(total, axis=0))


@triton.jit
def _scale_kernel(rows_ptr, chunks_ptr, coefficient_ptr, grad_type_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """g *= coefficient over this program's CHUNK; nothing when the coefficient is exactly 1."""
    coefficient = tl.load(coefficient_ptr)
    if coefficient != 1.0:
        chunk = tl.program_id(0)
        row = rows_ptr + tl.load(chunks_ptr + 2 * chunk) * 2
        start = tl.load(chunks_ptr + 2 * chunk + 1)
        grad = tl.load(row).to(tl.pointer_type(grad_type_ptr.dtype.element_ty))  # table row: (grad, numel)
        numel = tl.load(row + 1)
        for offset in range(0, CHUNK, BLOCK):
            index = start + offset + tl.arange(0, BLOCK)
            mask = index < numel
            g = tl.load(grad + index, mask=mask).to(tl.float32)
            tl.store(grad + index, (g * coefficient).to(grad_type_ptr.dtype.element_ty), mask=mask)


def _constexprs() -> dict[str, int]:
    """Both kernels' compile-time arguments: the work split of fasttrain_kernels/_multi_tensor.py."""
    return dict(CHUNK=_multi_tensor.CHUNK, BLOCK=_multi_tensor.BLOCK)


def specializations() -> list[Specialization]:
    """What `grad_norm` and `clip_grad_norm_` compile: one variant of each kernel per gradient dtype."""
    i64, f32 = torch.int64, torch.float32
    found = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        found.append(
            Specialization.of(
                _sum_squares_kernel,
                None,
                _constexprs(),
                rows_ptr=i64,
                chunks_ptr=i64,
                partials_ptr=f32,
                grad_type_ptr=dtype,
            )
        )
        found.append(
            Specialization.of(
                _scale_kernel,
                None,
                _constexprs(),
                rows_ptr=i64,
                chunks_ptr=i64,
                coefficient_ptr=f32,
                grad_type_ptr=dtype,
            )
        )
    return found


def _by_dtype(grads: list[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    """One kernel launch per gradient dtype (its pointers are typed)."""
    buckets: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        buckets.setdefault(g.dtype, []).append(g)
    return buckets


def _gradients(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if g.is_sparse:
            raise RuntimeError("clip_grad_norm_: sparse gradients are not supported")
        if not g.is_contiguous():
            raise RuntimeError(f"clip_grad_norm_: gradients must be contiguous, got strides {g.stride()}")
    return grads


def _table(tables: dict, bucket: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The work list of `bucket` (gradients of one dtype on one device), cached in `tables`."""
    key = ("grads", bucket[0].device, bucket[0].dtype)
    return tables.setdefault(key, _multi_tensor.TensorTable())([bucket])


# clip_grad_norm_'s work lists, kept between calls: rebuilt only when the gradients' addresses change.
_CLIP_TABLES: dict = {}


def grad_norm(grads: list[Tensor], tables: dict | None = None) -> Tensor:
    """The L2 norm over all of `grads` (contiguous, on one device), an fp32 0-dim tensor on their device.

    `tables`: a dict the caller keeps between calls, to cache the kernels' work lists in.
    """
    if not grads:
        return torch.zeros(())
    if not use_triton(grads[0]):
        norms = torch._foreach_norm([g.float() for g in grads])
        return torch.linalg.vector_norm(torch.stack(norms))
    tables = {} if tables is None else tables
    partials = []
    for bucket in _by_dtype(grads).values():
        rows, chunks = _table(tables, bucket)
        out = torch.empty(chunks.shape[0], dtype=torch.float32, device=bucket[0].device)
        _sum_squares_kernel[(chunks.shape[0],)](rows, chunks, out, bucket[0], **_constexprs())
        partials.append(out)
    return torch.cat(partials).sum().sqrt()


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)) as an fp32 0-dim device tensor; nan if the norm is nan."""
    return (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients of `parameters` in place so their global L2 norm is at most `max_norm`.

    torch.nn.utils.clip_grad_norm_(parameters, max_norm)'s result: returns the norm
    before clipping (always fp32 here; torch returns the gradients' dtype), and a
    non-finite norm makes the gradients non-finite as torch's does. Parameters
    without a gradient are skipped. Gradients must be dense and contiguous.
    """
    grads = _gradients(parameters)
    norm = grad_norm(grads, _CLIP_TABLES)
    if not grads:
        return norm
    coefficient = clip_coefficient(norm, max_norm)
    if not use_triton(grads[0]):
        torch._foreach_mul_(grads, coefficient)
        return norm
    for bucket in _by_dtype(grads).values():
        rows, chunks = _table(_CLIP_TABLES, bucket)  # the norm pass's, just built or kept
        _scale_kernel[(chunks.shape[0],)](rows, chunks, coefficient, bucket[0], **_constexprs())
    return norm
