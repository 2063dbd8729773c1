"""Cross-entropy of (N, V) logits against (N,) targets, loss and gradient from one Triton kernel.

Imports from fasttrain_kernels: _backend, _specialization.

    loss_i = lse_i - (1 - s) * x_i[t_i] - (s / V) * sum_j x_ij + z * lse_i**2

where x = softcap * tanh(logits / softcap) when soft-capping (else the logits),
lse_i = log sum_j exp(x_ij), s = label_smoothing and z = z_loss (PaLM's auxiliary
loss that keeps the normaliser near 0). Rows whose target is ignore_index add
nothing. With s = z = 0 and no softcap this is F.cross_entropy.

Why fused: the logits are the largest activation of a language model (N x V,
V ~ 50K-150K), so the op is bound by memory traffic. While a row is still in
the cache the forward kernel also writes its gradient

    d loss_i / d x_ij = softmax_ij * (1 + 2 z lse_i) - s / V - (1 - s) [j == t_i]

(times tanh' when soft-capping, times 1/count for the mean), so forward plus
backward read the logits once and write the gradient once. The backward then
only has to multiply by the incoming gradient, and skips even that on the
device when it is exactly 1 (a plain `loss.backward()`), without a host sync.

fp16 logits are the exception: a gradient of p / count stored in fp16
underflows for most of the vocabulary (p ~ 1/V), before the GradScaler's factor
can lift it. For fp16 the forward keeps only the per-row log-sum-exp and the
backward recomputes the gradient with the incoming (scaled) gradient folded in.

Layout of this file: Triton kernels -> launchers (Triton or PyTorch) ->
torch.library ops -> autograd.Function -> `cross_entropy` -> `CrossEntropyLoss`,
with `cross_entropy_reference` (eager, any dtype) for tests and benchmarks.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain_kernels._backend import gpu_properties, library_op, num_warps_for, tl, triton, use_triton
from fasttrain_kernels._specialization import COMPUTE_DTYPES, EXAMPLE_ROWS, VOCAB_SIZES, Specialization, choices

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")
MAX_BLOCK = 8192  # columns a program holds at once; a 131072-wide row takes 16 blocks per pass
CPU_PROGRAMS = 3  # kernel programs in the interpreter, each looping over rows (see `programs_for`)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _tanh(y):
    # Portable tanh (the interpreter lacks libdevice's): a Taylor series where 1 - exp(-2|y|) would cancel.
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0))))
    t = tl.where(a < 0.05, series, (1.0 - e) / (1.0 + e))
    return tl.where(y < 0, -t, t)


@triton.jit
def _load_row_block(row_ptr, cols, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """fp32 (soft-capped) logits of one block of a row; masked columns are 0."""
    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return x


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    weight_ptr,
    weight_stride,
    loss_ptr,
    lse_ptr,
    correct_ptr,
    grad_ptr,
    grad_stride,
    n_rows,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    FORWARD: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Rows program_id, program_id + programs, ... one at a time, each block of a row prefetched STAGES - 1
    blocks ahead. FORWARD: compute lse, the loss and whether the target is the row's maximum (pass 1),
    else load lse. WRITE_GRAD: write weight[row] * d loss_row / d logits_row (pass 2)."""
    offsets = tl.arange(0, BLOCK)
    # 64-bit rows: row * logits_stride passes 2**31 from 16384 rows of 131072 on
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        row_ptr = logits_ptr + row * logits_stride
        target = tl.load(target_ptr + row)
        valid = target != ignore_index

        if FORWARD:
            # Pass 1: online log-sum-exp (running max m, running sum s of exp(x - m)), and sum x for smoothing.
            m = float("-inf")
            s = 0.0
            x_sum = 0.0
            for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
                cols = start + offsets
                mask = cols < n_cols
                x = _load_row_block(row_ptr, cols, mask, softcap, HAS_SOFTCAP)
                x_sum += tl.sum(x, axis=0)
                x = tl.where(mask, x, float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            safe_target = tl.where(valid, target, 0)
            x_target = tl.load(row_ptr + safe_target).to(tl.float32)
            if HAS_SOFTCAP:
                x_target = softcap * _tanh(x_target / softcap)
            loss = lse - (1.0 - label_smoothing) * x_target - label_smoothing * x_sum / n_cols + z_loss * lse * lse
            tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
            tl.store(lse_ptr + row, lse)
            tl.store(correct_ptr + row, tl.where(valid & (x_target >= m), 1.0, 0.0))  # a top-1 hit (ties count)
        else:
            lse = tl.load(lse_ptr + row)

        if WRITE_GRAD:
            # Pass 2, last block first: those were read most recently, so they are likeliest still in L2.
            weight = tl.where(valid, tl.load(weight_ptr + row * weight_stride), 0.0)
            softmax_factor = 1.0 + 2.0 * z_loss * lse
            n_blocks = tl.cdiv(n_cols, BLOCK)
            for i in tl.range(0, n_blocks, num_stages=STAGES):
                cols = (n_blocks - 1 - i) * BLOCK + offsets
                mask = cols < n_cols
                x = _load_row_block(row_ptr, cols, mask, softcap, HAS_SOFTCAP)
                g = tl.exp(x - lse) * softmax_factor - label_smoothing / n_cols
                g = tl.where(cols == target, g - (1.0 - label_smoothing), g)
                if HAS_SOFTCAP:
                    g = g * (1.0 - (x / softcap) * (x / softcap))  # d(c tanh(u / c))/du = 1 - tanh^2
                tl.store(grad_ptr + row * grad_stride + cols, (g * weight).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(x_ptr, x_stride, weight_ptr, weight_stride, n_cols, BLOCK: tl.constexpr):
    """x[row] *= weight[row], skipped on the device when the weight is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    weight = tl.load(weight_ptr + row * weight_stride)
    if weight != 1.0:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            ptrs = x_ptr + row * x_stride + cols
            x = tl.load(ptrs, mask=mask).to(tl.float32)
            tl.store(ptrs, (x * weight).to(x_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of both kernels for rows of `n_cols`: the whole row in one block up to MAX_BLOCK."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    return block, num_warps_for(block)


def stages(n_cols: int, itemsize: int, softcap: bool) -> int:
    """The cross-entropy kernel's pipeline depth for rows of `n_cols` logits of `itemsize` bytes: with more
    than one block a row, each 16-bit block is loaded while the one before is reduced (2); a one-block row
    has nothing to overlap. fp32 blocks and soft-capped rows are left unpipelined: with the prefetched
    block, the fused soft-capped variant spills (fp32: on sm_90 with Triton 3.9; bf16: 20-28 bytes a
    thread on sm_80 and sm_90 with Triton 3.6, the GPU image's). Unpipelined, the fp32 one still spills
    4-16 bytes with 3.6 (allow-listed in tests/test_compile_targets.py)."""
    return 2 if n_cols > MAX_BLOCK and itemsize <= 2 and not softcap else 1


def programs_for(n_rows: int, n_cols: int, itemsize: int, device: torch.device) -> int:
    """Programs of the cross-entropy kernel, each taking every programs-th row.

    A row of one block is read again at once, from cache, whatever the grid: one program per row. A
    longer row is read block by block twice, and its second read comes from L2 only if the rows in
    flight fit there: a 131072-wide bf16 row is 256 KiB, and with a program per row the GPU keeps
    hundreds in flight, far beyond an H100's 50 MiB. So the rows in flight are held to about half the
    L2 (at least a program per SM): 132 programs at V = 131072 on an H100, about 260 at 50304. On the
    CPU (the interpreter) a few, so tests cover programs that loop.
    """
    if device.type != "cuda":
        return min(n_rows, CPU_PROGRAMS)
    if n_cols <= MAX_BLOCK:
        return n_rows
    props = gpu_properties(device)
    return max(1, min(n_rows, max(props.multi_processor_count, props.L2_cache_size // 2 // (n_cols * itemsize))))


def _row_stride(weight: Tensor) -> int:
    """Stride of a (1,) or (N,) weight over rows: 0 repeats the one factor for every row."""
    return weight.stride(0) if weight.numel() > 1 else 0


# Rows the PyTorch path handles at once: 128 rows of a 4096-wide vocabulary are 2 MiB in fp32, so
# each chunk's passes (max, exp, sum, scale) run in cache instead of streaming the whole (N, V) each time.
TORCH_CHUNK_ELEMENTS = 1 << 19


def _torch_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor,
    lse: Tensor | None,
    grad: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's math in PyTorch (the CPU path): (loss rows, lse, top-1 hits), and the gradient into `grad`.
    Like the kernel it goes row block by row block, each block's passes in cache; terms whose factor is 0
    (label smoothing, z-loss, soft-capping) cost nothing."""
    n_rows, n_cols = logits.shape
    forward = lse is None
    loss = logits.new_zeros(n_rows, dtype=torch.float32)
    correct = torch.zeros_like(loss)
    lse = torch.empty_like(loss) if lse is None else lse
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    row_weight = torch.where(valid, weight.expand(valid.shape), 0.0)  # what each row's gradient is scaled by
    chunk = max(1, TORCH_CHUNK_ELEMENTS // n_cols)
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        x = logits[rows].float()  # a view for fp32 logits: never written
        if softcap:
            x = softcap * torch.tanh(x / softcap)
        t, v = safe_target[rows], valid[rows]
        if forward:
            top = x.amax(dim=-1, keepdim=True)
            p = torch.exp(x - top)
            total = p.sum(dim=-1, keepdim=True)
            lse[rows] = (top + total.log()).squeeze(1)
            x_target = x.gather(1, t).squeeze(1)
            row_loss = lse[rows] - (1 - label_smoothing) * x_target
            if label_smoothing:
                row_loss -= label_smoothing * x.mean(-1)
            if z_loss:
                row_loss += z_loss * lse[rows] ** 2
            loss[rows] = torch.where(v, row_loss, 0.0)
            correct[rows] = (v & (x_target >= top.squeeze(1))).float()
            if grad is not None:
                p /= total  # the softmax
        elif grad is not None:
            p = torch.exp(x - lse[rows].unsqueeze(1))
        if grad is None:
            continue
        w = row_weight[rows]
        if z_loss:
            w = w * (1 + 2 * z_loss * lse[rows])
        p *= w.unsqueeze(1)
        if label_smoothing:
            p -= (label_smoothing / n_cols) * row_weight[rows].unsqueeze(1)
        p.scatter_add_(1, t, ((label_smoothing - 1) * row_weight[rows]).unsqueeze(1))
        if softcap:
            p *= 1 - (x / softcap) ** 2
        grad[rows] = p
    return loss, lse, correct


def _launch(
    logits: Tensor,
    target: Tensor,
    weight: Tensor,
    lse: Tensor | None,
    grad: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and top-1 hit (1.0 where a counted row's target has the largest logit) of
    `logits` (N, V); if `grad` is given, weight[row] * d loss_row / d logits into it.

    `weight` is fp32, shape (1,) (one factor for every row) or (N,). Passing `lse`
    (from an earlier forward) skips the first pass and computes only the gradient.
    """
    if not use_triton(logits):
        return _torch_rows(logits, target, weight, lse, grad, ignore_index, label_smoothing, z_loss, softcap)
    n_rows, n_cols = logits.shape
    forward = lse is None
    if lse is None:
        loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        lse, correct = torch.empty_like(loss), torch.empty_like(loss)
    else:
        loss = correct = lse  # not written when FORWARD is off; the kernel only needs pointers
    block, num_warps = launch_config(n_cols)
    _cross_entropy_kernel[(programs_for(n_rows, n_cols, logits.element_size(), logits.device),)](
        logits,
        logits.stride(0),
        target,
        weight,
        _row_stride(weight),
        loss,
        lse,
        correct,
        logits if grad is None else grad,
        logits.stride(0) if grad is None else grad.stride(0),
        n_rows,
        n_cols,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap or 1.0,
        HAS_SOFTCAP=bool(softcap),
        FORWARD=forward,
        WRITE_GRAD=grad is not None,
        BLOCK=block,
        STAGES=stages(n_cols, logits.element_size(), bool(softcap)),
        num_warps=num_warps,
    )
    return loss, lse, correct


def _scale_rows(x: Tensor, weight: Tensor) -> None:
    """x (N, V) *= weight ((1,) or (N,), fp32) in place."""
    if not use_triton(x):
        if weight.numel() != 1:  # a weight a row (none for no rows)
            x.mul_(weight.unsqueeze(1).to(x.dtype))
        elif weight.item() != 1.0:  # on the CPU path a sync costs nothing
            x.mul_(weight.to(x.dtype))
        return
    block, num_warps = launch_config(x.shape[1])
    _scale_rows_kernel[(x.shape[0],)](
        x, x.stride(0), weight, _row_stride(weight), x.shape[1], BLOCK=block, num_warps=num_warps
    )


def rows_specialization(
    dtype: torch.dtype, n_cols: int, softcap: bool, forward: bool, write_grad: bool
) -> Specialization:
    """The cross-entropy kernel as `_launch` compiles it for (N, n_cols) logits of `dtype` (the gradient in
    the same dtype; one fp32 weight for every row, as for reduction mean or sum). label_smoothing and
    z_loss are run-time floats: every value runs the same binary."""
    block, num_warps = launch_config(n_cols)
    f32 = torch.float32
    return Specialization.of(
        _cross_entropy_kernel,
        num_warps,
        dict(
            HAS_SOFTCAP=softcap,
            FORWARD=forward,
            WRITE_GRAD=write_grad,
            BLOCK=block,
            STAGES=stages(n_cols, dtype.itemsize, softcap),
        ),
        logits_ptr=dtype,
        logits_stride=n_cols,
        target_ptr=torch.int64,
        weight_ptr=f32,
        weight_stride=0,
        loss_ptr=f32,
        lse_ptr=f32,
        correct_ptr=f32,
        grad_ptr=dtype,
        grad_stride=n_cols,
        n_rows=EXAMPLE_ROWS,
        n_cols=n_cols,
        ignore_index=IGNORE_INDEX,
        label_smoothing=0.0,
        z_loss=0.0,
        softcap=1.0,
    )


def scale_rows_specialization(dtype: torch.dtype, n_cols: int) -> Specialization:
    """The row-scaling kernel as `_scale_rows` compiles it for (N, n_cols) rows of `dtype`."""
    block, num_warps = launch_config(n_cols)
    return Specialization.of(
        _scale_rows_kernel,
        num_warps,
        dict(BLOCK=block),
        x_ptr=dtype,
        x_stride=n_cols,
        weight_ptr=torch.float32,
        weight_stride=0,
        n_cols=n_cols,
    )


def specializations() -> list[Specialization]:
    """What `cross_entropy` compiles over the project's vocabularies and dtypes: per logits dtype, the
    forward without a gradient (no_grad, or fp16), then the fused forward and its row scaling, or (fp16)
    the separate backward; each with and without softcap."""
    found = []
    for n_cols in choices(launch_config, VOCAB_SIZES).values():
        for dtype in COMPUTE_DTYPES:
            fused = fuses_gradient(dtype)
            for forward, write_grad in ((True, False), (True, True) if fused else (False, True)):
                found += [rows_specialization(dtype, n_cols, softcap, forward, write_grad) for softcap in (False, True)]
            if fused:
                found.append(scale_rows_specialization(dtype, n_cols))
    return found


# ----------------------------------------------------------------------------- torch.library ops
# Registered ops are opaque to torch.compile: a compiled model calls them with no graph break.
# The fake (meta) implementations give compile the output shapes. Eager calls skip the op (LibraryOp).


@library_op("fasttrain::cross_entropy_rows", mutates_args=("grad",))
def _rows_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor,
    grad: Tensor,
    write_grad: bool,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss rows, lse, top-1 hits), fp32 (N,); with write_grad, weight * d loss / d logits into `grad` (may be
    `logits`)."""
    return _launch(
        logits, target, weight, None, grad if write_grad else None, ignore_index, label_smoothing, z_loss, softcap
    )


@_rows_op.register_fake
def _(logits, target, weight, grad, write_grad, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@library_op("fasttrain::cross_entropy_grad", mutates_args=("grad",))
def _grad_op(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    weight: Tensor,
    grad: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> None:
    """weight * d loss / d logits into `grad`, from the lse a forward saved."""
    _launch(logits, target, weight, lse, grad, ignore_index, label_smoothing, z_loss, softcap)


@_grad_op.register_fake
def _(logits, target, lse, weight, grad, ignore_index, label_smoothing, z_loss, softcap):
    return None


@library_op("fasttrain::scale_rows_", mutates_args=("x",))
def _scale_rows_op(x: Tensor, weight: Tensor) -> None:
    """x (N, V) *= weight ((1,) or (N,)), in place; free on the device when the weight is 1."""
    _scale_rows(x, weight)


@_scale_rows_op.register_fake
def _(x, weight):
    return None


# ----------------------------------------------------------------------------- autograd


def check_inputs(
    logits: Tensor, target: Tensor, reduction: str, label_smoothing: float, softcap: float | None, name: str = "logits"
) -> None:
    """ValueError naming the first thing wrong with a call's shapes, dtypes or options."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"{name} must be (N, D) with target (N,); got {tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, not {logits.dtype}")
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64, not {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], not {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, not {softcap}")


def checked_target(target: Tensor, n_classes: int, ignore_index: int) -> Tensor:
    """`target` as the kernels read it (contiguous: they index it by row), checked to hold classes in [0, n_classes) or
    ignore_index without a host sync: a target outside reads memory outside its row, so it fails (RuntimeError on the
    CPU, a device-side assert on a GPU) as F.cross_entropy's does."""
    in_range = ((target >= 0) & (target < n_classes)) | (target == ignore_index)
    torch._assert_async(in_range.all(), f"cross_entropy: a target outside [0, {n_classes}) and not ignore_index")
    return target.contiguous()


def mean_scale(target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """fp32 (1,): 1 / (non-ignored targets) for the mean (1 if there are none), else 1. No host sync."""
    if reduction != "mean":
        return torch.ones(1, device=target.device)
    return 1.0 / (target != ignore_index).sum().clamp_min(1).float().reshape(1)


def reduce_rows(rows: Tensor, scale: Tensor, reduction: str) -> Tensor:
    """The per-row losses reduced as `reduction` asks (mean uses `scale` = 1 / count)."""
    return rows if reduction == "none" else rows.sum() * scale.squeeze(0)


def fuses_gradient(dtype: torch.dtype) -> bool:
    """Whether the forward writes the gradient of logits of `dtype` (see the module docstring for why not fp16)."""
    return dtype != torch.float16


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        target: Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float,
        needs_grad: bool,
        inplace: bool,
    ) -> tuple[Tensor, Tensor]:
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        scale = mean_scale(target, ignore_index, reduction)
        ctx.fused = needs_grad and fuses_gradient(logits.dtype)
        grad = (logits if inplace else torch.empty_like(logits)) if ctx.fused else logits.new_empty(0)
        rows, lse, hits = _rows_op(
            logits, target, scale, grad, ctx.fused, ignore_index, label_smoothing, z_loss, softcap
        )
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap)
        ctx.save_for_backward(grad if ctx.fused else logits, target, lse, scale)
        correct = hits.sum()
        ctx.mark_non_differentiable(correct)
        return reduce_rows(rows, scale, reduction), correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_correct: Tensor | None):
        saved, target, lse, scale = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss, softcap = ctx.options
        weight = grad_loss.float().reshape(-1)
        if ctx.fused:
            _scale_rows_op(saved, weight)  # the forward already folded in the 1/count of the mean
            grad = saved
        else:
            grad = torch.empty_like(saved)
            _grad_op(saved, target, lse, weight * scale, grad, ignore_index, label_smoothing, z_loss, softcap)
        return grad, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- functional and module


@overload
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    inplace_backward: bool = ...,
    return_correct: Literal[False] = ...,
) -> Tensor: ...
@overload
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    inplace_backward: bool = ...,
    *,
    return_correct: Literal[True],
) -> tuple[Tensor, Tensor]: ...
@overload
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    inplace_backward: bool = ...,
    return_correct: bool = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    return_correct: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of `logits` (N, V) against class indices `target` (N,); fp32 result.

    F.cross_entropy's semantics where they overlap, plus `z_loss` (adds
    z_loss * lse**2 per counted row) and `softcap` (logits -> softcap * tanh(logits
    / softcap) first). reduction "mean" divides by the number of non-ignored
    targets, computed on the device; when every target is ignored the loss and
    gradient are 0 (F.cross_entropy gives nan). "none" returns per-row losses,
    0 on ignored rows. Targets must be in [0, V) or equal ignore_index.

    The gradient is computed in the forward (except for fp16, see the module
    docstring) into a new (N, V) buffer; `inplace_backward=True` writes it into
    `logits` instead, saving that buffer: the logits are overwritten, so use it
    only when nothing else reads them afterwards (autograd raises if something
    saved them for its backward).

    `return_correct=True` returns (loss, correct): correct (fp32, 0-dim) counts the
    non-ignored rows whose target has the largest (soft-capped) logit, ties
    included: top-1 accuracy at no extra cost, since pass 1 has both values.
    """
    check_inputs(logits, target, reduction, label_smoothing, softcap)
    target = checked_target(target, logits.shape[1], ignore_index)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, correct = _CrossEntropyFunction.apply(
        logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap or 0.0, needs_grad, inplace_backward
    )
    return (loss, correct) if return_correct else loss


class CrossEntropyLoss(torch.nn.Module):
    """`cross_entropy` as a module; logits of any leading shape (..., V) with targets (...)."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
    ):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.inplace_backward = z_loss, softcap, inplace_backward

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.z_loss,
            self.softcap,
            self.inplace_backward,
        )
        return loss.reshape(target.shape) if self.reduction == "none" else loss


def cross_entropy_reference(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """The same loss from stock PyTorch ops (F.cross_entropy and logsumexp) in the logits' dtype.

    Differentiable by autograd. Call it on float64 logits for a reference to test against.
    """
    x = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = target != ignore_index
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(x, dim=-1) ** 2, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (valid.sum().clamp_min(1) if reduction == "mean" else 1)
