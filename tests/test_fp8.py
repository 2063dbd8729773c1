"""FP8 matmuls (fasttrain/model/fp8.py) on the CPU: the scaling, the three matmuls against a float64
reference of the same quantized values, the fallback, the module swap, a training run and the compiled
graph; on a GPU with FP8 tensor cores, a bf16 run's loss curve against float8's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fasttrain_kernels._backend
from fasttrain.compute.device import _cpu_scaled_mm, kernels_on
from fasttrain.config import KernelsConfig
from fasttrain.model.fp8 import E4M3, E5M2, Float8Linear, float8_linear, to_float8
from fasttrain.model.transformer import Transformer
from fasttrain.system.errors import UsageError
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_config

cpu_float8 = pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch has no float8 matmul on the CPU")


@cpu_float8
@pytest.mark.parametrize("dtype,top", [(E4M3, 448.0), (E5M2, 57344.0)])
def test_the_scale_puts_the_largest_magnitude_at_the_formats_largest(dtype, top):
    t = torch.randn(37, 53) * 1e-3
    q, scale = to_float8(t, dtype)
    assert q.dtype == dtype and q.float().abs().max().item() == top
    mantissa = {E4M3: 3, E5M2: 2}[dtype]
    normal = t.abs() * scale >= torch.finfo(dtype).tiny  # subnormals carry fewer bits
    error = ((q.float() / scale - t).abs() / t.abs())[normal]
    assert error.max() <= 2.0 ** -(mantissa + 1) * 1.001  # round to nearest: half a unit in the last place
    zeros, one = to_float8(torch.zeros(4, 4), dtype)
    assert one.item() == 1.0 and not zeros.float().any()


@cpu_float8
@pytest.mark.parametrize("m,k,n", [(48, 80, 32), (16, 16, 16), (160, 32, 96)])
def test_forward_and_gradients_are_the_quantized_products(m, k, n):
    """y, dx and dW are exactly (to fp32 accumulation) the products of the float8 values each matmul
    was given: activations and weights in e4m3, the incoming gradient in e5m2."""
    x = torch.randn(m, k, requires_grad=True)
    w = (torch.randn(n, k) * 0.05).requires_grad_()
    g = torch.randn(m, n)
    y = float8_linear(x, w)
    y.backward(g)

    def dequantized(t, dtype):
        q, scale = to_float8(t.detach(), dtype)
        return q.double() / scale.double()

    xd, wd, gd = dequantized(x, E4M3), dequantized(w, E4M3), dequantized(g, E5M2)
    torch.testing.assert_close(y.double(), xd @ wd.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gd @ wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), gd.T @ xd, rtol=1e-5, atol=1e-5)
    # ... and close to the exact products: float8 keeps 3 (e4m3) or 2 (e5m2) mantissa bits
    exact = x.detach().double() @ w.detach().double().T
    assert (y.double() - exact).norm() / exact.norm() < 0.1
    assert x.grad.dtype == w.grad.dtype == torch.float32


@cpu_float8
def test_autocast_gives_its_dtype_and_odd_sizes_fall_back_to_the_plain_matmul():
    x, w = torch.randn(2, 24, 32), torch.randn(48, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float8_linear(x, w).dtype == torch.bfloat16
    odd = torch.randn(3, 7, 32)  # 21 rows: not a multiple of 16
    torch.testing.assert_close(float8_linear(odd, w), F.linear(odd, w), rtol=0, atol=0)


@cpu_float8
def test_the_swap_keeps_the_weights_their_names_and_the_tying(pydoc_data, tmp_path):
    cfg = Trainer(tiny_config(pydoc_data, tmp_path), quiet=True).cfg.model
    plain, fp8 = Transformer(cfg), Transformer(cfg, fp8="all")
    assert plain.state_dict().keys() == fp8.state_dict().keys()
    swapped = [name for name, m in fp8.named_modules() if isinstance(m, Float8Linear)]
    assert "output" in swapped and len(swapped) == 1 + 4 * cfg.n_layers  # the head; qkv, out, gate_up, down
    head_only = Transformer(cfg, fp8="head")
    assert [n for n, m in head_only.named_modules() if isinstance(m, Float8Linear)] == ["output"]
    if cfg.tie_embeddings:
        assert fp8.output.weight is fp8.embed.weight


@cpu_float8
def test_an_fp8_run_trains_like_fp32(pydoc_data, tmp_path):
    """Six steps of the tiny run with every matmul in float8 follow the fp32 run's losses within 1%
    (and are not the fp32 numbers: the float8 path ran); the head in FP8 keeps the fused loss off."""
    plain = Trainer(tiny_config(pydoc_data, tmp_path / "a"), quiet=True)
    fp8 = Trainer(tiny_config(pydoc_data, tmp_path / "b", 'train.fp8="all"'), quiet=True)
    losses = [(float(plain.step().loss), float(fp8.step().loss)) for _ in range(6)]
    assert all(abs(a - b) / a < 0.01 for a, b in losses) and any(a != b for a, b in losses)
    assert not fp8.kernels.linear_cross_entropy and isinstance(fp8.model.output, Float8Linear)


@cpu_float8
def test_an_fp8_head_refuses_the_fused_loss_forced_on(monkeypatch):
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)  # "auto" as a CPU run resolves it
    with pytest.raises(UsageError, match='kernels.linear_cross_entropy = true does not work with train.fp8 = "head"'):
        kernels_on(KernelsConfig(linear_cross_entropy=True), torch.device("cpu"), fp8="head")
    assert kernels_on(KernelsConfig(), torch.device("cpu"), fp8="all").names() == []
    assert kernels_on(KernelsConfig(), torch.device("cpu"), fp8="blocks").names() == ["linear_cross_entropy"]


@cpu_float8
@pytest.mark.compile
def test_the_float8_matmuls_compile_whole():
    """torch.compile takes the float8 linear forward and backward as one graph (a break would leave the
    casts unfused, the extra passes that make float8 slower than bf16 without compile), and the compiled
    module computes what the eager one does."""
    torch._dynamo.reset()  # fullgraph failures must come from this graph, not a cached one
    layer = Float8Linear(64, 48, bias=False)
    x = torch.randn(2, 16, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grads = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    expected = layer(x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(grads, (x.grad, layer.weight.grad), rtol=0, atol=0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 tensor cores (sm_89 or newer)",
)
def test_on_the_gpu_float8_follows_the_bf16_loss_curve(pydoc_data, tmp_path):
    """Twenty steps of the tiny run on the GPU in bf16 autocast, with every matmul in float8 and without:
    each float8 loss within 2% of bf16's (float8 keeps 2-3 mantissa bits to bf16's 7), and not equal to
    them (cuBLAS's float8 GEMMs ran)."""
    settings = ("train.device=cuda", 'train.precision="bf16"', "train.compile=false", "train.max_steps=20")
    bf16 = Trainer(tiny_config(pydoc_data, tmp_path / "a", *settings), quiet=True)
    fp8 = Trainer(tiny_config(pydoc_data, tmp_path / "b", *settings, 'train.fp8="all"'), quiet=True)
    losses = [(float(bf16.step().loss), float(fp8.step().loss)) for _ in range(20)]
    assert all(abs(a - b) / a < 0.02 for a, b in losses), losses
    assert any(a != b for a, b in losses) and isinstance(fp8.model.output, Float8Linear)
    assert losses[-1][1] < losses[0][1]  # and it learns
