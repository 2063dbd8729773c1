"""kernels.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_, both backends."""

from __future__ import annotations

import math

import pytest
import torch

import fasttrain_kernels._backend
import fasttrain_kernels._multi_tensor
from fasttrain_kernels import clip_grad_norm_
from fasttrain_kernels.clip_grad_norm import grad_norm
from tests.kernel_checks import assert_matches

SHAPES = [(37, 13), (1001,), (3,), (5, 7, 2), (130, 1)]  # with the test CHUNK of 64: several programs each


def with_grads(device, dtype=torch.float32, scale: float = 1.0) -> list[torch.Tensor]:
    params = [torch.zeros(s, device=device, dtype=dtype, requires_grad=True) for s in SHAPES]
    for p in params:
        p.grad = (scale * torch.randn(p.shape, device=device)).to(dtype)
    return params


def copies(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, out):
        q.grad = p.grad.clone()
    return out


@pytest.mark.parametrize("max_norm", [0.5, 1e6, math.inf], ids=["clips", "under", "inf"])
def test_matches_torch(kernel_device, max_norm):
    ours = with_grads(kernel_device)
    theirs = copies(ours)
    norm = clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm.dtype == torch.float32 and norm.shape == ()
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)  # squares summed in another order: some ulp
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=1e-7)  # the clip factor carries the norm's 1e-5
    if max_norm == 0.5:
        assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours])).item() == pytest.approx(
            0.5, rel=1e-5
        )


def test_low_precision_gradients_sum_in_fp32(kernel_device):
    ours = with_grads(kernel_device, torch.bfloat16, scale=300.0)  # squares overflow fp16, lose digits in bf16
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in ours]))
    before = [p.grad.double() for p in ours]
    norm = clip_grad_norm_(ours, 1.0)
    assert_matches(norm, exact, torch.float32, "norm")
    for p, g in zip(ours, before):
        assert_matches(p.grad, g / (exact + 1e-6), torch.bfloat16, "clipped gradient")


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_non_finite_gradients_poison_like_torch(kernel_device, bad):
    ours = with_grads(kernel_device)
    ours[1].grad[5] = bad
    theirs = copies(ours)
    norm = clip_grad_norm_(ours, 1.0)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, 1.0), equal_nan=True)
    for p, q in zip(ours, theirs):  # inf: factor 0 (inf * 0 = nan, the rest 0); nan: all nan
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_skips_parameters_without_gradients_and_takes_one_tensor(kernel_device):
    params = with_grads(kernel_device)
    params[0].grad = None
    norm = clip_grad_norm_(params, 1e6)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params[1:]])))
    single = params[2]
    torch.testing.assert_close(clip_grad_norm_(single, 1e6), single.grad.norm())
    assert clip_grad_norm_([torch.zeros(3, requires_grad=True)], 1.0).item() == 0.0


def test_sparse_gradients_are_refused():
    p = torch.zeros(4, 2, requires_grad=True)
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        clip_grad_norm_([p], 1.0)


def test_repeated_clipping_builds_its_work_list_once(kernel_device, monkeypatch):
    """Clipping the same gradients every step builds their work list once; gradients at new addresses (a
    training step's, after zero_grad) rewrite the rows in place, the chunks stay, and the norm is theirs."""
    if kernel_device.type == "cpu" and not fasttrain_kernels._backend.INTERPRETING:
        pytest.skip("the PyTorch path has no work list")
    built = []
    chunk_table = fasttrain_kernels._multi_tensor._chunk_table
    monkeypatch.setattr(
        fasttrain_kernels._multi_tensor, "_chunk_table", lambda numels: built.append(numels) or chunk_table(numels)
    )
    tables: dict = {}
    params = with_grads(kernel_device)
    for _ in range(3):
        grad_norm([p.grad for p in params], tables)
    (table,) = tables.values()
    rows, chunks = table([[p.grad for p in params]])
    assert len(built) == 1
    moved = [torch.randn_like(p.grad) for p in params]  # new gradients, new addresses, same sizes
    norm = grad_norm(moved, tables)
    assert len(built) == 1
    new_rows, new_chunks = table([moved])
    assert new_rows is rows and new_chunks is chunks  # the same device tables, rewritten
    assert rows[:, 0].tolist() == [g.data_ptr() for g in moved]
    expected = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in moved]))
    torch.testing.assert_close(norm.double().cpu(), expected.cpu(), rtol=1e-5, atol=0)
