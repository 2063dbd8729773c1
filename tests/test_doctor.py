"""The loss doctor: a healthy run passes every check; each planted fault fails the checks that should catch it."""

from __future__ import annotations

import pytest
import torch

from fasttrain import Trainer, train
from fasttrain.doctor import main
from fasttrain.system.errors import run_cli
from fasttrain.training.diagnosis import diagnose, report
from tests.conftest import tiny_args, tiny_config
from tests.test_reliability_start import edit_tensor, init_from

CHECKS = ["data", "targets", "init loss", "gradients", "grad norm", "lr", "update", "overfit"]


def doctor(pydoc_data, tmp_path, plant=None) -> dict[str, object]:
    """Diagnose a tiny run after `plant(trainer)` has broken it; returns {check name: Check}."""
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, "optim.lr=1e-2"), quiet=True)
    if plant:
        plant(trainer)
    checks = diagnose(trainer, overfit_steps=150)
    assert [c.name for c in checks] == CHECKS
    assert not any(tmp_path.iterdir())  # the doctor writes nothing into the run directory
    return {c.name: c for c in checks}


def failed(checks: dict) -> list[str]:
    return [name for name, c in checks.items() if c.passed is False]


def test_a_healthy_run_passes_everything(pydoc_data, tmp_path):
    checks = doctor(pydoc_data, tmp_path)
    assert failed(checks) == []
    assert "memorised" in checks["overfit"].detail


def test_a_frozen_parameter(pydoc_data, tmp_path):
    checks = doctor(pydoc_data, tmp_path, lambda t: t.model.blocks[1].mlp.down.weight.requires_grad_(False))
    assert failed(checks) == ["gradients", "update"]
    assert "blocks.1.mlp.down.weight frozen" in checks["gradients"].detail
    assert "blocks.1.mlp.down.weight" in checks["update"].detail and "requires_grad" in checks["gradients"].hint


def test_a_zero_learning_rate(pydoc_data, tmp_path):
    def zero_lr(trainer):
        trainer.lr = lambda: 0.0  # as a broken schedule would give

    checks = doctor(pydoc_data, tmp_path, zero_lr)
    assert failed(checks) == ["lr", "update"]
    assert "first update 0" in checks["lr"].detail
    assert checks["update"].detail.startswith("14 of 14 parameters unchanged")


def test_shuffled_targets(pydoc_data, tmp_path):
    def shuffle_targets(trainer):
        x, y = next(trainer.train_loader)
        trainer.train_loader = iter([(x, y[:, torch.randperm(y.shape[1])])])

    checks = doctor(pydoc_data, tmp_path, shuffle_targets)
    assert "targets" in failed(checks)
    assert "next input token" in checks["targets"].hint


def test_out_of_vocabulary_ids_stop_before_the_model_runs(pydoc_data, tmp_path):
    def corrupt(trainer):
        x, y = next(trainer.train_loader)
        x[0, 0] = 600  # past the 512-token vocabulary: an embedding lookup would crash
        trainer.train_loader = iter([(x, y)])

    checks = doctor(pydoc_data, tmp_path, corrupt)
    assert failed(checks) == ["data"]
    assert "..600, vocabulary 512" in checks["data"].detail
    assert [c.passed for c in checks.values()][2:] == [None] * 6
    assert "SKIP" in report(list(checks.values()))


def test_logits_too_large_at_init(pydoc_data, tmp_path):
    checks = doctor(pydoc_data, tmp_path, lambda t: t.model.embed.weight.data.mul_(100))
    assert "init loss" in failed(checks)
    assert "too large at init" in checks["init loss"].hint


def test_the_command_exits_1_on_a_failure_and_0_when_healthy(pydoc_data, tmp_path, capsys):
    args = tiny_args(pydoc_data, tmp_path, "optim.lr=1e-2")
    with pytest.raises(SystemExit) as healthy:
        run_cli(main, args + ["--overfit-steps", "150"])
    out = capsys.readouterr().out
    assert healthy.value.code == 0, out
    assert out.count("PASS") == 8 and "8 of 8 checks passed" in out
    with pytest.raises(SystemExit) as hopeless:
        run_cli(main, args + ["--overfit-steps", "2"])
    out = capsys.readouterr().out
    assert hopeless.value.code == 1
    assert "FAIL  overfit" in out and "look at: a model that cannot memorise" in out and "7 of 8 checks passed" in out


def test_the_doctor_checks_the_weights_model_init_from_starts_from(pydoc_data, tmp_path, capsys):
    """The doctor checked a random model whatever model.init_from named, so imported weights that break
    training passed. Here the source's logits are 100 times too large: its init loss fails, as training
    from it would."""
    quick = ["train.max_steps=2", "schedule.warmup_steps=1", "train.sample_tokens=0", "model.tie_embeddings=true"]
    with pytest.raises(SystemExit) as trained:
        run_cli(train.main, tiny_args(pydoc_data, tmp_path / "run", *quick))
    assert trained.value.code == 0
    source = init_from(tmp_path / "run", tmp_path, edit_tensor("model.embed_tokens.weight", lambda t: t * 100))
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_cli(main, tiny_args(pydoc_data, tmp_path / "new", *quick, source) + ["--overfit-steps", "2"])
    out = capsys.readouterr().out
    assert done.value.code == 1
    assert "FAIL  init loss" in out and "worse than a uniform guess from model.init_from's weights" in out
    assert not (tmp_path / "new").exists()


def test_the_doctors_header_gives_the_context_chosen(pydoc_data, tmp_path, capsys):
    """With train.seq_len = 0 (base.toml's: chosen at the start) the header said "batch 4 x 0"."""
    with pytest.raises(SystemExit):
        run_cli(
            main, tiny_args(pydoc_data, tmp_path, "train.seq_len=0", "model.max_seq_len=512") + ["--overfit-steps", "2"]
        )
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("doctor: configs/base.toml: ") and ", batch 4 x 256 from " in header, header
