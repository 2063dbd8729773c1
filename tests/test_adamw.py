"""kernels.FusedAdamW against torch.optim.AdamW on the same parameters and gradients, both backends.

Through the Triton interpreter on a CPU-only machine, with chunks small enough that
every parameter spans several programs (see conftest.kernel_device).
"""

from __future__ import annotations

import io

import pytest
import torch

from fasttrain_kernels import FusedAdamW
from fasttrain_kernels._backend import use_triton
from tests.kernel_checks import assert_fp32_sums_close, stored

# With the test's CHUNK of 64 and BLOCK of 16 every parameter but (3,) spans several programs, and each ends on
# a masked chunk: 233 = 3 x 64 + 41 ends as 1001 did (two whole blocks, one of 9, one empty) in 4 programs, not 16.
SHAPES = [(37, 13), (233,), (3,), (5, 7, 2), (130, 1)]
SETTINGS = {
    "defaults": {},
    "llm": {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    "no_momentum": {"lr": 1e-2, "betas": (0.0, 0.99), "eps": 1e-10, "weight_decay": 0.0},
}
STEPS = 25


def make_params(device, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(s, device=device).to(dtype).requires_grad_() for s in SHAPES]


def groups(params: list[torch.Tensor]) -> list[dict]:
    """Two groups, the second with its own lr and weight decay."""
    return [{"params": params[:3]}, {"params": params[3:], "lr": 5e-3, "weight_decay": 0.3}]


def set_grads(step: int, *param_lists: list[torch.Tensor]) -> None:
    """The same random gradients for every list; parameter 2 gets none on every 4th step (it is skipped)."""
    grads = [torch.randn(p.shape, device=p.device).to(p.dtype) for p in param_lists[0]]
    for params in param_lists:
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 2 and step % 4 == 3) else g.to(p.dtype, copy=True)


def saved_and_loaded(state_dict: dict) -> dict:
    """Through torch.save and torch.load, as a checkpoint goes: torch's load_state_dict keeps the
    tensors of a live state_dict (shared with the optimizer it came from) when nothing needs a cast."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def assert_same_state(ours: FusedAdamW, theirs: torch.optim.AdamW, params, reference_params) -> None:
    for i, (p, q) in enumerate(zip(params, reference_params)):
        assert_fp32_sums_close(
            p.detach().float() if p.dtype == torch.float32 else ours.state[p]["master_param"], q.detach(), f"param {i}"
        )
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours.state[p][key].dtype == torch.float32
            assert_fp32_sums_close(ours.state[p][key], theirs.state[q][key].float(), f"{key} {i}")
        assert ours.state[p]["step"].item() == theirs.state[q]["step"].item()


@pytest.mark.parametrize("name", SETTINGS)
def test_matches_torch_adamw(kernel_device, name):
    params = make_params(kernel_device)
    reference = [p.detach().clone().requires_grad_() for p in params]
    ours, theirs = FusedAdamW(groups(params), **SETTINGS[name]), torch.optim.AdamW(groups(reference), **SETTINGS[name])
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS) for opt in (ours, theirs)]
    for step in range(STEPS):
        set_grads(step, params, reference)
        ours.step()
        theirs.step()
        for schedule in schedules:
            schedule.step()  # a new lr every step, set as a float in the groups
    assert_same_state(ours, theirs, params, reference)
    assert ours.state[params[2]]["step"].item() == STEPS - STEPS // 4  # skipped while it had no gradient


def test_parameters_at_unaligned_addresses(kernel_device):
    """Parameters that are views into one flat buffer at 4-byte offsets (not 16-byte aligned): the kernel's
    aligned (vector) variant must not be chosen for them, and the update is the same as torch's."""
    flat = torch.randn(1 + sum(torch.Size(s).numel() for s in SHAPES), device=kernel_device)
    params, offset = [], 1
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        params.append(torch.nn.Parameter(flat[offset : offset + n].view(shape)))
        offset += n
    assert params[0].data_ptr() % 16 == 4
    reference = [p.detach().clone().requires_grad_() for p in params]
    ours, theirs = FusedAdamW(params, **SETTINGS["llm"]), torch.optim.AdamW(reference, **SETTINGS["llm"])
    for step in range(3):
        set_grads(step, params, reference)
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, params, reference)
    if use_triton(params[0]):  # the kernel ran, from tables that know the addresses are unaligned
        assert ours._tables and not any(t.aligned for t in ours._tables.values())


def test_bf16_parameters_follow_fp32_master_weights(kernel_device):
    params = make_params(kernel_device, torch.bfloat16)
    reference = [p.detach().float().requires_grad_() for p in params]  # fp32 AdamW from the same start
    ours, theirs = (
        FusedAdamW(groups(params), **SETTINGS["llm"]),
        torch.optim.AdamW(groups(reference), **SETTINGS["llm"]),
    )
    for step in range(STEPS):
        set_grads(step, params, reference)  # bf16 gradients, the same values in fp32 for torch
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, params, reference)
    for p in params:  # each parameter is its master rounded once (as the backend under test rounds)
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), stored(ours.state[p]["master_param"], torch.bfloat16).bfloat16())


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_loads_into_the_other(kernel_device, direction):
    """Five steps in one optimizer, its state into the other on copies of the parameters, five more in
    both: the continuation matches, so nothing was lost or misread (decoupled decay included)."""
    first, second = (FusedAdamW, torch.optim.AdamW) if direction == "ours_to_torch" else (torch.optim.AdamW, FusedAdamW)
    params = make_params(kernel_device)
    opt = first(groups(params), **SETTINGS["llm"])
    for step in range(5):
        set_grads(step, params)
        opt.step()
    moved = [p.detach().clone().requires_grad_() for p in params]
    other = second(groups(moved), lr=1.0, weight_decay=0.0)  # loading restores the groups' settings too
    other.load_state_dict(saved_and_loaded(opt.state_dict()))
    for step in range(5, 10):
        set_grads(step, params, moved)
        opt.step()
        other.step()
    ours, theirs = (opt, other) if first is FusedAdamW else (other, opt)
    ours_params, their_params = (params, moved) if first is FusedAdamW else (moved, params)
    assert_same_state(ours, theirs, ours_params, their_params)


def test_bf16_state_round_trip_keeps_fp32(kernel_device):
    params = make_params(kernel_device, torch.bfloat16)
    opt = FusedAdamW(params)
    set_grads(0, params)
    opt.step()
    again = FusedAdamW(params)
    again.load_state_dict(saved_and_loaded(opt.state_dict()))  # torch's load alone would round these to bf16
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "master_param", "step"):
            assert again.state[p][key].dtype == torch.float32
            assert torch.equal(again.state[p][key], opt.state[p][key])


def test_folded_clipping_matches_clip_then_step(kernel_device):
    params = make_params(kernel_device)
    reference = [p.detach().clone().requires_grad_() for p in params]
    ours = FusedAdamW(groups(params), max_grad_norm=0.5)
    theirs = torch.optim.AdamW(groups(reference))
    for step in range(10):
        set_grads(step, params, reference)
        grads_before = [None if p.grad is None else p.grad.clone() for p in params]
        if step % 2:  # the norm early, as the trainer does, reused by the step; else computed by the step
            norm = ours.grad_norm()
            # A norm sums squares in another order: positive terms, so relative, but some ulp of it (1e-5)
            torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(reference, 0.5), rtol=1e-5, atol=0)
        else:
            torch.nn.utils.clip_grad_norm_(reference, 0.5)
        ours.step()
        theirs.step()
        for p, g in zip(params, grads_before):  # the gradients themselves are not rescaled
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert_same_state(ours, theirs, params, reference)


def test_tensor_learning_rate_changed_in_place(kernel_device):
    """lr as a device tensor (the CUDA-graph way): updating it in place changes the next step."""
    params = make_params(kernel_device)
    reference = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2, device=kernel_device)
    ours, theirs = FusedAdamW(params, lr=lr), torch.optim.AdamW(reference, lr=1e-2)
    for step in range(6):
        set_grads(step, params, reference)
        ours.step()
        theirs.step()
        lr.mul_(0.5)
        theirs.param_groups[0]["lr"] *= 0.5
    assert_same_state(ours, theirs, params, reference)


def test_refuses_what_it_cannot_do():
    p = torch.zeros(4, 2, requires_grad=True)
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        FusedAdamW([p]).step()
    q = torch.zeros(4, 2).t().requires_grad_()
    q.grad = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        FusedAdamW([q]).step()
    adam = torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="not plain AdamW"):
        FusedAdamW([torch.zeros(2, requires_grad=True)]).load_state_dict(adam.state_dict())
    for bad in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"max_grad_norm": 0.0}):
        with pytest.raises(ValueError, match="FusedAdamW"):
            FusedAdamW([p], **bad)
    for group in ({"maximize": True}, {"amsgrad": True}, {"decoupled_weight_decay": False}):  # torch.optim's keys
        with pytest.raises(ValueError, match="not supported"):
            FusedAdamW([{"params": [p], **group}])  # it would run plain AdamW
        with pytest.raises(ValueError, match="not supported"):
            FusedAdamW([p]).add_param_group({"params": [torch.zeros(2, requires_grad=True)], **group})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_cuda():
    params = make_params("cuda")
    opt = FusedAdamW(groups(params), max_grad_norm=1.0)
    set_grads(0, params)
    opt.step()  # state creation and the first tables are allowed to sync
    set_grads(1, params)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.grad_norm()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
