"""RMSNorm over the last dimension, optionally fused with the residual add before it.

Imports from fasttrain_kernels: _backend, _specialization.

    h = x + residual                      (without a residual, h = x)
    y = h * rstd * weight,   rstd = 1 / sqrt(mean(h**2) + eps)

The mean of squares and rstd are fp32 whatever the dtype (an fp16 h**2 overflows
at |h| > 256). h is stored in the promoted dtype of x and residual, as `x + residual`,
and y in h's dtype, as torch.nn.RMSNorm does even when the weight is fp32, unless
asked for another: under autocast the module writes y in the autocast dtype (see `RMSNorm`).

Why fuse the add: every pre-norm block computes `stream = stream + delta` and then
normalises the new stream. As two ops that reads and writes 10 bytes per element
in bf16 (the add: 2 reads and a write; the norm: a read and a write); fused, 8
(reads x and residual, writes h and y). The backward gains more: the gradient
reaching h is the norm's gradient plus the one flowing down the residual stream,
and the kernel adds the two while it writes dx (8 bytes instead of 12).

Backward, with n = h * rstd and g = dy * weight:

    dh      = rstd * (g - n * mean(g * n)) + dh_out   (dh_out: gradient reaching h directly)
    dweight = sum over rows of dy * n

dx = dresidual = dh, each written by the kernel in its own input's dtype: under
autocast x (a block's output) is bf16 and the residual stream fp32, and a cast
kernel afterwards would read the fp32 gradient again. The backward is persistent:
a few programs per streaming multiprocessor, each taking a contiguous run of rows a
tile at a time, prefetching the next tiles into shared memory while it works on
this one (STAGES), and adding dy * n into an fp32 register tile that it reduces
over rows once, at the end, into its row of (programs, H) fp32 partials. Those are
summed afterwards, so dweight is deterministic and never accumulated in bf16.

A program holds whole rows (up to MAX_HIDDEN columns): several short rows as one
2-D tile, or a single long one. How many rows a tile, warps a program, programs per
SM and stages is a `Tiling`, per row block and GPU: measured winners from
`rms_norm_tilings.json` (written on a GPU by `python -m benchmarks.studies.tune_rms_norm`)
where it has them, else `default_tilings`. Layout of this file: Triton kernels ->
tilings and launchers (Triton or PyTorch) -> torch.library ops -> autograd.Function
-> `rms_norm` -> `RMSNorm`, with `rms_norm_reference` (stock ops) for tests and
benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.library import wrap_triton

from fasttrain_kernels._backend import gpu_properties, library_op, num_warps_for, tl, traced, triton, use_triton
from fasttrain_kernels._specialization import EXAMPLE_ROWS, HIDDEN_SIZES, PRECISIONS, Specialization, choices

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 65536  # a program holds a whole row in registers
TILE = 4096  # elements per program tile by default: TILE // H short rows at once, or one long row
TILINGS_FILE = Path(__file__).with_name("rms_norm_tilings.json")  # measured winners per GPU and row block
CPU_BACKWARD_PROGRAMS = 4  # in the interpreter: several, so tests cover the partials' reduction


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    x_stride,
    residual_ptr,
    residual_stride,
    h_ptr,
    h_stride,
    weight_ptr,
    y_ptr,
    y_stride,
    rstd_ptr,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK_ROWS rows per program: h = x + residual (stored), rstd (stored, fp32), y = h * rstd * weight."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    h = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * residual_stride + cols[None, :], mask=mask, other=0.0)
        # Round the sum to h's dtype before normalising it: the backward recomputes from the stored h.
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * h_stride + cols[None, :], h, mask=mask)
    h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * weight[None, :]
    tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr,
    dy_stride,
    dh_ptr,
    dh_stride,
    h_ptr,
    h_stride,
    weight_ptr,
    rstd_ptr,
    dx_ptr,
    dx_stride,
    dresidual_ptr,
    dresidual_stride,
    dweight_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DH: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    SPLIT_DRESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """dx for `rows_per_program` consecutive rows, BLOCK_ROWS at a time with STAGES - 1 tiles prefetched
    (dx may be dy's own memory: each tile is read before it is written); with SPLIT_DRESIDUAL the same
    gradient again into dresidual, in that pointer's dtype. With WEIGHT_GRAD, the fp32 sum of dy * n
    over the rows as this program's row of the dweight partials."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Summed over rows once, after the loop: a reduction across the tile's rows in every iteration
    # would cross warps (through shared memory, with a barrier) each time.
    dweight = tl.zeros((BLOCK_ROWS, BLOCK), dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in tl.range(first, last, BLOCK_ROWS, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(h_ptr + rows[:, None] * h_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        n = h * rstd[:, None]  # masked rows and columns are 0, so they add nothing below
        if WEIGHT_GRAD:
            dweight += dy * n
        g = dy * weight[None, :]
        dx = (g - n * (tl.sum(g * n, axis=1) / n_cols)[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(dh_ptr + rows[:, None] * dh_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * dx_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if SPLIT_DRESIDUAL:
            tl.store(
                dresidual_ptr + rows[:, None] * dresidual_stride + cols[None, :],
                dx.to(dresidual_ptr.dtype.element_ty),
                mask=mask,
            )
    if WEIGHT_GRAD:
        tl.store(dweight_ptr + program * n_cols + cols, tl.sum(dweight, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- tilings and launchers


@dataclass(frozen=True)
class Tiling:
    """How a launch covers rows of BLOCK columns: `block_rows` rows a tile, `num_warps` a program; for the
    backward, `programs_per_sm` persistent programs per streaming multiprocessor, each with `stages` - 1
    tiles in flight ahead of the one it works on (1: no prefetch). The forward takes one tile a program."""

    block_rows: int
    num_warps: int
    programs_per_sm: int = 1
    stages: int = 1


def default_tilings(block: int) -> tuple[Tiling, Tiling]:
    """(forward, backward) tilings for rows of `block` columns where nothing was measured: TILE elements a
    tile; the backward with two programs per SM (at up to 128 registers a thread, two 8-warp programs fill
    an SM's 64K registers), prefetching one tile ahead while a tile is at most TILE elements (at most 48 KiB
    of shared memory, with fp32 h and dh), without prefetch beyond."""
    block_rows = max(1, TILE // block)
    num_warps = num_warps_for(block * block_rows)
    return Tiling(block_rows, num_warps), Tiling(block_rows, num_warps, 2, 2 if block * block_rows <= TILE else 1)


def _read_tilings(path: Path) -> dict[str | None, dict[int, tuple[Tiling, Tiling]]]:
    """capability ("sm_90") -> row block -> (forward, backward), from the measured-winners file at `path`
    ({} when it is absent). Its shape: {"tilings": {"sm_90": {"1024": {"forward": {...}, "backward":
    {...}}}}, ...}, each tiling a dict of Tiling's fields. (The file has no None, the capability off the GPU:
    tests put tilings for the interpreter there.)"""
    if not path.is_file():
        return {}
    found = json.loads(path.read_text())["tilings"]
    return {
        capability: {
            int(block): (Tiling(**entry["forward"]), Tiling(**entry["backward"])) for block, entry in blocks.items()
        }
        for capability, blocks in found.items()
    }


MEASURED_TILINGS = _read_tilings(TILINGS_FILE)


def _capability(device: torch.device) -> str | None:
    """The dispatch key of the GPU behind `device` ("sm_90"); None off the GPU."""
    if device.type != "cuda":
        return None
    props = gpu_properties(device)
    return f"sm_{props.major}{props.minor}"


def tilings(n_cols: int, capability: str | None) -> tuple[int, Tiling, Tiling]:
    """(BLOCK, forward tiling, backward tiling) for rows of `n_cols` on a GPU of `capability`."""
    block = triton.next_power_of_2(n_cols)
    measured = MEASURED_TILINGS.get(capability, {}).get(block)
    return (block, *(measured or default_tilings(block)))


def _backward_split(n_rows: int, tiling: Tiling, device: torch.device) -> tuple[int, int]:
    """(rows per program, programs): runs of whole tiles, about `tiling.programs_per_sm` per SM."""
    wanted = (
        tiling.programs_per_sm * gpu_properties(device).multi_processor_count
        if device.type == "cuda"
        else CPU_BACKWARD_PROGRAMS
    )
    rows_per_program = tiling.block_rows * max(triton.cdiv(n_rows, wanted * tiling.block_rows), 1)
    return rows_per_program, triton.cdiv(n_rows, rows_per_program)  # no rows: no programs


def _sum_dtype(x: Tensor, residual: Tensor | None) -> torch.dtype:
    """h's dtype: that of x + residual."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _forward(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype, tiling: Tiling | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, rstd) for rows `x` (M, H) [+ `residual` (M, H)]; h is empty without a residual. `tiling`
    overrides the chosen one (benchmarks.studies.tune_rms_norm measures candidates so)."""
    n_rows, n_cols = x.shape
    if not use_triton(x):  # the same math in PyTorch
        h = x if residual is None else x + residual
        hf = h.float()
        rstd = torch.rsqrt(hf.square().mean(-1) + eps)
        y = (hf * rstd.unsqueeze(1) * weight.float()).to(out_dtype)
        return y, (x.new_empty(0) if residual is None else h), rstd
    y = torch.empty(n_rows, n_cols, dtype=out_dtype, device=x.device)
    h = x.new_empty(0) if residual is None else torch.empty_like(x, dtype=_sum_dtype(x, residual))
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, chosen, _ = tilings(n_cols, _capability(x.device))
    tiling = tiling or chosen
    kernel = wrap_triton(_rms_norm_forward_kernel) if traced(x) else _rms_norm_forward_kernel
    kernel[(triton.cdiv(n_rows, tiling.block_rows),)](
        x,
        x.stride(0),
        x if residual is None else residual,
        x.stride(0) if residual is None else residual.stride(0),
        x if residual is None else h,
        n_cols,
        weight,
        y,
        n_cols,
        rstd,
        n_rows,
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_ROWS=tiling.block_rows,
        BLOCK=block,
        num_warps=tiling.num_warps,
    )
    return y, h, rstd


def _backward(
    dy: Tensor,
    dh: Tensor | None,
    h: Tensor,
    weight: Tensor,
    rstd: Tensor,
    dx: Tensor,
    dresidual: Tensor | None,
    weight_grad: bool,
    tiling: Tiling | None = None,
) -> Tensor:
    """dx (written into `dx`, which may be `dy`), the same gradient into `dresidual` when given (in its
    own dtype) and, with `weight_grad`, dweight (returned, else empty). `tiling` as for `_forward`."""
    n_rows, n_cols = h.shape
    if not use_triton(h):
        n = h.float() * rstd.unsqueeze(1)
        dyf = dy.float()
        g = dyf * weight.float()
        grad = (g - n * (g * n).mean(-1, keepdim=True)) * rstd.unsqueeze(1)
        if dh is not None:
            grad += dh.float()
        # Before dx is written: dx may be dy itself (inplace_backward), and an fp32 dy is dyf
        dweight = (dyf * n).sum(0).to(weight.dtype) if weight_grad else weight.new_empty(0)
        for out in (dx, dresidual):
            if out is not None:
                out.copy_(grad)
        return dweight
    block, _, chosen = tilings(n_cols, _capability(h.device))
    tiling = tiling or chosen
    rows_per_program, programs = _backward_split(n_rows, tiling, h.device)
    partials = torch.empty(programs if weight_grad else 0, n_cols, dtype=torch.float32, device=h.device)
    kernel = wrap_triton(_rms_norm_backward_kernel) if traced(h) else _rms_norm_backward_kernel
    kernel[(programs,)](
        dy,
        dy.stride(0),
        dy if dh is None else dh,
        dy.stride(0) if dh is None else dh.stride(0),
        h,
        h.stride(0),
        weight,
        rstd,
        dx,
        dx.stride(0),
        dx if dresidual is None else dresidual,
        dx.stride(0) if dresidual is None else dresidual.stride(0),
        partials,
        n_rows,
        n_cols,
        rows_per_program,
        HAS_DH=dh is not None,
        WEIGHT_GRAD=weight_grad,
        SPLIT_DRESIDUAL=dresidual is not None,
        BLOCK_ROWS=tiling.block_rows,
        BLOCK=block,
        STAGES=tiling.stages,
        num_warps=tiling.num_warps,
    )
    return partials.sum(0).to(weight.dtype) if weight_grad else weight.new_empty(0)


def _all_tilings() -> dict[int, set[tuple[Tiling, Tiling]]]:
    """Row block -> every (forward, backward) the launchers may choose for it: the defaults over the
    project's hidden sizes, and each GPU's measured ones."""
    found: dict[int, set[tuple[Tiling, Tiling]]] = {}
    for block in choices(triton.next_power_of_2, HIDDEN_SIZES):
        found.setdefault(block, set()).add(default_tilings(block))
    for measured in MEASURED_TILINGS.values():
        for block, pair in measured.items():
            found.setdefault(block, set()).add(pair)
    return found


def specializations() -> list[Specialization]:
    """What `rms_norm` compiles over the project's hidden sizes and every tiling it may choose, per
    precision: the stream (x without a residual, the residual with one) and the weight in the parameter
    dtype, x with a residual (a block's output) and y in the compute dtype; the backward with dweight or
    without (a frozen weight), and with a residual, with or without a gradient reaching h, and with the
    residual's gradient written apart when its dtype is not x's. eps is a run-time float: every value runs
    the same binary. The example rows_per_program is that of a single program (all rows): its value only
    bounds a loop."""
    found = []
    f32 = torch.float32
    for block, pairs in _all_tilings().items():
        n_cols = min(block, HIDDEN_SIZES[-1])  # the widest size of the block: int widths follow it
        for forward, backward in pairs:
            for precision in PRECISIONS:
                stream, y = precision.param, precision.compute
                for x, residual in ((stream, None), (precision.compute, stream)):
                    h = x if residual is None else torch.promote_types(x, residual)  # the dtype of x + residual
                    found.append(
                        Specialization.of(
                            _rms_norm_forward_kernel,
                            forward.num_warps,
                            dict(HAS_RESIDUAL=residual is not None, BLOCK_ROWS=forward.block_rows, BLOCK=block),
                            x_ptr=x,
                            x_stride=n_cols,
                            residual_ptr=x if residual is None else residual,
                            residual_stride=n_cols,
                            h_ptr=h,
                            h_stride=n_cols,
                            weight_ptr=stream,
                            y_ptr=y,
                            y_stride=n_cols,
                            rstd_ptr=f32,
                            n_rows=EXAMPLE_ROWS,
                            n_cols=n_cols,
                            eps=1e-6,
                        )
                    )
                    split = residual is not None and residual != x
                    for has_dh in (False, True) if residual is not None else (False,):
                        for weight_grad in (True, False):
                            found.append(
                                Specialization.of(
                                    _rms_norm_backward_kernel,
                                    backward.num_warps,
                                    dict(
                                        HAS_DH=has_dh,
                                        WEIGHT_GRAD=weight_grad,
                                        SPLIT_DRESIDUAL=split,
                                        BLOCK_ROWS=backward.block_rows,
                                        BLOCK=block,
                                        STAGES=backward.stages,
                                    ),
                                    dy_ptr=y,
                                    dy_stride=n_cols,
                                    dh_ptr=h if has_dh else y,
                                    dh_stride=n_cols,
                                    h_ptr=h,
                                    h_stride=n_cols,
                                    weight_ptr=stream,
                                    rstd_ptr=f32,
                                    dx_ptr=x,
                                    dx_stride=n_cols,
                                    dresidual_ptr=residual if split else x,
                                    dresidual_stride=n_cols,
                                    dweight_ptr=f32,
                                    n_rows=EXAMPLE_ROWS,
                                    n_cols=n_cols,
                                    rows_per_program=EXAMPLE_ROWS,
                                )
                            )
    return found


# ----------------------------------------------------------------------------- torch.library ops
# torch.compile calls them without a graph break: on CUDA tensors it traces the launchers and Inductor
# launches the kernels itself; on the CPU the ops are opaque, their fakes giving it shapes and dtypes.
# Eager calls skip the op and call the function (fasttrain_kernels/_backend.py, LibraryOp).


@library_op("fasttrain::rms_norm_forward", inline=True)
def _forward_op(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, rstd) of rows x (M, H) [+ residual]; h is empty without a residual, rstd is fp32 (M,)."""
    return _forward(x, residual, weight, eps, out_dtype)


@_forward_op.register_fake
def _(x, residual, weight, eps, out_dtype):
    h = x.new_empty(0) if residual is None else torch.empty_like(x, dtype=_sum_dtype(x, residual))
    return x.new_empty(x.shape, dtype=out_dtype), h, x.new_empty(x.shape[0], dtype=torch.float32)


@library_op("fasttrain::rms_norm_backward", mutates_args=("dx", "dresidual"), inline=True)
def _backward_op(
    dy: Tensor,
    dh: Tensor | None,
    h: Tensor,
    weight: Tensor,
    rstd: Tensor,
    dx: Tensor,
    dresidual: Tensor | None,
    weight_grad: bool,
) -> Tensor:
    """dx into `dx` (may be `dy`) and into `dresidual` if given; returns dweight in the weight's dtype if
    `weight_grad`, else an empty tensor."""
    return _backward(dy, dh, h, weight, rstd, dx, dresidual, weight_grad)


@_backward_op.register_fake
def _(dy, dh, h, weight, rstd, dx, dresidual, weight_grad):
    return weight.new_empty(weight.shape if weight_grad else 0)


# ----------------------------------------------------------------------------- autograd


def check_inputs(
    x: Tensor, weight: Tensor, residual: Tensor | None, eps: float | None, out_dtype: torch.dtype | None = None
) -> None:
    """ValueError naming the first thing wrong with a call's shapes, dtypes or options."""
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.dtype not in DTYPES:
            raise ValueError(f"rms_norm: {name} must be float32, bfloat16 or float16, not {t.dtype}")
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm: weight must be (H,) for x (..., H); got {tuple(weight.shape)} and {tuple(x.shape)}"
        )
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} is over the kernel's limit of {MAX_HIDDEN}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, not {tuple(residual.shape)}")
    if eps is not None and not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, not {eps}")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise ValueError(f"rms_norm: out_dtype must be float32, bfloat16 or float16, not {out_dtype}")


def _rows(t: Tensor) -> Tensor:
    """`t` (..., H) as (M, H) rows with unit column stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        residual: Tensor | None,
        weight: Tensor,
        eps: float,
        out_dtype: torch.dtype,
        inplace_backward: bool,
        separate_grads: bool,
    ):
        y, h, rstd = _forward_op(x, residual, weight, eps, out_dtype)
        ctx.has_residual, ctx.inplace_backward = residual is not None, inplace_backward
        ctx.separate_grads = separate_grads
        ctx.grad_dtypes = (x.dtype, None if residual is None else residual.dtype)
        ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused y or h gets None, not a tensor of zeros to read
        return (y, h) if ctx.has_residual else y

    @staticmethod
    @once_differentiable  # a second derivative is refused, not computed wrong
    def backward(ctx, dy: Tensor | None, dh: Tensor | None = None):
        if dy is None:  # only h was used downstream: it passes its gradient straight to x and residual
            residual_grad = dh.clone() if ctx.separate_grads and dh is not None else dh
            return dh, residual_grad, None, None, None, None, None
        h, weight, rstd = ctx.saved_tensors
        dy, dh = _rows(dy), None if dh is None else _rows(dh)
        # x and the residual get the same gradient, each in its own dtype: one output, or two when the
        # dtypes differ (the kernel writes both, rather than autograd casting one after it).
        wanted = [dtype for dtype, needed in zip(ctx.grad_dtypes, ctx.needs_input_grad) if needed]
        first = wanted[0] if wanted else h.dtype  # a frozen x and residual: dx is only a scratch output
        overwrite = ctx.inplace_backward and dy.dtype == first and dy.is_contiguous()
        dx = dy if overwrite else torch.empty_like(h, dtype=first)
        dresidual = torch.empty_like(h, dtype=wanted[1]) if len(wanted) == 2 and wanted[1] != first else None
        dweight = _backward_op(dy, dh, h, weight, rstd, dx, dresidual, ctx.needs_input_grad[2])
        residual_grad = dx if dresidual is None else dresidual
        if residual_grad is dx and ctx.separate_grads:  # two leaves: a copy (a rare case)
            residual_grad = dx.clone()
        return (
            dx if ctx.needs_input_grad[0] else None,
            residual_grad if ctx.needs_input_grad[1] else None,
            dweight if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- functional and module


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float | None = 1e-6,
    residual: Tensor | None = None,
    inplace_backward: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm of `x` (..., H) over its last dimension, scaled by `weight` (H,).

    Returns y (x's shape, in x's dtype). With `residual` (x's shape) it normalises
    h = x + residual instead and returns (y, h), h in the promoted dtype of the
    two and y in h's: the add and the norm of a pre-norm block in one kernel. Both
    are differentiable; the gradient reaching x equals the one reaching residual.
    `out_dtype` stores y in another dtype (rounded once from fp32). `eps` None is
    torch's: the machine epsilon of h's dtype.

    The backward writes dx into new memory; `inplace_backward=True` writes it over
    the incoming gradient of y when that is contiguous and of the same dtype,
    saving the allocation: use it only when nothing else reads that gradient. An
    add reading y hands that same gradient tensor to its other input too (y + s
    in a post-norm or sandwich block): there it would overwrite s's gradient.
    """
    check_inputs(x, weight, residual, eps, out_dtype)
    eps = torch.finfo(_sum_dtype(x, residual)).eps if eps is None else eps
    # Two leaves would otherwise get one tensor as both .grad: a second backward accumulates into it twice
    separate_grads = residual is not None and all(t.is_leaf and t.requires_grad for t in (x, residual))
    out = _RMSNormFunction.apply(
        _rows(x),
        None if residual is None else _rows(residual),
        weight.contiguous(),  # the kernels index it by column
        eps,
        out_dtype or _sum_dtype(x, residual),
        inplace_backward,
        separate_grads,
    )
    if residual is None:
        return out.view(x.shape)
    y, h = out
    return y.view(x.shape), h.view(x.shape)


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension with a learned scale: a drop-in for torch.nn.RMSNorm(dim, eps)
    (same `weight` parameter and state_dict; eps None, the default, is the machine epsilon of the input's
    dtype, as torch's) whose forward also takes an optional residual.

    Under autocast y comes out in the autocast dtype (torch.nn.RMSNorm's stays in its input's,
    often fp32 in the residual stream). The matmul that reads a norm's output would round it to
    that dtype anyway: the same values, without writing fp32 and reading it back to cast.
    """

    def __init__(
        self,
        dim: int,
        eps: float | None = None,
        *,
        inplace_backward: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.eps, self.inplace_backward = dim, eps, inplace_backward
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """y = norm(x), or (norm(x + residual), x + residual); see `rms_norm`."""
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return rms_norm(x, self.weight, self.eps, residual, self.inplace_backward, out_dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def rms_norm_reference(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """The same from stock PyTorch ops, differentiable by autograd: statistics and product in fp32
    (fp64 for fp64 inputs), y rounded once to h's dtype. Call it on fp64 tensors for a test reference."""
    h = x if residual is None else x + residual
    hf = h.to(torch.promote_types(h.dtype, torch.float32))
    y = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps) * weight).to(h.dtype)
    return y if residual is None else (y, h)
