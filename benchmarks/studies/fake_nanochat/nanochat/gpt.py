"""The stand-in's model: what the dry run calls of nanochat's GPT (its config's fields, a meta build, init_weights,
num_scaling_params, estimate_flops, setup_optimizer, forward with and without targets), over a residual stack of
linear layers. Shapes: idx (B, T) token ids -> logits (B, T, vocab_size), or the mean loss given targets (B, T)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanochat.optim import MuonAdamW


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str = "L"


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(nn.Linear(config.n_embd, config.n_embd, bias=False) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def init_weights(self) -> None:
        torch.nn.init.normal_(self.wte.weight, std=1.0)
        for layer in self.h:
            torch.nn.init.normal_(layer.weight, std=self.config.n_embd**-0.5)
        torch.nn.init.zeros_(self.lm_head.weight)

    def num_scaling_params(self) -> dict[str, int]:
        counts = {
            "wte": self.wte.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.h.parameters()),
            "lm_head": self.lm_head.weight.numel(),
        }
        return {**counts, "total": sum(counts.values())}

    def estimate_flops(self) -> int:
        """Forward and backward FLOPs a token: 6 per matrix weight (the stand-in has no attention)."""
        counts = self.num_scaling_params()
        return 6 * (counts["transformer_matrices"] + counts["lm_head"])

    def setup_optimizer(
        self,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        scalar_lr: float = 0.5,
    ) -> MuonAdamW:
        groups = [
            {"kind": "adamw", "params": list(self.lm_head.parameters()), "lr": unembedding_lr, "weight_decay": 0.0},
            {"kind": "adamw", "params": list(self.wte.parameters()), "lr": embedding_lr, "weight_decay": 0.0},
            {"kind": "muon", "params": list(self.h.parameters()), "lr": matrix_lr, "weight_decay": weight_decay},
        ]
        optimizer = MuonAdamW(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.wte(idx)
        for layer in self.h:
            x = x + torch.relu(layer(x))
        logits = self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
