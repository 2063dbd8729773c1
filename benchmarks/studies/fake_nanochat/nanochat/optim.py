"""The stand-in's optimizer: AdamW on every group (nanochat's MuonAdamW runs Muon on its "muon" groups)."""

from __future__ import annotations

import torch


class MuonAdamW(torch.optim.AdamW):
    """AdamW whatever a group's "kind"; a group's extra keys (kind, momentum, initial_lr) ride along unused."""
