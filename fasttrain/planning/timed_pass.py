"""What the sizing's timing runs in each pass (planning/sizing.calibrate): the run's own loss and update, so the speed
it measures is the run's.

Imports from fasttrain: compute.device, config, model.transformer, optimization.objective, optimization.optimizers,
planning.sizing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fasttrain.compute.device import kernels_on
from fasttrain.config import Config
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.objective import NextTokenLoss
from fasttrain.optimization.optimizers import Updater
from fasttrain.planning.sizing import Loss, Update


def timed_update(cfg: Config, device: torch.device) -> Update:
    """What the sizing's timing runs after each backward (sizing.calibrate): the run's clipping and optimizer
    step at its peak rate, so the speed it predicts includes the optimizer's time."""

    def build(model: torch.nn.Module) -> Callable[[], None]:
        updater = Updater(model, cfg.optim, device, cfg.train.precision)

        def step() -> None:
            updater.clip_gradients()
            updater.apply(cfg.optim.lr)

        return step

    return build


def timed_loss(cfg: Config, device: torch.device) -> Loss:
    """The loss the sizing's timing backpropagates: the run's, fused where [kernels] fuses it on `device` (on a GPU
    "auto" needs a shape the timing has not got: the unfused loss)."""
    t = cfg.train
    fused = kernels_on(cfg.kernels, device, fp8=t.fp8, softcap=cfg.model.logit_softcap)

    def build(model: Transformer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        objective = NextTokenLoss(model, fused=fused.linear_cross_entropy)
        return lambda x, y: objective(x, y).loss

    return build
