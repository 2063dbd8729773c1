"""optim.weight_decay_rule = "repeats" (fasttrain/planning/repeats.py): the weight decay a run trains at, from how many
times it reads its corpus and how much that corpus's validation text repeats its training text; stated by the plan,
kept by a resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.compute.distributed import World
from fasttrain.config import OptimConfig, load_config, save_config
from fasttrain.planning import plan as plan_module
from fasttrain.planning import repeats
from fasttrain.planning.plan import plan_run
from fasttrain.planning.speed import Speed
from fasttrain.train import main as train_main
from tests.conftest import tiny_args, tiny_config, write_shard
from tests.test_sizing_bounds import DAYS, SLOW

RULE = ['optim.weight_decay_rule="repeats"', "data.vocab_size=0"]
CPU = torch.device("cpu")


def test_the_rule_raises_the_decay_with_the_epochs_where_validation_is_new_text():
    o = OptimConfig(weight_decay=0.1, max_weight_decay=3.2)
    assert repeats.repeat_decay(o, 2.0, 0.0) == 0.1  # up to REPEATS_FREE epochs: as set
    assert repeats.repeat_decay(o, 3.0, 0.0) == 0.1
    assert repeats.repeat_decay(o, 5.0, 0.0) == pytest.approx(1.0)  # 0.5 an epoch beyond the third
    assert repeats.repeat_decay(o, 7.0, 0.0) == pytest.approx(2.0)
    assert repeats.repeat_decay(o, 40.0, 0.0) == pytest.approx(3.2)  # the ceiling
    rule = OptimConfig(weight_decay=0.1)  # past 8 epochs, 2 more each time the epochs double, to 6.4
    assert repeats.repeat_decay(rule, 8.0, 0.0) == pytest.approx(2.5)
    assert repeats.repeat_decay(rule, 16.0, 0.0) == pytest.approx(4.5)
    assert repeats.repeat_decay(rule, 11.3, 0.0) == pytest.approx(2.5 + 2 * math.log2(11.3 / 8))
    assert repeats.repeat_decay(rule, 32.0, 0.0) == pytest.approx(rule.max_weight_decay) == 6.4
    assert repeats.repeat_decay(o, 7.0, 0.25) == pytest.approx(0.1 + 0.5 * 1.9)  # half new: half the rise
    assert repeats.repeat_decay(o, 7.0, 0.6) == 0.1  # validation mostly the training text over again: as set
    assert repeats.repeat_decay(OptimConfig(weight_decay=7.0), 20.0, 0.0) == 7.0  # never lowered


def test_the_overlap_counts_validation_spans_found_verbatim_in_training(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 4096, 5000)
    val = np.concatenate([train[1000:1100], rng.integers(0, 4096, 100)])  # half copied, half new
    write_shard(tmp_path / "train_000000.bin", train)
    write_shard(tmp_path / "val_000000.bin", val)
    spans = len(val) - repeats.SPAN + 1
    copied = 100 - repeats.SPAN + 1  # the windows wholly inside the copied part
    assert repeats.verbatim_overlap(str(tmp_path)) == pytest.approx(copied / spans)


def plan(data, tmp_path, *sets):
    return plan_run(tiny_config(data, tmp_path, *RULE, *sets), World(), CPU)


def test_a_small_new_corpus_read_twenty_times_gets_more_decay_and_one_read_once_does_not(
    code_data, pydoc_data, tmp_path
):
    once = plan(code_data, tmp_path, "train.batch_size=16", "train.max_steps=20")  # about half an epoch
    assert once.cfg.optim.decay() == 0.1
    assert any("weight decay 0.1, as it reads" in n and "(repeats need more from 3)" in n for n in once.notes)
    epoch = once.rows_per_epoch[0] // 16
    many = plan(code_data, tmp_path, "train.batch_size=16", f"train.max_steps={20 * epoch}")
    overlap = repeats.verbatim_overlap(str(code_data))
    assert overlap < 0.25  # held-out files of a package: mostly new text
    expected = repeats.repeat_decay(OptimConfig(), many.reading().epochs[0], overlap)  # the ceiling, times the novelty
    assert many.cfg.optim.decay() == round(expected, 3) and expected > 1.6
    note = next(n for n in many.notes if n.startswith("optim.weight_decay_rule = repeats"))
    assert f"weight decay 0.1 -> {round(expected, 3):g}: it reads code 20.0 times over and {overlap:.0%} of its" in note
    # the topics' validation text is mostly their training text: read as often, the decay is kept
    topics = plan(pydoc_data, tmp_path, "train.batch_size=64", f"train.max_steps={20 * (many.rows_per_epoch[0] // 16)}")
    read = topics.reading().epochs[0]
    assert read > 3 and topics.cfg.optim.decay() == 0.1
    assert any("kept though it reads" in n and "which recalling serves" in n for n in topics.notes), topics.notes


def test_a_fixed_rule_and_unknown_tokens_keep_the_decay(code_data, tmp_path):
    fixed = plan_run(tiny_config(code_data, tmp_path, "data.vocab_size=0", "train.max_steps=5000"), World(), CPU)
    assert fixed.cfg.optim.weight_decay == 0.1 and not any("weight_decay_rule" in n for n in fixed.notes)
    # a budget too short to time the machine for (sizing.MIN_BUDGET): the tokens it holds are not known
    clock = plan(code_data, tmp_path, "train.max_steps=0", "train.max_time=5", "model.n_layers=2")
    assert clock.speed is None and clock.cfg.optim.decay() == 0.1
    assert any("as the run's tokens are not known before it trains" in n for n in clock.notes)


def test_a_set_shape_under_a_budget_is_timed_and_planned_as_a_chosen_one(code_data, tmp_path):
    """--set model.n_layers=D (what a plan's note offers to keep its choice) under a time budget: the shape is timed
    alone, so the plan knows the epochs the budget reads, and its weight decay and stop at the epoch limit are the
    rule's, as a chosen shape's are (at the same speed). Before, it read a small corpus as often as the clock
    allowed, at decay 0.1."""
    clock = plan(code_data, tmp_path, "train.max_steps=0", "train.max_time=600", "model.n_layers=2", "model.members=1")
    assert clock.speed is not None and len(clock.speed.points) == 1  # the set shape alone
    assert clock.cfg.optim.decay() > 0.1 and clock.cfg.train.max_steps > 0
    assert any(
        n.startswith(f"train.max_steps = {clock.cfg.train.max_steps}: a budgeted run stops") for n in clock.notes
    )
    chosen = plan_run(
        tiny_config(
            code_data, tmp_path, *RULE, "train.max_steps=0", "train.max_time=600", "model.n_layers=0", "model.members=1"
        ),
        World(),
        CPU,
        speed=clock.speed,
    )
    # both read the corpus to its limit: the same decay and the same stop, whatever shape the budget chose
    same = (chosen.cfg.optim.decay(), chosen.cfg.train.max_steps)
    assert same == (clock.cfg.optim.decay(), clock.cfg.train.max_steps), chosen.notes


def test_the_dry_run_says_it_and_a_resume_keeps_the_decay_the_run_recorded(code_data, tmp_path, capsys):
    steps = 8 * (plan(code_data, tmp_path, "train.batch_size=16", "train.max_steps=1").rows_per_epoch[0] // 16)
    sets = [*RULE, "train.batch_size=16", f"train.max_steps={steps}", "train.eval_interval=1000"]
    assert train_main(tiny_args(code_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "note: optim.weight_decay_rule = repeats: weight decay 0.1 -> " in out, out
    short = [*sets[:-2], "train.max_steps=2", "train.eval_interval=1000"]  # 2 steps: the rule keeps 0.1
    assert train_main(tiny_args(code_data, tmp_path / "run", *short, "train.sample_tokens=0")) == 0
    # resumed with a budget that reads the corpus 8 times: the decay it started with stays, and that is said
    assert train_main(tiny_args(code_data, tmp_path / "run", *sets, flags=["--resume", "auto", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "optim.weight_decay_rule = repeats: weight decay 0.1, as the run recorded it (for this run's length" in out
    # resumed as it was planned: nothing to say
    assert train_main(tiny_args(code_data, tmp_path / "run", *short, flags=["--resume", "auto", "--dry-run"])) == 0
    assert "weight_decay_rule" not in capsys.readouterr().out


def test_a_resume_reads_the_overlap_its_run_recorded_instead_of_measuring_it(code_data, tmp_path, monkeypatch, capsys):
    """A run that read its corpus 8 times recorded the overlap its decay was chosen by (its start event); resumed
    for twice the steps, its plan takes that overlap to say what the rule would choose now, and measures nothing."""
    steps = 8 * (plan(code_data, tmp_path, "train.batch_size=16", "train.max_steps=1").rows_per_epoch[0] // 16)
    sets = [*RULE, "train.batch_size=16", "train.eval_interval=1000", "train.sample_tokens=0"]
    run = tmp_path / "run"
    assert train_main(tiny_args(code_data, run, *sets, f"train.max_steps={steps}", flags=["--quiet"])) == 0
    started = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert started["event"] == "start" and started["overlap"]["source"] == "code", started
    capsys.readouterr()
    measured: list[str] = []
    monkeypatch.setattr(repeats, "verbatim_overlap", lambda directory: measured.append(directory) or 0.0)
    longer = tiny_args(code_data, run, *sets, f"train.max_steps={2 * steps}", flags=["--resume", "auto", "--dry-run"])
    assert train_main([*longer, "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert measured == [] and resumed["overlap"] == started["overlap"], measured
    assert resumed["weight_decay"] == started["weight_decay"]  # kept, and the rule's other choice said
    assert any("as the run recorded it (for this run's length the rule would choose" in n for n in resumed["notes"])


def test_the_epoch_limit_falls_from_data_max_epochs_to_four_as_validation_text_gets_new():
    assert repeats.epoch_limit(10.0, 0.0) == repeats.NOVEL_EPOCHS == 4.0  # all new
    assert repeats.epoch_limit(10.0, 0.2) == repeats.epoch_limit(10.0, 0.53) == 10.0  # recalled: the default, topics
    assert repeats.epoch_limit(10.0, 0.05) == pytest.approx(4.0 + 0.25 * 6.0)
    assert repeats.epoch_limit(3.0, 0.0) == 3.0  # never above data.max_epochs


def test_a_self_sized_budget_stops_at_the_limit_on_new_text_and_at_data_max_epochs_on_the_topics(
    code_data, pydoc_data, tmp_path, monkeypatch
):
    """Three days at a slow speed: every depth would read the corpus more often than allowed, so the plan's stop
    (train.max_steps) is the limit: under 10 epochs of held-out code (8% of its validation spans are in its training
    text), data.max_epochs of the topics, whose validation text is mostly their training text, and data.max_epochs
    under the fixed rule. The limit and the decay (both chosen here: over 3 epochs) measure the overlap once."""
    measured = []
    monkeypatch.setattr(
        repeats, "verbatim_overlap", lambda d, measure=repeats.verbatim_overlap: measured.append(d) or measure(d)
    )

    def epochs(data, *sets):
        p = plan_run(tiny_config(data, tmp_path, *DAYS, *sets), World(), CPU, speed=SLOW)
        return p.reading().epochs[0], p.notes

    overlap = repeats.verbatim_overlap(str(code_data))
    limit = round(repeats.epoch_limit(10.0, overlap), 1)
    measured.clear()
    read, notes = epochs(code_data, *RULE)
    assert len(measured) == 1 and any("weight decay 0.1 -> " in n for n in notes), (measured, notes)
    assert overlap < repeats.RECALLED and limit - 0.5 < read <= limit < 10  # within a batch of the limit
    assert any(f"reads code at most {limit:g} times, not data.max_epochs = 10: {overlap:.1%}" in n for n in notes)
    assert any(f"read the corpus {limit:g} times (the limit above)" in n for n in notes), notes
    read, notes = epochs(code_data)  # the fixed rule
    assert 9.5 < read <= 10 and any("times (data.max_epochs)" in n for n in notes)
    read, notes = epochs(pydoc_data, *RULE)
    assert 9.5 < read <= 10 and not any("at most" in n for n in notes)
    read, notes = epochs(code_data, *RULE, "train.max_time=20")  # a budget that never reaches the limit: not said
    assert read < limit and not any("at most" in n or "train.max_steps = " in n for n in notes), notes


def test_a_new_run_from_a_runs_config_toml_chooses_the_decay_afresh(code_data, tmp_path):
    """A run's config.toml records the decay the rule chose apart from the one set: a new run started from that file
    (no resume, no replay) chooses for its own length, where it took the chosen decay as set and rose from it."""
    steps = 8 * (plan(code_data, tmp_path, "train.batch_size=16", "train.max_steps=1").rows_per_epoch[0] // 16)
    first = plan(code_data, tmp_path / "long", "train.batch_size=16", f"train.max_steps={steps}")
    chosen = first.cfg.optim.decay()
    assert chosen > 1.0  # eight epochs of new text
    save_config(first.cfg, tmp_path / "long")  # what the run records
    recorded = load_config(tmp_path / "long" / "config.toml")
    assert recorded.optim.weight_decay == 0.1 and recorded.optim.decay() == chosen
    # a new run from that file, 2 steps (a fraction of an epoch): the rule keeps what was set
    again = plan_run(
        replace(recorded, train=replace(recorded.train, max_steps=2, out_dir=str(tmp_path / "new"))), World(), CPU
    )
    assert again.cfg.optim.decay() == 0.1
    # and one as long chooses what the first chose, not a rise from it
    same = plan_run(replace(recorded, train=replace(recorded.train, out_dir=str(tmp_path / "same"))), World(), CPU)
    assert same.cfg.optim.decay() == chosen


def test_data_not_prepared_yet_is_planned_at_the_limit_of_new_text(tmp_path):
    """A dry run before the data is prepared cannot measure the overlap: it plans the corpus as new text, at the
    limit the prepared run applies to new text (it planned data.max_epochs, 10, and the run then trained at ~4),
    and says that it assumed so and which way a repeating text would move it. Three days at a slow speed: the
    budget's stop (train.max_steps) is the epoch limit, against the fixed rule's 10 epochs of the same estimate."""
    inputs = [str(Path(json.__file__).parent / "*.py")]
    sets = [*DAYS, f"data.inputs={json.dumps(inputs)}", "data.vocab_size=512"]

    def unprepared(*more):
        return plan_run(tiny_config(tmp_path / "absent", tmp_path / "run", *sets, *more), World(), CPU, speed=SLOW)

    rule, fixed = unprepared(*RULE[:1]), unprepared()
    assert rule.prepare and fixed.prepare  # not prepared yet: planned at the estimate
    limit = repeats.epoch_limit(10.0, 0.0)
    assert limit == repeats.NOVEL_EPOCHS < 10
    assert rule.cfg.train.max_steps == pytest.approx(fixed.cfg.train.max_steps * limit / 10, abs=1)
    said = f"the estimate reads the corpus at most {limit:g} times, not data.max_epochs = 10"
    assert any(said in n and "assumed until the data is prepared" in n for n in rule.notes), rule.notes


def test_the_decay_reads_the_epochs_the_start_event_records(pydoc_data, tmp_path, monkeypatch):
    """One count of a run's epochs (issue 100 item 3): the rule reads RunPlan.reading's, as the start event, the
    dry-run table and the warnings do (the loader's planned rows over its rows an epoch), not the tokens planned x
    the source's share / its tokens an epoch. For base.toml's 2 minutes on the topics at a fixed speed these differ
    (the whole steps of the clock's end at that speed): 4.45 epochs by the loader's count, 4.47 by the tokens'."""
    read: list = []

    def choose(cfg, sources, epochs, *rest):
        read.append(epochs)
        return repeats.choose_weight_decay(cfg, sources, epochs, *rest)

    monkeypatch.setattr(plan_module, "choose_weight_decay", choose)
    sets = [f'data.dir="{pydoc_data}"', "data.inputs=[]", "data.vocab_size=0", f'train.out_dir="{tmp_path}"',
            "train.device=cpu", 'train.precision="fp32"']  # fmt: skip
    base = load_config(str(Path(__file__).parents[1] / "configs" / "base.toml"), sets)
    p = plan_run(base, World(), CPU, speed=Speed(((5e6, 3e10), (2e7, 7e10))))
    assert read == [p.reading().epochs]
