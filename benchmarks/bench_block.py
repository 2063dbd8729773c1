"""One transformer block under torch.compile, forward + backward: the RMSNorm kernel against inductor.

Inside a compiled model inductor fuses a stock norm and its residual add with the elementwise work
around them, so an op-level race (bench_rms_norm.py) cannot say whether the kernel helps there. This
is the whole-block A/B the dispatch table reads for rms_norm in compiled mode: fasttrain's Block (two
norms with their residual adds, attention, SwiGLU) built with `norm_kernel=True` ("fasttrain": the
Triton kernel, a custom op inductor cannot fuse into) or False ("stock": torch.nn.RMSNorm and separate
adds, for inductor to fuse), each compiled, bf16 autocast, B x T = 16 x 1024 tokens, head size 64.
Tokens/s of the block's forward + backward. GPU only (the dry run: eager on the CPU at toy sizes).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DRY_RUN, compiled, require, sizes, time_device
from fasttrain.config import ModelConfig
from fasttrain.model.attention import rope_tables
from fasttrain.model.transformer import Block

BATCH, SEQ = sizes((16, 1024), (2, 32))
HIDDEN = sizes([768, 1024, 2048, 4096], [64])
IMPLS = {"fasttrain": True, "stock": False}  # -> norm_kernel


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=lambda h: f"H{h}")
def test_block_fwd_bwd(benchmark, record, device, impl, hidden):
    require(impl)
    cfg = ModelConfig(vocab_size=256, d_model=hidden, n_layers=1, n_heads=max(hidden // 64, 1), max_seq_len=SEQ)
    block = Block(cfg, norm_kernel=IMPLS[impl]).to(device)
    cos, sin = (t.to(device) for t in rope_tables(hidden // cfg.n_heads, SEQ, cfg.rope_theta))
    delta, stream = (torch.randn(BATCH, SEQ, hidden, device=device, requires_grad=True) for _ in range(2))
    grads = [torch.randn(BATCH, SEQ, hidden, device=device) for _ in range(2)]
    run = block if DRY_RUN else compiled(block)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = run(delta, stream, cos, sin)
        torch.autograd.grad(out, [delta, stream, *block.parameters()], grads)

    time_device(benchmark, device, step)
    record(
        per_call=BATCH * SEQ, impl=impl, hidden=hidden, tokens=BATCH * SEQ, dtype=str(dtype)[6:], compiled=not DRY_RUN
    )
