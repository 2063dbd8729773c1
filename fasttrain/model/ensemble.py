"""An ensemble: model.members Transformers of one shape, trained side by side and scored as one model.

Imports from fasttrain: config, model.attention, model.transformer.

Where a budget outlasts what its corpus can teach one model (a small corpus read to its epoch limit,
planning/repeats.py), the rest of the time trains more models of the same shape, each from its own initialization, on
the same batches: an average of independently trained models' probabilities is better than any of them (Kim et al. 2025;
on 254K tokens of held-out code, 3 x 192 read 4 times: one 1.465 bits per byte, two 1.420, four 1.390). Each member
trains as it would alone but for three couplings: the training loss is the mean of the members' losses, so a member's
gradient is its own loss's over the number of members (a scale Muon and Adam's normalisation all but ignore), the
gradient-norm clip (optim.max_grad_norm) is taken over all members at once, and a step a member's loss is not finite
skips every member's update. The training loss reported is the members' mean; validation's is the ensemble's, the mean
of its members' probabilities, so what it returns as logits are log-probabilities: the loss, sampling, the evaluation
harness and validation read them as they read a Transformer's logits.

    model = build_model(cfg.model)   # a Transformer when cfg.model.members is 1, else an Ensemble
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence, cast

import torch
from torch import nn

from fasttrain.config import ModelConfig
from fasttrain.model.attention import KVCache
from fasttrain.model.transformer import Transformer, flops_per_token


class EnsembleCache:
    """Each member's KVCache, advanced together: what Ensemble.hidden takes as `cache` (`length` as KVCache's)."""

    def __init__(self, cfg: ModelConfig):
        self.parts = [KVCache(cfg) for _ in range(cfg.members)]

    @property
    def length(self) -> int:
        return self.parts[0].length

    @length.setter
    def length(self, value: int) -> None:
        for part in self.parts:
            part.length = value


class Ensemble(nn.Module):
    """`cfg.members` Transformers of `cfg`'s shape (`options` as Transformer's), each initialised afresh:
    `forward(tokens (B, T)) -> log of the mean of the members' probabilities (B, T, vocab_size)`."""

    def __init__(self, cfg: ModelConfig, **options: Any):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(Transformer(replace(cfg, members=1), **options) for _ in range(cfg.members))

    @classmethod
    def of(cls, members: Sequence[Transformer]) -> Ensemble:
        """An ensemble of the trained `members` as they are (one shape, say several runs' models: a distilled run's
        rounds), not initialised afresh."""
        ensemble = cls(replace(members[0].cfg, members=0))
        ensemble.cfg = replace(members[0].cfg, members=len(members))
        ensemble.members = nn.ModuleList(members)
        return ensemble

    @property
    def blocks(self) -> nn.ModuleList:
        """Every member's blocks, in order: what FSDP shards one by one and Muon updates."""
        return nn.ModuleList(block for member in transformers(self) for block in member.blocks)

    def reset_parameters(self) -> None:
        for member in transformers(self):
            member.reset_parameters()

    def new_cache(self) -> EnsembleCache:
        return EnsembleCache(self.cfg)

    def hidden(
        self, tokens: torch.Tensor, documents: torch.Tensor | None = None, cache: EnsembleCache | None = None
    ) -> torch.Tensor:
        """Each member's final hidden states, (B, T, members, d_model): `logits` reads the members' axis."""
        parts = [None] * len(self.members) if cache is None else cache.parts
        return torch.stack([m.hidden(tokens, documents, c) for m, c in zip(transformers(self), parts)], dim=-2)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """log of the mean of the members' probabilities, (..., vocab_size), of `hidden` (..., members, d_model)."""
        total = None  # one member's logits at a time: an ensemble's whole set would be members x the memory
        for i, m in enumerate(transformers(self)):
            x = m.logits(hidden[..., i, :])  # bf16 under autocast: log-softmax in fp32 at least
            log_probs = x.log_softmax(-1, dtype=torch.promote_types(x.dtype, torch.float32))
            total = log_probs if total is None else torch.logaddexp(total, log_probs)
        assert total is not None
        return total - math.log(len(self.members))

    def forward(
        self, tokens: torch.Tensor, documents: torch.Tensor | None = None, cache: EnsembleCache | None = None
    ) -> torch.Tensor:
        return self.logits(self.hidden(tokens, documents, cache))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.cfg, seq_len)


def build_model(cfg: ModelConfig, **options: Any) -> Transformer | Ensemble:
    """The network `cfg` describes: a Transformer, or an Ensemble of cfg.members of them (`options`: Transformer's)."""
    return Ensemble(cfg, **options) if cfg.members > 1 else Transformer(cfg, **options)


def transformers(model: nn.Module) -> list[Transformer]:
    """The Transformers `model` is made of: itself, or an ensemble's members."""
    return cast(list[Transformer], list(model.members)) if isinstance(model, Ensemble) else [cast(Transformer, model)]
