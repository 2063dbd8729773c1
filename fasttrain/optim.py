"""AdamW with decoupled weight decay on weight matrices only, and the gradient clipping before it.

Decay pulls weights toward zero, which regularises matrices that mix features.
It is wrong for RMSNorm gains (pulled toward 0 instead of their natural 1) and
biases, and usually unhelpful for embeddings, whose rows are each updated only
when their token appears; those go in a group with weight_decay = 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fasttrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: decayed matrices, and the rest (vectors, and embeddings unless `decay_embeddings`).

    A parameter shared by two modules (tied embedding and output weights) is listed
    once, and counts as an embedding.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # parameters() already skips repeats of a shared tensor
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.ndim >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Updater:
    """What happens to the gradients after the backward: fp16 loss scaling, clipping, the AdamW step.

        updater.scale(loss).backward()       # per micro-batch
        norm = updater.clip_gradients()      # the global norm before clipping
        updater.apply(lr)                    # apply(None): no update; either way the gradients are cleared

    The one place that reads optim.max_grad_norm and decides how clipping happens: with
    torch's AdamW (its fused CUDA implementation on GPU) the gradients are scaled here; with
    `kernel`, kernels.FusedAdamW applies the clip as it reads the gradients in its step, so
    only the norm is computed here and the gradients stay unscaled. The two have the same
    math and state_dict, so a checkpoint of one resumes with the other.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, device: torch.device, precision: str,
                 kernel: bool = False, sharded: bool = False):
        groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
        self.max_grad_norm = cfg.max_grad_norm or math.inf  # 0 disables clipping; the norm is still measured
        self.clip_in_step = kernel
        if kernel:
            from kernels.adamw import FusedAdamW  # needs Triton, so only when asked for

            self.optimizer = FusedAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                        max_grad_norm=cfg.max_grad_norm or None)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                               fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.parameters = [p for group in groups for p in group["params"]]
        self.sharded = sharded  # FSDP: the gradients are DTensor shards

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times the fp16 loss scale (itself otherwise), ready for backward()."""
        return self.scaler.scale(loss)

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to a global L2 norm of optim.max_grad_norm; returns the norm before (a device scalar)."""
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        if self.clip_in_step:
            return self.optimizer.grad_norm()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm, foreach=True)
        return norm.full_tensor() if self.sharded else norm  # FSDP's is a DTensor (already reduced over ranks)

    def apply(self, lr: float | None) -> None:
        """One AdamW step at learning rate `lr` (none if `lr` is None; the GradScaler also skips it if
        fp16 gradients overflowed), then clear the gradients."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
