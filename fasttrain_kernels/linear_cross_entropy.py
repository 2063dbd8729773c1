"""Cross-entropy of `hidden @ weight.T + bias` without ever holding the whole (N, V) logits.

Imports from fasttrain_kernels: _backend, _specialization, cross_entropy.

A language model's last layer projects N hidden states (N, H) onto a vocabulary
of V words. The logits (N, V) are the largest tensor of the step (8192 x 131072
in bf16 is 2 GiB, and F.cross_entropy keeps fp32 copies besides), yet all the
loss needs from them is each row's log-sum-exp and its target logit.

So the rows go through in chunks. For each chunk of rows: project (a GEMM),
run the cross-entropy kernel over the chunk's logits, which writes their
gradient into the same buffer, then turn that gradient straight into the
chunk's share of the input gradients with two more GEMMs:

    grad_hidden[chunk] = grad_logits @ weight            (complete: a chunk owns its rows)
    grad_weight       += grad_logits.T @ hidden[chunk]   (summed over chunks in fp32)
    grad_bias         += grad_logits.sum(0)              (fp32)

That is the whole backward, done during the forward: the backward proper only
multiplies the finished gradients by the incoming one (nothing on the device
when it is 1). The matmul work is the 6 N H V of an unfused forward + backward;
extra memory is one chunk of logits plus the fp32 weight-gradient accumulator
(which is the gradient itself when the weight is fp32, as with autocast).
Accumulating grad_weight in bf16 instead, as some libraries do, rounds away
small contributions once many chunks have been added, a known cause of
divergence.

The fp32 sum costs no pass of its own where torch runs a bf16/fp16 GEMM with an
fp32 output (`out_dtype`; CUDA, probed once per device and dtype): the GEMM adds
into the accumulator itself (cuBLAS beta = 1: 8 bytes an element, read and
written), and the first chunk's GEMM writes it (4 bytes), so it is never zero-filled.
Elsewhere each chunk's product is a (V, H) temporary in the GEMM's dtype, written,
read back and added: 12 bytes an element.

Chunks are as large as a byte budget of logits allows (LOGITS_BUDGET), in
multiples of 128 rows and of nearly equal size: every chunk is one more pass
over the (V, H) accumulator, and tall GEMMs keep the tensor cores busy.

In training the loss is multiplied before the backward (by 1 / tokens, a loss
scale, ...), so the incoming gradient is not 1 and the backward would read and
write every gradient once more. A caller that announces the factor
(`grad_scale`) gets it folded into the gradients the forward writes; the
backward then multiplies by incoming / grad_scale, exactly 1 when the caller did
what it announced, which the device skips.

Two cases recompute instead (chunked the same way, in the backward):
reduction="none", where each row's incoming gradient is only known then, and
fp16, for the underflow reason given in fasttrain_kernels/cross_entropy.py. That costs
one more projection, 8 N H V in all. There `grad_scale` changes nothing: the
incoming gradient is folded in when the gradient is computed.

Under autocast the GEMMs run in the autocast dtype, as F.linear would, and the
gradients come back in the inputs' own dtypes.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain_kernels._backend import library_op
from fasttrain_kernels._specialization import HIDDEN_SIZES, PRECISIONS, VOCAB_SIZES, Specialization, choices
from fasttrain_kernels.cross_entropy import (
    IGNORE_INDEX,
    _grad_op,
    _rows_op,
    _scale_rows_op,
    check_inputs,
    checked_target,
    cross_entropy_reference,
    fuses_gradient,
    launch_config,
    mean_scale,
    reduce_rows,
    rows_specialization,
    scale_rows_specialization,
)

# Bytes of logits alive at once when the caller names no chunk size. With bf16 logits that is
# 512 MiB / (2 V) rows: about 5.3K at V = 50304 (5248, 41 multiples of 128: N = 16384 goes in 4
# chunks of 4096), 2048 at V = 131072. Larger chunks mean fewer passes over the (V, H) fp32
# accumulator and taller GEMMs; the price is memory (the unfused path holds all N rows, and more).
LOGITS_BUDGET = 512 * 2**20
CHUNK_MULTIPLE = 128  # rows: a whole number of tensor-core tiles in the GEMMs' M and K


def chunk_bounds(n_rows: int, n_cols: int, itemsize: int, chunk_rows: int | None = None) -> tuple[int, ...]:
    """Where the chunks of `n_rows` rows of `n_cols` logits of `itemsize` bytes start, then n_rows:
    (0, ..., n_rows), chunk i being rows bounds[i]:bounds[i + 1]; just (0,) when there are no rows.

    `chunk_rows` rows each (the last takes what is left), or when None: as few chunks as
    LOGITS_BUDGET allows, of nearly equal size (whole multiples of CHUNK_MULTIPLE rows, at least
    one, differing by at most one multiple; the last ends at n_rows), so none is a sliver.
    """
    if chunk_rows is not None:
        return (*range(0, n_rows, chunk_rows), n_rows)
    units = -(-n_rows // CHUNK_MULTIPLE)
    units_per_chunk = max(1, LOGITS_BUDGET // (n_cols * itemsize * CHUNK_MULTIPLE))
    n_chunks = -(-units // units_per_chunk)
    return tuple(min(units * i // n_chunks * CHUNK_MULTIPLE, n_rows) for i in range(n_chunks + 1)) if units else (0,)


def _gemm_adds_in_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `dtype` GEMMs on `device` can write an fp32 result, and add into one in place, as
    `_gemm_into` calls them (torch.mm / torch.addmm with out_dtype; CUDA on recent torch). A probe that
    syncs with the host; `_fp32_gemm_known` keeps its answers.

    Probed with a tiny call on exact operands (small integers, an accumulator whose fraction
    `dtype` cannot hold), so a missing kernel, an older signature or a wrong sum all say no.
    """
    a = (torch.arange(32 * 64) % 7 - 3).to(dtype).view(32, 64)
    b = (torch.arange(32 * 48) % 5 - 2).to(dtype).view(32, 48)
    product = a.double().t() @ b.double()
    start = 0.5 + 2.0**-14  # exact in fp32 beside sums below 2**8 (a step of 2**-15 there); not in bf16 or fp16
    try:
        a, b = a.to(device), b.to(device)
        acc = torch.empty(64, 48, device=device)
        torch.mm(a.t(), b, out_dtype=torch.float32, out=acc)
        written = torch.equal(acc.cpu().double(), product)
        acc.fill_(start)
        torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc)
        added = torch.equal(acc.cpu().double(), product + start)
    except (RuntimeError, TypeError):  # no kernel for the device (NotImplementedError), no such overload
        return False
    return written and added


def _fp32_gemm_known(device: torch.device, dtype: torch.dtype) -> bool:
    """`_gemm_adds_in_fp32`, probed once per device and dtype, but never while a CUDA graph is being
    captured: the probe's host sync would break the capture, and its failure be kept as a no. There
    (cudagraph trees run every graph eagerly before capturing it, so it is rare) the slower path is
    taken, and the probe waits for a later call."""
    key = (device, dtype)
    if key not in _FP32_GEMM:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        _FP32_GEMM[key] = _gemm_adds_in_fp32(device, dtype)
    return _FP32_GEMM[key]


_FP32_GEMM: dict[tuple[torch.device, torch.dtype], bool] = {}  # `_gemm_adds_in_fp32`'s answers


@library_op("fasttrain::gemm_into_", mutates_args=("out",))
def _gemm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out (M, N) = a (M, K) @ b (K, N), or += when `accumulate`: the product in a's and b's dtype
    (fp32 inside), stored in out's, which is theirs or fp32.

    An op of its own so that torch.compile keeps it as it is: its decomposition of the
    fp32-output GEMM would bring back the (M, N) temporary and the separate add.
    """
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif _fp32_gemm_known(out.device, a.dtype):
        if accumulate:  # in place: out is `self` and the result, cuBLAS reads and writes it once (beta = 1)
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # a product in a's dtype, written and read back, then added: the traffic the fp32 GEMM saves
        product = a @ b
        if accumulate:
            out += product
        else:
            out.copy_(product)


@_gemm_into.register_fake
def _(out, a, b, accumulate):
    return None


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


def _chunked_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor,
    lse: Tensor | None,
    needs: tuple[bool, bool, bool],
    options: tuple,
    bounds: tuple[int, ...],
):
    """Go through the rows in chunks (`chunk_bounds`): losses and lse (when `lse` is None), and the
    requested gradients.

    `row_weight` ((1,) or (N,), fp32) multiplies each row's gradient. Returns
    (loss rows, lse, top-1 hits, (grad_hidden, grad_weight fp32, grad_bias fp32)),
    with None for what was not computed.
    """
    n_rows = hidden.shape[0]
    want_grad = any(needs)
    forward = lse is None
    rows = hidden.new_empty(n_rows, dtype=torch.float32) if forward else None
    lse_out = hidden.new_empty(n_rows, dtype=torch.float32) if lse is None else lse
    hits = hidden.new_empty(n_rows, dtype=torch.float32) if forward else None
    # Row-major whatever the inputs' strides (a transposed weight, column-major hidden states): the backward
    # scales these gradients row by row, with unit column stride.
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None
    # The first chunk writes the weight's gradient and the others add to it: no zero-fill (unless no chunk runs)
    new_accumulator = torch.empty if n_rows else torch.zeros
    grad_weight = new_accumulator(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs[2] and bias is not None else None
    for start, end in zip(bounds[:-1], bounds[1:]):
        h, t = hidden[start:end], target[start:end]
        w = row_weight if row_weight.numel() == 1 else row_weight[start:end]
        logits = _project(h, weight, bias)  # ours, so the kernel may overwrite it with its gradient
        if forward:
            assert rows is not None and hits is not None  # made above for the forward
            rows[start:end], lse_out[start:end], hits[start:end] = _rows_op(logits, t, w, logits, want_grad, *options)
        else:
            _grad_op(logits, t, lse_out[start:end], w, logits, *options)  # lse_out is lse here
        if not want_grad:
            continue
        if grad_hidden is not None:
            _gemm_into(grad_hidden[start:end], logits, weight, False)
        if grad_weight is not None:
            _gemm_into(grad_weight, logits.t(), h, start > 0)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)
    return rows, lse_out, hits, (grad_hidden, grad_weight, grad_bias)


def specializations() -> list[Specialization]:
    """What `linear_cross_entropy` compiles of the cross-entropy kernels, per precision: chunks of logits
    in the compute dtype, forward (with the gradient when fused) and the recomputing backward
    (reduction="none", fp16); when fused, the backward scales the finished gradients, the hidden
    states' (compute dtype) and the weight's (parameter dtype) over hidden-size rows, the bias's over
    one vocabulary-wide row."""
    vocab = choices(launch_config, VOCAB_SIZES).values()
    hidden = choices(launch_config, HIDDEN_SIZES).values()
    found = []
    for precision in PRECISIONS:
        fused = fuses_gradient(precision.compute)
        for n_cols in vocab:
            for forward, write_grad in ((True, False), (True, fused), (False, True)):
                found += [
                    rows_specialization(precision.compute, n_cols, softcap, forward, write_grad)
                    for softcap in (False, True)
                ]
        if fused:
            found += [
                scale_rows_specialization(dtype, n_cols)
                for dtype in (precision.compute, precision.param)
                for n_cols in hidden
            ]
            found += [scale_rows_specialization(precision.param, n_cols) for n_cols in vocab]
    return found


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float,
        bounds: tuple[int, ...],
        needs: tuple[bool, bool, bool],
        compute_dtype: torch.dtype,
        grad_scale: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        options = (ignore_index, label_smoothing, z_loss, softcap)
        scale = mean_scale(target, ignore_index, reduction)
        ctx.fused = any(needs) and reduction != "none" and fuses_gradient(h.dtype)
        if ctx.fused:
            announced = None if grad_scale is None else grad_scale.float().reshape(1)
            row_weight = scale if announced is None else scale * announced
            rows, lse, hits, grads = _chunked_pass(h, w, b, target, row_weight, None, needs, options, bounds)
            # Stored in the inputs' dtypes now, so the fp32 accumulators are freed at once
            ctx.save_for_backward(*(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes)), announced)
        else:  # the backward computes the gradients, with the incoming gradient in hand: nothing to announce
            rows, lse, hits, _ = _chunked_pass(h, w, b, target, scale, None, (False,) * 3, options, bounds)
            ctx.save_for_backward(h, w, b, target, lse, scale)
        ctx.needs, ctx.options, ctx.bounds = needs, options, bounds
        correct = hits.sum()
        ctx.mark_non_differentiable(correct)
        return reduce_rows(rows, scale, reduction), correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_correct: Tensor | None):
        incoming = grad_loss.float().reshape(-1)
        if ctx.fused:
            *grads, announced = ctx.saved_tensors
            factor = incoming if announced is None else _remaining_factor(incoming, announced)
            for g in grads:
                if g is not None:
                    _scale_rows_op(g.view(-1, g.shape[-1]), factor)
        else:
            h, w, b, target, lse, scale = ctx.saved_tensors
            *_, grads = _chunked_pass(h, w, b, target, incoming * scale, lse, ctx.needs, ctx.options, ctx.bounds)
            grads = tuple(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def _remaining_factor(incoming: Tensor, announced: Tensor) -> Tensor:
    """What the gradients, already multiplied by the `announced` factor, still need: incoming / announced.

    Exactly 1 when they are equal, which the row scaling skips: compared, not divided, because a
    compiled division (a reciprocal, an approximate divide) need not give x / x == 1.
    """
    return torch.where(incoming == announced, 1.0, incoming / announced)


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of the GEMMs: the autocast dtype if autocast is on for this device, else the input's."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


@overload
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    chunk_rows: int | None = ...,
    return_correct: Literal[False] = ...,
    grad_scale: Tensor | None = ...,
) -> Tensor: ...
@overload
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    chunk_rows: int | None = ...,
    *,
    return_correct: Literal[True],
    grad_scale: Tensor | None = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = ...,
    ignore_index: int = ...,
    reduction: str = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    chunk_rows: int | None = ...,
    return_correct: bool = ...,
    grad_scale: Tensor | None = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    return_correct: bool = False,
    grad_scale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`cross_entropy(hidden @ weight.T + bias, target, ...)` for hidden (N, H), weight (V, H), bias (V,).

    Same options and result as kernels.cross_entropy (fp32 loss; a mean over no
    counted rows is 0; `return_correct` adds the top-1 hit count), computed
    `chunk_rows` rows at a time so the (N, V) logits never exist (None: as many as
    LOGITS_BUDGET holds, see `chunk_bounds`). Gradients for hidden, weight and
    bias, the weight's and bias's summed over chunks in fp32.

    `grad_scale` (a one-element tensor, not differentiated): the factor the caller will
    multiply the loss by before the backward, e.g. 1 / tokens, so the backward that
    receives exactly it has nothing left to do (see the module docstring). The loss
    returned is not multiplied by it. Any other incoming gradient still gives the right
    gradients, at the cost of one more pass over them (it must then be nonzero and finite).
    """
    check_inputs(hidden, target, reduction, label_smoothing, softcap, name="hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (V, {hidden.shape[1]}) for hidden {tuple(hidden.shape)}, not {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), not {tuple(bias.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, not {chunk_rows}")
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.device != hidden.device):
        raise ValueError(
            f"grad_scale must be a one-element tensor on {hidden.device}, not {tuple(grad_scale.shape)} "
            f"on {grad_scale.device}"
        )
    target = checked_target(target, weight.shape[0], ignore_index)
    compute_dtype = _compute_dtype(hidden)
    bounds = chunk_bounds(hidden.shape[0], weight.shape[0], compute_dtype.itemsize, chunk_rows)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    loss, correct = _LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        bias,
        target,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap or 0.0,
        bounds,
        needs,
        compute_dtype,
        grad_scale,
    )
    return (loss, correct) if return_correct else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """`linear_cross_entropy` as a module: forward(hidden (..., H), weight (V, H), target (...), bias=None,
    grad_scale=None)."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_rows: int | None = None,
    ):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_rows = z_loss, softcap, chunk_rows

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> Tensor:
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            target.reshape(-1),
            bias,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.z_loss,
            self.softcap,
            self.chunk_rows,
            grad_scale=grad_scale,
        )
        return loss.reshape(target.shape) if self.reduction == "none" else loss


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, **options: Any
) -> Tensor:
    """The unfused path: F.linear, then `cross_entropy_reference` on the full logits."""
    return cross_entropy_reference(F.linear(hidden, weight, bias), target, **options)
