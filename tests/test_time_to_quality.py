"""benchmarks.time_to_quality without training anything: skipped without nanochat, a bad checkout refused in one
line, nanochat's schedule on progress, and its scoring equal to fasttrain's own validation; where NANOCHAT_DIR
names a checkout, one nanochat step driven end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.recipe_sweep import ROOT
from benchmarks.time_to_quality import lr_multiplier, main, muon_momentum, score
from fasttrain.data.prepared_folder import open_prepared
from fasttrain.system.errors import UsageError
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_config


def test_without_nanochat_it_is_skipped_in_one_line_before_preparing_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "nanochat", None)  # not importable: find_spec says None
    assert main(["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "skipped" in lines[0]
    assert "git clone https://github.com/karpathy/nanochat" in lines[0] and "--nanochat" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no corpus prepared, no results written


@pytest.mark.parametrize("by_environment", [False, True])
def test_a_folder_that_is_not_a_checkout_is_refused_in_one_line_naming_it(tmp_path, monkeypatch, by_environment):
    (tmp_path / "nanochat").mkdir()
    (tmp_path / "nanochat" / "gpt.py").write_text("")  # but no optim.py
    monkeypatch.setenv("NANOCHAT_DIR", str(tmp_path) if by_environment else "")
    argv = ["--cache", str(tmp_path / "cache")] + ([] if by_environment else ["--nanochat", str(tmp_path)])
    with pytest.raises(UsageError) as error:
        main(argv)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "nanochat/optim.py" in message
    assert ("NANOCHAT_DIR" if by_environment else "--nanochat") in message
    assert not (tmp_path / "cache").exists()


def test_bad_budgets_are_usage_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanochat", None)
    with pytest.raises(UsageError, match="--budgets 60 0: each must be > 0"):
        main(["--budgets", "60", "0"])


def test_nanochat_schedule_on_progress_has_base_trains_shape():
    # runcpu.sh's 5000 steps: warmup over the first 40 (0.8%, or 40 steps if sooner), warmdown over the last 65%
    # to 5% of the peak
    assert lr_multiplier(0, 0.0) == pytest.approx(1 / 40)  # base_train's first update, before any speed is known
    assert lr_multiplier(1, 0.004) == pytest.approx(0.5) and lr_multiplier(19, 0.001) == pytest.approx(0.5)
    assert lr_multiplier(1, 0.008) == lr_multiplier(40, 0.0) == lr_multiplier(100, 0.35) == 1.0
    assert lr_multiplier(100, 1 - 0.65 / 2) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(100, 1.0) == lr_multiplier(100, 1.2) == pytest.approx(0.05)
    # momentum 0.85 -> 0.97 over the first 400 steps (8%), -> 0.90 over the warmdown
    assert muon_momentum(0.0) == pytest.approx(0.85) and muon_momentum(0.04) == pytest.approx(0.91)
    assert muon_momentum(0.08) == muon_momentum(0.3) == pytest.approx(0.97)
    assert muon_momentum(1.0) == muon_momentum(1.2) == pytest.approx(0.90)


def test_score_is_fasttrains_own_validation(pydoc_data, tmp_path):
    """score() reads the rows fasttrain validates on (the first eval_steps x batch_size of the val split) and
    converts as it does: on fasttrain's own model it gives the trainer's val_bpb."""
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, "train.eval_steps=3"), quiet=True)
    for _ in range(3):
        trainer.step()
    expected = trainer.evaluate()
    assert expected is not None
    got = score(trainer.model, open_prepared(pydoc_data), trainer.cfg)
    assert got["val_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-6)
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    # and the rows are the first ones only: more of them score differently
    more = score(trainer.model, open_prepared(pydoc_data), tiny_config(pydoc_data, tmp_path, "train.eval_steps=6"))
    assert more["val_loss"] != pytest.approx(expected["val_loss"], rel=1e-6)


@pytest.mark.skipif(not os.environ.get("NANOCHAT_DIR"), reason="NANOCHAT_DIR names no nanochat checkout")
def test_one_nanochat_step_is_trained_and_scored(pydoc_data, tmp_path):
    """The worker process as run_nanochat starts it, at depth 1 for one step (a budget shorter than a step)."""
    spec = {"checkout": os.environ["NANOCHAT_DIR"], "data_dir": str(pydoc_data), "depth": 1, "budget": 0.01}
    worker = [sys.executable, "-m", "benchmarks.time_to_quality", "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*worker, "--out", str(tmp_path / "r.json")], check=True, cwd=ROOT, env=env, capture_output=True)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["steps"] == 1 and result["tokens"] == 32 * 512 and result["recipe"]["model_dim"] == 64
    assert 0 < result["val_bpb"] < 20
