"""Validation: the loss, accuracy, perplexity and bits per byte of a model on held-out rows, and of a mixture's
sources (validate_sources).

Imports from fasttrain: compute.device, compute.distributed, data.loader, data.mixture, evaluation.loss_sums.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Sequence

import torch
from torch import nn

from fasttrain.compute import distributed
from fasttrain.compute.device import autocast
from fasttrain.data.loader import TokenLoader
from fasttrain.data.mixture import Source
from fasttrain.evaluation.loss_sums import LossSums, perplexity


@torch.no_grad()
def validate(
    loss: Callable[[torch.Tensor, torch.Tensor], LossSums],
    model: nn.Module,
    loader: TokenLoader,
    max_batches: int,
    precision: str,
    world: distributed.World,
    bits_per_nat: float,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, float] | None:
    """val_loss, val_accuracy, val_ppl and val_bpb over the first `max_batches` batches of `loader`; None if `stop()`,
    asked before each batch (on every rank alike), says to give up. `loss(x, y)` gives a batch's sums (Trainer.loss);
    `model` is in eval mode meanwhile. Give a sequential `whole` loader and its whole pass, so evaluations see the same
    rows in any world. Each rank reads its share, and the loss is the mean over every counted target of all ranks."""
    sums = torch.zeros(3, device=loader.device)
    model.eval()
    try:
        for x, y in islice(loader, max_batches):
            if stop():
                return None
            with autocast(precision, loader.device):
                sums += loss(x, y).detached()
    finally:
        model.train()
    loss_sum, correct, counted = distributed.total(sums, world).tolist()
    val_loss = loss_sum / max(counted, 1)
    return {
        "val_loss": val_loss,
        "val_accuracy": correct / max(counted, 1),
        "val_ppl": perplexity(val_loss),
        "val_bpb": val_loss * bits_per_nat,
    }


def mixture_metrics(found: Sequence[tuple[str, dict[str, float]]], weights: Sequence[float]) -> dict[str, float]:
    """One source's metrics as they are; a mixture's (`found`: names and metrics, in `weights`' order) totalled by
    data.sources' fixed weights, then each source's as "val_loss.<name>", .... ValueError on a mismatch."""
    names = [name for name, _ in found]
    if len(found) != len(weights) or len(set(names)) != len(names):
        raise ValueError(f"{len(weights)} weights for the sources {names}: one each, by distinct names")
    if len(found) == 1:
        return found[0][1]
    keys = ("val_loss", "val_accuracy", "val_bpb")
    total = {k: sum(w * m[k] for w, (_, m) in zip(weights, found)) for k in keys}
    total["val_ppl"] = perplexity(total["val_loss"])
    return {**total, **{f"{k}.{name}": m[k] for name, m in found for k in keys}}


def validate_sources(
    loss: Callable[[torch.Tensor, torch.Tensor], LossSums],
    model: nn.Module,
    sources: Sequence[Source],
    loader_of: Callable[[Source], TokenLoader],
    precision: str,
    world: distributed.World,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, float] | None:
    """`validate` over the whole of each source's loader (`loader_of(source)`, closed after), then the sources'
    metrics weighted as data.sources weighs them (mixture_metrics); None if `stop()` cut one short."""
    found: dict[str, dict[str, float]] = {}
    for source in sources:
        with loader_of(source) as loader:
            metrics = validate(
                loss, model, loader, loader.reader.batches_per_epoch, precision, world, source.data.bits_per_nat, stop
            )
        if metrics is None:
            return None
        found[source.name] = metrics
    return mixture_metrics([(s.name, found[s.name]) for s in sources], [s.weight for s in sources])
