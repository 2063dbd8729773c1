"""kernels.linear_cross_entropy against the unfused path in fp64: losses and all three gradients."""

from __future__ import annotations

import pytest
import torch

from kernels import LinearCrossEntropyLoss, cross_entropy, linear_cross_entropy, linear_cross_entropy_reference
from tests.kernel_checks import DTYPES, assert_matches, random_targets

# Gradients out of a GEMM over rounded logits: errors scale with the largest entry, not each entry.
GEMM_ATOL = {torch.float32: 0.0, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(n, hidden_size, vocab, dtype, device, bias=True):
    hidden = torch.randn(n, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None
    return hidden, weight, b


def check_against_reference(hidden, weight, bias, target, **options):
    """Loss and the gradients of hidden, weight and bias (for a random incoming gradient) vs fp64."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, *leaves[2:], **options)
    incoming = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, leaves, incoming)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    options.pop("chunk_rows", None)
    reference = linear_cross_entropy_reference(leaves64[0], leaves64[1], target, *leaves64[2:], **options)
    grads64 = torch.autograd.grad(reference, leaves64, incoming.double())
    assert_matches(loss, reference, hidden.dtype, "loss")  # the logits were rounded to that dtype
    for name, ours, ref, leaf in zip(("hidden", "weight", "bias"), grads, grads64, leaves):
        assert ours.dtype == leaf.dtype
        assert_matches(ours, ref, hidden.dtype, f"grad {name}", min_atol=GEMM_ATOL[hidden.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [
    {},
    {"reduction": "none", "label_smoothing": 0.1},
    {"reduction": "sum", "z_loss": 1e-3, "softcap": 4.0},
], ids=["mean", "none", "sum-options"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matches_reference(kernel_device, dtype, options, bias):
    hidden, weight, b = make_inputs(37, 24, 300, dtype, kernel_device, bias)
    target = random_targets(37, 300, 6, kernel_device)
    check_against_reference(hidden, weight, b, target, chunk_rows=16, **options)  # 16 + 16 + 5 rows


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_chunk_size_does_not_change_the_result(kernel_device, chunk_rows):
    hidden, weight, b = make_inputs(20, 8, 50, torch.float32, kernel_device)
    target = random_targets(20, 50, 4, kernel_device)
    check_against_reference(hidden, weight, b, target, chunk_rows=chunk_rows)


def test_only_requested_gradients(kernel_device):
    hidden, weight, _ = make_inputs(10, 8, 40, torch.float32, kernel_device, bias=False)
    target = random_targets(10, 40, 0, kernel_device)
    weight.requires_grad_()
    linear_cross_entropy(hidden, weight, target).backward()
    assert hidden.grad is None and weight.grad is not None
    reference = weight.detach().clone().requires_grad_()
    linear_cross_entropy_reference(hidden, reference, target).backward()
    assert_matches(weight.grad, reference.grad.double(), torch.float32, "grad weight")


def test_autocast_computes_in_bf16_and_returns_fp32_gradients(kernel_device):
    hidden, weight, b = make_inputs(33, 16, 120, torch.float32, kernel_device)
    target = random_targets(33, 120, 5, kernel_device)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(*leaves[:2], target, leaves[2], chunk_rows=8)
    loss.backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    rounded = [t.detach().bfloat16().double().requires_grad_() for t in leaves]  # what the GEMMs saw
    reference = linear_cross_entropy_reference(rounded[0], rounded[1], target, rounded[2])
    reference.backward()
    assert_matches(loss, reference.detach(), torch.bfloat16, "loss")
    for name, t, r in zip(("hidden", "weight", "bias"), leaves, rounded):
        assert_matches(t.grad, r.grad, torch.bfloat16, f"grad {name}", min_atol=GEMM_ATOL[torch.bfloat16])


def test_weight_gradient_is_summed_in_fp32():
    """512 one-row chunks adding same-sign contributions: a bf16 running sum would lose their tails.

    The summing is the same Python for both backends, so the (fast) PyTorch one serves.
    """
    hidden, weight, _ = make_inputs(512, 16, 64, torch.bfloat16, "cpu", bias=False)
    hidden = hidden.abs()
    target = torch.full((512,), 3)
    weight.requires_grad_()
    linear_cross_entropy(hidden, weight, target, chunk_rows=1).backward()
    w64 = weight.detach().double().requires_grad_()
    linear_cross_entropy_reference(hidden.double(), w64, target).backward()
    logits = (hidden @ weight.detach().t()).double()
    grad_logits = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, 64)) / 512
    bf16_sum = torch.zeros_like(weight)
    for g, h in zip(grad_logits, hidden.double()):  # what a bf16 running sum of the chunks' GEMMs gives
        bf16_sum += torch.outer(g, h).bfloat16()
    ours_error = (weight.grad.double() - w64.grad).abs().max()
    bf16_error = (bf16_sum.double() - w64.grad).abs().max()
    assert ours_error < bf16_error / 5, (ours_error, bf16_error)


def test_module_takes_any_leading_shape(kernel_device):
    hidden, weight, b = make_inputs(12, 8, 30, torch.float32, kernel_device)
    target = random_targets(12, 30, 4, kernel_device)
    ours = LinearCrossEntropyLoss(reduction="none")(hidden.view(3, 4, 8), weight, target.view(3, 4), b)
    assert ours.shape == (3, 4)
    reference = linear_cross_entropy_reference(hidden.double(), weight.double(), target, b.double(), reduction="none")
    assert_matches(ours.flatten(), reference, torch.float32, "loss")


@pytest.mark.parametrize("bad, message", [
    ({"weight": torch.zeros(30, 7)}, "weight must be \\(V, 8\\)"),
    ({"bias": torch.zeros(29)}, "bias must be \\(30,\\)"),
    ({"chunk_rows": 0}, "chunk_rows must be positive"),
    ({"hidden": torch.zeros(4, 8, dtype=torch.float64)}, "hidden must be float32"),
])
def test_bad_arguments(bad, message):
    args = {"hidden": torch.zeros(4, 8), "weight": torch.zeros(30, 8), "target": torch.zeros(4, dtype=torch.int64)}
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**(args | bad))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, width=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.output = torch.nn.Linear(width, vocab)

    def forward(self, tokens, targets, fused):
        h = torch.tanh(self.embed(tokens)).flatten(0, 1)
        if fused:
            return linear_cross_entropy(h, self.output.weight, targets.flatten(), self.output.bias, chunk_rows=8,
                                        z_loss=1e-3)
        return cross_entropy(self.output(h), targets.flatten(), label_smoothing=0.1, softcap=3.0)


@pytest.mark.compile
@pytest.mark.parametrize("fused", [True, False], ids=["linear_cross_entropy", "cross_entropy"])
def test_compiles_without_graph_breaks(kernel_device, fused):
    model = TinyLM().to(kernel_device)
    tokens = torch.randint(0, 64, (2, 10), device=kernel_device)
    targets = random_targets(20, 64, 4, kernel_device).view(2, 10)
    eager_loss = model(tokens, targets, fused)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break is an error
    loss = compiled(tokens, targets, fused)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_correct_counts_top1_hits(kernel_device, dtype):
    """Small integer inputs make every logit exact in any dtype and chunking, ties included."""
    hidden = torch.randint(-3, 4, (53, 16), device=kernel_device).to(dtype).requires_grad_()
    weight = torch.randint(-3, 4, (301, 16), device=kernel_device).to(dtype).requires_grad_()
    logits = hidden.detach().double() @ weight.detach().double().t()
    target = random_targets(53, 301, 4, kernel_device)
    target[:20] = logits[:20].argmax(-1)
    loss, correct = linear_cross_entropy(hidden, weight, target, chunk_rows=16, return_correct=True)
    valid = target != -100
    at_target = logits.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    assert correct.item() == int(((at_target >= logits.max(-1).values) & valid).sum()) >= 15
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
