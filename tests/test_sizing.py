"""Issue 56, the model's shape chosen for the run's compute (model.n_layers = 0, fasttrain/planning/sizing.py):
the ladder, the worth of repeated tokens, the rule's choice as tokens and corpus size change, the calibration
timed by a fake clock, and through `python -m fasttrain.train`: machines of different speeds and corpora of
different sizes get different shapes, a resume and a replay keep the shape recorded, and each bad input's line."""

from __future__ import annotations

import importlib
import itertools
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fasttrain_kernels._backend
from fasttrain.config import ModelConfig, load_config
from fasttrain.model.transformer import flops_per_token, matmul_params
from fasttrain.planning import repeats, sizing
from fasttrain.planning.repeats import effective_tokens
from fasttrain.planning.sizing import Speed, choose_shape, ladder_shape, size_model
from fasttrain.system.errors import UsageError, run_cli
from fasttrain.train import main as train_main
from tests.conftest import tiny_args, tiny_config
from tests.test_time_budget import FakeClock, timed

AUTO = ("model.n_layers=0", "model.d_model=0", "model.n_heads=0")
BUDGET = ("train.max_steps=0", "train.max_time=600")


def cli(args: list[str]) -> int:
    """`python -m fasttrain.train ARGS` in this process: its exit code."""
    with pytest.raises(SystemExit) as exited:
        run_cli(train_main, args)
    return exited.value.code  # type: ignore[return-value]


def depth_in(out: str) -> int:
    """The depth the plan's note says was chosen."""
    found = re.search(r"model\.n_layers = 0: depth (\d+) ", out)
    assert found, out
    return int(found.group(1))


def fake_clock(monkeypatch, seconds_per_pass: tuple[float, float]) -> list[float]:
    """The calibration's clock made a fake one: depth 1's and depth 2's passes take `seconds_per_pass` each;
    returns the list its readings are appended to."""
    readings: list[float] = []
    times = itertools.accumulate(
        itertools.cycle(
            [0.0, seconds_per_pass[0] * sizing.CALIBRATION_STEPS, 0.0, seconds_per_pass[1] * sizing.CALIBRATION_STEPS]
        ),
        initial=1000.0,
    )
    next(times)

    def clock() -> float:
        readings.append(next(times))
        return readings[-1]

    monkeypatch.setattr(sizing.time, "perf_counter", clock)
    return readings


def fake_calibration(monkeypatch, seconds_per_pass: tuple[float, float]) -> list[int]:
    """A machine whose FLOP/s is the power law through the smallest two depths' `seconds_per_pass` (those the set
    keys allow): sizing.calibrate returns it at the depths it is asked for; returns the list of the depths timed."""
    timed: list[int] = []

    def calibrate(cfg, device, clock=None, update=None, loss=sizing.logits_loss, depths=()):
        t = cfg.train

        def flops(depth: int) -> float:
            return flops_per_token(ladder_shape(cfg.model, depth), t.seq_len)

        first = sizing.fitting_depths(cfg.model)[:2]
        law = Speed(tuple((flops(d), flops(d) * t.batch_size * t.seq_len / s) for d, s in zip(first, seconds_per_pass)))
        timed.extend(depths or first)
        return Speed(tuple(sorted((flops(d), law.flops_per_s(flops(d))) for d in depths or first)))

    monkeypatch.setattr(sizing, "calibrate", calibrate)
    return timed


def test_the_ladder_derives_width_and_heads_from_the_depth_unless_set():
    auto = ModelConfig(vocab_size=512, d_model=0, n_layers=0, n_heads=0)
    assert [(s.d_model, s.n_heads) for s in (ladder_shape(auto, d) for d in (1, 2, 3, 6))] == [
        (64, 1),
        (128, 2),
        (192, 3),
        (384, 6),
    ]
    wide = ladder_shape(ModelConfig(d_model=96, n_layers=0, n_heads=0), 5)
    assert (wide.n_layers, wide.d_model, wide.n_heads) == (5, 96, 1)  # the set width kept, heads of 96
    assert ladder_shape(ModelConfig(d_model=0, n_layers=0, n_heads=4), 3).n_heads == 4


def test_repeated_tokens_are_worth_less_than_new_ones():
    assert effective_tokens(5e5, 1e6) == 5e5 and effective_tokens(5e5, None) == 5e5
    worth = [effective_tokens(e * 1e5, 1e5) for e in (1, 2, 4, 16, 64, 1000)]
    assert worth == sorted(worth) and worth[0] == 1e5
    gains = [b - a for a, b in zip(worth, worth[1:])]
    assert worth[1] < 2e5 and worth[-2] < worth[-1] <= 1e5 * (1 + repeats.REPEAT_WORTH)  # never more than R epochs
    assert gains[-1] < gains[0]


def corpus(unique: float | None) -> tuple[tuple[float, float], ...]:
    """One source of `unique` training tokens read for the whole run (None: not known, taken as unlimited)."""
    return ((1.0, unique),) if unique else ()


def test_the_aim_is_the_fitted_ratio_within_the_sweeps_and_grows_beyond_to_chinchillas():
    """Up to FITTED_TO new tokens the aim is the ratio the sweeps fitted; beyond, it grows (a longer CPU budget wants
    more tokens a parameter: at 30 minutes 3 x 192 beat the fixed ratio's 4 x 256), but never past the ratio
    compute-optimal training holds at scale, so a GPU's billions of tokens still buy a model that grows with them.
    Repeats of a corpus do not move it (the main job's 30 minutes read 4.2 epochs at the aim they would give, and
    lost 0.07 to the shape the fitted ratio chose)."""
    assert sizing.aim(1e5) == sizing.aim(sizing.FITTED_TO) == sizing.TOKENS_PER_PARAM
    tokens = [sizing.FITTED_TO * 2**k for k in range(12)]
    aims = [sizing.aim(e) for e in tokens]
    assert aims == sorted(aims) and aims[1] > aims[0] and aims[-1] == sizing.CHINCHILLA
    best_params = [e / a for e, a in zip(tokens, aims)]  # the model the aim asks for: never smaller for more tokens,
    assert best_params == sorted(best_params) and best_params[-1] == pytest.approx(2 * best_params[-2])  # and past 20
    # tokens a parameter twice the tokens ask for twice the parameters
    small = ((1.0, 2e6),)  # a corpus under FITTED_TO, read many times over
    assert repeats.first_reads(5e7, small) == 2e6 and sizing.aim(2e6) == sizing.TOKENS_PER_PARAM
    assert repeats.first_reads(5e7, ((0.5, 2e6), (0.5, 1e8))) == 2e6 + 2.5e7 and repeats.first_reads(5e7, ()) == 5e7


def test_more_tokens_choose_deeper_models_and_a_small_corpus_shallower_ones():
    cfg = tiny_config(".", ".", "model.vocab_size=4096", *AUTO)
    depth = {}
    for tokens in (1e4, 1e5, 1e6, 1e7, 1e8):
        for unique in (None, 2e5):
            depth[tokens, unique] = choose_shape(cfg, lambda shape: tokens, corpus(unique), "fixed").model.n_layers
    unlimited = [depth[t, None] for t in (1e4, 1e5, 1e6, 1e7, 1e8)]
    assert unlimited == sorted(unlimited) and len(set(unlimited)) >= 3, unlimited
    assert all(depth[t, 2e5] <= depth[t, None] for t in (1e6, 1e7, 1e8))
    assert depth[1e8, 2e5] < depth[1e8, None]  # 500 epochs of 200K tokens are worth far less than 1e8 new ones
    for tokens, unique in depth:  # the choice is the ladder's closest to the rule's ratio
        chosen = choose_shape(cfg, lambda shape: tokens, corpus(unique), "fixed")
        assert chosen.effective == effective_tokens(tokens, unique) and chosen.params == matmul_params(chosen.model)
        worth = effective_tokens(tokens, unique)
        ratios = [worth / matmul_params(ladder_shape(cfg.model, d)) for d in sizing.DEPTHS]
        best = min(ratios, key=lambda r: abs(math.log(r / sizing.aim(repeats.first_reads(tokens, corpus(unique))))))
        assert chosen.effective / chosen.params == pytest.approx(best)


def test_no_depth_that_would_read_the_corpus_more_than_ten_times_is_chosen_while_one_reads_it_less():
    """Under a time budget a shallower model is faster, so it reads a small corpus more often; past data.max_epochs
    it overfits (the module docstring's runs), so the choice skips to the first depth that reads it at most that
    often, though the ratio alone would go shallower. If every depth would, the ratio chooses, and the note says
    the run overfits."""
    cfg = tiny_config(".", ".", "model.vocab_size=4096", *AUTO)

    def tokens_at(compute: float):  # a machine of `compute` FLOPs a second, the budget's tokens at each shape
        return lambda shape: compute / (6 * matmul_params(shape))

    unique = 5e4
    free = choose_shape(cfg, tokens_at(5e12), corpus(None), "timed")  # a corpus that is never repeated
    read = choose_shape(cfg, tokens_at(5e12), corpus(unique), "timed")
    assert free.tokens / unique > cfg.data.max_epochs  # the depth the ratio likes would read it too often
    assert read.model.n_layers > free.model.n_layers and read.tokens / unique <= cfg.data.max_epochs
    shallower = ladder_shape(cfg.model, read.model.n_layers - 1)
    assert tokens_at(5e12)(shallower) / unique > cfg.data.max_epochs  # the first depth within the ceiling
    # depth 1 reads it 53 times: the ratio's choice on this corpus, were there no limit (depth 2, 17.5, is not)
    assert "the aim alone would choose depth 1, but it would read the corpus more than 10 times" in read.note
    fast = choose_shape(cfg, tokens_at(5e20), corpus(unique), "timed")  # every depth reads it 10+ times: the ratio's
    assert fast.model.n_layers < max(sizing.DEPTHS) and "every depth would read the corpus more than 10" in fast.note
    assert "extrapolated" in fast.note


def test_the_note_names_the_epoch_limit_only_where_it_changed_the_choice():
    """A shallower depth that would read the corpus past the limit is not mentioned where the ratio chose a deeper
    one anyway: depth 1 would read 5.3 times (limit 3), but depth 2's 1.8 reads are the rule's choice."""
    cfg = tiny_config(".", ".", "model.vocab_size=4096", "data.max_epochs=3", *AUTO)
    tokens_at = lambda shape: 5e12 / (6 * matmul_params(shape))  # noqa: E731
    chosen = choose_shape(cfg, tokens_at, corpus(5e5), "timed")
    assert tokens_at(ladder_shape(cfg.model, 1)) / 5e5 > 3 >= chosen.tokens / 5e5
    assert chosen.model.n_layers == 2 and "epoch limit" not in chosen.note


def test_a_budget_stops_at_ten_epochs_where_every_depth_would_read_more():
    """Under train.max_time the run stops when it has read the corpus data.max_epochs times (epoch_cap, set by the plan
    as train.max_steps): where every depth would read it more often, the deepest offered trains that long (all read
    the same tokens; on held-out code read 4.2 times 3 x 192 scored 1.461 against 2 x 128's 1.477) and the note
    says so. A shallower depth stopped there is not chosen over a deeper one within the ceiling (it lost on a
    254K-token corpus), and without a clock (steps only) nothing stops the run. (A corpus that can feed depth 3:
    under a clock no depth is chosen whose parameters exceed data.max_epochs epochs / FED_TOKENS_PER_PARAM.)"""
    timed = tiny_config(".", ".", "model.vocab_size=4096", *AUTO, *BUDGET)
    counted = tiny_config(".", ".", "model.vocab_size=4096", *AUTO)
    unique = 1e5

    def reading(*epochs: float):  # depth d reads the corpus epochs[d - 1] times in the budget, then ever less
        return lambda shape: unique * (epochs[shape.n_layers - 1] if shape.n_layers <= len(epochs) else 0.5)

    corpus_bound = reading(20.0, 10.5, 6.0, 3.0)  # depth 2 just over: still the first depth within is chosen
    for cfg in (timed, counted):
        chosen = choose_shape(cfg, corpus_bound, corpus(unique), "")
        assert chosen.model.n_layers == 3 and chosen.tokens == 6 * unique
    every = choose_shape(timed, reading(*[40.0] * 40), corpus(unique), "timed")  # the deepest offered, stopped
    fed = timed.data.max_epochs * unique / sizing.FED_TOKENS_PER_PARAM
    deepest = max(d for d in sizing.DEPTHS if sizing.matmul_params(sizing.ladder_shape(timed.model, d)) <= fed)
    assert every.model.n_layers == deepest, every.note
    assert every.tokens == pytest.approx(timed.data.max_epochs * unique) and "so the deepest trains" in every.note
    assert choose_shape(counted, reading(*[40.0] * 40), corpus(unique), "").tokens == 40 * unique  # nothing stops it
    # The cap: the updates after which the source read most often has been read data.max_epochs times.
    assert repeats.epoch_cap(((0.25, 1000.0), (0.75, 6000.0)), 100, 10) == 10 * 4000 // 100
    assert repeats.epoch_cap(((0.25, 1000.0), (0.75, 6000.0)), 100, 16) == 16 * 4000 // 100
    assert repeats.epoch_cap((), 100, 10) == 0


def test_the_plan_sets_the_cap_for_a_budget_whether_its_shape_is_chosen_or_set(pydoc_data, tmp_path):
    """A budgeted run records the cap as train.max_steps (so a resume stops at the same step) and says so, its shape
    chosen (model.n_layers = 0) or set; a smaller max_steps stays, and a run of steps alone is not capped."""
    from fasttrain.compute.distributed import World
    from fasttrain.planning.plan import plan_run

    fast = Speed(((1e6, 1e13),))  # every depth would read the small corpus far more than ten times
    cpu = torch.device("cpu")
    plan = plan_run(tiny_config(pydoc_data, tmp_path, *AUTO, *BUDGET, "model.vocab_size=512"), World(), cpu, None, fast)
    tokens_per_step = plan.cfg.train.batch_size * plan.cfg.train.seq_len
    epoch = plan.rows_per_epoch[0] * plan.cfg.train.seq_len  # what the loader reads of it in an epoch: whole batches
    assert epoch < plan.sources[0].data.meta["tokens"]["train"]
    assert plan.cfg.train.max_steps == int(10 * epoch / tokens_per_step)
    assert any(n.startswith(f"train.max_steps = {plan.cfg.train.max_steps}: a budgeted run") for n in plan.notes)
    few = plan_run(tiny_config(pydoc_data, tmp_path, *AUTO, *BUDGET, "train.max_steps=3"), World(), cpu, None, fast)
    fixed = plan_run(tiny_config(pydoc_data, tmp_path, *BUDGET, "model.n_layers=2"), World(), cpu, None, fast)
    counted = plan_run(tiny_config(pydoc_data, tmp_path, *AUTO, "train.max_steps=5000"), World(), cpu, None, None)
    set_epoch = fixed.rows_per_epoch[0] * fixed.cfg.train.seq_len
    set_cap = int(10 * set_epoch / (fixed.cfg.train.batch_size * fixed.cfg.train.seq_len))
    assert (few.cfg.train.max_steps, fixed.cfg.train.max_steps, counted.cfg.train.max_steps) == (3, set_cap, 5000)


def test_lookup_tables_do_not_move_the_choice():
    """An untied embedding and value embeddings add parameters but no matmul: the rule weighs matmul_params, so
    at the same tokens the tied, untied and value-embedded ladders choose the same depth, and the note says both
    counts where they differ (the value embeddings' gates are matmuls: a few dozen parameters)."""
    tables = ("model.tie_embeddings=false", "model.value_embeddings=true")
    for tokens in (1e5, 1e6, 1e7):
        chosen = [
            choose_shape(tiny_config(".", ".", "model.vocab_size=4096", *AUTO, *sets), lambda m: tokens, (), "fixed")
            for sets in ((), tables[:1], tables)
        ]
        assert len({c.model.n_layers for c in chosen}) == 1, [c.note for c in chosen]
        assert chosen[0].params == chosen[1].params <= chosen[2].params < 1.001 * chosen[0].params  # + the gates
        assert "with the lookup tables" in chosen[2].note and "lookup" not in chosen[0].note


def test_calibration_reads_the_rate_at_two_sizes_from_its_clock(monkeypatch):
    cfg = tiny_config(".", ".", "model.vocab_size=512", *AUTO)
    readings = fake_clock(monkeypatch, (0.5, 1.0))
    speed = sizing.calibrate(cfg, torch.device("cpu"))
    assert len(readings) == 4  # each shape timed once, around its CALIBRATION_STEPS passes
    tokens = cfg.train.batch_size * cfg.train.seq_len
    f1, f2 = (flops_per_token(ladder_shape(cfg.model, d), cfg.train.seq_len) for d in (1, 2))
    assert [f for f, _ in speed.points] == [f1, f2]
    assert [r for _, r in speed.points] == pytest.approx([f1 * tokens / 0.5, f2 * tokens / 1.0])
    assert speed.tokens_per_s(f1) == pytest.approx(tokens / 0.5) and speed.tokens_per_s(f2) == pytest.approx(tokens)
    exponent = math.log((f2 * tokens) / (f1 * tokens / 0.5)) / math.log(f2 / f1)
    assert speed.flops_per_s(4 * f2) == pytest.approx(f2 * tokens * 4**exponent)  # the power law through both
    fake_clock(monkeypatch, (0.1, 10.0))  # the larger model's rate lower: beyond the two, a constant rate
    slower = sizing.calibrate(cfg, torch.device("cpu"))
    assert slower.flops_per_s(10 * f2) == pytest.approx(slower.flops_per_s(f2))


def test_a_speed_of_three_points_is_a_power_law_between_each_pair_and_bounded_beyond():
    speed = Speed(((1e6, 1e9), (4e6, 4e9), (16e6, 8e9)))  # the rate grows in proportion, then as the square root
    assert [speed.flops_per_s(f) for f in (1e6, 4e6, 16e6)] == pytest.approx([1e9, 4e9, 8e9])  # each point timed
    assert speed.flops_per_s(2e6) == pytest.approx(2e9) and speed.flops_per_s(8e6) == pytest.approx(8e9 / 2**0.5)
    assert speed.flops_per_s(64e6) == pytest.approx(16e9)  # beyond the last: the last pair's exponent, 0.5
    assert speed.flops_per_s(0.25e6) == pytest.approx(0.25e9)  # before the first: the first pair's, 1
    falling = Speed(((1e6, 2e9), (2e6, 1e9)))  # measured lower at the larger size: kept between, flat beyond
    assert falling.flops_per_s(1.5e6) < 2e9 and falling.flops_per_s(8e6) == pytest.approx(1e9)
    assert falling.flops_per_s(0.5e6) == pytest.approx(2e9)
    assert Speed(((1e6, 3e9),)).flops_per_s(1e8) == 3e9  # one point: a rate that does not scale
    assert speed.timed(4e6) and not speed.timed(5e6)
    assert speed.merged(Speed(((8e6, 7e9),))).points == ((1e6, 1e9), (4e6, 4e9), (8e6, 7e9), (16e6, 8e9))
    assert speed.scaled(2).flops_per_s(2e6) == pytest.approx(4e9)


def test_the_shape_a_timing_chooses_is_timed_too_and_chosen_again_at_its_speed(pydoc_data, tmp_path, monkeypatch):
    """Depths 1 and 2 time fast enough for a deep model; that depth, timed, is slower than they said, and the
    choice made again falls on a shallower depth, which is timed in turn: the shape the run trains was timed."""
    cfg = tiny_config(pydoc_data, tmp_path, *AUTO, *BUDGET, "model.vocab_size=512")
    t = cfg.train
    timed: list[int] = []

    def calibrate(cfg, device, clock=None, update=None, loss=sizing.logits_loss, depths=()):
        depths = list(depths) or [1, 2]
        timed.extend(depths)
        level = flops_per_token(ladder_shape(cfg.model, 2), t.seq_len)
        # 120K tokens/s up to depth 2 (FLOP/s in proportion to the size), then FLOP/s falling: slower than 1 and 2 say
        return Speed(
            tuple(
                sorted(
                    (f, 1.2e5 * min(f, level * level / f))
                    for f in (flops_per_token(ladder_shape(cfg.model, d), t.seq_len) for d in depths)
                )
            )
        )

    monkeypatch.setattr(sizing, "calibrate", calibrate)
    shape, note, speed = size_model(cfg, (), 128, 1, torch.device("cpu"), None)
    assert len(timed) > 2 and timed[:2] == [1, 2], timed
    assert speed is not None and speed.timed(flops_per_token(shape, t.seq_len)), (timed, note)
    assert shape.n_layers < timed[2], (timed, note)  # the first choice, at the rate 1 and 2 said, was deeper
    assert f"for depth {shape.n_layers}, timed" in note


def test_the_calibration_times_the_runs_loss_and_optimizer_step(pydoc_data, tmp_path, monkeypatch):
    """A budgeted run's timing includes its loss and its clipping and optimizer step (planning.timed_pass: timed_loss, timed_update):
    the plan hands both to the calibration, which computes that loss (on a CPU the fused head and cross-entropy, as
    the run does) and runs the step after every backward, so the gradients are gone after each pass."""
    from fasttrain.compute.distributed import World
    from fasttrain.planning import shape
    from fasttrain.planning.preflight import Machine

    cfg = tiny_config(pydoc_data, tmp_path, "model.vocab_size=512", *AUTO, "optim.name=muon", "train.max_time=60")
    handed, real_calibrate = [], sizing.calibrate
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)  # "auto" as a CPU run resolves it
    monkeypatch.setattr(
        sizing,
        "calibrate",
        lambda cfg, device, update, loss, depths=(): handed.append((update, loss)) or Speed(((1e6, 1e9),)),
    )
    machine = Machine.of(torch.device("cpu"))
    given = shape.SizingInputs(
        world=World(),
        machine=machine,
        sources=(),
        estimate=0.0,
        accumulation=1,
        shard_group=1,
        earlier=None,
        speed=None,
        context_set=False,
    )
    shape.shape_of(cfg, (), 128, given)
    monkeypatch.setattr(sizing, "calibrate", real_calibrate)
    passes, fused_calls = [], []

    def counting(model):
        step, hidden = handed[0][0](model), model.blocks[0].attn.qkv.weight

        def counted():  # the gradients there before, the weights moved and the gradients cleared after
            before = hidden.detach().clone()
            had = hidden.grad is not None
            step()
            passes.append(had and hidden.grad is None and not torch.equal(hidden, before))

        return counted

    fused_loss = importlib.import_module("fasttrain_kernels.linear_cross_entropy")  # the package's name is the function
    real = fused_loss.linear_cross_entropy
    monkeypatch.setattr(fused_loss, "linear_cross_entropy", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    sizing.calibrate(cfg, torch.device("cpu"), update=counting, loss=handed[0][1])
    assert passes == [True] * 2 * (sizing.CALIBRATION_STEPS + 1)
    assert len(fused_calls) == len(passes)  # every pass through the run's fused loss


def test_the_timing_compiles_where_the_run_compiles_on_a_gpu_and_times_eager_where_the_compile_fails(
    pydoc_data, tmp_path, monkeypatch
):
    """An eager timing read an H200 at half the speed its compiled run trained at, and chose a shape too small
    (benchmarks/results/gpu/h200-2026-11-30): the timing compiles the loss where the run compiles on a GPU, eager
    elsewhere. A compile that fails (inductor faked to fail here, on the CPU) is timed eager, as the run then trains,
    not a failed timing that trains the smallest shape."""
    import torch._inductor.compile_fx as compile_fx

    from fasttrain.model.transformer import Transformer
    from fasttrain.planning import timed_pass

    cfg = tiny_config(pydoc_data, tmp_path, "model.vocab_size=512", "train.compile=true")
    t, cpu = cfg.train, torch.device("cpu")
    assert timed_pass.times_compiled(t, torch.device("cuda")) and not timed_pass.times_compiled(t, cpu)
    assert not timed_pass.times_compiled(replace(t, compile=False), torch.device("cuda"))
    torch.manual_seed(0)
    model, x = Transformer(cfg.model), torch.randint(0, 512, (2, 9))
    eager = timed_pass.timed_loss(cfg, cpu)(model)(x[:, :-1], x[:, 1:])
    monkeypatch.setattr(timed_pass, "times_compiled", lambda t, device: True)
    backend_calls = []

    def failing(*args, **kwargs):
        backend_calls.append(1)
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(compile_fx, "compile_fx", failing)
    loss = timed_pass.timed_loss(cfg, cpu)(model)
    first, second = loss(x[:, :-1], x[:, 1:]), loss(x[:, :-1], x[:, 1:])
    assert backend_calls and torch.equal(first, eager) and torch.equal(second, eager)
    monkeypatch.undo()
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the timing compiles on a GPU")
def test_a_gpus_timing_runs_the_compiled_loss(pydoc_data, tmp_path):
    """On a GPU the timed loss is the compiled one (dynamo compiled a frame), the eager loss within bf16's rounding."""
    from torch._dynamo.utils import counters

    from fasttrain.compute.device import autocast
    from fasttrain.model.transformer import Transformer
    from fasttrain.planning import timed_pass

    cfg = tiny_config(pydoc_data, tmp_path, "model.vocab_size=512", "train.compile=true", "train.precision=bf16")
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model, x = Transformer(cfg.model).to(cuda), torch.randint(0, 512, (4, 33), device=cuda)
    with autocast("bf16", cuda):
        eager = timed_pass.timed_loss(replace(cfg, train=replace(cfg.train, compile=False)), cuda)(model)(
            x[:, :-1], x[:, 1:]
        )
        counters.clear()
        compiled = timed_pass.timed_loss(cfg, cuda)(model)(x[:, :-1], x[:, 1:])
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


def test_a_faster_machine_gets_a_deeper_model_through_the_cli(pydoc_data, tmp_path, monkeypatch, capsys):
    depths = []
    for seconds in (2.0, 0.01):  # a slow machine, then one 200x as fast
        fake_calibration(monkeypatch, (seconds / 2, seconds))
        assert cli(tiny_args(pydoc_data, tmp_path / "run", *AUTO, *BUDGET, flags=["--dry-run"])) == 0
        out = capsys.readouterr().out
        depths.append(depth_in(out))
        assert "600 s at ~" in out
    assert depths[0] < depths[1], depths
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_a_smaller_corpus_gets_a_shallower_model_and_steps_need_no_timing(
    pydoc_data, code_data, tmp_path, monkeypatch, capsys
):
    readings = fake_calibration(monkeypatch, (1.0, 2.0))
    depths = []
    steps = ("train.max_steps=12000",)  # 1.5M tokens of 4 x 32: 8 epochs of the first, 84 of the second
    for data, vocab in ((pydoc_data, 512), (code_data, 0)):  # 180K training tokens, then 18K (one tokenizer)
        args = tiny_args(data, tmp_path / "run", *AUTO, *steps, f"data.vocab_size={vocab}", flags=["--dry-run"])
        assert cli(args) == 0
        out = capsys.readouterr().out
        depths.append(depth_in(out))
        assert "12000 steps of 128 tokens" in out and "epochs of" in out
    assert depths[1] < depths[0], depths
    assert readings == []  # a run of steps knows its tokens without timing the machine


def test_a_resume_and_a_replay_train_the_shape_their_run_recorded(pydoc_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    quiet = ("train.sample_tokens=0", "train.eval_interval=1000", "checkpoint.interval=2")
    assert cli(tiny_args(pydoc_data, run, *AUTO, *quiet, "train.max_steps=4", flags=["--quiet"])) == 0
    recorded = load_config(run / "config.toml").model
    assert (recorded.n_layers, recorded.d_model, recorded.n_heads) == (1, 64, 1)
    longer = ("train.max_steps=12000",)  # alone, it would choose a deeper model
    assert cli(tiny_args(pydoc_data, tmp_path / "new", *AUTO, *quiet, *longer, flags=["--dry-run"])) == 0
    assert depth_in(capsys.readouterr().out) > 1
    flags = ["--dry-run", "--resume", "auto"]
    assert cli(tiny_args(pydoc_data, run, *AUTO, *quiet, *longer, flags=flags)) == 0
    assert (
        f"the resumed run's shape, 1 x 64 with 1 head, as {run / 'config.toml'} records it" in capsys.readouterr().out
    )

    # A budgeted run (its shape chosen at a fake speed), replayed step for step at another speed.
    fake_calibration(monkeypatch, (0.001, 0.002))
    trainer = timed(
        sizing_trainer(pydoc_data, tmp_path / "timed", *AUTO, *quiet, "train.max_steps=0", "train.max_time=60"), [20.0]
    )
    trainer.train()
    chosen = trainer.cfg.model
    assert chosen.n_layers > 1
    fake_calibration(monkeypatch, (1.0, 2.0))
    replay = ("train.max_time=0", "train.max_steps=3", f"schedule.progress_from={tmp_path / 'timed'}")
    out_dir = tmp_path / "replay"
    assert cli(tiny_args(pydoc_data, out_dir, *AUTO, *quiet, *replay, flags=["--quiet"])) == 0
    replayed = load_config(out_dir / "config.toml").model
    assert (replayed.n_layers, replayed.d_model, replayed.n_heads) == (chosen.n_layers, chosen.d_model, chosen.n_heads)


def sizing_trainer(data: Path, out: Path, *overrides: str):
    from fasttrain.training.trainer import Trainer

    return Trainer(tiny_config(data, out, *overrides), quiet=True, clock=FakeClock())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("train.max_time=5",), "train.max_time = 5 s is too short to time the machine for (under 10 s): the smallest"),
        (("model.d_model=96",), "model.d_model = 96 kept, as set"),
        (("train.max_time=0", "train.max_steps=10000000"), "beyond the sweeps"),  # a clock would stop at 10 epochs
    ],
)
def test_notes_for_a_short_budget_a_set_key_and_a_budget_beyond_the_sweeps(
    pydoc_data, tmp_path, monkeypatch, capsys, overrides, expected
):
    fake_calibration(monkeypatch, (0.05, 0.1))
    args = tiny_args(pydoc_data, tmp_path / "run", *AUTO, *BUDGET, *overrides, flags=["--dry-run"])
    assert cli(args) == 0
    assert expected in capsys.readouterr().out


def test_a_failed_calibration_trains_the_smallest_shape_and_says_why(pydoc_data, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("out of memory\nmore detail")

    monkeypatch.setattr(sizing, "calibrate", fails)
    cfg = tiny_config(pydoc_data, tmp_path, *AUTO, *BUDGET, "model.vocab_size=512")
    shape, note, speed = size_model(cfg, ((1.0, 180_000),), 128, 1, torch.device("cpu"), None)
    assert (shape.n_layers, shape.d_model, speed) == (1, 64, None)
    assert "timing the machine failed (out of memory): the smallest shape, 1 x 64, trains instead" in note


def test_a_world_of_ranks_is_refused_a_timed_choice_but_not_a_recorded_or_counted_one(pydoc_data, tmp_path):
    cfg = tiny_config(pydoc_data, tmp_path, *AUTO, *BUDGET, "model.vocab_size=512")
    with pytest.raises(UsageError, match=r"every rank would time its own device .* set model.n_layers"):
        size_model(cfg, ((1.0, 180_000),), 128, 2, torch.device("cpu"), None)
    counted = tiny_config(pydoc_data, tmp_path, *AUTO, "train.max_steps=50", "model.vocab_size=512")
    assert size_model(counted, ((1.0, 180_000),), 256, 2, torch.device("cpu"), None)[0].n_layers >= 1
    given = Speed(((1e6, 1e9),))  # an earlier plan's speed: nothing to time
    assert size_model(cfg, ((1.0, 180_000),), 256, 2, torch.device("cpu"), given)[2] is given


def test_heads_that_divide_no_width_of_the_ladder_are_one_line(pydoc_data, tmp_path, capsys):
    args = tiny_args(pydoc_data, tmp_path / "run", *AUTO, "model.n_heads=33", flags=["--dry-run"])
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.n_heads = 33: no depth of the ladder" in err


def test_the_end_says_the_speed_trained_at_beside_the_one_the_shape_was_chosen_for(pydoc_data, tmp_path, capsys):
    """Where the plan expected its time budget to end the run, the speed it timed chose the shape: the end event
    records an update's seconds at that speed, and the time line says them beside those trained at; where the two
    differ by more than a timing is good to (SENSITIVITY), it adds that a shape chosen at this speed could differ and
    how to time real steps. Where the steps bound the run (train.max_steps, the epoch limit), the speed chose
    nothing: nothing is said or recorded. A 2-minute budget on an H200 (2026-11-30) chose a shape that read the
    corpus to its limit in half the budget, and no line of the run said at what speed the shape had been chosen."""
    from types import SimpleNamespace

    from fasttrain.compute.distributed import World
    from fasttrain.planning.plan import plan_run
    from fasttrain.training.reporting import speed_words
    from fasttrain.training.trainer import Trainer

    cpu = torch.device("cpu")
    sets = (*AUTO, *BUDGET, "train.max_steps=3", "train.sample_tokens=0", "model.vocab_size=512")

    def trained(speed: Speed, out: Path) -> tuple[object, dict, str]:
        plan = plan_run(tiny_config(pydoc_data, out, *sets), World(), cpu, None, speed)
        summary = Trainer(plan.cfg, plan=plan).train()
        return plan, summary, next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  time "))

    # 0.1 megaflop a second: the 600 s budget would end the run before its 3 steps, so the speed chose the shape
    slow = Speed(((1e6, 1e5),))
    plan, summary, line = trained(slow, tmp_path / "slow")
    timed = plan.tokens_per_step / sizing.tokens_per_s(slow, plan.cfg.model, plan.cfg.train.seq_len)
    chosen_for = sizing.timed_step_seconds(plan.speed, plan.cfg.model, plan.cfg.train, plan.tokens_per_step)
    assert chosen_for == pytest.approx(timed) and 3 * timed > 600
    assert summary["timed_step_seconds"] == pytest.approx(timed, rel=1e-5)
    said = re.search(r"; (\S+) ms an update, (\S+)x the speed of the (\S+) ms its plan chose the shape for \(a ", line)
    assert said, line
    per_update, ratio, chosen = (float(said.group(i)) for i in (1, 2, 3))
    assert chosen == pytest.approx(1e3 * timed, rel=1e-2) and ratio == pytest.approx(chosen / per_update, rel=1e-2)
    assert line.endswith("a shape chosen at this speed could differ: `--dry-run --measure 100` times real steps)")
    # Ten teraflops a second: the 3 steps end the run, not the budget; the speed chose nothing
    plan, summary, line = trained(Speed(((1e6, 1e13),)), tmp_path / "fast")
    assert sizing.timed_step_seconds(plan.speed, plan.cfg.model, plan.cfg.train, plan.tokens_per_step) is None
    assert "timed_step_seconds" not in summary and "an update" not in line
    run = SimpleNamespace(step=10, train_seconds=1.0)  # 100 ms an update
    assert speed_words(run, 0.11) == "; 100 ms an update, 1.1x the speed of the 110 ms its plan chose the shape for"
    assert speed_words(run, 0.05).endswith("times real steps)") and speed_words(run, None) == ""
    assert speed_words(SimpleNamespace(step=0, train_seconds=0.0), 0.1) == ""  # nothing trained: nothing to compare
