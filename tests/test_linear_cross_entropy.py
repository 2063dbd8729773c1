"""kernels.linear_cross_entropy against the unfused path in fp64: losses and all three gradients."""

from __future__ import annotations

import importlib

import pytest
import torch

import fasttrain_kernels._backend
from fasttrain_kernels import (
    LinearCrossEntropyLoss,
    cross_entropy,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from tests.kernel_checks import DTYPES, assert_matches, random_targets

lce = importlib.import_module(
    "fasttrain_kernels.linear_cross_entropy"
)  # the module: the package exports its function by name

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
    options.pop("grad_scale", None)
    reference = linear_cross_entropy_reference(leaves64[0], leaves64[1], target, *leaves64[2:], **options)
    grads64 = torch.autograd.grad(reference, leaves64, incoming.double())
    assert_matches(loss, reference, hidden.dtype, "loss")  # the logits were rounded to that dtype
    for name, ours, ref, leaf in zip(("hidden", "weight", "bias"), grads, grads64, leaves):
        assert ours.dtype == leaf.dtype
        assert_matches(ours, ref, hidden.dtype, f"grad {name}", min_atol=GEMM_ATOL[hidden.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "none", "label_smoothing": 0.1}, {"reduction": "sum", "z_loss": 1e-3, "softcap": 4.0}],
    ids=["mean", "none", "sum-options"],
)
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


def test_weight_gradient_is_summed_in_fp32(monkeypatch):
    """512 one-row chunks adding same-sign contributions: a bf16 running sum would lose their tails.

    The summing is the same Python for both backends, so the (fast) PyTorch one serves (under TRITON_INTERPRET=1
    CPU tensors would take the interpreter's 512 launches: that backend as kernel_device's "torch" turns it off).
    """
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)
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


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"weight": torch.zeros(30, 7)}, "weight must be \\(V, 8\\)"),
        ({"bias": torch.zeros(29)}, "bias must be \\(30,\\)"),
        ({"chunk_rows": 0}, "chunk_rows must be positive"),
        ({"grad_scale": torch.ones(2)}, "grad_scale must be a one-element tensor"),
        ({"hidden": torch.zeros(4, 8, dtype=torch.float64)}, "hidden must be float32"),
    ],
)
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
            return linear_cross_entropy(
                h, self.output.weight, targets.flatten(), self.output.bias, chunk_rows=8, z_loss=1e-3
            )
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


@pytest.mark.parametrize(
    "n_rows, n_cols, itemsize, sizes",
    [
        (16384, 50304, 2, [4096] * 4),  # 41 multiples of 128 fit in 512 MiB: 128 multiples go in 4 chunks
        (8192, 131072, 2, [2048] * 4),
        (8193, 262144, 2, [896] * 4 + [1024] + [896] * 3 + [897]),  # not 8 x 1024 and a 1-row sliver
        (1000, 50304, 2, [1000]),
        (0, 50304, 2, []),
    ],
)
def test_default_chunks_at_real_shapes(n_rows, n_cols, itemsize, sizes):
    bounds = lce.chunk_bounds(n_rows, n_cols, itemsize)
    assert [b - a for a, b in zip(bounds[:-1], bounds[1:])] == sizes


def test_default_chunks_are_few_balanced_and_within_the_budget(monkeypatch):
    """Over every row count up to 40 chunks: the fewest chunks the budget allows, whole multiples of 128 rows
    (the last ends at n_rows), none over the budget, sizes within one multiple of each other."""
    monkeypatch.setattr(lce, "LOGITS_BUDGET", 1000 * 100 * 4)  # 1000 rows of 100 fp32 logits: 7 multiples
    for n_rows in range(1, 40 * 896, 37):
        bounds = lce.chunk_bounds(n_rows, 100, 4)
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        assert bounds[0] == 0 and bounds[-1] == n_rows and min(sizes) > 0
        assert len(sizes) == -(-n_rows // 896) and max(sizes) <= 896
        assert all(size % 128 == 0 for size in sizes[:-1])
        assert max(sizes) - min(sizes[:-1] or sizes) <= 128 and sizes[-1] > max(sizes) - 256
    assert lce.chunk_bounds(100, 10**6, 4) == (0, 100)  # a row over the budget still goes, one multiple at a time
    assert lce.chunk_bounds(300, 10**6, 4) == (0, 128, 256, 300)
    assert lce.chunk_bounds(37, 10**6, 4, chunk_rows=16) == (0, 16, 32, 37)  # named: exactly that


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_budget_sized_chunks_match_the_reference(kernel_device, dtype, monkeypatch):
    """A budget of 12 rows in multiples of 4 splits 37 rows into 8 + 12 + 8 + 9: the default path through
    several uneven chunks, with every gradient (fp16: the recomputing backward)."""
    monkeypatch.setattr(lce, "CHUNK_MULTIPLE", 4)
    monkeypatch.setattr(lce, "LOGITS_BUDGET", 12 * 300 * dtype.itemsize)
    projections = []
    project = lce._project
    monkeypatch.setattr(lce, "_project", lambda h, *rest: projections.append(h.shape[0]) or project(h, *rest))
    hidden, weight, b = make_inputs(37, 24, 300, dtype, kernel_device)
    target = random_targets(37, 300, 6, kernel_device)
    check_against_reference(hidden, weight, b, target)
    assert projections[:4] == [8, 12, 8, 9]


def emulated_fp32_gemms(monkeypatch, calls: list) -> None:
    """torch.mm and torch.addmm with out_dtype=float32 as CUDA runs them (16-bit operands, an fp32 result and
    sum), for the CPU, whose build lacks them; each such call is recorded as (name, out is self)."""
    mm, addmm = torch.mm, torch.addmm

    def fake_mm(a, b, out_dtype=None, out=None):
        if out_dtype is None:
            return mm(a, b, out=out)
        calls.append(("mm", False))
        return out.copy_(a.to(out_dtype) @ b.to(out_dtype))

    def fake_addmm(acc, a, b, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return addmm(acc, a, b, out=out, **kwargs)
        calls.append(("addmm", out is acc))
        return out.copy_(acc + a.to(out_dtype) @ b.to(out_dtype))

    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "addmm", fake_addmm)


def test_fp32_output_gemms_write_the_first_chunk_and_add_the_others(monkeypatch):
    """Where the probe finds fp32-output GEMMs, bf16 chunks go through them: the first writes the weight's
    gradient (no zero-fill), the others add into it in place. Same sums as the fallback, within bf16."""
    calls = []
    emulated_fp32_gemms(monkeypatch, calls)
    monkeypatch.setattr(lce, "_gemm_adds_in_fp32", lambda device, dtype: True)
    monkeypatch.setattr(lce, "_FP32_GEMM", {})  # not an answer kept from an earlier test
    hidden, weight, b = make_inputs(37, 24, 300, torch.bfloat16, "cpu")
    target = random_targets(37, 300, 6, "cpu")
    check_against_reference(hidden, weight, b, target, chunk_rows=16)
    assert calls == [("mm", False), ("addmm", True), ("addmm", True)]


def test_the_probe_never_runs_inside_a_cuda_graph_capture(monkeypatch):
    """The probe syncs with the host, which breaks a capture (and would cache a false no): while capturing,
    an unprobed device takes the fallback without probing; once probed, its answer stands."""
    probes = []
    monkeypatch.setattr(lce, "_gemm_adds_in_fp32", lambda device, dtype: probes.append(dtype) or True)
    monkeypatch.setattr(lce, "_FP32_GEMM", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    gpu = torch.device("cuda", 0)
    assert not lce._fp32_gemm_known(gpu, torch.bfloat16) and probes == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert lce._fp32_gemm_known(gpu, torch.bfloat16) and probes == [torch.bfloat16]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert lce._fp32_gemm_known(gpu, torch.bfloat16)


def test_the_probe_says_no_to_a_missing_or_rounding_fp32_gemm(monkeypatch):
    probe = lce._gemm_adds_in_fp32  # the probe itself, not the answer _fp32_gemm_known keeps
    cpu = torch.device("cpu")
    assert not probe(cpu, torch.bfloat16)  # this build has no CPU kernel: it raises
    emulated_fp32_gemms(monkeypatch, [])
    assert probe(cpu, torch.bfloat16) and probe(cpu, torch.float16)
    addmm = torch.addmm
    monkeypatch.setattr(
        torch,
        "addmm",
        lambda acc, a, b, out_dtype, out: out.copy_(
            addmm(acc, a, b, out_dtype=out_dtype, out=torch.empty_like(out)).to(a.dtype)
        ),
    )  # a 16-bit sum
    assert not probe(cpu, torch.bfloat16)


def scaled_gradients(hidden, weight, bias, target, factor, grad_scale, **options):
    """Loss and gradients of (loss * factor).sum(), the loss told `grad_scale` (None: nothing)."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    announced = None if grad_scale is None else torch.tensor(grad_scale, device=hidden.device)
    loss = linear_cross_entropy(leaves[0], leaves[1], target, *leaves[2:], grad_scale=announced, **options)
    grads = torch.autograd.grad((loss * torch.tensor(factor, device=hidden.device)).sum(), leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_announced_grad_scale_changes_no_loss_or_gradient(kernel_device, dtype, reduction, monkeypatch):
    """grad_scale = s, then backward of loss * s: the same loss and gradients as without it, and where the
    forward computes the gradients (bf16, fp32; mean or sum) the backward's factor is exactly 1, which the
    row scaling skips. Where the backward computes them (fp16, reduction none) grad_scale changes nothing."""
    factors = []
    scale_rows = lce._scale_rows_op
    monkeypatch.setattr(lce, "_scale_rows_op", lambda x, w: factors.append(w.clone()) or scale_rows(x, w))
    # Eight passes of the whole loss, so smaller than the other tests' 37 x 300: 21 rows are a chunk of 16 and a
    # part-full one (the weight's gradient written, then added to), and through the interpreter's 128-column
    # blocks 170 columns are two, the second part-full (the bias's row scaling loops twice too).
    hidden, weight, b = make_inputs(21, 24, 170, dtype, kernel_device)
    target = random_targets(21, 170, 6, kernel_device)
    options = {"reduction": reduction, "chunk_rows": 16, "z_loss": 1e-3}
    fused = dtype != torch.float16 and reduction != "none"
    for s in (1.0, 0.25, 3 / 7, 1e-5):
        expected_loss, expected = scaled_gradients(hidden, weight, b, target, s, None, **options)
        factors.clear()
        loss, grads = scaled_gradients(hidden, weight, b, target, s, s, **options)
        assert torch.equal(loss, expected_loss)
        assert len(factors) == (3 if fused else 0) and all(torch.equal(f.cpu(), torch.ones(1)) for f in factors)
        for name, ours, ref in zip(("hidden", "weight", "bias"), grads, expected):
            assert_matches(ours, ref.double(), dtype, f"grad {name}, s={s}", min_atol=GEMM_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "none"])  # not mean: fp16 gradients / 31 rows reach subnormals
def test_an_incoming_gradient_other_than_announced_is_still_exact(kernel_device, dtype, reduction):
    """grad_scale = 3/7 announced, then a random incoming gradient: the gradients are still the reference's."""
    hidden, weight, b = make_inputs(37, 24, 300, dtype, kernel_device)
    target = random_targets(37, 300, 6, kernel_device)
    check_against_reference(
        hidden,
        weight,
        b,
        target,
        chunk_rows=16,
        reduction=reduction,
        grad_scale=torch.tensor(3 / 7, device=kernel_device),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_inputs_get_exact_gradients(kernel_device, dtype):
    """A weight stored (H, V) and passed as its transpose (as a tied or borrowed projection may be) and
    column-major hidden states: the backward scales the gradients row by row, so they must be laid out
    row-major whatever the inputs' strides (a random incoming gradient makes that scaling run)."""
    hidden, weight, b = make_inputs(37, 24, 300, dtype, kernel_device)
    hidden, weight = hidden.t().contiguous().t(), weight.t().contiguous().t()
    assert hidden.stride() == (1, 37) and weight.stride() == (1, 300)
    target = random_targets(37, 300, 6, kernel_device)
    check_against_reference(hidden, weight, b, target, chunk_rows=16, reduction="sum")


def test_no_rows(kernel_device):
    """An empty batch: loss 0, zero gradients (the weight's accumulator is zeroed, no chunk writes it)."""
    hidden, weight, b = make_inputs(0, 8, 30, torch.float32, kernel_device)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    loss = linear_cross_entropy(*leaves[:2], torch.zeros(0, dtype=torch.int64, device=kernel_device), leaves[2])
    loss.backward()
    assert loss.item() == 0 and all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


def test_a_strided_target_and_one_outside_the_classes(kernel_device):
    """The target is read by its stride, and a class outside [0, V) is refused as F.cross_entropy refuses it."""
    hidden, weight, bias = make_inputs(6, 8, 30, torch.float32, kernel_device)
    check_against_reference(hidden, weight, bias, torch.randint(0, 30, (6, 2), device=kernel_device)[:, 1])
    with pytest.raises(RuntimeError, match=r"outside \[0, 30\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 30, 4, 5], device=kernel_device))
