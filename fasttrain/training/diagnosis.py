"""The loss doctor's checks: the systematic checks for "my loss does not go down", run on a real batch of a built
Trainer (`diagnose`), and their report. The command line is fasttrain/doctor.py, `python -m fasttrain.doctor`.

Imports from fasttrain: compute.device, data.documents, training.trainer.

One training batch is checked, in order:

    data         token ids are int64 and inside [0, vocab_size)
    targets      the targets are the inputs shifted by one token
    init loss    near ln(vocab_size), a uniform guess (with model.init_from, not above it)
    gradients    every trainable parameter gets a finite, non-zero gradient (or after one update, if it starts at zero)
    grad norm    the global gradient norm is in a sane range
    lr           the learning rate of the first update and the schedule's peak are not zero
    update       one optimizer step (two for a gradient that starts at zero) changes every trainable parameter
    overfit      a slice of the batch is memorised within N steps at the peak learning rate

Each check says PASS or FAIL and what it measured; a failure also says what to look at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fasttrain.compute.device import autocast
from fasttrain.data.documents import IGNORE_INDEX
from fasttrain.training.trainer import Trainer

INIT_LOSS_TOLERANCE = 1.0  # nats from ln(V); random init with small logits lands well within it
GRAD_NORM_RANGE = (1e-4, 1e3)  # outside it, gradients have vanished or exploded before any training
OVERFIT_ROWS, OVERFIT_TOKENS = 4, 64  # the slice of the batch to memorise
OVERFIT_TARGET = 0.1  # memorised: the loss is below this fraction of where it started


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not run, because an earlier failure makes it meaningless
    detail: str  # what was measured
    hint: str = ""  # what to look at, when it failed


def diagnose(trainer: Trainer, overfit_steps: int = 200) -> list[Check]:
    """Run every check on the next batch of `trainer`'s training data; changes the trainer's model."""
    x, y = next(trainer.train_loader)
    vocab = trainer.cfg.model.vocab_size
    checks = [check_data(x, y, vocab), check_targets(x, y)]
    if not checks[0].passed:  # out-of-range ids would crash the forward pass
        return checks + [
            Check(name, None, "not run: fix the data first")
            for name in ("init loss", "gradients", "grad norm", "lr", "update", "overfit")
        ]
    model = trainer.model
    loss, grad_norm = backward(trainer, x, y)
    problems = gradient_problems(model)
    stuck = unchanged_by_update(trainer)
    zero = [name for name, problem in problems.items() if problem == ZERO_GRADIENT]
    late_gradients, late_moves = [], []
    if zero or stuck:
        # A parameter behind a weight that starts at zero by design (model.zero_init_projections' projections,
        # model.smear's gate behind its scale) has a zero gradient until the first update moves that weight, and
        # an optimizer without weight decay leaves it where it was: each is judged again after that update, and
        # only one whose gradient is still zero, or that a second update still leaves, is dead.
        backward(trainer, x, y)
        again = gradient_problems(model)
        late_gradients = [name for name in zero if name not in again]
        for name in late_gradients:
            del problems[name]
        still = unchanged_by_update(trainer)
        late_moves = [name for name in stuck if name not in still]
        stuck = [name for name in stuck if name in still]
    total = sum(1 for _ in model.parameters())
    checks += [
        check_initial_loss(loss, vocab, pretrained=bool(trainer.cfg.model.init_from)),
        check_gradients(problems, total, late_gradients),
        check_grad_norm(grad_norm),
        check_lr(trainer),
        check_update(stuck, total, late_moves),
        check_overfit(trainer, x[:OVERFIT_ROWS, :OVERFIT_TOKENS], y[:OVERFIT_ROWS, :OVERFIT_TOKENS], overfit_steps),
    ]
    return checks


def backward(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """The gradients of batch (x, y)'s mean loss, clipped as training clips them; returns (loss, norm before)."""
    loss = mean_loss(trainer, x, y)
    trainer.updater.scale(loss).backward()
    return loss.item(), trainer.updater.clip_gradients().item()


def unchanged_by_update(trainer: Trainer) -> list[str]:
    """One optimizer step with the gradients there are, at the first update's rate; returns the names of the
    parameters it left exactly as they were."""
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.updater.apply(trainer.lr())
    return [name for name, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[name])]


def mean_loss(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean loss per counted target of batch (x, y), through the trainer's objective."""
    with autocast(trainer.precision, trainer.device):
        sums = trainer.loss(x, y)
    return sums.loss / sums.counted


def check_data(x: torch.Tensor, y: torch.Tensor, vocab_size: int) -> Check:
    if x.dtype != torch.int64 or y.dtype != torch.int64:
        hint = "the embedding and the loss need int64 (torch.long) token ids"
        return Check("data", False, f"inputs {x.dtype}, targets {y.dtype}", hint)
    targets = y[y != IGNORE_INDEX]
    low, high = min(x.min().item(), targets.min().item()), max(x.max().item(), targets.max().item())
    detail = f"int64 {tuple(x.shape)}, ids {low}..{high}, vocabulary {vocab_size}"
    hint = (
        "ids must lie in [0, model.vocab_size): is the data tokenized with the tokenizer the model was sized for "
        "(data.dir, model.vocab_size)?"
    )
    return Check("data", 0 <= low and high < vocab_size, detail, hint)


def check_targets(x: torch.Tensor, y: torch.Tensor) -> Check:
    counted = y[:, :-1] != IGNORE_INDEX
    matches = (y[:, :-1] == x[:, 1:]) & counted
    share = matches.sum().item() / max(counted.sum().item(), 1)
    detail = f"targets[t] == inputs[t + 1] at {100 * share:.1f}% of {counted.sum().item()} positions"
    hint = (
        "the target of each position must be the next input token: windows of T + 1 tokens, "
        "x = w[:-1], y = w[1:]; look at the loader, or at shuffling applied to one but not the other"
    )
    return Check("targets", share == 1.0, detail, hint)


def check_initial_loss(loss: float, vocab_size: int, pretrained: bool = False) -> Check:
    """`pretrained`: the weights are a trained model's (model.init_from), which should beat chance."""
    chance = math.log(vocab_size)
    detail = f"{loss:.3f} nats vs ln({vocab_size}) = {chance:.3f}"
    if loss > chance + INIT_LOSS_TOLERANCE or not math.isfinite(loss):
        hint = (
            "worse than a uniform guess from model.init_from's weights: is the data tokenized with that model's "
            "tokenizer?"
            if pretrained
            else "confidently wrong before training: the logits are too large at init; scale down the output layer's "
            "(or tied embedding's) initialisation"
        )
    elif loss < chance - INIT_LOSS_TOLERANCE and not pretrained:
        hint = (
            "better than chance before training: the model can see the targets; check the causal mask and that "
            "targets are not among the inputs"
        )
    else:
        return Check("init loss", True, detail)
    return Check("init loss", False, detail, hint)


ZERO_GRADIENT = "gradient all zero"


def gradient_problems(model: torch.nn.Module) -> dict[str, str]:
    """What is wrong with the gradient of each parameter that has a problem, by name."""
    problems = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            problems[name] = "frozen (requires_grad=False)"
        elif p.grad is None:
            problems[name] = "has no gradient"
        elif not torch.isfinite(p.grad).all():
            problems[name] = "gradient not finite"
        elif not p.grad.any():
            problems[name] = ZERO_GRADIENT
    return problems


def check_gradients(problems: dict[str, str], total: int, late: Sequence[str] = ()) -> Check:
    """`late`: parameters whose gradient was zero before the first update and is not after it."""
    if problems:
        hint = (
            "a parameter without a gradient never trains: check requires_grad, that its module is used in forward, "
            "and that nothing on its path is detached (.detach(), .data, no_grad)"
        )
        return Check("gradients", False, _some([f"{n} {p}" for n, p in problems.items()], total, "parameters"), hint)
    detail = f"all {total} parameters have finite, non-zero gradients"
    if late:
        detail += f" ({_some(list(late), total, 'only after the first update, behind a weight that starts at 0')})"
    return Check("gradients", True, detail)


def check_grad_norm(norm: float) -> Check:
    low, high = GRAD_NORM_RANGE
    detail = f"{norm:.4g} (sane: {low:g} to {high:g})"
    if not math.isfinite(norm) or norm > high:
        hint = (
            "exploding before training: check the init scale and the loss reduction (a sum instead of a mean grows "
            "with the batch); optim.max_grad_norm clips it"
        )
    elif norm < low:
        hint = "vanishing: check that the loss depends on the parameters and that the init is not too small"
    else:
        return Check("grad norm", True, detail)
    return Check("grad norm", False, detail, hint)


def check_lr(trainer: Trainer) -> Check:
    first, peak = trainer.lr(), trainer.cfg.optim.lr * trainer.run.lr_scale
    detail = f"first update {first:.3g}, peak {peak:.3g}"
    hint = (
        "a zero learning rate changes nothing: check optim.lr, the schedule (warmup starts at lr / warmup_steps, "
        "not 0) and anything that sets param_groups' lr"
    )
    return Check("lr", not (first <= 0 or peak <= 0), detail, hint)  # a NaN rate is not zero


def check_update(stuck: list[str], total: int, late: Sequence[str] = ()) -> Check:
    """`stuck`: the parameters no update changed; `late`: those only the second update changed."""
    if stuck:
        hint = (
            "the optimizer does not move them: are they in its param groups, is their gradient zero, is the learning "
            "rate zero?"
        )
        return Check("update", False, _some(stuck, total, "parameters unchanged"), hint)
    detail = f"all {total} parameters changed"
    if late:
        detail += f" ({_some(list(late), total, 'only at the second update, their first gradient zero')})"
    return Check("update", True, detail)


def check_overfit(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, steps: int) -> Check:
    """Train on one small batch at the peak learning rate until the loss is a small fraction of its start."""
    first = last = None
    for step in range(1, steps + 1):
        loss = mean_loss(trainer, x, y)
        trainer.updater.scale(loss).backward()
        trainer.updater.apply(trainer.cfg.optim.lr)
        last = loss.item()
        first = first if first is not None else last
        if last < OVERFIT_TARGET * first:
            return Check(
                "overfit", True, f"{x.numel()} tokens memorised in {step} steps: loss {first:.3f} -> {last:.3f}"
            )
    return Check(
        "overfit",
        False,
        f"after {steps} steps on {x.numel()} tokens: loss {first:.3f} -> {last:.3f}, "
        f"not below {OVERFIT_TARGET:g} x the start",
        "a model that cannot memorise one small batch has a broken training step: check that the loss "
        "is backpropagated, optimizer.step() and zero_grad() run, and try a larger optim.lr",
    )


def _some(items: list[str], total: int, what: str) -> str:
    """ "2 of 14 <what>: a; b" naming at most three of `items`."""
    return f"{len(items)} of {total} {what}: {'; '.join(items[:3])}" + ("; ..." if len(items) > 3 else "")


def report(checks: Sequence[Check]) -> str:
    lines = []
    for c in checks:
        status = "SKIP" if c.passed is None else "PASS" if c.passed else "FAIL"
        lines.append(f"  {status}  {c.name:<10} {c.detail}")
        if c.passed is False:
            lines.append(f"        look at: {c.hint}")
    failed = sum(c.passed is False for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed" + (f"; {failed} failed" if failed else ""))
    return "\n".join(lines)
