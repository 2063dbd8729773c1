"""kernels.rms_norm against an fp64 reference: outputs and all gradients, every dtype, both backends.

Through the Triton interpreter on a CPU-only machine (see conftest.kernel_device), with
tiles shrunk so that several short rows share one and the last tile of a program is part-full.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys

import pytest
import torch

import fasttrain_kernels._backend
from benchmarks.studies import tune_rms_norm
from fasttrain_kernels import RMSNorm, rms_norm, rms_norm_reference
from fasttrain_kernels.rms_norm import Tiling
from tests.kernel_checks import DTYPES, assert_matches, stored

norm_module = importlib.import_module("fasttrain_kernels.rms_norm")  # the package exports a function of that name

# (rows, hidden): one row and many, hidden sizes from 2 to 16384 including odd ones.
SHAPES = [(1, 2), (300, 2), (1, 127), (37, 127), (33, 760), (1, 2048), (1, 4097), (9, 4097), (3, 16384)]


def reference_with_rounded_sum(x64, weight64, eps, residual=None, h_dtype=None):
    """rms_norm_reference in fp64 of h = x + residual rounded to its storage dtype, as the op stores it
    (as eager torch does too): the rounding is part of the result; its gradient passes straight through."""
    if residual is None:
        return rms_norm_reference(x64, weight64, eps)
    exact = x64 + residual
    h = exact + (stored(exact, h_dtype) - exact).detach()
    return rms_norm_reference(h, weight64, eps), h


def run_both(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float = 1e-6):
    """Ours and the fp64 reference on the same inputs: y, h and the gradients of
    sum(y * dy) + sum(h * dh) for random dy, dh. Returns ({name: ours}, {name: reference}, dx_scale).

    dx = rstd * (dy * w - n * mean(dy * w * n)) is orthogonal to h: a difference of terms of
    size |dy * w| * rstd, which cancel when dy * w is nearly parallel to h (often, for H = 2).
    Its rounding is relative to those terms, so dx_scale is their largest magnitude.
    """
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    ours_fn = functools.partial(rms_norm, eps=eps)
    reference_fn = functools.partial(reference_with_rounded_sum, eps=eps, h_dtype=h_dtype)
    results = []
    dy = dh = None
    for fn, cast in ((ours_fn, lambda t: t), (reference_fn, torch.Tensor.double)):
        leaves = {"x": x, "weight": weight, "residual": residual}
        leaves = {k: cast(v.detach()).requires_grad_() for k, v in leaves.items() if v is not None}
        out = fn(leaves["x"], leaves["weight"], residual=leaves.get("residual"))
        y, h = out if residual is not None else (out, None)
        if dy is None:
            dy = torch.randn_like(y)
            dh = None if h is None else torch.randn_like(h)
        total = (y * cast(dy)).sum() + (0 if h is None else (h * cast(dh)).sum())
        grads = torch.autograd.grad(total, list(leaves.values()))
        results.append({"y": y, **({"h": h} if h is not None else {}), **{f"d{k}": g for k, g in zip(leaves, grads)}})
    h64 = leaves["x"] if residual is None else h
    rstd = torch.rsqrt(h64.detach().square().mean(-1, keepdim=True) + eps)
    dx_scale = (dy.double() * weight.double() * rstd).abs().max().item()
    return *results, dx_scale


def assert_all_match(ours: dict, reference: dict, dx_scale: float) -> None:
    """Every result of run_both within the tolerance of its own dtype."""
    for name in ours:
        scale = dx_scale if name in ("dx", "dresidual") else None
        assert_matches(ours[name], reference[name], ours[name].dtype, name, scale=scale)


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add+norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-H{}".format(*s))
def test_matches_reference(kernel_device, shape, dtype, residual):
    x = (3 * torch.randn(shape, device=kernel_device)).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[1], device=kernel_device)).to(dtype)
    r = torch.randn(shape, device=kernel_device).to(dtype) if residual else None
    ours, reference, dx_scale = run_both(x, weight, r)
    assert ours.keys() == reference.keys()
    assert all(t.dtype == dtype for t in ours.values())
    assert_all_match(ours, reference, dx_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_is_exactly_x_plus_residual(kernel_device, dtype):
    x = torch.randn(37, 300, device=kernel_device, dtype=dtype)
    r = torch.randn(37, 300, device=kernel_device, dtype=dtype)
    y, h = rms_norm(x, torch.ones(300, device=kernel_device, dtype=dtype), residual=r)
    assert torch.equal(h, stored(x.double() + r.double(), dtype).to(dtype))  # x + r in torch, but see `stored`
    assert torch.equal(y, rms_norm(h, torch.ones_like(h[0])))  # y is the norm of the stored (rounded) sum


def test_mixed_dtypes_follow_torch(kernel_device):
    """The autocast case: a bf16 delta added to an fp32 residual stream, an fp32 weight."""
    x = torch.randn(2, 9, 130, device=kernel_device, dtype=torch.bfloat16)
    r = torch.randn(2, 9, 130, device=kernel_device)
    weight = 1 + 0.5 * torch.randn(130, device=kernel_device)
    ours, reference, dx_scale = run_both(x, weight, r)
    assert ours["h"].dtype == ours["y"].dtype == (x + r).dtype == torch.float32
    assert ours["dx"].dtype == torch.bfloat16 and ours["dresidual"].dtype == ours["dweight"].dtype == torch.float32
    assert_all_match(ours, reference, dx_scale)
    y = rms_norm(x, weight)  # without a residual y keeps x's dtype, as torch.nn.RMSNorm's does
    assert y.dtype == torch.nn.functional.rms_norm(x, (130,), weight.bfloat16()).dtype == torch.bfloat16


def test_out_dtype_and_autocast(kernel_device):
    """y stored straight in another dtype is the fp32 result rounded once, with the same gradients;
    under autocast the module does that with the autocast dtype."""
    x, r = torch.randn(2, 2, 7, 96, device=kernel_device).unbind(0)
    weight = torch.randn(96, device=kernel_device)
    dy = torch.randn(2, 7, 96, device=kernel_device).bfloat16()
    results = {}
    for out_dtype in (None, torch.bfloat16):
        leaves = [t.clone().requires_grad_() for t in (x, r, weight)]
        y, h = rms_norm(leaves[0], leaves[2], residual=leaves[1], out_dtype=out_dtype)
        results[out_dtype] = (y, h, *torch.autograd.grad(y, leaves, dy.to(y.dtype)))
    (y32, h32, *grads32), (y16, h16, *grads16) = results.values()
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    assert torch.equal(y16, stored(y32, torch.bfloat16).bfloat16()) and torch.equal(h16, h32)
    # Not bit for bit on a GPU: the backward compiled for a bf16 dy vectorizes its loads, and so its row
    # sums, differently from the one for an fp32 dy (8 elements a thread instead of 4).
    for a, b in zip(grads16, grads32):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    norm = RMSNorm(96, device=kernel_device)
    with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        y_auto, h_auto = norm(x, r)
    assert y_auto.dtype == torch.bfloat16 and h_auto.dtype == torch.float32


def test_statistics_are_fp32(kernel_device):
    """fp16 squares overflow above 256: only fp32 statistics give a finite, correct result."""
    x = (1000 * torch.randn(5, 300, device=kernel_device)).half()
    assert_all_match(*run_both(x, torch.ones(300, device=kernel_device).half(), None))


def test_weight_gradient_sums_many_rows_in_fp32(kernel_device):
    """dweight is a sum over all rows: a bf16 running sum of 4096 same-sign terms stalls far below it."""
    x = torch.rand(4096, 8, device=kernel_device).add(0.5).bfloat16().requires_grad_()
    weight = torch.ones(8, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    rms_norm(x, weight).sum().backward()
    x64 = x.detach().double()
    expected = (x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6)).sum(0)
    torch.testing.assert_close(weight.grad.double(), expected, rtol=4e-3, atol=0)  # one bf16 rounding


def test_zero_rows_and_only_one_output_used(kernel_device):
    x = torch.randn(6, 50, device=kernel_device)
    x[2] = 0  # rstd = 1 / sqrt(eps): y and its gradient are finite
    r = torch.randn(6, 50, device=kernel_device)
    r[2] = 0
    weight = torch.randn(50, device=kernel_device)
    for keep in ("y", "h"):  # the other output gets no gradient (None: no zeros are made or read)
        leaves = [t.clone().requires_grad_() for t in (x, r, weight)]
        leaves64 = [t.double().requires_grad_() for t in (x, r, weight)]
        y, h = rms_norm(leaves[0], leaves[2], residual=leaves[1])
        y64, h64 = rms_norm_reference(leaves64[0], leaves64[2], residual=leaves64[1])
        (y if keep == "y" else h).sum().backward()
        (y64 if keep == "y" else h64).sum().backward()
        for ours, ref, name in zip(leaves, leaves64, ("dx", "dresidual", "dweight")):
            if ref.grad is None:  # the weight, when only h is used
                assert ours.grad is None, f"{keep} only: {name}"
            else:
                assert_matches(ours.grad, ref.grad, torch.float32, f"{keep} only: {name}")


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add+norm"])
def test_an_empty_batch(kernel_device, residual):
    """No rows: empty outputs, empty input gradients and a zero weight gradient (the backward launches no
    program rather than dividing its rows among none)."""
    x = torch.randn(0, 50, device=kernel_device, requires_grad=True)
    r = torch.randn(0, 50, device=kernel_device, requires_grad=True) if residual else None
    weight = torch.randn(50, device=kernel_device, requires_grad=True)
    out = rms_norm(x, weight, residual=r)
    y = out[0] if residual else out
    assert y.shape == (0, 50)
    y.sum().backward()
    assert x.grad.shape == (0, 50) and torch.equal(weight.grad, torch.zeros(50, device=kernel_device))


def test_same_tensor_as_input_and_residual(kernel_device):
    x = torch.randn(4, 70, device=kernel_device, requires_grad=True)
    y, h = rms_norm(x, torch.ones(70, device=kernel_device), residual=x)
    (y.sum() + h.sum()).backward()
    x64 = x.detach().double().requires_grad_()
    y64, h64 = rms_norm_reference(x64, torch.ones(70, dtype=torch.float64, device=kernel_device), residual=x64)
    (y64.sum() + h64.sum()).backward()
    assert_matches(x.grad, x64.grad, torch.float32, "both gradients accumulated")


def test_incoming_gradient_is_kept_unless_asked(kernel_device):
    x = torch.randn(8, 96, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(96, device=kernel_device, dtype=torch.bfloat16)
    dy = torch.randn(8, 96, device=kernel_device, dtype=torch.bfloat16)
    kept = dy.clone()
    (dx,) = torch.autograd.grad(rms_norm(x, weight), x, dy)
    assert torch.equal(dy, kept)
    (dx_inplace,) = torch.autograd.grad(rms_norm(x, weight, inplace_backward=True), x, dy)
    assert torch.equal(dx_inplace, dx) and torch.equal(dy, dx)  # asked for: dx written over dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_gradient_written_over_dy_leaves_the_weights_gradient_right(kernel_device, dtype):
    """inplace_backward: dweight reads dy, which dx overwrites (in fp32 on the CPU, dy.float() is dy itself)."""
    x = torch.randn(8, 96, device=kernel_device, dtype=dtype, requires_grad=True)
    weight = (torch.rand(96, device=kernel_device) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(8, 96, device=kernel_device, dtype=dtype)
    expected = torch.autograd.grad(rms_norm(x, weight), (x, weight), dy.clone())
    found = torch.autograd.grad(rms_norm(x, weight, inplace_backward=True), (x, weight), dy.clone())
    for ours, theirs, name in zip(found, expected, ("dx", "dweight")):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_two_leaves_get_gradients_of_their_own(kernel_device):
    """x and residual leaves: each .grad its own tensor (autograd would accumulate the next backward into one shared
    tensor twice), whether y is used or only h."""
    x, r = (torch.randn(3, 40, device=kernel_device, requires_grad=True) for _ in range(2))
    weight = torch.rand(40, device=kernel_device) + 0.5
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, r))
    for use in ("y", "h", "y", "h"):  # accumulated over four backwards
        dy = torch.randn(3, 40, device=kernel_device)
        y, h = rms_norm(x, weight, residual=r)
        y64, h64 = rms_norm_reference(x64, weight.double(), residual=r64)
        ((y if use == "y" else h) * dy).sum().backward()
        ((y64 if use == "y" else h64) * dy.double()).sum().backward()
    assert x.grad.data_ptr() != r.grad.data_ptr()
    assert_matches(x.grad, x64.grad, torch.float32, "x's accumulated gradient")
    assert_matches(r.grad, r64.grad, torch.float32, "residual's accumulated gradient")


def test_a_strided_weight(kernel_device):
    x = torch.randn(5, 37, device=kernel_device, requires_grad=True)
    weight = (torch.rand(74, device=kernel_device) + 0.5)[::2].requires_grad_()
    assert_all_match(*run_both(x, weight, None))


def test_a_second_derivative_is_refused(kernel_device):
    """The backward is not itself differentiable: a gradient of it raises rather than gives wrong numbers."""
    x = torch.randn(3, 8, device=kernel_device, requires_grad=True)
    (dx,) = torch.autograd.grad(rms_norm(x, torch.ones(8, device=kernel_device)).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dx.square().sum(), x)


def test_non_contiguous_input(kernel_device):
    x = torch.randn(40, 6, device=kernel_device).t()  # (6, 40) with column stride 6
    r = torch.randn(12, 40, device=kernel_device)[::2]  # (6, 40) with row stride 80
    assert_all_match(*run_both(x, torch.randn(40, device=kernel_device), r))


def test_module_is_a_drop_in_for_torch(kernel_device):
    theirs = torch.nn.RMSNorm(130, eps=1e-5, device=kernel_device)
    torch.nn.init.normal_(theirs.weight)
    ours = RMSNorm(130, eps=1e-5, device=kernel_device)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 3, 130, device=kernel_device, requires_grad=True)
    y = ours(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    y_torch = theirs(x)
    (dx_torch,) = torch.autograd.grad(y_torch.square().sum(), x)
    torch.testing.assert_close(y, y_torch)
    torch.testing.assert_close(dx, dx_torch)
    theirs.load_state_dict(ours.state_dict())  # and back
    y, h = ours(x, residual=x)
    torch.testing.assert_close(h, 2 * x)
    small = torch.randn(4, 130, device=kernel_device) * 1e-3  # where eps matters: torch's default, the dtype's epsilon
    torch.testing.assert_close(
        RMSNorm(130, device=kernel_device)(small), torch.nn.RMSNorm(130, device=kernel_device)(small)
    )


@pytest.mark.compile
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_compiles_without_graph_breaks(kernel_device, autocast):
    norms = torch.nn.ModuleList(RMSNorm(48, device=kernel_device) for _ in range(2))
    for norm in norms:
        torch.nn.init.normal_(norm.weight)

    def block(x, delta):
        with torch.autocast(kernel_device.type, dtype=torch.bfloat16, enabled=autocast):
            y, h = norms[0](delta, x)
            return norms[1](y.relu(), h)[0].float().square().sum()

    x = torch.randn(3, 5, 48, device=kernel_device)
    delta = torch.randn(3, 5, 48, device=kernel_device, requires_grad=True)
    eager = torch.autograd.grad(block(x, delta), [delta, norms[0].weight, norms[1].weight])
    # aot_eager traces forward and backward through the ops' fakes, which is where a bad schema fails.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(compiled(x, delta), [delta, norms[0].weight, norms[1].weight]), eager):
        torch.testing.assert_close(a, b)


@pytest.mark.compile
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor launches the kernels itself on CUDA tensors only")
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["dx", "dx_into_dy"])
@pytest.mark.parametrize("dynamic_rows", [False, True], ids=["static", "dynamic_rows"])
def test_inductor_launches_the_kernels_itself_on_the_gpu(residual, inplace_backward, dynamic_rows):
    """Compiled on CUDA, the norms are no opaque ops: Inductor's code launches the Triton kernels (forward
    and backward) without a hop back into the ops' Python, and computes what eager code does: with the
    residual's add or without, dx written over dy's memory or not, the rows fixed or symbolic."""
    from torch._inductor.utils import run_and_get_code

    norms = torch.nn.ModuleList(RMSNorm(96, inplace_backward=inplace_backward, device="cuda") for _ in range(2))
    for norm in norms:
        torch.nn.init.normal_(norm.weight)

    def block(x, delta):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if not residual:
                return norms[1](norms[0](delta).relu() + x).float().square().sum()
            y, h = norms[0](delta, x)
            return norms[1](y.relu(), h)[0].float().square().sum()

    x = torch.randn(3, 7, 96, device="cuda")
    delta = torch.randn(3, 7, 96, device="cuda", requires_grad=True)
    if dynamic_rows:
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(delta, 0)
    params = [delta, norms[0].weight, norms[1].weight]
    eager = torch.autograd.grad(block(x, delta), params)
    compiled = torch.compile(block, fullgraph=True)
    grads, code = run_and_get_code(lambda: torch.autograd.grad(compiled(x, delta), params))
    code = "\n".join(code)
    assert "_rms_norm_forward_kernel" in code and "_rms_norm_backward_kernel" in code
    assert "fasttrain.rms_norm" not in code  # no call of an opaque op
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


def test_only_traced_tensors_launch_through_the_wrapper():
    """A launcher wraps its kernel for torch.compile's trace (fake tensors) and launches the kernel itself on
    real ones, whose launch in eager code must not pay for the wrapper's dispatch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fasttrain_kernels._backend import traced

    assert not traced(torch.ones(2)) and not traced(torch.nn.Parameter(torch.ones(2)))
    with FakeTensorMode():
        assert traced(torch.ones(2))


@pytest.mark.subprocess
def test_torch_finds_the_kernels_the_inlined_ops_launch():
    """torch keys its compile cache for an op made with triton_op on the source of the kernels it finds in the
    op's launcher: a kernel it missed could be edited and a stale compiled graph still run. (Without
    TRITON_INTERPRET, which makes the kernels interpreter objects that it does not look for.)"""
    pytest.importorskip("triton")
    script = (
        "import importlib\n"
        "from torch._library.triton import get_inner_triton_kernels\n"
        "m = importlib.import_module('fasttrain_kernels.rms_norm')\n"
        "for op, kernel in ((m._forward_op, m._rms_norm_forward_kernel),\n"
        "                   (m._backward_op, m._rms_norm_backward_kernel)):\n"
        "    assert get_inner_triton_kernels(op.launcher) == [kernel], get_inner_triton_kernels(op.launcher)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    "case, message",
    [
        ({"weight": torch.ones(7)}, "weight must be"),
        ({"x": torch.ones(4, 8, dtype=torch.int64)}, "x must be float32"),
        ({"residual": torch.ones(4, 9)}, "residual must have"),
        ({"x": torch.ones(1, 65537), "weight": torch.ones(65537)}, "over the kernel's limit"),
        ({"eps": -1.0}, "eps must be"),
        ({"out_dtype": torch.int8}, "out_dtype must be"),
    ],
)
def test_bad_arguments(case, message):
    args = {"x": torch.ones(4, 8), "weight": torch.ones(8), "residual": None, "eps": 1e-6, "out_dtype": None, **case}
    with pytest.raises(ValueError, match=message):
        rms_norm(args["x"], args["weight"], args["eps"], args["residual"], out_dtype=args["out_dtype"])


def test_mixed_dtypes_with_a_frozen_input(kernel_device):
    """Only the residual stream (fp32) or only x (bf16) wants a gradient: it comes back in its own dtype."""
    x = torch.randn(5, 130, device=kernel_device, dtype=torch.bfloat16)
    r = torch.randn(5, 130, device=kernel_device)
    weight = torch.randn(130, device=kernel_device)
    dy = torch.randn(5, 130, device=kernel_device)
    for trained in ("x", "residual"):
        leaves = {"x": x.clone(), "residual": r.clone()}
        leaves[trained].requires_grad_()
        y, _ = rms_norm(leaves["x"], weight, residual=leaves["residual"])
        (grad,) = torch.autograd.grad(y, leaves[trained], dy.to(y.dtype))
        x64, r64 = x.double(), r.double().requires_grad_()
        y64, _ = reference_with_rounded_sum(x64, weight.double(), 1e-6, r64, torch.float32)
        (expected,) = torch.autograd.grad(y64, r64, dy.double())
        assert grad.dtype == leaves[trained].dtype
        assert_matches(
            grad, expected, grad.dtype, f"d{trained}", min_rtol=1e-4, scale=(dy.abs() * weight.abs()).max().item()
        )


# Tilings unlike the defaults: one row a tile, several with no prefetch, deep prefetch over many programs.
ODD_TILINGS = [
    (Tiling(1, 4), Tiling(1, 4, 1, 3)),
    (Tiling(2, 2), Tiling(4, 8, 8, 1)),
    (Tiling(8, 1), Tiling(2, 1, 3, 2)),
]


@pytest.mark.parametrize("forward, backward", ODD_TILINGS, ids=["one-row", "no-prefetch", "deep"])
def test_measured_tilings_compute_the_same(kernel_device, monkeypatch, forward, backward):
    """Whatever tiling the measured table gives a row block, the results are the reference's (the interpreter
    runs the tiling; on a GPU the table is keyed by its capability)."""
    x = torch.randn(45, 200, device=kernel_device, dtype=torch.bfloat16)
    r = torch.randn(45, 200, device=kernel_device)
    weight = 1 + 0.5 * torch.randn(200, device=kernel_device)
    capability = norm_module._capability(x.device)
    monkeypatch.setattr(norm_module, "MEASURED_TILINGS", {capability: {256: (forward, backward)}})
    assert norm_module.tilings(200, capability)[1:] == (forward, backward)
    assert_all_match(*run_both(x, weight, r))


@pytest.mark.second_tier  # the tuner's dry run: the first tier is at its 10 minutes
def test_measured_tilings_are_read_per_gpu_and_compiled(tmp_path, monkeypatch):
    """The tuner's file round-trips into the table; a GPU without entries, or a row block without one,
    gets the defaults; every measured tiling is among the variants the compile check builds. The tuner runs
    the kernels' PyTorch path, as in the GPU pack's dry run: its figures mean nothing on a CPU, and through
    Triton's interpreter it took 57 s of CI's second tier where this takes 5 (odd tilings through the Triton
    kernels are the first tier's: test_measured_tilings_compute_the_same)."""
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)
    out = tmp_path / "tilings.json"
    assert tune_rms_norm.main(["--dry-run", "--out", str(out)]) == 0
    table = norm_module._read_tilings(out)
    (measured,) = table.values()
    assert set(measured) == {64, 256} and all(isinstance(t, Tiling) for pair in measured.values() for t in pair)
    odd = {"sm_90": {1024: ODD_TILINGS[0]}}
    monkeypatch.setattr(norm_module, "MEASURED_TILINGS", odd)
    assert norm_module.tilings(768, "sm_90") == (1024, *ODD_TILINGS[0])
    assert norm_module.tilings(768, "sm_80") == (1024, *norm_module.default_tilings(1024))
    assert norm_module.tilings(2048, "sm_90") == (2048, *norm_module.default_tilings(2048))
    compiled = {
        (s.name, dict(s.constexprs)["BLOCK_ROWS"], s.num_warps)
        for s in norm_module.specializations()
        if dict(s.constexprs)["BLOCK"] == 1024
    }
    assert {("_rms_norm_forward_kernel", 1, 4), ("_rms_norm_backward_kernel", 1, 4)} <= compiled


def test_eager_calls_skip_the_library_op_but_keep_its_version_bumps(kernel_device, monkeypatch):
    """Outside torch.compile the launcher runs without the op's dispatch; the tensors it writes still count
    as modified in place, as the op would mark them, so autograd can refuse a clobbered saved tensor."""
    for op in (norm_module._forward_op, norm_module._backward_op):
        for name in ("op", "inlined"):
            monkeypatch.setattr(op, name, lambda *args: pytest.fail("the torch.library op was called in eager mode"))
    x = torch.randn(3, 40, device=kernel_device, requires_grad=True)
    dy = torch.randn(3, 40, device=kernel_device)
    before = dy._version
    (dx,) = torch.autograd.grad(rms_norm(x, torch.ones(40, device=kernel_device), inplace_backward=True), x, dy)
    assert dx.data_ptr() == dy.data_ptr() and dy._version > before
