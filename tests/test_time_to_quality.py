"""benchmarks.studies.time_to_quality without training anything: skipped without nanochat, a bad checkout refused in one
line, nanochat's schedule on progress and on its own updates, its batch and rates, the equal-token step counts,
and the scoring: the whole val split, the same targets and bytes at each side's context, equal to fasttrain's
own validation; where NANOCHAT_DIR names a checkout, one nanochat step driven end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.studies import time_to_quality
from benchmarks.studies.common import ROOT
from benchmarks.studies.time_to_quality import (
    base_train_batch,
    equal_token_steps,
    lr_multiplier,
    main,
    muon_momentum,
    nanochat_batch,
    nanochat_rates,
    run_fasttrain,
    score,
    summarize,
    whole_split,
    whole_split_steps,
)
from fasttrain.data.documents import IGNORE_INDEX
from fasttrain.formats.prepared_folder import open_prepared
from fasttrain.formats.shards import find_shards
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


def test_a_study_stopped_part_way_keeps_every_run_it_finished(pydoc_data, tmp_path, monkeypatch):
    """The results file was written once, at the study's end: a 30-minute study stopped before its last depth kept
    nothing but what it had printed. Each run's result is in the file as soon as the run ends."""

    class Checkout:
        def describe(self) -> dict:
            return {"folder": "nanochat"}

    def result(system: str, case: str, budget: float) -> dict:
        return {"system": system, "case": case, "budget_seconds": budget, "target_tokens": None, "val_bpb": 1.5}

    def nanochat(nanochat, data, depth, budget, *rest):
        if depth == 3:
            raise KeyboardInterrupt  # stopped while depth 3 trains
        return result("nanochat", f"depth {depth}", budget)

    monkeypatch.setattr(time_to_quality, "find_nanochat", lambda given, named_by: Checkout())
    monkeypatch.setattr(time_to_quality, "prepared", lambda corpus, cache: pydoc_data)
    monkeypatch.setattr(
        time_to_quality, "run_fasttrain", lambda sets, data, budget, *rest: result("fasttrain", "base", budget)
    )
    monkeypatch.setattr(time_to_quality, "run_nanochat", nanochat)
    out = tmp_path / "study.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--budgets", "60", "--nanochat-depths", "2", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert [(r["system"], r["case"]) for r in record["results"]] == [("fasttrain", "base"), ("nanochat", "depth 2")]
    assert len(record["summary"]) == 2 and record["mode"] == "budget" and record["validation"]["bytes"] > 0


def test_bad_budgets_are_usage_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanochat", None)
    with pytest.raises(UsageError, match="--budgets 60 0: each must be > 0"):
        main(["--budgets", "60", "0"])
    with pytest.raises(UsageError, match="--tokens 0: each must be > 0"):
        main(["--tokens", "0"])
    with pytest.raises(UsageError, match="not allowed with argument"):  # a run is of time or of tokens
        main(["--budgets", "60", "--tokens", "100000"])


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


@pytest.mark.parametrize("updates", [100, 1000])
def test_nanochat_schedule_over_its_own_updates_is_base_trains(updates):
    """Under --tokens: horizon = the run's updates, progress = step / updates, as scripts/base_train.py's
    get_lr_multiplier and get_muon_momentum over num_iterations (written out here from base_train)."""
    warmdown = 0.65 * updates  # base_train rounds it; 100 and 1000 need no rounding

    def base_train_lr(it: int) -> float:
        if it < 40:
            return (it + 1) / 40
        if it <= updates - warmdown:
            return 1.0
        left = (updates - it) / warmdown
        return left + (1 - left) * 0.05

    def base_train_momentum(it: int) -> float:
        if it < 400:
            return (1 - it / 400) * 0.85 + it / 400 * 0.97
        if it >= updates - warmdown:
            frac = (it - (updates - warmdown)) / warmdown
            return 0.97 * (1 - frac) + 0.90 * frac
        return 0.97

    for step in range(updates):
        assert lr_multiplier(step, step / updates, updates) == pytest.approx(base_train_lr(step)), step
        assert muon_momentum(step / updates, updates) == pytest.approx(base_train_momentum(step)), step


def test_nanochat_batch_is_16k_where_that_leaves_200_updates_else_the_largest_power_of_two_that_does():
    assert nanochat_batch(16_384 * 200) == 16_384  # runcpu.sh's batch: exactly 200 updates
    assert nanochat_batch(10_000 * 3600) == 16_384  # never more than runcpu.sh's
    assert nanochat_batch(16_384 * 200 - 1) == 8192
    assert nanochat_batch(10_000 * 60) == 2048  # 600K tokens: 292 updates of 2048, 146 of 4096
    assert nanochat_batch(200_000) == 512  # 390 updates of one 512-token row
    assert nanochat_batch(1_000) == 512  # one row at least: fewer than 200 updates then
    for tokens in (3e5, 1e6, 2.5e6, 1e7):
        batch = nanochat_batch(tokens)
        assert math.log2(batch).is_integer() and tokens / batch >= 200 and (batch == 16_384 or tokens / batch < 400)


def test_nanochat_rates_scale_with_the_batch_as_base_train_scales_them():
    at_reference = nanochat_rates(2**19, 1.0)  # base_train's reference batch and depth: its defaults
    assert at_reference == pytest.approx(
        {"unembedding_lr": 0.008, "embedding_lr": 0.3, "scalar_lr": 0.5, "matrix_lr": 0.02, "weight_decay": 0.28}
    )
    quarter = nanochat_rates(2**17, 3.0)  # a quarter of the batch: every rate halved; D_ref / D = 3 on the decay
    assert quarter["matrix_lr"] == pytest.approx(0.01) and quarter["embedding_lr"] == pytest.approx(0.15)
    assert quarter["weight_decay"] == pytest.approx(0.28 * 0.5 * 3)


def test_base_trains_batch_grows_as_the_compute_optimal_tokens_to_the_0_383():
    assert base_train_batch(1.0) == 2**19  # its reference model: B_REF
    assert base_train_batch(4.0) == 2**18  # a quarter of D_REF: 2^19 x 4^-0.383 = 2^18.23, rounded
    assert base_train_batch(1 / 16) == 2**21  # 16 x D_REF: 2^19 x 16^0.383 = 2^20.53


def test_equal_token_runs_train_both_sides_on_about_n_tokens(pydoc_data, tmp_path, monkeypatch):
    n = 2**20
    assert equal_token_steps(n, 16 * 256) == 256  # fasttrain's 16 x 256 a step
    assert equal_token_steps(n, nanochat_batch(n)) == 256 and nanochat_batch(n) == 4096  # nanochat's 8 x 512
    assert equal_token_steps(200_000, 4096) == 49 and equal_token_steps(100, 4096) == 1
    # fasttrain's run: train.max_steps from the tokens and its batch, no clock, compiled as train.compile says,
    # validated on the whole split (at the config's own interval too); the seed is a --set of its own
    seen = {}

    def train_sets(sets, data, budget, threads, out_dir, steps=0, **options):
        seen.update(sets=sets, budget=budget, steps=steps, **options)
        return {"val_bpb": 2.0}

    monkeypatch.setattr(time_to_quality, "train_sets", train_sets)
    result = run_fasttrain(["train.batch_size=8"], pydoc_data, 0.0, n, 7, 1, tmp_path)
    data = open_prepared(pydoc_data)
    assert seen == {
        "sets": ["train.batch_size=8", "train.seed=7"],
        "budget": 0.0,
        "steps": 512,
        "train_compile": "auto",
        "eval_steps": whole_split_steps(data, 256, 8),
        "evaluate_on_the_way": True,  # as the config evaluates, so final/ may hold the best step's weights
        "timeout": None,
    }
    assert result["case"] == "configs/base.toml train.batch_size=8" and result["target_tokens"] == n
    assert result["seed"] == 7 and result["budget_seconds"] is None


def test_summary_is_each_cases_mean_and_spread_over_the_seeds():
    runs = [
        {"budget_seconds": None, "target_tokens": 1000, "system": "nanochat", "case": "depth 2", "val_bpb": bpb}
        for bpb in (2.0, 2.5)
    ]
    (row,) = summarize(runs)
    assert row["seeds"] == 2 and row["val_bpb_mean"] == pytest.approx(2.25)
    assert row["val_bpb_spread"] == pytest.approx(0.5)


def test_both_sides_score_the_same_targets_and_bytes_over_the_whole_split(pydoc_data):
    """fasttrain at its 256-token context and nanochat at its 512 read the same val tokens as targets: every
    token of each shard but its first, in order, the shorter last window included; the same bytes convert."""
    data = open_prepared(pydoc_data)

    def targets(seq_len: int, rows: int) -> list[int]:
        with whole_split(data, seq_len, rows) as loader:
            return [t for _, y in loader for t in y.flatten().tolist() if t != IGNORE_INDEX]

    at_256, at_512 = targets(256, 16), targets(512, 32)
    shards = find_shards(data.dir, "val")
    assert len(at_256) == data.meta["tokens"]["val"] - len(shards)
    assert at_256 == at_512  # the same tokens, in the same order
    assert at_256 == targets(100, 3)  # whatever the context and batch: the tail is a shorter window for all
    assert whole_split_steps(data, 256, 16) * 16 * 256 >= len(at_256)


def test_score_is_fasttrains_own_validation_on_the_whole_split(pydoc_data, tmp_path):
    """score() on fasttrain's own model at its own context gives what its trainer records when its eval_steps
    are whole_split_steps (the run's end event, fasttrain's side of the comparison); at another context it
    counts the same targets, and converts with the same bytes."""
    data = open_prepared(pydoc_data)
    steps = whole_split_steps(data, 32, 4)
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, f"train.eval_steps={steps}"), quiet=True)
    for _ in range(3):
        trainer.step()
    expected = trainer.evaluate()
    assert expected is not None
    got = score(trainer.model, data, 32, 4)
    assert got["val_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-6)
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert got["val_targets"] == data.meta["tokens"]["val"] - len(find_shards(data.dir, "val"))
    shorter = score(trainer.model, data, 16, 8)  # another context (the model's is at most 32): the same targets
    assert shorter["val_targets"] == got["val_targets"] and shorter["val_loss"] != pytest.approx(got["val_loss"])
    for metrics in (got, shorter):  # bits per byte: nats per target x the split's tokens / (its bytes x ln 2)
        val = data.meta
        assert metrics["val_bpb"] == pytest.approx(
            metrics["val_loss"] * val["tokens"]["val"] / (val["text_bytes"]["val"] * math.log(2)), rel=1e-12
        )


@pytest.mark.skipif(not os.environ.get("NANOCHAT_DIR"), reason="NANOCHAT_DIR names no nanochat checkout")
def test_one_nanochat_step_is_trained_and_scored(pydoc_data, tmp_path):
    """The worker process as run_nanochat starts it, at depth 1 for one 512-token update (the batch rule's
    for 512 tokens), compiled, its warm-up outside the clock."""
    spec = {"checkout": os.environ["NANOCHAT_DIR"], "data_dir": str(pydoc_data), "depth": 1, "tokens": 512}
    worker = [sys.executable, "-m", "benchmarks.studies.time_to_quality", "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*worker, "--out", str(tmp_path / "r.json")], check=True, cwd=ROOT, env=env, capture_output=True)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["steps"] == 1 and result["tokens"] == 512 and result["recipe"]["batch_tokens"] == 512
    assert result["recipe"]["model_dim"] == 64 and result["compiled"] and "512" in result["warm_up_tokens_per_s"]
    data = open_prepared(pydoc_data)
    assert result["val_targets"] == data.meta["tokens"]["val"] - len(find_shards(data.dir, "val"))
    assert 0 < result["val_bpb"] < 20


def test_a_results_file_written_in_parts_keeps_each_parts_command(tmp_path):
    """A second part appended to a results file took the first part's header as its own: its runs now carry the
    command (and date, and commit) that made them where those differ from the header's."""
    from benchmarks.studies.common import add_runs

    out = tmp_path / "results.json"
    add_runs(
        out, [{"budget_s": 1800}], "a study", "benchmarks.studies.budget_ladder", ["--budgets", "1800"], "2026-11-29"
    )
    add_runs(
        out, [{"budget_s": 600}], "a study", "benchmarks.studies.budget_ladder", ["--budgets", "600"], "2026-11-30"
    )
    first, second = json.loads(out.read_text())["runs"]
    assert first == {"budget_s": 1800}
    assert second["command"].endswith("--budgets 600") and second["date"] == "2026-11-30" and "commit" not in second
