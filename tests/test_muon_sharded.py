"""Muon under FSDP and HSDP: sharded matrices take the step that whole ones take in one process.

The ranks are real processes under `torchrun --standalone` (gloo on the CPU), which picks its own free
port: this module is also their program (`-m tests.test_muon_sharded`), so the workers and the
single-process reference build the same model and feed it the same gradients. The ranks wait on each
other at most FASTTRAIN_DIST_TIMEOUT=60 s, and the job runs at most 300 s (test_distributed's torchrun).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from fasttrain.compute import distributed
from fasttrain.config import ModelConfig, MuonConfig, OptimConfig
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import Hybrid, build_optimizer
from tests.test_distributed import torchrun

pytestmark = pytest.mark.subprocess  # the tests start torchrun
CPU = torch.device("cpu")
STEPS = 3


def tiny_model() -> Transformer:
    """Two blocks whose MLP is 33 wide: the up projection's 33 rows split unevenly (17 + 16) over 2 ranks, and no
    matrix is square, so a rate adjusted by a shard's shape instead of the matrix's would show."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, mlp="relu2", ffn_hidden=33)
    return Transformer(cfg)


def take_steps(model: torch.nn.Module) -> Hybrid:
    """STEPS steps of Muon (with AdamW for the rest; nanochat's variants on, as their per-neuron means and
    whole-matrix norms are what a shard could get wrong) on gradients drawn from each step and parameter's own
    seed, whole in one process, each rank's shard of them under FSDP; returns the optimizer."""
    variants = MuonConfig(orthogonalisation="polar_express", second_moment_beta2=0.9, cautious_weight_decay=True)
    optimizer = build_optimizer(model, OptimConfig(name="muon", muon=variants), CPU)
    assert isinstance(optimizer, Hybrid)
    for step in range(STEPS):
        for i, p in enumerate(model.parameters()):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))  # the whole shape
            p.grad = (
                distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(p, DTensor)
                else grad
            )
        optimizer.step()
    return optimizer


def worker(parallel: str, group: int, out: str) -> None:
    """One rank: shard the model (`parallel` over groups of `group` ranks) and take the steps; then save the whole
    weights as this rank sees them, and whether each of Muon's momentum buffers is sharded as its matrix is, in
    `out`/rank_R.pt. The model and its optimizer live in `save_steps` only, so they are freed before the rank
    leaves the process group (distributed.stop)."""
    world = distributed.world_from_env()
    distributed.start(world, CPU)
    try:
        save_steps(parallel, group, f"{out}/rank_{world.rank}.pt", world)
    finally:
        distributed.stop()


def save_steps(parallel: str, group: int, path: str, world: distributed.World) -> None:
    """The steps of one rank of `world`, its weights and placements saved in `path` (worker's)."""
    model = tiny_model()
    model = distributed.wrap(model, model.blocks, world, parallel, group, "fp32", CPU)
    optimizer = take_steps(model)
    weights = {name: p.full_tensor() for name, p in model.named_parameters()}
    muon = optimizer.parts["muon"]
    placed = [
        isinstance(p, DTensor)
        and muon.state[p]["momentum_buffer"].placements == p.placements
        and isinstance(muon.state[p]["second_moment"], DTensor)
        for group in muon.param_groups
        for p in group["params"]
    ]
    torch.save({"weights": weights, "momentum_placed": placed}, path)


@pytest.mark.parametrize(
    "nproc, parallel, group",
    [
        (2, "fsdp", 2),  # 11 s on the 2 cores
        # 4 processes, 2 replicas of 2 shards: 22 s on the 2 cores, 36-41 s when they are shared
        pytest.param(4, "hsdp", 2, marks=pytest.mark.second_tier),
    ],
)
def test_sharded_muon_steps_as_one_process(tmp_path, nproc, parallel, group):
    """Three steps of Muon on shards (the up projection's uneven ones included) move every weight as one
    process moves the whole model, up to fp32 rounding, on every rank (HSDP's replicas alike), and Muon's
    state stays sharded as the parameters are."""
    proc = torchrun([parallel, str(group), str(tmp_path)], nproc=nproc, module="tests.test_muon_sharded")
    assert proc.returncode == 0, proc.stderr
    model = tiny_model()
    take_steps(model)
    theirs = dict(model.named_parameters())
    for rank in range(nproc):
        sharded = torch.load(tmp_path / f"rank_{rank}.pt")
        assert sharded["momentum_placed"] == [True] * 2 * 4  # 4 matrices a block
        assert sharded["weights"].keys() == theirs.keys()
        for name, ours in sharded["weights"].items():
            torch.testing.assert_close(
                ours, theirs[name].detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank}, {name}: {m}"
            )


if __name__ == "__main__":  # a rank of the test above, under torchrun
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
