"""The optimizer step: FusedAdamW against torch.optim.AdamW (foreach and fused), with and without clipping.

Memory-bound: an fp32 AdamW step must read the parameter, gradient and both moments
and write back the parameter and moments, 28 bytes per parameter; clipping adds at
least one read of the gradients for the norm (32). FusedAdamW folds the scaling into
its step, so that is all it moves. torch's clip_grad_norm_ also reads and writes the
gradients to scale them (40). GB/s is of the floor bytes; fraction_of_floor is against
a measured device copy. Parameter sets: those of configs/gpt2-small.toml (124M) and
a 1B model of the same family. GPU only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.conftest import bandwidth, median_seconds, sizes, time_device
from fasttrain.config import ModelConfig, load_config
from fasttrain.model.transformer import Transformer
from fasttrain_kernels import FusedAdamW

FLOOR_BYTES = {False: 28, True: 32}  # per parameter, without and with clipping
MAX_NORM = 1.0
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


MODELS = {  # name: the model whose parameters one step updates
    "124M": lambda: load_config(CONFIGS / "gpt2-small.toml").model,
    "1B": lambda: ModelConfig(vocab_size=50304, max_seq_len=2048, d_model=2048, n_layers=18, n_heads=16),
    "tiny": lambda: ModelConfig(vocab_size=512, max_seq_len=64, d_model=64, n_layers=2, n_heads=2),  # dry runs
}


def parameter_shapes(name: str) -> list[torch.Size]:
    cfg = MODELS[name]()
    with torch.device("meta"):
        return [p.shape for p in Transformer(cfg).parameters()]


def fasttrain_step(params: list[torch.Tensor], clip: bool):
    return FusedAdamW(params, max_grad_norm=MAX_NORM if clip else None).step


def torch_step(**options):
    """A step maker for torch.optim.AdamW(**options), clipping first with torch's clip_grad_norm_."""

    def make(params: list[torch.Tensor], clip: bool):
        optimizer = torch.optim.AdamW(params, **options)

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            optimizer.step()

        return step

    return make


OPTIMIZERS = {
    "fasttrain": fasttrain_step,
    "torch_foreach": torch_step(foreach=True),
    "torch_fused": torch_step(fused=True),
}


@pytest.mark.parametrize("impl", OPTIMIZERS)
@pytest.mark.parametrize("clip", [False, True], ids=["step", "clip_step"])
@pytest.mark.parametrize("model", sizes(["124M", "1B"], ["tiny"]))
def test_adamw_step(benchmark, record, device, copy_bandwidth, impl, clip, model):
    params = [torch.randn(shape, device=device, requires_grad=True) for shape in parameter_shapes(model)]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    time_device(benchmark, device, OPTIMIZERS[impl](params, clip))
    record(
        impl=impl,
        model=model,
        parameters=n,
        tensors=len(params),
        dtype="float32",
        clip=clip,
        bytes_per_param=FLOOR_BYTES[clip],
        **bandwidth(FLOOR_BYTES[clip] * n, median_seconds(benchmark), copy_bandwidth),
    )
