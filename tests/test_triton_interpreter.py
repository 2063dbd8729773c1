"""The suite's shortcut in Triton's interpreter (tests/conftest.py, `_patch_the_language_once_a_launch`) changes
no result: kernels whose @triton.jit helpers skip the re-patch give bitwise what the interpreter as shipped
gives, and triton.language is whole again after each launch."""

from __future__ import annotations

import pytest
import torch

import fasttrain_kernels._backend
from fasttrain_kernels import FusedAdamW, cross_entropy, rms_norm

pytestmark = pytest.mark.skipif(
    not fasttrain_kernels._backend.INTERPRETING, reason="the kernels were imported without TRITON_INTERPRET=1"
)


def interpreter():
    module = pytest.importorskip("triton.runtime.interpreter")
    if not hasattr(module, "unpatched"):
        pytest.skip("this Triton's interpreter runs as shipped (conftest found no _patch_lang to share)")
    return module


def kernels_run(device: torch.device) -> list[torch.Tensor]:
    """Outputs and gradients of three kernels whose helpers are @triton.jit functions, from fixed inputs."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g).to(device).requires_grad_()
    target = torch.randint(0, 300, (5,), generator=g).to(device)
    loss = cross_entropy(logits, target, z_loss=1e-3, label_smoothing=0.1)
    (grad_logits,) = torch.autograd.grad(loss, logits)
    x, residual = torch.randn(3, 40, generator=g).to(device), torch.randn(3, 40, generator=g).to(device)
    y, h = rms_norm(x, torch.rand(40, generator=g).to(device) + 0.5, residual=residual)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in [(70,), (3, 5)]]
    optimizer = FusedAdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        optimizer.step()
    return [loss.detach(), grad_logits, y, h, *(p.detach() for p in params)]


def test_the_shared_patch_gives_bitwise_the_shipped_interpreters_results(kernel_device, monkeypatch):
    if kernel_device.type != "cpu" or not fasttrain_kernels._backend.INTERPRETING:
        pytest.skip("the PyTorch backend, or a GPU: no interpreter runs")
    module = interpreter()
    patch_builtin, patches = module._patch_builtin, []  # what a patch of the language does, module by module
    monkeypatch.setattr(module, "_patch_builtin", lambda *args: patches.append(args[0]) or patch_builtin(*args))
    shared = kernels_run(kernel_device)
    once = len(patches)
    assert once > 0
    patch_lang, launch = module.unpatched
    monkeypatch.setattr(module, "_patch_lang", patch_lang)
    monkeypatch.setattr(module.GridExecutor, "__call__", launch)
    shipped = kernels_run(kernel_device)
    assert len(patches) - once > 2 * once  # as shipped, every helper's call patched the language again
    for ours, theirs in zip(shared, shipped, strict=True):
        assert torch.equal(ours, theirs)


def test_the_language_is_restored_after_a_launch(kernel_device):
    if kernel_device.type != "cpu" or not fasttrain_kernels._backend.INTERPRETING:
        pytest.skip("the PyTorch backend, or a GPU: no interpreter runs")
    module = interpreter()
    tl = module.tl
    before = {name: getattr(tl, name) for name in ("load", "store", "sum", "exp", "range", "multiple_of")}
    tensor_before = {name: getattr(tl.tensor, name) for name in ("__add__", "to")}
    kernels_run(kernel_device)
    assert {name: getattr(tl, name) for name in before} == before
    assert {name: getattr(tl.tensor, name) for name in tensor_before} == tensor_before
