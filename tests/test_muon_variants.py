"""Muon's nanochat variants (optim.muon.orthogonalisation, second_moment_beta2, cautious_weight_decay): each
step against the formulas written out in fp64, and Polar Express against the fixed quintic.

torch.optim.Muon's own step is test_training.py's; these add to it, so with all three off the step is still
torch's (the first case below checks the same formulas with every variant off).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fasttrain.config import ModelConfig, MuonConfig, OptimConfig
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import Hybrid, Muon, build_optimizer
from fasttrain_kernels.newton_schulz import (
    COEFFICIENTS,
    POLAR_EXPRESS,
    POLAR_EXPRESS_MARGIN,
    newton_schulz_reference,
    per_step,
)
from tests.conftest import tiny_args
from tests.test_sizing import cli

LR, WEIGHT_DECAY, MOMENTUM, STEPS = 0.02, 0.1, 0.95, 3


def spread_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A rows x cols matrix whose singular values run evenly in log from 1e-3 to 1: what an iteration that
    lifts small ones slowly leaves far from 1."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    k = min(rows, cols)
    return (u[:, :k] * torch.logspace(-3, 0, k, dtype=torch.float64)) @ v[:k, :]


@pytest.mark.parametrize("shape", [(24, 40), (64, 33)], ids=["wide", "tall"])
def test_polar_express_is_nearer_orthogonal_than_the_fixed_quintic_in_five_steps(shape):
    g = spread_matrix(*shape, seed=1).float()
    worst = {}
    for name, coefficients, margin in [("fixed", COEFFICIENTS, 0.0), ("polar", POLAR_EXPRESS, POLAR_EXPRESS_MARGIN)]:
        singular = torch.linalg.svdvals(newton_schulz_reference(g, 5, coefficients, dtype=torch.float32, margin=margin))
        worst[name] = (singular.double().log().abs().max()).item()  # how far the furthest is from 1, either way
    assert worst["polar"] < 0.7 * worst["fixed"], worst  # here ~0.58 against ~1.25 (singular values 0.56 vs 0.29)


def test_per_step_coefficients():
    assert per_step(COEFFICIENTS, 3) == [COEFFICIENTS] * 3
    assert per_step(POLAR_EXPRESS, 7) == [*POLAR_EXPRESS, POLAR_EXPRESS[-1], POLAR_EXPRESS[-1]]
    assert per_step([list(t) for t in POLAR_EXPRESS], 2) == list(POLAR_EXPRESS[:2])  # as a checkpoint may hold them


def reference_moves(
    start: list[torch.Tensor], grads: list[list[torch.Tensor]], polar: bool, beta2: float, cautious: bool
) -> list[torch.Tensor]:
    """The weights' moves after len(grads) steps, by the formulas in fp64: Nesterov momentum, the iteration
    (Polar Express's coefficients and margin, or the fixed quintic's), NorMuon's per-neuron second moment with
    the norm kept, (cautious) decoupled weight decay, and the rate scaled by sqrt(max(1, rows / cols))."""
    params = [p.double().clone() for p in start]
    momenta = [torch.zeros_like(p) for p in params]
    second: list[torch.Tensor | None] = [None] * len(params)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            g = g.double()
            momenta[i] = MOMENTUM * momenta[i] + (1 - MOMENTUM) * g
            u = (1 - MOMENTUM) * g + MOMENTUM * momenta[i]
            wide = u if u.shape[0] <= u.shape[1] else u.T
            x = wide / (wide.norm() * (1 + (POLAR_EXPRESS_MARGIN if polar else 0.0)))
            for a, b, c in POLAR_EXPRESS if polar else [COEFFICIENTS] * 5:
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            u = x if u.shape[0] <= u.shape[1] else x.T
            if beta2:
                neuron_means = (u**2).mean(dim=1 if u.shape[0] >= u.shape[1] else 0, keepdim=True)
                previous = torch.zeros_like(neuron_means) if second[i] is None else second[i]
                second[i] = beta2 * previous + (1 - beta2) * neuron_means
                scaled = u / second[i].sqrt()
                u = scaled * u.norm() / scaled.norm()
            if cautious:
                p -= LR * WEIGHT_DECAY * p * (u * p >= 0)
            else:
                p *= 1 - LR * WEIGHT_DECAY
            p -= LR * max(1.0, u.shape[0] / u.shape[1]) ** 0.5 * u
    return [p - p0.double() for p, p0 in zip(params, start)]


@pytest.mark.parametrize(
    "polar, beta2, cautious",
    [(False, 0.0, False), (True, 0.0, False), (False, 0.9, False), (False, 0.0, True), (True, 0.9, True)],
    ids=["torch", "polar", "second-moment", "cautious", "all"],
)
def test_each_variant_steps_as_its_formula(polar, beta2, cautious):
    torch.manual_seed(0)
    start = [torch.randn(24, 40), torch.randn(40, 24), torch.randn(16, 16)]  # wide, tall, square
    grads = [[torch.randn_like(p) for p in start] for _ in range(STEPS)]
    params = [nn.Parameter(p.clone()) for p in start]
    opt = Muon(
        params,
        ns_dtype=torch.float32,
        polar_express=polar,
        second_moment_beta2=beta2,
        cautious_weight_decay=cautious,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        momentum=MOMENTUM,
    )
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, p0, theirs in zip(params, start, reference_moves(start, grads, polar, beta2, cautious)):
        ours = (p.detach() - p0).double()
        assert (ours - theirs).norm() / theirs.norm() < 1e-4  # fp32 against fp64 through 15 iterations


def test_the_variants_come_from_the_config_and_survive_a_state_saved_without_them():
    """build_optimizer hands optim.muon's settings to every Muon group; a Muon state saved before the settings
    existed loads with the optimizer's own (its defaults: what the older run stepped with)."""
    model = Transformer(ModelConfig(vocab_size=50, max_seq_len=8, d_model=16, n_layers=2, n_heads=2))
    muon_cfg = MuonConfig(orthogonalisation="polar_express", second_moment_beta2=0.9, cautious_weight_decay=True)
    optimizer = build_optimizer(model, OptimConfig(name="muon", muon=muon_cfg), torch.device("cpu"))
    assert isinstance(optimizer, Hybrid)
    muon = optimizer.parts["muon"]
    for group in muon.param_groups:
        assert group["ns_coefficients"] == POLAR_EXPRESS and group["ns_margin"] == POLAR_EXPRESS_MARGIN
        assert group["second_moment_beta2"] == 0.9 and group["cautious_weight_decay"] is True
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    matrix = muon.param_groups[0]["params"][0]
    assert muon.state[matrix]["second_moment"].shape in {(matrix.shape[0], 1), (1, matrix.shape[1])}
    old = muon.state_dict()
    for group in old["param_groups"]:
        for key in ("ns_margin", "second_moment_beta2", "cautious_weight_decay"):
            del group[key]
    plain = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    assert isinstance(plain, Hybrid)
    plain.parts["muon"].load_state_dict(old)
    group = plain.parts["muon"].param_groups[0]
    assert (group["ns_margin"], group["second_moment_beta2"], group["cautious_weight_decay"]) == (0.0, 0.0, False)
    plain.step()  # steps with the settings it took


def test_a_run_with_the_variants_resumes_exactly_and_takes_the_configs_on_a_resume(pydoc_data, tmp_path, capsys):
    """The second moment is state: a checkpoint carries it, and the run goes on with the same losses. As every
    optimizer setting, a variant the resumed run's config changes replaces the saved one, and the run says so."""
    sets = (
        "optim.name=muon",
        'optim.muon.orthogonalisation="polar_express"',
        "optim.muon.second_moment_beta2=0.9",
        "optim.muon.cautious_weight_decay=true",
        "train.log_interval=1",
        "train.max_steps=4",
    )
    run, again = tmp_path / "run", tmp_path / "again"
    assert cli(tiny_args(pydoc_data, run, *sets, "checkpoint.interval=2", flags=["--quiet"])) == 0
    checkpoint = run / "checkpoints" / "step_0000002.pt"
    assert cli(tiny_args(pydoc_data, again, *sets, flags=["--resume", str(checkpoint)])) == 0
    assert train_losses(again) == train_losses(run)[2:]
    assert "optimizer settings replace" not in capsys.readouterr().out  # Polar Express's coefficients included
    switched = [s for s in sets if "second_moment" not in s] + ["optim.muon.second_moment_beta2=0"]
    assert cli(tiny_args(pydoc_data, tmp_path / "off", *switched, flags=["--resume", str(checkpoint)])) == 0
    out = capsys.readouterr().out
    assert "the config's optimizer settings replace the checkpoint's (second_moment_beta2: 0.9 -> 0.0)" in out, out
    assert train_losses(tmp_path / "off") != train_losses(run)[2:]


def train_losses(run: Path) -> list[str]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["loss"]).hex() for line in lines if '"event": "train"' in line]
