"""train.distill (fasttrain/distillation.py): an ensemble's run ends with its members distilled into one model, so
final/ holds one model and ensemble/ the members; killed in either phase, `--resume auto` ends with the same
weights as a run never stopped; under a time budget the plan holds the student's time too."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fasttrain import train as train_module
from fasttrain.config import TrainConfig, load_config
from fasttrain.distillation import ensemble_config
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.export import export
from fasttrain.model.transformer import flops_per_token
from fasttrain.planning import sizing
from fasttrain.planning.members import TEACHER_COST, distill_note, ensemble_members
from fasttrain.planning.speed import Speed
from fasttrain.system.errors import UsageError
from fasttrain.training.trainer import Interrupted, Trainer
from tests.conftest import tiny_args, tiny_config
from tests.test_checkpoint import EXACT

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.toml"  # from any working directory
DISTILLED = [
    "model.members=2",
    "train.distill=true",
    "model.value_embeddings=true",
    "train.max_steps=8",
    "train.sample_tokens=0",
    *EXACT,
]


def train(data, out, *sets: str, flags: tuple[str, ...] = ()) -> None:
    args = tiny_args(data, out, *DISTILLED, *sets, config=str(BASE), flags=["--quiet", *flags])
    assert train_module.main(args) == 0


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_a_distilled_run_leaves_one_model_in_final_and_its_members_in_ensemble(pydoc_data, tmp_path):
    run = tmp_path / "run"
    train(pydoc_data, run)
    student, members = load_trained(run), load_trained(run / "ensemble")
    assert student.cfg.model.members == 1 and members.cfg.model.members == 2
    assert members.cfg.model.value_embeddings and not student.cfg.model.value_embeddings  # so the student exports
    assert (run / "export-hf" / "model.safetensors") in export(run, hf=True)
    assert student.cfg.train.teacher == os.path.abspath(run / "ensemble" / "final")
    assert not student.cfg.train.distill and not members.cfg.train.distill  # each phase an ordinary run
    # base.toml's student starts from the first member (members without value embeddings' tables and gates: a subset)
    assert student.cfg.train.teacher_init and not members.cfg.train.teacher_init
    assert student.cfg.train.max_steps == members.cfg.train.max_steps == 8  # the student reads what a member read
    assert student.cfg.model.n_layers == members.cfg.model.n_layers and student.cfg.model.d_model == 32


def stop_at(monkeypatch, step: int, where=lambda trainer: True) -> None:
    """SIGINT after `step` of a phase's Trainer that `where` picks."""
    original = Trainer.step

    def stepped(self):
        out = original(self)
        if where(self) and self.run.step == step:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", stepped)


@pytest.mark.parametrize("phase", ["members", "student"])
def test_a_distilled_run_killed_in_either_phase_resumes_to_the_same_model(phase, pydoc_data, tmp_path, monkeypatch):
    """Begun with a relative train.out_dir in one directory, resumed with the command it printed from another."""
    train(pydoc_data, tmp_path / "straight")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run = tmp_path / "a" / "run"
    stopped = str(run / "ensemble") if phase == "members" else str(run)
    stop_at(monkeypatch, 5, lambda trainer: os.path.abspath(trainer.cfg.train.out_dir) == stopped)
    with pytest.raises(Interrupted) as stop:
        train(pydoc_data, "run")
    assert f"train.out_dir={run}" in str(stop.value) and "--resume auto" in str(stop.value)  # the whole run's
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path / "b")
    train(pydoc_data, run, flags=("--resume", "auto"))
    assert sorted(os.listdir(tmp_path / "b")) == []
    for name in ("ensemble", "."):
        straight, resumed = weights(tmp_path / "straight" / name), weights(run / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (name, key)


def test_an_overwrite_killed_among_its_members_trains_a_new_student_not_the_earlier_one(
    pydoc_data, tmp_path, monkeypatch
):
    """The earlier distilled run's student (6 steps) stays whole until the new one's student replaces it; a resume
    after the new members does not continue it (which would end 2 steps on from it, not as a run never stopped)."""
    train(pydoc_data, tmp_path / "straight")
    run = tmp_path / "run"
    train(pydoc_data, run, "train.max_steps=6")
    stop_at(monkeypatch, 5, lambda trainer: trainer.cfg.train.out_dir.endswith("ensemble"))
    with pytest.raises(Interrupted):
        train(pydoc_data, run, flags=("--overwrite",))
    assert load_config(run / "config.toml").train.max_steps == 6  # the earlier run, whole meanwhile
    monkeypatch.undo()
    train(pydoc_data, run, flags=("--resume", "auto"))
    straight, resumed = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_a_resume_after_an_ordinary_run_replaced_a_distilled_one_is_an_ordinary_resume(pydoc_data, tmp_path):
    """ensemble/ stays beside a run that --overwrite started over it; a resume of that run is the run's own."""
    run = tmp_path / "run"
    train(pydoc_data, run)
    train(pydoc_data, run, "model.members=1", "train.max_steps=4", flags=("--overwrite",))
    train(pydoc_data, run, "model.members=1", "train.max_steps=6", flags=("--resume", "auto"))
    assert load_trained(run).cfg.train.teacher == "" and load_config(run / "config.toml").train.max_steps == 6


def test_a_time_budget_holds_the_members_and_their_student():
    """One model reaches the epoch limit in 100 s of 600: six models side by side without distillation; with it,
    K members then a student costing 1 + K/2 of one: (6 - 1) / 1.5 = 3.33, so 3, the members for 3 / (3 + 1 + 1.5)
    of the budget, the student for the rest."""
    assert TEACHER_COST == 0.5
    shape = replace(sizing.ladder_shape(load_config("configs/base.toml").model, 2), vocab_size=4096)
    t = TrainConfig(max_time=600.0, max_steps=100, seq_len=256)
    rate = flops_per_token(shape, 256) * 1000.0  # 1,000 tokens/s: 100 steps of 1,000 tokens in 100 s
    speed = Speed(((flops_per_token(shape, 256), rate),))
    assert ensemble_members(shape, t, 1000, speed, 8)[0] == 6
    members, note = ensemble_members(shape, replace(t, distill=True), 1000, speed, 8)
    assert members == 3 and "final/" not in note
    assert ensemble_members(shape, replace(t, distill=True, max_time=250.0), 1000, speed, 8)[0] == 1
    cfg = tiny_config("data", "runs/x", "model.members=3", "train.distill=true", "train.max_time=600")
    assert ensemble_config(cfg).train.max_time == pytest.approx(600 * 3 / 5.5, abs=1e-3)
    assert ensemble_config(cfg).train.out_dir == os.path.abspath(os.path.join("runs/x", "ensemble"))
    note = distill_note(3, cfg.train)
    assert "327 s" in note and "273 s" in note and "final/ holds that one model" in note


def test_the_dry_run_says_the_ensemble_is_distilled_and_a_single_model_is_not(pydoc_data, tmp_path, capsys):
    args = tiny_args(pydoc_data, tmp_path / "run", *DISTILLED, flags=["--dry-run", "--json"])
    assert train_module.main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["members"] == 2 and record["distill"] is True
    assert train_module.main([*args, "model.members=1"]) == 0
    assert json.loads(capsys.readouterr().out)["distill"] is False
    assert not (tmp_path / "run").exists()


def test_a_new_run_over_a_killed_members_run_is_refused_before_anything_and_names_the_resume(
    pydoc_data, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    stop_at(monkeypatch, 5)
    with pytest.raises(Interrupted):
        train(pydoc_data, run)
    monkeypatch.undo()
    monkeypatch.setattr(train_module, "start_run", lambda *a, **k: pytest.fail("planned before the refusal"))
    with pytest.raises(UsageError, match=r"ensemble.*--resume auto"):
        train(pydoc_data, run)
    assert not (run / "checkpoints").exists() and (run / "ensemble" / "checkpoints").is_dir()


def test_a_resume_takes_its_set_items_into_the_phases_but_not_those_that_make_them(
    pydoc_data, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    stop_at(monkeypatch, 5)
    with pytest.raises(Interrupted):
        train(pydoc_data, run)
    monkeypatch.undo()
    sets = [*DISTILLED, "train.log_interval=3", "model.n_layers=1"]
    args = tiny_args(pydoc_data, run, *sets, config=str(BASE), flags=["--resume", "auto"])
    assert train_module.main(args) == 0
    assert "note: distill: model.n_layers=1: a resume keeps what the run's phases recorded" in capsys.readouterr().out
    for phase in (run / "ensemble", run):
        recorded = load_config(phase / "config.toml")
        assert recorded.train.log_interval == 3 and recorded.model.n_layers == 2, phase
