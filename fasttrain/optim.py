"""AdamW with decoupled weight decay on weight matrices only.

Decay pulls weights toward zero, which regularises matrices that mix features.
It is wrong for RMSNorm gains (pulled toward 0 instead of their natural 1) and
biases, and usually unhelpful for embeddings, whose rows are each updated only
when their token appears; those go in a group with weight_decay = 0.
"""

from __future__ import annotations

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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, kernel: bool = False
                    ) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model)`: torch's (its fused CUDA implementation on GPU), or with `kernel`
    kernels.FusedAdamW, which also clips the gradients to optim.max_grad_norm inside its step.

    The two have the same math and state_dict, so a checkpoint of one resumes with the other.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    if kernel:
        from kernels.adamw import FusedAdamW  # needs Triton, so only when asked for

        return FusedAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                          max_grad_norm=cfg.max_grad_norm or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type == "cuda")
