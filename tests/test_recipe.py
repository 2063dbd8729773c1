"""Issue 63, the recipe's components: learning rates of their own for the token embedding and an untied head
(the optimizer, the schedule, a checkpoint round trip and a refused resume), and the logits' soft-cap (its
formula, the fused loss it turns off, a run, a refused resume and export). test_model.py trains each model
option, checks its KV cache against the full forward and its activation checkpointing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fasttrain_kernels._backend
from fasttrain.compute.device import kernels_on
from fasttrain.config import OptimConfig
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import HEAD_LR_POWER, Updater, head_rate, untied_head_rate
from fasttrain.system.errors import UsageError, run_cli
from tests.conftest import tiny_args, tiny_config
from tests.test_sizing import cli

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["adamw", "muon", "sgd"])
def test_the_embedding_and_an_untied_head_step_at_their_own_rates(pydoc_data, tmp_path, name):
    sets = ("model.vocab_size=512", "model.tie_embeddings=false", "model.value_embeddings=true")
    model = Transformer(tiny_config(pydoc_data, tmp_path, *sets).model)
    cfg = OptimConfig(name=name, lr=1e-3, embedding_lr=0.2, head_lr=0.004)
    updater = Updater(model, cfg, CPU, "fp32")
    rate = {id(p): g["lr"] for g in updater.optimizer.param_groups for p in g["params"]}
    assert rate[id(model.embed.weight)] == 0.2 and rate[id(model.output.weight)] == 0.004
    assert model.value_embeds and all(rate[id(table.weight)] == 0.2 for table in model.value_embeds.values())
    assert rate[id(model.norm.weight)] == 1e-3
    listed = [id(p) for g in updater.optimizer.param_groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    decay = {id(p): g["weight_decay"] for g in updater.optimizer.param_groups for p in g["params"]}
    assert decay[id(model.output.weight)] == cfg.weight_decay and decay[id(model.embed.weight)] == 0.0
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    updater.apply(5e-4)  # the schedule's rate for optim.lr: every group scaled alike
    after = {id(p): g["lr"] for g in updater.optimizer.param_groups for p in g["params"]}
    assert after[id(model.embed.weight)] == pytest.approx(0.1) and after[id(model.output.weight)] == pytest.approx(
        0.002
    )


def test_the_heads_rate_falls_with_the_width_from_head_lr_width(pydoc_data, tmp_path):
    """optim.head_lr_width: head_lr at that width, (head_lr_width / width) ** HEAD_LR_POWER times it at another within
    the widths measured (base.toml's 0.004 at 192: ~0.008 at 128, ~0.0025 at 256, the best rates measured there), the
    nearest one's beyond; 0: head_lr at every width."""
    cfg = OptimConfig(name="muon", lr=1e-3, embedding_lr=0.05, head_lr=0.004, head_lr_width=192)
    assert head_rate(cfg, 192) == 0.004
    assert head_rate(cfg, 128) == pytest.approx(0.004 * 1.5**HEAD_LR_POWER) and 0.0075 < head_rate(cfg, 128) < 0.0085
    assert 0.0023 < head_rate(cfg, 256) < 0.0027 and head_rate(cfg, 160) == pytest.approx(0.004 * 1.2**HEAD_LR_POWER)
    # Beyond the widths measured, the nearest one's rate
    assert head_rate(cfg, 64) == head_rate(cfg, 128) and head_rate(cfg, 768) == head_rate(cfg, 256)
    assert head_rate(replace(cfg, head_lr_width=0), 128) == 0.004
    sets = ("model.vocab_size=512", "model.tie_embeddings=false", "model.d_model=128", "model.n_heads=2")
    shape = tiny_config(pydoc_data, tmp_path, *sets).model
    model = Transformer(shape)
    rate = {id(p): g["lr"] for g in Updater(model, cfg, CPU, "fp32").optimizer.param_groups for p in g["params"]}
    assert rate[id(model.output.weight)] == head_rate(cfg, 128) and rate[id(model.embed.weight)] == 0.05
    assert untied_head_rate(cfg, shape) == head_rate(cfg, 128)  # what the plan says is what the optimizer does
    tied = replace(shape, tie_embeddings=True)
    model = Transformer(tied)
    rate = {id(p): g["lr"] for g in Updater(model, cfg, CPU, "fp32").optimizer.param_groups for p in g["params"]}
    assert model.output.weight is model.embed.weight and rate[id(model.output.weight)] == 0.05
    assert untied_head_rate(cfg, tied) == 0.0


def test_the_plan_says_the_rates_of_their_own(pydoc_data, tmp_path, capsys):
    """The dry run's schedule line gives the tables' and the untied head's rates, the head's at the model's width."""
    sets = ("model.tie_embeddings=false", "model.d_model=128", "model.n_heads=2", "optim.head_lr_width=192")
    assert cli(tiny_args(pydoc_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("schedule:"))
    assert f"the tables 0.05, the head {0.004 * 1.5**HEAD_LR_POWER:.3g}," in line, line
    assert cli(tiny_args(pydoc_data, tmp_path / "tied", "model.tie_embeddings=true", flags=["--dry-run"])) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("schedule:"))
    assert "the head" not in line and "the tables 0.05" in line, line


def test_without_rates_of_their_own_the_groups_are_as_before(pydoc_data, tmp_path):
    model = Transformer(tiny_config(pydoc_data, tmp_path, "model.vocab_size=512").model)
    assert len(Updater(model, OptimConfig(), CPU, "fp32").optimizer.param_groups) == 2


def test_a_head_rate_for_a_tied_head_is_a_note(pydoc_data, tmp_path, capsys):
    """base.toml sets optim.head_lr; a run that ties the head trains, and its plan says the key does nothing."""
    sets = ("model.tie_embeddings=true", "optim.head_lr=0.01")
    assert cli(tiny_args(pydoc_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "optim.head_lr = 0.01 is an untied head's rate: this head is tied" in out, out
    assert cli(tiny_args(pydoc_data, tmp_path / "untied", flags=["--dry-run"])) == 0
    assert "untied head's rate" not in capsys.readouterr().out


def test_rates_of_their_own_resume_exactly_and_are_not_switched_on_a_resume(pydoc_data, tmp_path, capsys):
    sets = ("model.tie_embeddings=false", "optim.embedding_lr=0.05", "optim.head_lr=0.004", "train.log_interval=1")
    run = tmp_path / "run"
    assert cli(tiny_args(pydoc_data, run, *sets, "train.max_steps=4", "checkpoint.interval=2", flags=["--quiet"])) == 0
    through = (run / "metrics.jsonl").read_text()
    again = tmp_path / "again"
    checkpoint = run / "checkpoints" / "step_0000002.pt"
    assert (
        cli(tiny_args(pydoc_data, again, *sets, "train.max_steps=4", flags=["--quiet", "--resume", str(checkpoint)]))
        == 0
    )
    losses = [line for line in through.splitlines() if '"event": "train"' in line]
    resumed = [line for line in (again / "metrics.jsonl").read_text().splitlines() if '"event": "train"' in line]
    assert [_loss(x) for x in resumed] == [_loss(x) for x in losses[2:]]
    capsys.readouterr()
    off = [s for s in sets if not s.startswith("optim.embedding_lr")] + ["optim.embedding_lr=0"]  # base.toml's 0.05
    args = tiny_args(pydoc_data, tmp_path / "off", *off, "train.max_steps=4", flags=["--resume", str(checkpoint)])
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "saved by a run with optim.embedding_lr = 0.05, this one has 0" in err, err


def _loss(line: str) -> str:
    import json

    return float(json.loads(line)["loss"]).hex()


def test_a_rate_must_not_be_negative(pydoc_data, tmp_path):
    with pytest.raises(UsageError, match=r"optim.embedding_lr: must be >= 0"):
        tiny_config(pydoc_data, tmp_path, "optim.embedding_lr=-1")


# model.logit_softcap: cap x tanh(logits / cap)


def test_the_softcap_is_its_formula_and_bounds_the_logits(pydoc_data, tmp_path):
    cfg = tiny_config(pydoc_data, tmp_path, "model.vocab_size=512", "model.logit_softcap=2").model
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    with torch.no_grad():
        model.output.weight.mul_(500)  # raw logits far beyond the cap
    tokens = torch.randint(0, 512, (2, 9))
    hidden = model.hidden(tokens)
    raw = hidden @ model.output.weight.T
    capped = model(tokens)
    torch.testing.assert_close(capped, 2 * torch.tanh(raw / 2), rtol=1e-12, atol=1e-12)
    assert raw.abs().max() > 10 and capped.abs().max() <= 2
    off = Transformer(replace(cfg, logit_softcap=0.0)).double()
    off.load_state_dict(model.state_dict())
    torch.testing.assert_close(off(tokens), raw)


def test_the_softcap_turns_the_fused_loss_off_and_refuses_it_on(pydoc_data, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(pydoc_data, tmp_path, "model.logit_softcap=15")
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)  # "auto" as a CPU run resolves it
    assert kernels_on(cfg.kernels, CPU, softcap=15.0).names() == []
    assert kernels_on(cfg.kernels, CPU).names() == ["linear_cross_entropy"]
    sets = ["model.logit_softcap=15", "kernels.linear_cross_entropy=true"]
    assert cli(tiny_args(pydoc_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 2
    err = capsys.readouterr().err.strip()
    assert "kernels.linear_cross_entropy = true does not work with model.logit_softcap = 15" in err, err
    assert cli(tiny_args(pydoc_data, tmp_path / "run", "model.logit_softcap=-1", flags=["--dry-run"])) == 2
    assert "model.logit_softcap: must be >= 0" in capsys.readouterr().err


def test_a_softcapped_run_trains_resumes_and_is_refused_as_a_llama(pydoc_data, tmp_path, capsys):
    from fasttrain.export import main as export_main

    run = tmp_path / "run"
    sets = ("model.logit_softcap=15", "train.max_steps=4", "checkpoint.interval=2")
    assert cli(tiny_args(pydoc_data, run, *sets, flags=["--quiet"])) == 0
    checkpoint = run / "checkpoints" / "step_0000002.pt"
    args = tiny_args(pydoc_data, tmp_path / "off", "train.max_steps=4", flags=["--resume", str(checkpoint)])
    assert cli(args) == 2  # the cap switched off on a resume: another model
    assert "model.logit_softcap = 15.0 there, 0.0 here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        run_cli(export_main, [str(run), "--hf", "--out", str(tmp_path / "hf")])
    assert exited.value.code == 2
    assert "cannot express model.logit_softcap = 15" in capsys.readouterr().err
