"""What the sizing's timing runs in each pass (planning/sizing.calibrate): the run's own loss and update, so the speed
it measures is the run's.

Imports from fasttrain: compute.device, config, data.mixture, evaluation.trained_model, formats.tokenizer,
model.transformer, optimization.objective, optimization.optimizers, planning.sizing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fasttrain.compute.device import compile_failure, compile_options, kernels_on, uncompiled
from fasttrain.config import Config, TrainConfig
from fasttrain.data.mixture import Source
from fasttrain.evaluation.trained_model import load_teacher
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.objective import NextTokenLoss, batch_loss
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


def timed_loss(cfg: Config, device: torch.device, teacher: torch.nn.Module | None = None) -> Loss:
    """The loss the sizing's timing backpropagates: the run's, fused where [kernels] fuses it on `device` (on a GPU
    "auto" needs a shape the timing has not got: the unfused loss); with train.teacher's model (`teacher`) its forward
    and the distillation loss too, which a student's every step runs (a larger teacher makes the step several times
    one model's: a plan that timed without it chose its shape for that many times the tokens). Compiled as the run
    compiles it where the run compiles on a GPU: there a small eager step waits on its kernels' launches, which
    compiling cuts (1.27x at 4 x 256 on an H200: benchmarks/results/gpu/h200-2026-11-30b). Eager elsewhere:
    compiling each shape timed would cost a CPU half a minute, to gain it a few percent. A compile that fails is
    timed eager, as the run then trains."""
    t = cfg.train
    fused = kernels_on(cfg.kernels, device, fp8=t.fp8, softcap=cfg.model.logit_softcap)
    compiled = times_compiled(t, device)

    def build(model: Transformer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        objective = NextTokenLoss(model, fused=fused.linear_cross_entropy, teacher_weight=t.teacher_weight)
        if compiled:
            torch._dynamo.reset()  # each shape compiled afresh: the timed shapes never reach dynamo's recompile limit
            objective.compile(options=compile_options(t.compile_mode, t.coordinate_descent_tuning))
        failed = not compiled

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            nonlocal failed
            try:
                with uncompiled(failed):
                    return batch_loss(objective, x, y, None, teacher=teacher).loss
            except Exception as e:
                if failed or compile_failure(e) is None:
                    raise
                failed = True
                return loss(x, y)

        return loss

    return build


def times_compiled(t: TrainConfig, device: torch.device) -> bool:
    """Whether the sizing times a run's steps compiled (`timed_loss`): where the run compiles, on a GPU."""
    return bool(t.compile) and device.type == "cuda"


def timed_teacher(cfg: Config, sources: Sequence[Source], device: torch.device) -> torch.nn.Module | None:
    """train.teacher's model on `device`, for the timing (`timed_loss`); None without one, or before the data (whose
    tokenizer the teacher must share) is prepared. UsageError as the run itself would give for a teacher it cannot
    learn from."""
    if not cfg.train.teacher or not sources:
        return None
    tokenizer = Tokenizer.load(Path(sources[0].dir) / "tokenizer.json")
    return load_teacher(cfg.train.teacher, tokenizer, cfg.model.vocab_size, device)
