"""`train_loop`: the plain training loop, for any model that maps tokens to logits.

Imports from fasttrain: compute.device, evaluation.loss_sums, optimization.objective.

    from fasttrain import train_loop
    history = train_loop(model, loader, optimizer, num_epochs=3, device="cpu")

For code that brings its own model, data and optimizer. The full trainer (schedule,
accumulation, mixed precision, evaluation, checkpoints) is `fasttrain.Trainer`.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from fasttrain.compute.device import resolve_device
from fasttrain.evaluation.loss_sums import perplexity
from fasttrain.optimization.objective import cross_entropy_loss

Batch = Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]


def train_loop(
    model: nn.Module,
    train_dataloader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    num_epochs: int,
    max_grad_norm: float = 1.0,
    log_interval: int = 100,
    device: str | torch.device = "cuda",
) -> dict[str, list]:
    """Train `model` for `num_epochs` passes over `train_dataloader`; returns {"losses": [...], "steps": [...]}.
    `model(input_ids)` must return logits (B, T, V); a batch is a dict of "input_ids" and "target_ids" ((B, T) integers;
    targets of -100 ignored) or an `(input_ids, target_ids)` pair. Per batch: zero the gradients, forward,
    cross-entropy, backward, clip the gradient norm to `max_grad_norm` (0 disables), step; every `log_interval` steps
    (from 1, across epochs) the loss is recorded and printed. The model is moved to `device` in train mode (its
    Parameters stay the optimizer's). A CUDA device on a machine without one is a UsageError."""
    if num_epochs < 0 or log_interval <= 0:
        raise ValueError(f"num_epochs must be >= 0 and log_interval > 0, got {num_epochs} and {log_interval}")
    device = resolve_device(str(device))
    model.to(device)
    model.train()
    history: dict[str, list] = {"losses": [], "steps": []}
    step = 0
    for epoch in range(num_epochs):
        for batch in train_dataloader:
            inputs, targets = _unpack(batch)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = cross_entropy_loss(model(inputs), targets)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            step += 1
            if step % log_interval == 0:
                value = loss.item()
                history["losses"].append(value)
                history["steps"].append(step)
                print(f"epoch {epoch + 1} step {step}: loss {value:.4f} (ppl {perplexity(value):.2f})")
    return history


def _unpack(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        missing = {"input_ids", "target_ids"} - batch.keys()
        if missing:
            raise KeyError(f"batch dict lacks {sorted(missing)}; it has {sorted(batch.keys())}")
        return batch["input_ids"], batch["target_ids"]
    inputs, targets = batch
    return inputs, targets
