"""Hand-written Triton kernels for language-model training.

Imports from fasttrain_kernels: adamw, clip_grad_norm, cross_entropy, linear_cross_entropy, newton_schulz, rms_norm,
transformers_patch.

This package stands alone: it depends on torch and triton only, so other
projects can use it without the fasttrain trainer. Kernels dispatch on their
inputs: CUDA tensors run the Triton kernels, CPU tensors a PyTorch
implementation of the same math, and CPU tensors with TRITON_INTERPRET=1 set
run the Triton kernels through Triton's interpreter (how CI tests them). Only
the first and the last need triton: without it the package imports and CPU
tensors run, and a call that needs it says what to install.

Modules, in reading order: one per op, each Triton kernel -> launcher -> autograd Function -> functional ->
module with its eager reference beside it: rms_norm, cross_entropy, linear_cross_entropy, adamw,
clip_grad_norm, newton_schulz; then transformers_patch (the kernels in a Hugging Face model). What they share:
_backend (Triton or PyTorch for a call; triton itself, or stand-ins without it), _specialization (the variants
each kernel compiles), _multi_tensor (one launch over many tensors). inspect compiles every variant for GPU
targets on a machine without one. Nothing here imports fasttrain.
"""

from fasttrain_kernels.adamw import FusedAdamW
from fasttrain_kernels.clip_grad_norm import clip_grad_norm_
from fasttrain_kernels.cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_reference
from fasttrain_kernels.linear_cross_entropy import (
    LinearCrossEntropyLoss,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from fasttrain_kernels.newton_schulz import newton_schulz, newton_schulz_reference, symmetric_matmul
from fasttrain_kernels.rms_norm import RMSNorm, rms_norm, rms_norm_reference
from fasttrain_kernels.transformers_patch import patch_hf_model

__all__ = [
    "patch_hf_model",
    "FusedAdamW",
    "clip_grad_norm_",
    "CrossEntropyLoss",
    "cross_entropy",
    "cross_entropy_reference",
    "LinearCrossEntropyLoss",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "newton_schulz",
    "newton_schulz_reference",
    "symmetric_matmul",
    "RMSNorm",
    "rms_norm",
    "rms_norm_reference",
]
