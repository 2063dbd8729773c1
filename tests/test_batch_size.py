"""train.batch_size grown for a time budget's planned tokens (fasttrain/planning/batch_size.py): the rule at its
boundaries, the settings that keep the rows, and a self-sized budget planned with the grown rows as a run set to
them is (its epoch cap, memory and shape counted at the new tokens a step)."""

from __future__ import annotations

import math

import pytest
import torch

from fasttrain.compute.distributed import World
from fasttrain.config import load_config
from fasttrain.planning import batch_size
from fasttrain.planning.batch_size import MIN_UPDATES, MOST_GROWTH, choose_batch, growth
from fasttrain.planning.plan import plan_run
from fasttrain.planning.sizing import Speed
from tests.conftest import tiny_config

CPU = torch.device("cpu")
STEP = 4096  # base.toml's 16 rows of 256 tokens


@pytest.mark.parametrize(
    "updates_at_base, expected",
    [
        (2 * MIN_UPDATES - 1, 1),  # twice the tokens an update would leave fewer than MIN_UPDATES
        (2 * MIN_UPDATES, 2),
        (4 * MIN_UPDATES - 1, 2),
        (4 * MIN_UPDATES, 4),
        (1000 * MIN_UPDATES, MOST_GROWTH),  # a GPU budget: no larger than measured
        (math.inf, 1),  # tokens not known
    ],
)
def test_the_batch_grows_in_powers_of_two_while_the_updates_stay_many(updates_at_base, expected):
    assert growth(updates_at_base * STEP, STEP) == expected


def test_a_set_step_count_or_update_size_keeps_its_rows_and_says_what_it_would_have_grown_to():
    tokens = 4 * MIN_UPDATES * STEP
    budget = load_config(None, ["train.max_time=1800", "train.max_steps=0", "train.seq_len=256"]).train
    grown, note = choose_batch(budget, STEP, tokens)
    assert grown.batch_size == 4 * budget.batch_size
    assert note.startswith(f"train.batch_size: {budget.batch_size} -> {grown.batch_size} rows of 256 tokens, as 4x")
    for setting in ("train.max_steps=5000", "train.tokens_per_update=8192"):
        t = load_config(None, ["train.max_time=1800", "train.max_steps=0", "train.seq_len=256", setting]).train
        kept, note = choose_batch(t, STEP, tokens)
        assert kept == t and f"kept, as {setting.split('=')[0]} is set; 4x the tokens an update" in note
    steps = load_config(None, ["train.max_time=0", "train.max_steps=5000", "train.seq_len=256"]).train
    assert choose_batch(steps, STEP, tokens) == (steps, "")  # a run of steps: its tokens are its steps'
    assert choose_batch(budget, STEP, 2 * MIN_UPDATES * STEP - 1) == (budget, "")  # too few: nothing said


def test_a_self_sized_budget_grows_its_rows_and_is_planned_as_a_run_set_to_them(pydoc_data, tmp_path, monkeypatch):
    """model.n_layers = 0 under train.max_time with the tiny corpus's ten-epoch cap (`cap` steps of 1,024 tokens):
    with the rule asking more updates than that the rows stay; asking an eighth of them they grow 4x, the cap
    counted in the new steps, and the plan is the one of a run set to those rows (its context set, so nothing is
    chosen for it)."""
    auto = ("model.n_layers=0", "model.d_model=0", "model.n_heads=0", "train.max_steps=0", "train.max_time=600")
    chosen = ("train.seq_len=0", "model.max_seq_len=256")  # tiny_config's 4 rows of 256 tokens
    speed = Speed(((1e6, 1e14),))  # far more than the cap
    monkeypatch.setattr(batch_size, "MIN_UPDATES", 10**9)
    kept = plan_run(tiny_config(pydoc_data, tmp_path, *chosen, *auto), World(), CPU, None, speed)
    cap = kept.cfg.train.max_steps
    assert kept.tokens_per_step == 1024 and kept.cfg.train.batch_size == 4
    assert not any(n.startswith("train.batch_size") for n in kept.notes)
    monkeypatch.setattr(batch_size, "MIN_UPDATES", cap // 8)
    plan = plan_run(tiny_config(pydoc_data, tmp_path, *chosen, *auto), World(), CPU, None, speed)
    assert (plan.cfg.train.batch_size, plan.tokens_per_step) == (16, 4096)
    assert abs(plan.cfg.train.max_steps - cap / 4) <= 1  # the same epochs, in updates four times the size
    assert any(n.startswith("train.batch_size: 4 -> 16 rows of 256 tokens, as 4x") for n in plan.notes)
    set_to = plan_run(
        tiny_config(pydoc_data, tmp_path, *auto, "train.seq_len=256", "model.max_seq_len=256", "train.batch_size=16"),
        World(),
        CPU,
        None,
        speed,
    )
    assert (plan.cfg.model, plan.cfg.train, plan.memory) == (set_to.cfg.model, set_to.cfg.train, set_to.memory)


def test_a_timed_plan_times_again_at_the_rows_it_grows_to_and_compiled_only_there_on_a_gpu(
    pydoc_data, tmp_path, monkeypatch
):
    """The machine timed at 16 x 256 read an H200 at a fifth of its speed at the 32 x 512 its run trained
    (benchmarks/results/gpu/h200-2026-11-30b): a plan that grows its rows or context times the machine again at them.
    Where the run compiles on a GPU, the first timing, which only chooses the rows and context, is eager and the
    second, at the run's geometry, compiled (each shape compiled costs the timing seconds); where neither grows it is
    timed compiled again at the same rows. Recorded here: each timing's rows, context and compile, and the depths the
    compiled timing starts at (near the eager one's choice: each shape compiled costs seconds)."""
    from fasttrain.planning import shape, sizing

    auto = ("model.n_layers=0", "model.d_model=0", "model.n_heads=0", "train.max_steps=0", "train.max_time=600")
    chosen = ("train.seq_len=0", "model.max_seq_len=256")
    timings: list[tuple[int, int, bool]] = []
    real_loss = shape.timed_loss

    def recorded_loss(cfg, device, teacher=None):
        timings.append((cfg.train.batch_size, cfg.train.seq_len, bool(cfg.train.compile)))
        return real_loss(cfg, device, teacher)

    depth_calls: list[list[int]] = []

    def calibrate(cfg, device, clock=None, update=None, loss=sizing.logits_loss, depths=()):
        t = cfg.train  # far more than the tiny corpus's cap, at any depth
        depth_calls.append(list(depths))
        return Speed(
            tuple(sorted((sizing.flops_per_token(sizing.ladder_shape(cfg.model, d), t.seq_len), 1e14) for d in depths))
        )

    monkeypatch.setattr(shape, "timed_loss", recorded_loss)
    monkeypatch.setattr(sizing, "calibrate", calibrate)

    def timed_plan(min_updates: int, *sets: str) -> list[tuple[int, int, bool]]:
        monkeypatch.setattr(batch_size, "MIN_UPDATES", min_updates)
        timings.clear()
        depth_calls.clear()
        plan_run(tiny_config(pydoc_data, tmp_path, *chosen, *auto, *sets), World(), CPU)
        return list(timings)

    assert timed_plan(10**9) == [(4, 256, False)]  # a CPU's rows kept: timed once
    cap = plan_run(
        tiny_config(pydoc_data, tmp_path, *chosen, *auto), World(), CPU, None, Speed(((1e6, 1e14),))
    ).cfg.train.max_steps
    assert timed_plan(cap // 8) == [(4, 256, False), (16, 256, False)]
    monkeypatch.setattr(shape, "times_compiled", lambda t, device: bool(t.compile))  # a GPU's
    assert timed_plan(cap // 8, "train.compile=true") == [(4, 256, False), (16, 256, True)]
    # the compiled timing starts where the eager one chose (depth k: timed second), not at the smallest two
    (smallest, (k,), near) = depth_calls
    assert smallest == [1, 2] and near == [k - 1, k]
    assert timed_plan(10**9, "train.compile=true") == [(4, 256, False), (4, 256, True)]
    assert timed_plan(cap // 8) == [(4, 256, False), (16, 256, False)]  # a GPU's run set not to compile
