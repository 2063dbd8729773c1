"""Generation throughput: new tokens/s with the KV cache against re-running the whole context per token.

CPU: the base config's model (192 wide, 4 layers, context 512), fp32, one row: a
32-token prompt and 64 new tokens. GPU (skipped without one): the GPT-2-small config
(124M, context 1024), bf16 autocast, a 128-token prompt and 512 new tokens, batches
of 1 and 8 rows. Greedy decoding, eager (generation is not compiled), random
weights: the speed does not depend on what the model knows. Each call generates
from the prompt afresh, so the prefill is part of the time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.conftest import FIXED_BASE, sizes, time_device
from fasttrain.compute.device import autocast
from fasttrain.config import load_config
from fasttrain.model.generation import generate
from fasttrain.model.transformer import Transformer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def model_of(config: str, device: torch.device, *overrides: str) -> Transformer:
    cfg = load_config(
        CONFIGS / config,
        [*(["model.vocab_size=50304"] if "gpt2" in config else ["model.vocab_size=4096", *FIXED_BASE]), *overrides],
    )
    return Transformer(cfg.model).to(device).eval()


def run_generation(
    benchmark,
    record,
    device: torch.device,
    model: Transformer,
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    precision: str,
    use_cache: bool,
    rounds: int,
) -> None:
    prompt = torch.randint(0, model.cfg.vocab_size, (batch_size, prompt_len), device=device)

    def greedy():
        with autocast(precision, device):
            generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)

    # Host timing: decoding is thousands of small launches a call, paced by the host, so its cost is its
    # wall time; no GPU work queued ahead of a call this long could keep the host out of an event interval
    time_device(benchmark, device, greedy, rounds=rounds, events=False)
    record(
        per_call=batch_size * new_tokens,
        cache=use_cache,
        batch_size=batch_size,
        prompt=prompt_len,
        new_tokens=new_tokens,
        context=model.cfg.max_seq_len,
        params=model.num_params(),
        dtype=precision,
    )


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_cpu_generate(benchmark, record, use_cache):
    model = model_of("base.toml", torch.device("cpu"))
    run_generation(benchmark, record, torch.device("cpu"), model, 1, 32, 64, "fp32", use_cache, rounds=5)


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_gpu_generate(benchmark, record, device, use_cache, batch_size):
    model = model_of(*sizes(("gpt2-small.toml", device), ("base.toml", device, "model.n_layers=2")))
    precision = sizes("bf16", "fp32")
    run_generation(
        benchmark, record, device, model, batch_size, sizes(128, 16), sizes(512, 16), precision, use_cache, rounds=5
    )
