"""kernels.cross_entropy against an fp64 eager reference: every dtype, option and reduction, both backends.

Through the Triton interpreter on a CPU-only machine (see conftest.kernel_device),
with the block shrunk so that rows span several blocks, the last one partial.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fasttrain_kernels import CrossEntropyLoss, cross_entropy, cross_entropy_reference
from tests.kernel_checks import DTYPES, assert_matches, random_targets

OPTIONS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "all": {"reduction": "none", "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
}
# Odd sizes: no row or block boundary lines up. Through the interpreter (blocks of 128 columns, 3 programs) a row
# of 301 is 3 blocks, the last 45 columns wide, and each program loops over 12 or 13 rows: every loop of the
# kernel runs more than once and ends part-full, as at 1001 columns (8 blocks), in half the CPU time. On a GPU
# either width is one masked block.
ROWS, VOCAB = 37, 301


def check_against_reference(logits: torch.Tensor, target: torch.Tensor, min_rtol: float = 0.0, **options) -> None:
    """Loss and logits gradient (for a random incoming gradient) vs the fp64 reference."""
    logits = logits.detach().requires_grad_()
    loss = cross_entropy(logits, target, **options)
    incoming = torch.randn_like(loss)
    (grad,) = torch.autograd.grad(loss, logits, incoming)
    x64 = logits.detach().double().requires_grad_()
    reference = cross_entropy_reference(x64, target, **options)
    (grad64,) = torch.autograd.grad(reference, x64, incoming.double())
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert_matches(loss, reference, torch.float32, "loss", min_rtol)
    assert_matches(grad, grad64, logits.dtype, "gradient", min_rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIONS)
def test_matches_reference(kernel_device, dtype, name):
    logits = (4 * torch.randn(ROWS, VOCAB, device=kernel_device)).to(dtype)
    check_against_reference(logits, random_targets(ROWS, VOCAB, 5, kernel_device), **OPTIONS[name])


@pytest.mark.second_tier  # 38 s through the interpreter; test_matches_reference covers odd shapes in the first
@pytest.mark.parametrize("vocab", [50257, 32000])
def test_real_vocabulary_sizes(kernel_device, vocab):
    logits = torch.randn(3, vocab, device=kernel_device).to(torch.bfloat16)
    target = torch.tensor([0, vocab - 1, 12345], device=kernel_device)
    check_against_reference(logits, target)
    check_against_reference(logits, target, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits_do_not_overflow(kernel_device, dtype):
    logits = 1e4 * torch.rand(16, 300, device=kernel_device) * torch.randn(16, 300, device=kernel_device).sign()
    logits[:, 7] = 1e4  # ties at the maximum
    # fp32 resolves 1e4 to ~1e-3, so exp(x - lse) is known to a few 1e-4 relative at best (eager fp32 too).
    check_against_reference(logits.to(dtype), random_targets(16, 300, 4, kernel_device), min_rtol=2e-3, z_loss=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradient(kernel_device, reduction):
    logits = torch.randn(6, 50, device=kernel_device, requires_grad=True)
    target = torch.full((6,), -100, device=kernel_device)
    loss = cross_entropy(logits, target, reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    if reduction == "mean":
        assert F.cross_entropy(logits, target).isnan()  # what we document differently


def test_a_strided_target_is_read_by_its_stride(kernel_device):
    """A target that is a column of a larger tensor (stride 2): the kernel indexes the target by row."""
    logits = torch.randn(6, 11, device=kernel_device)
    target = torch.randint(0, 11, (6, 2), device=kernel_device)[:, 0]
    check_against_reference(logits, target)


@pytest.mark.parametrize("bad", [11, 16, -1, -3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_target_outside_the_classes_is_refused(kernel_device, bad, reduction):
    """As F.cross_entropy refuses it, rather than reading memory outside the row (ignore_index is -100 here)."""
    target = torch.tensor([1, bad, 3], device=kernel_device)
    with pytest.raises(RuntimeError, match=r"outside \[0, 11\)"):
        cross_entropy(torch.randn(3, 11, device=kernel_device, requires_grad=True), target, reduction=reduction)


def test_no_rows_with_a_loss_a_row(kernel_device):
    logits = torch.randn(0, 11, device=kernel_device, requires_grad=True)
    loss = cross_entropy(logits, torch.zeros(0, dtype=torch.int64, device=kernel_device), reduction="none")
    loss.sum().backward()
    assert loss.shape == (0,) and logits.grad.shape == (0, 11)


def test_custom_ignore_index_and_module(kernel_device):
    logits = torch.randn(2, 5, 40, device=kernel_device)
    target = random_targets(10, 40, 3, kernel_device, ignore_index=0).view(2, 5)
    ours = CrossEntropyLoss(ignore_index=0, reduction="none")(logits, target)
    assert ours.shape == (2, 5)
    reference = F.cross_entropy(logits.flatten(0, 1).double(), target.flatten(), ignore_index=0, reduction="none")
    assert_matches(ours.flatten(), reference, torch.float32, "loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_untouched_unless_inplace(kernel_device, dtype):
    logits = torch.randn(9, 70, device=kernel_device).to(dtype).requires_grad_()
    target = random_targets(9, 70, 4, kernel_device)
    before = logits.detach().clone()
    (grad,) = torch.autograd.grad(cross_entropy(logits, target), logits)
    assert torch.equal(logits.detach(), before)

    buffer = before.clone().requires_grad_()
    (grad_inplace,) = torch.autograd.grad(cross_entropy(buffer * 1, target, inplace_backward=True), buffer)
    assert torch.equal(grad_inplace, grad)
    staged = before.clone().requires_grad_()
    logits_view = staged * 1
    cross_entropy(logits_view, target, inplace_backward=True)
    assert not torch.equal(logits_view.detach(), before)  # the gradient went where the logits were


def test_saved_logits_are_protected_from_inplace(kernel_device):
    raw = torch.randn(4, 30, device=kernel_device, requires_grad=True)
    logits = raw.exp()  # exp saves its output for the backward
    loss = cross_entropy(logits, random_targets(4, 30, 0, kernel_device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_forward_matches(kernel_device):
    logits = torch.randn(11, 90, device=kernel_device, requires_grad=True)
    target = random_targets(11, 90, 3, kernel_device)
    with torch.no_grad():
        plain = cross_entropy(logits, target, softcap=2.0)
    assert torch.equal(plain, cross_entropy(logits, target, softcap=2.0).detach())


def test_twice_the_loss_doubles_the_gradient(kernel_device):
    logits = torch.randn(5, 64, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    target = random_targets(5, 64, 0, kernel_device)
    (once,) = torch.autograd.grad(cross_entropy(logits, target), logits)
    (twice,) = torch.autograd.grad(2 * cross_entropy(logits, target), logits)
    assert torch.equal(twice, 2 * once)  # the backward applied the incoming gradient exactly


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"logits": torch.zeros(4)}, "logits must be \\(N, D\\)"),
        ({"target": torch.zeros(3, dtype=torch.int64)}, "got \\(4, 5\\) and \\(3,\\)"),
        ({"logits": torch.zeros(4, 5, dtype=torch.int32)}, "float32, bfloat16 or float16"),
        ({"target": torch.zeros(4, dtype=torch.int32)}, "target must be int64"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"label_smoothing": 1.5}, "label_smoothing must be in"),
        ({"softcap": 0.0}, "softcap must be positive"),
    ],
)
def test_bad_arguments(bad, message):
    args = {"logits": torch.zeros(4, 5), "target": torch.zeros(4, dtype=torch.int64)} | bad
    with pytest.raises(ValueError, match=message):
        cross_entropy(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a GPU")
def test_no_host_sync_on_cuda():
    logits = torch.randn(64, 1000, device="cuda", requires_grad=True)
    target = random_targets(64, 1000, 3, "cuda")
    cross_entropy(logits, target).backward()  # warm up: compile the kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        cross_entropy(logits, target, z_loss=1e-4).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def top1_hits(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> int:
    """Counted rows whose target logit is the row's maximum (ties count), exactly, in fp64."""
    x = logits.detach().double()
    valid = target != ignore_index
    at_target = x.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    return int(((at_target >= x.max(dim=-1).values) & valid).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["plain", "all"])
def test_return_correct_counts_top1_hits(kernel_device, dtype, name):
    logits = (4 * torch.randn(ROWS, VOCAB, device=kernel_device)).to(dtype).requires_grad_()
    target = random_targets(ROWS, VOCAB, 5, kernel_device)
    target[:12] = logits[:12].argmax(-1)  # hits for sure (one may be ignored below)
    target[3] = -100
    loss, correct = cross_entropy(logits, target, return_correct=True, **OPTIONS[name])
    assert correct.dtype == torch.float32 and not correct.requires_grad
    assert correct.item() == top1_hits(logits, target) >= 11  # softcap keeps the order: the same hits
    torch.testing.assert_close(loss, cross_entropy(logits, target, **OPTIONS[name]))
    loss.sum().backward()  # the count takes no part in the gradient
    assert logits.grad is not None
