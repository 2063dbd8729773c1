"""final/'s output layer scaled to score the validation rows best (checkpoint.fit_temperature, training/calibration.py):
the fit on losses whose best scale is known, and a run's final/ against its own checkpoint and `fasttrain evaluate`."""

import json
import math
from dataclasses import replace

import pytest
import torch

from fasttrain.config import load_config
from fasttrain.evaluate import main as evaluate_main
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.model.ensemble import build_model
from fasttrain.training.calibration import BOUNDS, fit_head_scale, output_weights, vertex
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_config


def test_the_vertex_of_a_parabola_and_none_where_it_has_no_minimum():
    for low in (0.83, 1.0, 1.27):
        points = [(s, 3.0 * (s - low) ** 2 + 0.5) for s in (0.8, 0.9, 1.0)]
        assert vertex(points) == pytest.approx(low, abs=1e-9)
    assert vertex([(0.8, 1.0), (0.9, 1.2), (1.0, 1.0)]) is None  # opens downward
    assert vertex([(0.8, 1.0), (0.9, 0.9), (1.0, 0.8)]) is None  # a line


def losses_of(heads, originals, loss_at):
    """An `evaluate` whose loss is loss_at(the scale the heads now hold), and the scales it was asked at."""
    asked = []

    def evaluate():
        scale = (heads[0] / originals[0]).mean().item()
        for head, original in zip(heads, originals):  # every head holds the same scale of its own weights
            torch.testing.assert_close(head, original * scale)
        asked.append(round(scale, 6))
        return {"val_loss": loss_at(scale), "val_bpb": loss_at(scale) / math.log(2)}

    return evaluate, asked


@pytest.mark.parametrize("low", [0.87, 0.74, 1.12])
def test_a_loss_whose_best_scale_is_known_is_fitted_in_three_evaluations(low):
    heads = [torch.randn(7, 5, dtype=torch.float64) + 3, torch.randn(7, 5, dtype=torch.float64) + 3]
    originals = [h.clone() for h in heads]
    evaluate, asked = losses_of(heads, originals, lambda s: 2.0 + 4.0 * (s - low) ** 2)
    scale, metrics = fit_head_scale(heads, evaluate, "val_loss", {"val_loss": 2.0 + 4.0 * (1 - low) ** 2})
    assert scale == pytest.approx(low, abs=0.005) and len(asked) == 3 and 1.0 not in asked
    assert metrics["val_loss"] == pytest.approx(2.0, abs=1e-4)
    for head, original in zip(heads, originals):  # left at the scale returned
        torch.testing.assert_close(head, original * scale)


def test_a_scale_measured_no_better_than_one_leaves_the_heads_as_they_were():
    heads = [torch.randn(4, 3)]
    originals = [h.clone() for h in heads]
    # best at 1, and lopsided so that the parabola's vertex is not 1 either: measured worse, so not taken
    evaluate, asked = losses_of(heads, originals, lambda s: 1.0 + abs(s - 1) ** 1.5 + (0.3 if s > 1 else 0.0))
    scale, metrics = fit_head_scale(heads, evaluate, "val_loss", {"val_loss": 1.0, "val_bpb": 1.4})
    assert scale == 1.0 and metrics == {"val_loss": 1.0, "val_bpb": 1.4} and len(asked) >= 2
    assert torch.equal(heads[0], originals[0])


def test_the_vertex_tried_stays_within_bounds():
    heads = [torch.ones(2, 2)]
    evaluate, asked = losses_of(heads, [torch.ones(2, 2)], lambda s: (s - 9.0) ** 2)  # far beyond, to the right
    scale, _ = fit_head_scale(heads, evaluate, "val_loss", {"val_loss": 64.0})
    assert max(asked) == BOUNDS[1] and scale == BOUNDS[1]


def test_the_output_weights_of_a_model_an_ensemble_and_a_tied_head(pydoc_data, tmp_path):
    cfg = replace(tiny_config(pydoc_data, tmp_path).model, vocab_size=64, tie_embeddings=False)
    ensemble = build_model(replace(cfg, members=3))
    assert [id(w) for w in output_weights(ensemble)] == [id(m.output.weight) for m in ensemble.members]
    tied = build_model(replace(cfg, tie_embeddings=True))
    assert len(output_weights(tied)) == 1 and output_weights(tied)[0] is tied.embed.weight


@pytest.mark.parametrize("members", [1, 2])
def test_final_holds_the_checkpoints_weights_with_the_scale_the_run_reports(pydoc_data, tmp_path, capsys, members):
    """final/ is the last save's weights but for the output layer (each member's), multiplied by the scale the end
    event records; its loss on the eval rows is the one the run reports for it, no higher than the last evaluation's
    at scale 1, and `fasttrain evaluate` scores final/ as the run's closing line does."""
    run = tmp_path / "run"
    sets = ["train.max_steps=12", "train.eval_interval=12", "checkpoint.fit_temperature=true", "train.final_eval=true"]
    sets += ["train.distill=false"]
    untied = "model.tie_embeddings=false"  # as base.toml's: a tied head's scale is the embedding's too
    summary = Trainer(tiny_config(pydoc_data, run, f"model.members={members}", untied, *sets)).train()
    end = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    scale = end["weights_scale"]
    assert end["event"] == "end" and summary["weights_scale"] == scale and end["weights_step"] == end["step"] == 12
    assert end["weights_val_loss"] <= end["val_loss"]  # the last evaluation is the one at scale 1
    assert (scale == 1.0) == (end["weights_val_loss"] == end["val_loss"])
    final = load_trained(run).model.state_dict()
    saved = load_trained(run / "checkpoints" / "step_0000012.pt").model.state_dict()
    heads = [k for k in final if k.endswith("output.weight")]
    assert len(heads) == members and final.keys() == saved.keys()
    for name, weight in final.items():
        expected = saved[name] * scale if name in heads else saved[name]
        torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    out = capsys.readouterr().out
    if scale != 1.0:
        assert f"the output layer x {scale:g}, fitted on the eval rows" in out
    evaluate_main([str(run), "--split", "val"])
    assert f"{end['final_val_bpb']:.4f}" in capsys.readouterr().out
    assert load_config(run / "config.toml").checkpoint.fit_temperature
