"""The training objective: next-token cross-entropy, or distillation's against a teacher's probabilities, as sums
that add up across batches and ranks.

Imports from fasttrain: data.documents, evaluation.loss_sums, model.ensemble, model.transformer.

    objective = NextTokenLoss(model)               # what DDP / FSDP wrap and torch.compile compiles
    sums = objective(tokens, targets)              # LossSums: summed loss, top-1 hits, counted targets
    mean_loss = sums.loss / sums.counted

Sums, never a mean, so batches of different counts (padded rows, ranks) combine: the caller adds an update's sums and
divides once by its global count of targets. Targets equal to IGNORE_INDEX (pads) count for nothing.

With a teacher (train.teacher: any trained model of the same tokenizer, an ensemble included), each target's loss is
w x the cross-entropy against the teacher's probabilities over the whole vocabulary + (1 - w) x the next-token loss
(w: train.teacher_weight). The soft targets carry what the teacher learned about every other token; an ensemble's
mean probabilities taught this way keep most of its gain in one model (Kim et al. 2025).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.data.documents import IGNORE_INDEX
from fasttrain.evaluation.loss_sums import LossSums
from fasttrain.model.ensemble import Ensemble, transformers
from fasttrain.model.transformer import Transformer


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits` (B, T, V) against `targets` (B, T), skipping IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def counted_targets(targets: torch.Tensor) -> torch.Tensor:
    """How many of `targets` (any shape) count toward the loss: those that are not IGNORE_INDEX (an int scalar)."""
    return (targets != IGNORE_INDEX).sum()


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Each token's document number within its row of `tokens` (B, T): an end-of-text token starts a new one."""
    return (tokens == eot_id).cumsum(1)


def batch_loss(
    objective: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask_eot_id: int | None,
    grad_scale: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
) -> LossSums:
    """The loss sums of batch (x, y) through `objective` (a NextTokenLoss, wrapped or not). `mask_eot_id`: document
    masking's end-of-text id; `grad_scale`: see NextTokenLoss; `teacher`: a frozen model whose probabilities of x's
    next tokens (its logits' softmax, fp32) the objective learns."""
    documents = None if mask_eot_id is None else document_ids(x, mask_eot_id)
    with torch.no_grad():
        soft = None if teacher is None else next_token_probs(teacher, x, documents)
    return objective(x, y, documents, grad_scale=grad_scale, teacher_probs=soft)


def next_token_probs(model: nn.Module, x: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
    """`model`'s probabilities of each next token of `x` (B, T) in fp32, (B, T, vocab_size): an ensemble's the mean
    of its members' softmaxes, summed in place, one member's logits at a time (not the softmax of its forward's log
    mean probabilities, which costs a log-softmax and a logaddexp a member more over the whole vocabulary)."""
    members = transformers(model)
    total = members[0](x, documents).softmax(-1, dtype=torch.float32)
    for member in members[1:]:
        total += member(x, documents).softmax(-1, dtype=torch.float32)
    return total.div_(len(members))


class NextTokenLoss(nn.Module):
    """`model`'s loss as a module holding the model, so wrappers and torch.compile see every use of the output weight:
    `forward(tokens, targets, documents, grad_scale, teacher_probs) -> LossSums`. `fused`:
    kernels.linear_cross_entropy. An ensemble in training mode trains each member on its own loss: the sums are the
    means of the members'. `teacher_weight`: the share of the loss that is the cross-entropy against a teacher's
    probabilities, when given."""

    def __init__(self, model: Transformer | Ensemble, fused: bool = False, teacher_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.fused = fused
        self.teacher_weight = teacher_weight

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        documents: torch.Tensor | None = None,
        grad_scale: torch.Tensor | None = None,
        teacher_probs: torch.Tensor | None = None,
    ) -> LossSums:
        """The sums over `targets` (B, T) of `tokens` (B, T); `documents` (B, T) masks attention to each token's own
        document; `teacher_probs` (B, T, vocab_size), a teacher's, make the loss distillation's (never fused).
        `grad_scale` (a scalar tensor): the factor the caller will multiply the loss by before its backward, which the
        fused loss folds into the gradients it computes in the forward, so that backward has no pass left to make; the
        loss returned is not multiplied by it, and the unfused loss ignores it."""
        members = transformers(self.model)
        if len(members) == 1 or not self.model.training:  # an ensemble scores as one model (its probabilities' mean)
            return self.sums(self.model, tokens, targets, documents, grad_scale, teacher_probs)
        share = None if grad_scale is None else grad_scale / len(members)  # what each member's loss is multiplied by
        sums = [self.sums(m, tokens, targets, documents, share, teacher_probs) for m in members]
        return LossSums(*(torch.stack(parts).mean() for parts in zip(*sums)))

    def sums(
        self,
        model: Transformer | Ensemble,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        documents: torch.Tensor | None,
        grad_scale: torch.Tensor | None,
        teacher_probs: torch.Tensor | None,
    ) -> LossSums:
        valid = targets != IGNORE_INDEX
        if self.fused and isinstance(model, Transformer) and teacher_probs is None:
            from fasttrain_kernels.linear_cross_entropy import (
                linear_cross_entropy,  # needs Triton, so only when asked for
            )

            loss, correct = linear_cross_entropy(
                model.hidden(tokens, documents).flatten(0, 1),
                model.output.weight,
                targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
                return_correct=True,
                grad_scale=grad_scale,
            )
        else:
            logits = model(tokens, documents)
            flat = logits.flatten(0, 1)
            if teacher_probs is None:
                loss = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            else:
                loss = self.distillation_loss(flat, teacher_probs.flatten(0, 1), targets.flatten(), valid.flatten())
            x = logits.detach()
            at_target = x.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
            correct = ((at_target >= x.amax(dim=-1)) & valid).sum()
        return LossSums(loss, correct.float(), valid.sum().float())

    def distillation_loss(
        self, logits: torch.Tensor, teacher_probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """teacher_weight x the cross-entropy of `logits` (N, V) against `teacher_probs` (N, V) + the rest x against
        `targets` (N,), summed over the rows whose target counts (`valid`, N): one cross-entropy against the mixed
        distribution (it is linear in its targets), so one log-softmax and one backward over the vocabulary, not two,
        and none for the next tokens at base.toml's weight 1."""
        mixed = teacher_probs
        if self.teacher_weight < 1:
            rest = torch.full_like(targets, 1 - self.teacher_weight, dtype=teacher_probs.dtype).unsqueeze(1)
            mixed = (teacher_probs * self.teacher_weight).scatter_add_(
                1, torch.where(valid, targets, 0).unsqueeze(1), rest
            )
        return (F.cross_entropy(logits, mixed, reduction="none") * valid).sum()  # a pad's row counts for nothing
