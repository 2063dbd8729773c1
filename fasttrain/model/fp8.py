"""FP8 training matmuls: linear layers whose three matmuls run in float8 through `torch._scaled_mm`, with tensorwise
current scaling, while the weights (the master copy) and the gradients keep their dtype.

Imports from fasttrain: nothing.

    forward   y  = (x sx)_e4m3 @ (W sw)_e4m3ᵀ / (sx sw)
    backward  dx = (g sg)_e5m2 @ (W sw)_e4m3  / (sg sw)
              dW = (g sg)_e5m2ᵀ @ (x sx)_e4m3 / (sg sx)

A scale maps the tensor's largest magnitude, measured at each call ("current" scaling: no overflow when a tensor grows),
onto its format's largest finite value (448 in e4m3 for activations and weights, 57344 in e5m2 for gradients). Under
torch.compile the scaling and casts fuse into neighbouring kernels.

`use_float8(model, which)` swaps the output head ("head"), the blocks' projections ("blocks") or both ("all") for
`Float8Linear`, which keeps the same weight Parameter. Shapes `_scaled_mm` cannot take (a size not a multiple of 16, as
generation's one-token steps) run the ordinary matmul.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_CHOICES = ("none", "head", "blocks", "all")


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(`t` scaled so its largest magnitude is `dtype`'s largest value and cast, the fp32 scale):
    t ≈ t_fp8 / scale. An all-zero tensor gets scale 1."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float()
    scale = torch.where(amax > 0, top / amax, torch.ones_like(amax))
    return (t.float() * scale).clamp(-top, top).to(dtype), scale


def scaled_mm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """a (M, K) @ b (K, N) of float8 tensors, a row-major and b column-major, un-scaled: (M, N) in out_dtype."""
    return torch._scaled_mm(a, b, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(), out_dtype=out_dtype)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """`t` with the same shape and values, laid out column by column (as _scaled_mm's second operand)."""
    return t.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """x (M, K) @ w (N, K)ᵀ with every matmul in float8; saves the float8 x and w for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        xq, sx = to_float8(x, E4M3)
        wq, sw = to_float8(w, E4M3)
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.dtypes = x.dtype, w.dtype
        return scaled_mm(xq, sx, wq.t(), sw, out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        gq, sg = to_float8(g, E5M2)
        dx = scaled_mm(gq, sg, column_major(wq), sw, x_dtype)  # (M, N) @ (N, K)
        dw = scaled_mm(gq.t().contiguous(), sg, column_major(xq), sx, w_dtype)  # (N, M) @ (M, K)
        return dx, dw, None


def float8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) through float8 matmuls; x (..., K), weight (N, K) -> (..., N), in the
    autocast dtype under autocast, else x's. Sizes _scaled_mm cannot take fall back to F.linear."""
    rows = x.numel() // x.shape[-1]
    if rows % 16 or x.shape[-1] % 16 or weight.shape[0] % 16:
        return F.linear(x, weight)
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    y = _Float8Matmul.apply(x.reshape(rows, x.shape[-1]), weight, out_dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Float8Linear(nn.Linear):
    """nn.Linear without bias whose matmuls run in float8 (see `float8_linear`); the same state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight)


def _swap(parent: nn.Module, name: str) -> None:
    old = getattr(parent, name)
    new = Float8Linear(old.in_features, old.out_features, bias=False, device="meta")
    new.weight = old.weight  # the same Parameter: tying, the optimizer and checkpoints see no change
    setattr(parent, name, new)


def use_float8(model: nn.Module, which: str) -> nn.Module:
    """Swap `model`'s (a Transformer's) output head, its blocks' linear layers, or all of them for
    Float8Linear, per `which` in FP8_CHOICES ("none" swaps nothing); returns `model`."""
    if which in ("head", "all"):
        _swap(model, "output")
    if which in ("blocks", "all"):
        for block in cast(Iterable[nn.Module], model.blocks):  # a Transformer's
            for parent in (cast(nn.Module, block.attn), cast(nn.Module, block.mlp)):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        _swap(parent, name)
    return model
