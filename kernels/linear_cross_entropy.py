"""Cross-entropy of `hidden @ weight.T + bias` without ever holding the whole (N, V) logits.

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

Two cases recompute instead (chunked the same way, in the backward):
reduction="none", where each row's incoming gradient is only known then, and
fp16, for the underflow reason given in kernels/cross_entropy.py. That costs
one more projection, 8 N H V in all.

Under autocast the GEMMs run in the autocast dtype, as F.linear would, and the
gradients come back in the inputs' own dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._specialization import HIDDEN_SIZES, PRECISIONS, VOCAB_SIZES, Specialization, choices
from kernels.cross_entropy import (
    IGNORE_INDEX,
    _grad_op,
    _rows_op,
    _scale_rows_op,
    check_inputs,
    cross_entropy_reference,
    fuses_gradient,
    launch_config,
    mean_scale,
    reduce_rows,
    rows_specialization,
    scale_rows_specialization,
)

CHUNK_ROWS = 1024  # rows of logits alive at once: 1024 x 131072 bf16 = 256 MiB


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


def _chunked_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, row_weight: Tensor,
                  lse: Tensor | None, needs: tuple[bool, bool, bool], options: tuple, chunk_rows: int):
    """Go through the rows in chunks: losses and lse (when `lse` is None), and the requested gradients.

    `row_weight` ((1,) or (N,), fp32) multiplies each row's gradient. Returns
    (loss rows, lse, top-1 hits, (grad_hidden, grad_weight fp32, grad_bias fp32)),
    with None for what was not computed.
    """
    n_rows = hidden.shape[0]
    want_grad = any(needs)
    forward = lse is None
    rows = hidden.new_empty(n_rows, dtype=torch.float32) if forward else None
    lse_out = hidden.new_empty(n_rows, dtype=torch.float32) if forward else lse
    hits = hidden.new_empty(n_rows, dtype=torch.float32) if forward else None
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        h, t = hidden[start:end], target[start:end]
        w = row_weight if row_weight.numel() == 1 else row_weight[start:end]
        logits = _project(h, weight, bias)  # ours, so the kernel may overwrite it with its gradient
        if forward:
            rows[start:end], lse_out[start:end], hits[start:end] = _rows_op(logits, t, w, logits, want_grad, *options)
        else:
            _grad_op(logits, t, lse[start:end], w, logits, *options)
        if not want_grad:
            continue
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            if grad_weight.dtype == logits.dtype:
                grad_weight.addmm_(logits.t(), h)
            else:  # a GEMM in the compute dtype (fp32 inside), summed across chunks in fp32
                grad_weight += logits.t() @ h
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
                found += [rows_specialization(precision.compute, n_cols, softcap, forward, write_grad)
                          for softcap in (False, True)]
        if fused:
            found += [scale_rows_specialization(dtype, n_cols) for dtype in (precision.compute, precision.param)
                      for n_cols in hidden]
            found += [scale_rows_specialization(precision.param, n_cols) for n_cols in vocab]
    return found


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
                reduction: str, label_smoothing: float, z_loss: float, softcap: float, chunk_rows: int,
                needs: tuple[bool, bool, bool], compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        options = (ignore_index, label_smoothing, z_loss, softcap)
        scale = mean_scale(target, ignore_index, reduction)
        ctx.fused = any(needs) and reduction != "none" and fuses_gradient(h.dtype)
        rows, lse, hits, grads = _chunked_pass(h, w, b, target, scale, None, needs if ctx.fused else (False,) * 3,
                                               options, chunk_rows)
        if ctx.fused:  # stored in the inputs' dtypes now, so the fp32 accumulators are freed at once
            grads = tuple(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes))
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(h, w, b, target, lse, scale)
        ctx.needs, ctx.options, ctx.chunk_rows = needs, options, chunk_rows
        correct = hits.sum()
        ctx.mark_non_differentiable(correct)
        return reduce_rows(rows, scale, reduction), correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_correct: Tensor | None):
        incoming = grad_loss.float().reshape(-1)
        if ctx.fused:
            grads = ctx.saved_tensors
            for g in grads:
                if g is not None:
                    _scale_rows_op(g.view(-1, g.shape[-1]), incoming)
        else:
            h, w, b, target, lse, scale = ctx.saved_tensors
            *_, grads = _chunked_pass(h, w, b, target, incoming * scale, lse, ctx.needs, ctx.options,
                                      ctx.chunk_rows)
            grads = tuple(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None, None, None)


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of the GEMMs: the autocast dtype if autocast is on for this device, else the input's."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None, chunk_rows: int = CHUNK_ROWS,
                         return_correct: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """`cross_entropy(hidden @ weight.T + bias, target, ...)` for hidden (N, H), weight (V, H), bias (V,).

    Same options and result as kernels.cross_entropy (fp32 loss; a mean over no
    counted rows is 0; `return_correct` adds the top-1 hit count), computed
    `chunk_rows` rows at a time so the (N, V) logits never exist. Gradients for
    hidden, weight and bias, the weight's and bias's summed over chunks in fp32.
    """
    check_inputs(hidden, target, reduction, label_smoothing, softcap, name="hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, {hidden.shape[1]}) for hidden {tuple(hidden.shape)}, "
                         f"not {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), not {tuple(bias.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, not {chunk_rows}")
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    loss, correct = _LinearCrossEntropyFunction.apply(hidden, weight, bias, target, ignore_index, reduction,
                                                      label_smoothing, z_loss, softcap or 0.0, chunk_rows, needs,
                                                      _compute_dtype(hidden))
    return (loss, correct) if return_correct else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """`linear_cross_entropy` as a module: forward(hidden (..., H), weight (V, H), target (...), bias=None)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, chunk_rows: int = CHUNK_ROWS):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_rows = z_loss, softcap, chunk_rows

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias,
                                    self.ignore_index, self.reduction, self.label_smoothing, self.z_loss,
                                    self.softcap, self.chunk_rows)
        return loss.reshape(target.shape) if self.reduction == "none" else loss


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                                   **options) -> Tensor:
    """The unfused path: F.linear, then `cross_entropy_reference` on the full logits."""
    return cross_entropy_reference(F.linear(hidden, weight, bias), target, **options)
