"""model.members (fasttrain/model/ensemble.py): models of one shape trained side by side, each as it would train
alone, scored as the mean of their probabilities; chosen by the plan where a small corpus's epoch limit stops one
model long before its budget ends, and not where the corpus is read once; kept by a resume, stated by the dry run,
written and loaded back by export, refused where it cannot work."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from fasttrain.compute.distributed import World
from fasttrain.config import Config, ModelConfig, load_config
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.model.ensemble import Ensemble, build_model, transformers
from fasttrain.model.generation import stream
from fasttrain.model.transformer import flops_per_token
from fasttrain.model.weights import export_weights, load_exported
from fasttrain.optimization.objective import NextTokenLoss
from fasttrain.planning.members import ensemble_members
from fasttrain.planning.plan import plan_run
from fasttrain.planning.sizing import run_tokens
from fasttrain.system.errors import UsageError
from fasttrain.train import main as train_main
from tests.conftest import tiny_args, tiny_config
from tests.test_repeats import RULE
from tests.test_sizing_bounds import DAYS, SLOW

CPU = torch.device("cpu")


def ensemble(members: int = 3, **options) -> Ensemble:
    cfg = ModelConfig(vocab_size=67, max_seq_len=24, d_model=32, n_layers=3, n_heads=2, members=members, **options)
    model = build_model(cfg)
    assert isinstance(model, Ensemble)
    return model


@pytest.mark.parametrize("options", [{}, {"value_embeddings": True, "smear": True, "tie_embeddings": False}])
def test_an_ensemble_predicts_the_mean_of_its_members_probabilities(options):
    torch.manual_seed(0)
    model = ensemble(**options).double()
    tokens = torch.randint(0, 67, (3, 11))
    mean = torch.stack([m(tokens).softmax(-1) for m in transformers(model)]).mean(0)
    assert torch.allclose(model(tokens).exp(), mean, rtol=1e-12, atol=1e-14)
    assert model.num_params() == 3 * transformers(model)[0].num_params()
    weights = [m.embed.weight for m in transformers(model)]
    assert not torch.equal(weights[0], weights[1])  # each member from an initialization of its own


def test_each_member_trains_on_its_own_loss_and_evaluation_scores_the_ensemble():
    """A member's gradient from the ensemble's training loss is what it gets alone, over the number of members (a
    scale Muon and Adam do not see); in eval mode the loss is the ensemble's, whose mean probability it scores."""
    torch.manual_seed(1)
    model = ensemble(members=2).double()
    tokens, targets = torch.randint(0, 67, (2, 13)), torch.randint(0, 67, (2, 13))
    targets[0, :3] = -100  # pads count for nothing
    sums = NextTokenLoss(model)(tokens, targets)
    sums.loss.backward()
    together = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = [NextTokenLoss(m)(tokens, targets) for m in transformers(model)]
    sum(s.loss for s in alone).backward()
    for a, b in zip(together, (p.grad for p in model.parameters())):
        assert torch.allclose(a * 2, b, rtol=1e-10, atol=1e-14)
    assert torch.isclose(sums.loss, (alone[0].loss + alone[1].loss) / 2) and sums.counted == 26 - 3
    model.eval()
    scored = NextTokenLoss(model)(tokens, targets).loss
    log_probs = model(tokens).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.isclose(scored, -log_probs[targets != -100].sum())
    assert scored < sums.loss  # the mean of two models' probabilities beats their mean loss (Jensen)


def test_generation_through_the_members_caches_matches_running_the_context_again():
    torch.manual_seed(2)
    model = ensemble(smear=True).eval()
    prompt = torch.randint(0, 67, (2, 5))
    cached = torch.cat(list(stream(model, prompt, 15, temperature=0)), dim=1)
    again = torch.cat(list(stream(model, prompt, 15, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(cached, again)


def test_members_are_chosen_where_the_epoch_limit_stops_one_model_early(code_data, tmp_path):
    """Three days at a slow speed read a small corpus to its limit many times over: the most members; 20 seconds
    never reach the limit, and a run of steps or of a set shape trains one model, as model.members = 1 keeps."""

    def plan(*sets):
        return plan_run(
            tiny_config(code_data, tmp_path, *DAYS, *RULE, "model.members=0", *sets), World(), CPU, speed=SLOW
        )

    days = plan()
    assert days.cfg.model.members == 8 and days.params == 8 * plan("model.members=1").params
    assert any(n.startswith("model.members = 8: one model reaches the epoch limit in about ") for n in days.notes)
    assert plan("train.max_time=20").cfg.model.members == 1
    assert plan("model.n_layers=2", "train.max_time=0", "train.max_steps=50").cfg.model.members == 1
    assert plan("model.members=3").cfg.model.members == 3
    one, t = replace(days.cfg.model, members=1), days.cfg.train
    seconds = t.max_steps * days.tokens_per_step / SLOW.tokens_per_s(flops_per_token(one, t.seq_len))
    # budgets in one model's runs to the limit, rounded: 1.9 trains two (1 would leave 47% of the budget unused)
    for budget, most, members in ((2.4, 8, 2), (1.9, 8, 2), (1.4, 8, 1), (2.6, 8, 3), (20, 3, 3)):
        chosen = ensemble_members(one, replace(t, max_time=budget * seconds), days.tokens_per_step, SLOW, most)[0]
        assert chosen == members  # the last as many as memory holds
    # a time budget's tokens are each member's: the members share the machine's speed (timed on one model)
    whole = replace(t, max_steps=0)
    each = run_tokens(whole, days.cfg.model, days.tokens_per_step, SLOW)
    assert each == pytest.approx(run_tokens(whole, one, days.tokens_per_step, SLOW) / 8)


def test_the_dry_run_states_an_ensemble_and_its_final_weights_export_and_load_back(pydoc_data, tmp_path, capsys):
    sets = ["model.members=2", "train.max_steps=4", "train.eval_interval=2", "train.sample_tokens=0"]
    assert train_main(tiny_args(pydoc_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 0
    assert "parameters (2 models of 2 layers, d_model 32" in (out := capsys.readouterr().out), out
    assert train_main(tiny_args(pydoc_data, tmp_path / "run", *sets)) == 0
    # resumed with the shape set and model.members = 0 (base.toml's): the two members it recorded, not one
    longer = [*sets[1:], "model.members=0", "train.max_steps=6"]
    assert train_main(tiny_args(pydoc_data, tmp_path / "run", *longer, flags=["--resume", "auto"])) == 0
    trained = load_trained(tmp_path / "run").model
    assert isinstance(trained, Ensemble) and trained.cfg.members == 2
    exported = load_exported(tmp_path / "run" / "final")
    tokens = torch.randint(0, 512, (1, 9))
    assert torch.equal(exported(tokens), trained(tokens))
    with pytest.raises(UsageError, match=r"cannot express model.members = 2, an ensemble \(set model.members = 1\)"):
        export_weights(trained.state_dict(), load_trained(tmp_path / "run").cfg, tmp_path / "hf", hf=True)


def test_a_tied_ensemble_is_written_once_per_member_and_loads_back(tmp_path):
    torch.manual_seed(3)
    model = ensemble(members=2, tie_embeddings=True)
    cfg = replace(Config(), model=model.cfg, train=replace(Config().train, seq_len=16))
    export_weights(model.state_dict(), cfg, tmp_path / "out")
    loaded = load_exported(tmp_path / "out")
    assert isinstance(loaded, Ensemble) and all(m.output.weight is m.embed.weight for m in transformers(loaded))
    tokens = torch.randint(0, 67, (2, 7))
    assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.members=-1"], "--set: model.members: must be >= 0, got -1"),
        (['model.init_from="somewhere"', "model.members=2"], "model.members = 2 does not go with model.init_from"),
    ],
)
def test_members_out_of_range_or_with_a_model_to_start_from_are_refused(sets, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(None, sets)
