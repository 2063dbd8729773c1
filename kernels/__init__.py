"""Hand-written Triton kernels for language-model training.

This package stands alone: it depends on torch and triton only, so other
projects can use it without the fasttrain trainer. Kernels dispatch on their
inputs: CUDA tensors run the Triton kernels, CPU tensors a PyTorch
implementation of the same math, and CPU tensors with TRITON_INTERPRET=1 set
run the Triton kernels through Triton's interpreter (how CI tests them).
"""
