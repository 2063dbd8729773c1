"""train.seq_len = 0 (fasttrain/planning/sequence_length.py): the context chosen for the run's planned tokens,
256 below LONG_FROM and 512 from there with the tokens of a micro-batch kept; through the plan for a run of
steps and a self-sized budget, and a resumed run that keeps the context it recorded whatever its new length."""

from __future__ import annotations

import math

import pytest
import torch

from fasttrain.compute.distributed import World
from fasttrain.config import load_config
from fasttrain.planning import batch_size, sequence_length
from fasttrain.planning.plan import accumulation_steps, plan_run
from fasttrain.planning.sequence_length import LONG, LONG_FROM, SHORT, choose_context, contexts, short_context
from fasttrain.planning.sizing import Speed
from fasttrain.system.errors import UsageError, run_cli
from fasttrain.train import main as train_main
from tests.conftest import tiny_args, tiny_config

CHOSEN = ("train.seq_len=0", "model.max_seq_len=512")  # batch_size 4 rows of 256 tokens: 1,024 tokens a step
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "tokens, max_seq_len, rows, batching, expected, said",
    [
        (LONG_FROM - 1, 512, 16, "packed", (SHORT, 16), f"{SHORT} for the ~7.00M training tokens planned at {SHORT}"),
        (LONG_FROM, 512, 16, "packed", (LONG, 8), f"{LONG}, in batches of 8 rows"),
        (1e9, 512, 16, "packed", (LONG, 8), f"{LONG}, in batches of 8 rows"),
        (1e9, 2048, 6, "packed", (LONG, 3), f"{LONG}, in batches of 3 rows"),
        (1e9, 512, 16, "padded", (SHORT, 16), "data.batching = 'padded' rows hold a document each"),
        (1e9, 256, 16, "packed", (SHORT, 16), "model.max_seq_len = 256 allows no longer"),
        (1e9, 128, 16, "packed", (128, 16), "model.max_seq_len = 128 allows no longer"),
        (1e9, 512, 15, "packed", (SHORT, 15), "train.batch_size = 15 rows of 256 tokens are no whole number"),
        (math.inf, 512, 16, "packed", (SHORT, 16), "does not know its tokens"),
    ],
)
def test_the_context_follows_the_planned_tokens(tokens, max_seq_len, rows, batching, expected, said):
    cfg = load_config(None, [*CHOSEN, f"model.max_seq_len={max_seq_len}", f"train.batch_size={rows}"])
    short = short_context(cfg.train, cfg.model)
    t, note = choose_context(short, cfg.model, batching, tokens)
    assert (t.seq_len, t.batch_size) == expected
    assert t.batch_size * t.seq_len == rows * short.seq_len  # the tokens of a micro-batch kept
    assert [(t.seq_len, t.batch_size)] == [g for g in contexts(rows, 0, max_seq_len) if g == expected]
    assert note.startswith("train.seq_len = 0: ") and said in note, note


@pytest.mark.parametrize(
    "steps, expected", [(int(LONG_FROM // 1024), (SHORT, 4)), (int(LONG_FROM // 1024) + 1, (LONG, 2))]
)
def test_a_run_of_steps_chooses_by_its_tokens_and_keeps_its_steps(steps, expected, pydoc_data, tmp_path):
    """max_steps x 1,024 tokens either side of LONG_FROM: the context and rows the rule gives, the same tokens
    a step; FLOPs, memory and rows an epoch planned at the context chosen; a note says why."""
    plan = plan_run(tiny_config(pydoc_data, tmp_path, *CHOSEN, f"train.max_steps={steps}"), World(), CPU)
    t = plan.cfg.train
    assert (t.seq_len, t.batch_size) == expected and plan.tokens_per_step == 1024
    explicit = plan_run(
        tiny_config(
            pydoc_data,
            tmp_path,
            *CHOSEN,
            f"train.max_steps={steps}",
            f"train.seq_len={t.seq_len}",
            f"train.batch_size={t.batch_size}",
            f"model.max_seq_len={t.seq_len}",
        ),
        World(),
        CPU,
    )
    assert (plan.flops_per_token, plan.rows_per_epoch, plan.memory) == (
        explicit.flops_per_token,
        explicit.rows_per_epoch,
        explicit.memory,
    )
    assert any(
        n.startswith(f"train.seq_len = 0: {t.seq_len}") and f"~{steps * 1024 / 1e6:.2f}M" in n for n in plan.notes
    )
    # the model knows the positions it trains: generation, lm-eval's windows and an export use no others
    assert plan.cfg.model.max_seq_len == t.seq_len


def test_a_self_sized_budget_chooses_its_context_then_its_shape_at_it(pydoc_data, tmp_path, monkeypatch):
    """model.n_layers = 0 under train.max_time: the tokens planned at 256 choose the context (the epoch cap
    counted: a small corpus read ten times stays short), and the shape is then the one the same speed chooses
    at 512, as a run set to 512 would train."""
    auto = ("model.n_layers=0", "model.d_model=0", "model.n_heads=0", "train.max_steps=0", "train.max_time=600")
    speed = Speed(((1e6, 1e14),))  # far more than the cap
    capped = plan_run(tiny_config(pydoc_data, tmp_path, *CHOSEN, *auto), World(), CPU, None, speed)
    tokens = capped.cfg.train.max_steps * capped.tokens_per_step  # the cap: ten epochs of 0.1M tokens
    assert capped.cfg.train.seq_len == SHORT and tokens < LONG_FROM
    assert f"train.seq_len = 0: {SHORT} for the ~{tokens / 1e6:.2f}M training tokens planned" in "".join(capped.notes)
    monkeypatch.setattr(sequence_length, "LONG_FROM", tokens)  # a corpus that long, as far as the rule can tell
    monkeypatch.setattr(batch_size, "MIN_UPDATES", math.inf)  # the rows kept: test_batch_size.py grows them
    plan = plan_run(tiny_config(pydoc_data, tmp_path, *CHOSEN, *auto), World(), CPU, None, speed)
    assert (plan.cfg.train.seq_len, plan.cfg.train.batch_size, plan.speed) == (LONG, 2, speed)
    long = plan_run(
        tiny_config(pydoc_data, tmp_path, *CHOSEN, *auto, "train.seq_len=512", "train.batch_size=2"),  # max 512
        World(),
        CPU,
        None,
        speed,
    )
    assert plan.cfg.model == long.cfg.model and plan.cfg.train == long.cfg.train
    assert [n for n in plan.notes if n.startswith("model.n_layers")] == [
        n for n in long.notes if n.startswith("model.n_layers")
    ]
    untimed = plan_run(tiny_config(pydoc_data, tmp_path, *CHOSEN, *auto, "train.max_time=5"), World(), CPU)
    assert untimed.speed is None and untimed.cfg.train.seq_len == SHORT  # too short to time: its tokens unknown
    assert any(n.startswith(f"train.seq_len = 0: {SHORT}, as a train.max_time run whose speed") for n in untimed.notes)


def test_a_resumed_run_keeps_its_context_whatever_its_new_length(pydoc_data, tmp_path, monkeypatch):
    """Trained 2 steps at 512 (the rule lowered so that it chooses it), then resumed to 4 with the rule as it
    ships, which would choose 256 for a new run that short: the resume plans, and trains, the 512-token context
    and the rows its config.toml records."""
    out = tmp_path / "run"
    args = tiny_args(pydoc_data, out, *CHOSEN, "train.sample_tokens=0", flags=["--quiet"])
    monkeypatch.setattr(sequence_length, "LONG_FROM", 1.0)
    with pytest.raises(SystemExit) as done:
        run_cli(train_main, [*args, "train.max_steps=2"])
    assert done.value.code == 0
    recorded = load_config(out / "config.toml").train
    assert (recorded.seq_len, recorded.batch_size) == (LONG, 2)
    monkeypatch.undo()
    new = plan_run(tiny_config(pydoc_data, tmp_path / "new", *CHOSEN, "train.max_steps=4"), World(), CPU)
    assert (new.cfg.train.seq_len, new.cfg.train.batch_size) == (SHORT, 4)
    resumed = plan_run(tiny_config(pydoc_data, out, *CHOSEN, "train.max_steps=4"), World(), CPU, "auto")
    assert (resumed.cfg.train.seq_len, resumed.cfg.train.batch_size) == (LONG, 2)
    assert f"train.seq_len = 0: the run's context, {LONG} in batches of 2 rows, as {out / 'config.toml'}" in "".join(
        resumed.notes
    )
    assert resumed.cfg.model.max_seq_len == LONG and new.cfg.model.max_seq_len == SHORT
    resume = tiny_args(
        pydoc_data, out, *CHOSEN, "train.sample_tokens=0", "train.max_steps=4", flags=["--quiet", "--resume", "auto"]
    )
    with pytest.raises(SystemExit) as done:
        run_cli(train_main, resume)
    assert done.value.code == 0
    again = load_config(out / "config.toml").train
    assert (again.seq_len, again.batch_size, again.max_steps) == (LONG, 2, 4)


def test_a_chosen_context_is_checked_against_tokens_per_update(pydoc_data, tmp_path):
    """train.tokens_per_update is checked at the short context, whose rows hold the tokens of either: one line
    naming the geometry. The Python API's accumulation_steps wants a planned config."""
    cfg = tiny_config(pydoc_data, tmp_path, *CHOSEN, "train.tokens_per_update=1000")
    with pytest.raises(UsageError, match=r"train.tokens_per_update = 1000 is not a multiple of .* 4 x 256 x 1"):
        plan_run(cfg, World(), CPU)
    with pytest.raises(UsageError, match="train.seq_len = 0 is chosen by the run's plan"):
        accumulation_steps(cfg.train)
