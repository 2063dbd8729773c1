"""Our kernels inside a Hugging Face transformers model, in one call (as Liger-Kernel's
apply_liger_kernel_to_llama does for its own):

Imports from fasttrain_kernels: linear_cross_entropy, rms_norm.

    from fasttrain_kernels import patch_hf_model
    model = patch_hf_model(AutoModelForCausalLM.from_pretrained(...))

Every RMSNorm module becomes kernels.RMSNorm, sharing its weight (the state dict and any optimizer
are unchanged), and forward(labels=...) computes the loss with kernels.linear_cross_entropy, so the
(tokens x vocabulary) logits are never built. The loss is transformers' own: labels shifted one to
the left (or `shift_labels`), -100 ignored, the mean over counted targets (nan when none counts, as
there), or their sum divided by `num_items_in_batch` when the Trainer passes it. The logits come back only
when asked for (`return_logits=True`, which takes the unpatched path) or when there are no labels
(generation). `return_dict=False` gives transformers' tuple of the fields that are not None, the loss first.
Patching a patched model changes nothing.

The model is read by duck typing (a `.model` that returns `last_hidden_state`, an `.lm_head`, a
`config.model_type`): this module imports transformers only to build the output a patched forward
returns, so fasttrain_kernels/ still needs nothing but torch and triton.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain_kernels.linear_cross_entropy import linear_cross_entropy
from fasttrain_kernels.rms_norm import RMSNorm

# Families whose RMSNorm is weight x normalised x (Gemma's is (1 + weight) x ..., so it is not here)
# and whose head is a plain linear layer without a softcap.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
IGNORE_INDEX = -100  # transformers' ignore_index


def patch_hf_model(model: nn.Module, rms_norm: bool = True, fused_loss: bool = True) -> nn.Module:
    """Patch the transformers causal LM `model` (a family in FAMILIES) in place and return it: its
    RMSNorm modules (`rms_norm`) and its loss (`fused_loss`), as the module docstring says. ValueError
    for a model of another family or shape, naming what does not fit."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"patch_hf_model: model_type {model_type!r} is not one of {', '.join(FAMILIES)}")
    if fused_loss and not (isinstance(getattr(model, "lm_head", None), nn.Linear) and hasattr(model, "model")):
        raise ValueError(
            f"patch_hf_model: {type(model).__name__} has no .model and linear .lm_head to fuse the loss into"
        )
    if rms_norm:
        _swap_rms_norms(model)  # a norm swapped already is skipped
    if fused_loss and not getattr(model.forward, "fused_loss", False):  # patched twice, the second would wrap
        model.forward = types.MethodType(_fused_loss_forward(model.forward), model)  # the first and lose the logits
    return model


def _swap_rms_norms(model: nn.Module) -> int:
    """Replace every module whose class is named *RMSNorm by kernels.RMSNorm with the same weight and eps."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not type(child).__name__.endswith("RMSNorm") or isinstance(child, RMSNorm):
                continue
            eps = getattr(child, "variance_epsilon", getattr(child, "eps", None))
            weight = getattr(child, "weight", None)
            if eps is None or weight is None or weight.dim() != 1:
                raise ValueError(f"patch_hf_model: {type(child).__name__} has no eps or 1-d weight to carry over")
            ours = RMSNorm(weight.shape[0], eps)
            ours.weight = weight  # the same Parameter: state dict, optimizer and tying unchanged
            setattr(parent, name, ours)
            swapped += 1
    return swapped


def _fused_loss_forward(unpatched):
    """A forward for a causal LM whose loss, given labels, goes through linear_cross_entropy."""

    # The first three arguments keep their places in transformers' signature; the rest are keywords and pass
    # through as given (the KV cache among them, which transformers 5.24 renamed from past_key_values to cache).
    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, *, labels=None, return_logits=False, **kwargs
    ):
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if return_logits or (labels is None and kwargs.get("shift_labels") is None):  # logits: the model as it was
            return unpatched(labels=labels, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        kwargs.pop("logits_to_keep", None)  # no logits are built on this path
        out = self.model(return_dict=True, **kwargs)
        hidden = out.last_hidden_state
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:  # position t predicts token t + 1; the last predicts nothing
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        weight = self.lm_head.weight
        bias = self.lm_head.bias
        if weight.dtype != hidden.dtype:  # under autocast the head would run in the hidden states' dtype
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        targets = shift_labels.reshape(-1).to(hidden.device)
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        # The sum over the counted targets, or over num_items_in_batch: every label -100 is 0 / 0, nan, as
        # transformers gives (kernels' own mean over no targets is 0).
        items = kwargs.get("num_items_in_batch")
        if items is None:
            items = (targets != IGNORE_INDEX).sum()
        loss = loss / (items.to(loss.device) if isinstance(items, torch.Tensor) else items)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        # The base model's fields but its last hidden state, under whatever names this transformers gives them
        # (the cache's changed in 5.24): the LM output names them the same way.
        passed = {key: value for key, value in out.items() if key != "last_hidden_state"}
        output = CausalLMOutputWithPast(loss=loss, logits=None, **passed)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()  # as transformers: the fields that are not None

    setattr(forward, "fused_loss", True)  # a mark patch_hf_model reads; mypy knows no attributes of functions
    return forward
