"""A run's plan (fasttrain/planning/plan.py) and `fasttrain train --dry-run`: the plan's figures are the real
run's start event, and a dry run writes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fasttrain import train
from fasttrain.config import load_config
from fasttrain.model.transformer import Transformer
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_args
from tests.test_checkpoint import run_cli_code
from tests.test_reliability_start import init_from

pytestmark = pytest.mark.subprocess  # whole runs, if in this process
VARIES = {"available_bytes", "config_file"}  # what the device has free: read anew; the file: the dry run's alone


def dry_run(*args: str) -> tuple[int, str]:
    """`fasttrain train ARGS --dry-run`: the exit status and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        run_cli(train.main, [*args, "--dry-run"])
    return done.value.code, out.getvalue()


def start_event(out: Path) -> dict:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next({k: v for k, v in e.items() if k not in ("event", "time")} for e in events if e["event"] == "start")


def mixture(pydoc_data: Path, tmp_path: Path) -> list[str]:
    """A mixture of the corpus and a copy of it (one tokenizer), weighted 3:1, then 1:1 from step 2."""
    shutil.copytree(pydoc_data, tmp_path / "copy")
    return [
        'data.dir=""',
        "data.inputs=[]",
        "data.vocab_size=0",
        f'data.sources=[{{dir="{pydoc_data}", weight=3}}, {{dir="{tmp_path / "copy"}", weight=1}}]',
        "data.mix=[{step=2, weights=[1, 1]}]",
    ]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under `roots` with its size and modification time."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def trained(pydoc_data, tmp_path_factory) -> Path:
    """A tiny run, for an init_from model folder."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, tiny_args(pydoc_data, out, "train.max_steps=2", "train.sample_tokens=0", flags=["--quiet"]))
    assert done.value.code == 0
    return out


@pytest.mark.parametrize("case", ["base", "mixture", "init_from", "budgeted"])
def test_the_plan_is_the_runs_start_event(case, pydoc_data, trained, tmp_path):
    """The dry run's figures, --json, equal the start event the real run writes from its own plan."""
    sets = {
        "base": [],
        "mixture": mixture(pydoc_data, tmp_path),
        "init_from": [init_from(trained, tmp_path)],
        "budgeted": ["train.max_time=600", "train.max_steps=4", "schedule.warmup_steps=50"],
    }[case]
    args = tiny_args(
        pydoc_data,
        tmp_path / "run",
        "train.max_steps=4",
        "train.sample_tokens=0",
        "train.eval_steps=2",
        *sets,
        flags=["--quiet"],
    )
    status, printed = dry_run(*args, "--json")
    assert status == 0
    planned = json.loads(printed)
    assert not (tmp_path / "run").exists()  # the dry run wrote nothing there
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, args)
    assert done.value.code == 0
    started = start_event(tmp_path / "run")
    varies = VARIES | ({"speed"} if case == "budgeted" else set())  # a set shape under a budget: each plan times it
    assert {k: v for k, v in planned.items() if k not in varies} == {
        k: v for k, v in started.items() if k not in varies
    }
    assert planned["params"] > 0 and planned["tokens_per_step"] == 4 * 32
    if case == "mixture":
        assert [s["planned_epochs"] > 0 for s in planned["sources"]] == [True, True]
        assert planned["mix_changes"] == [[2, [0.5, 0.5]]]
    if case == "budgeted":
        assert planned["warmup_steps"] == 50 and planned["max_time"] == 600  # a budget's warmup is not fitted


def test_gpt2_small_plans_the_model_it_builds(pydoc_data, tmp_path):
    """The shipped gpt2-small config, planned on the CPU (too big to train here): its figures are the model's."""
    sets = [
        f"data.dir={pydoc_data}",
        "data.inputs=[]",
        'data.tokenizer=""',
        "train.device=cpu",
        "train.batch_size=2",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    status, printed = dry_run("configs/gpt2-small.toml", "--json", "--set", *sets)
    assert status == 0
    plan = json.loads(printed)
    cfg = load_config("configs/gpt2-small.toml", sets)
    with torch.device("meta"):
        model = Transformer(replace(cfg.model, vocab_size=50304))
    assert plan["params"] == model.num_params() and plan["flops_per_token"] == model.flops_per_token(1024)
    assert plan["tokens_per_step"] == 524288 and plan["accumulation"] == 524288 // (2 * 1024)
    assert plan["warmup_steps"] == 700 and plan["max_steps"] == 19000


def test_a_dry_run_of_unprepared_data_says_what_it_would_prepare_and_writes_nothing(tmp_path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "run"
    cache.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("FASTTRAIN_CACHE", raising=False)
    before = snapshot(tmp_path)
    status, printed = dry_run("configs/base.toml", "--set", f"train.out_dir={out}", "train.device=cpu")
    assert status == 0
    assert (
        "data: not prepared yet; the run prepares builtin:pydoc, builtin:sources into " + str(cache / "fasttrain")
        in printed
    )
    # planned at the corpus estimated from its bytes: stopped where it would have read it data.max_epochs times
    assert re.search(
        r"run: 2m of training(, at most \d+ steps)? x 4,096 tokens \(16 x 256 x 1 accumulation\) on cpu", printed
    )
    planned = (
        r"note: the data is not prepared yet: the model's shape and context are planned for ~(\S+)M training tokens"
    )
    assert 1 < float(re.search(planned, printed)[1]) < 5  # the topics and the stdlib's sources: ~2.7M on 3.11
    assert "note: optim.weight_decay_rule = repeats: weight decay 0.1 until the data is prepared" in printed
    for line in (
        # the head at 2 x 128; a budget's warmup ends by its first tenth at the latest (lr_on_progress)
        "schedule: wsd, lr 0.002 (min 0.0002), the tables 0.05, the head 0.00797, warmup 20 steps or the first 10% of "
        "the run, whichever ends first; ends after ",
        "memory: about",
        "kernel: rms_norm: auto, off on the cpu",
        "cadence: log every 10 steps",
        # base.toml's final/: what it will hold, decided after the last step
        "final/: the weights of the lowest validation loss, its output layer x the factor that scores the validation "
        "rows best (checkpoint.fit_temperature; the checkpoints keep the weights as trained)\n",
    ):
        assert line in printed
    from fasttrain.config import Config
    from fasttrain.training.plan_table import final_line

    assert final_line(Config()) == "final/: the last step's weights"  # the dataclasses' defaults
    # The shape is chosen for the machine's measured speed (model.n_layers = 0): the ladder's, as the note says.
    depth = int(re.search(r"^note: model\.n_layers = 0: depth (\d+) ", printed, re.M).group(1))
    s = "s" * (depth != 1)
    assert (
        f" parameters (1 model of {depth} layer{s}, d_model {64 * depth}, {depth} head{s}, vocab 4096, context 256)"
        in printed
    )
    assert snapshot(tmp_path) == before


def test_a_dry_run_of_document_rows_leaves_the_data_as_it_was(paragraph_data, tmp_path):
    """Padded rows need the shards' document index: a dry run computes it and caches nothing."""
    data = tmp_path / "data"
    shutil.copytree(paragraph_data, data)
    for index in data.glob("*.docs.npy"):
        index.unlink()
    before = snapshot(tmp_path)
    status, printed = dry_run(*tiny_args(data, tmp_path / "run", "data.batching=padded"))
    assert status == 0 and "read " not in printed.split("data:")[0]
    assert snapshot(tmp_path) == before


def test_measure_times_real_steps_and_saves_nothing(pydoc_data, tmp_path):
    before = snapshot(tmp_path)
    status, printed = dry_run(*tiny_args(pydoc_data, tmp_path / "run"), "--measure", "2", "--json")
    assert status == 0
    found = json.loads(printed)
    assert found["measured_steps"] == 2 and found["s_per_step"] > 0 and found["mfu"] is None
    # s_per_step is kept to the microsecond, so it gives tokens_per_s back to well under 1%
    assert found["tokens_per_s"] == pytest.approx(4 * 32 / found["s_per_step"], rel=0.01)
    assert found["projected_seconds"] == pytest.approx(10 * found["s_per_step"], abs=0.1)  # rounded to 0.1 s
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], None),
        (["--resume", "auto-or-new"], None),
        (["--overwrite"], None),
        (["--resume", "EMPTY"], "no checkpoint saved there yet"),
    ],
)
def test_a_dry_run_checks_train_out_dir_as_the_run_would(flags, expected, pydoc_data, trained, tmp_path, capsys):
    """A resume of a folder without saves is the run's own line; resuming the run there, or replacing it, plans,
    and so does a new run over another run's checkpoints (no --overwrite), whose refusal a note says (the dry
    run writes nothing there). Nothing changes there."""
    flags = [str(tmp_path) if f == "EMPTY" else f for f in flags]
    before = snapshot(trained)
    code = run_cli_code(train.main, [*tiny_args(pydoc_data, trained, "train.max_steps=4"), *flags, "--dry-run"])
    out, err = capsys.readouterr()
    refused = "holds checkpoints of an earlier run (up to step 2): the run would refuse to start there; continue"
    assert (refused in out) == (not flags), out
    if expected is None:
        assert code == 0, err
    else:
        assert code == 2 and expected in err and err.count("\n") == 1, err
    assert snapshot(trained) == before


@pytest.mark.parametrize(
    "sets, said",
    [
        (["train.compile=false", 'train.compile_mode="max-autotune"'], '"max-autotune" does nothing: train.compile is'),
        (["train.compile=true", 'train.compile_mode="reduce-overhead"'], "adds only CUDA graphs, which a CPU has none"),
        (["train.compile=true", 'train.compile_mode="max-autotune"'], None),  # it tunes a CPU's matmul templates
    ],
)
def test_a_compile_mode_that_does_nothing_is_a_note(sets, said, pydoc_data, tmp_path, capsys):
    """train.compile_mode without a compile, or "reduce-overhead" (CUDA graphs) on a CPU: the plan says in a line
    that it changes nothing, and the run goes on."""
    assert run_cli_code(train.main, tiny_args(pydoc_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "train.compile_mode" in line]
    assert notes == ([] if said is None else [notes[0]]) and (said is None or said in notes[0]), notes


@pytest.mark.parametrize("case", ["topics", "code", "mixture"])
def test_the_dry_run_records_each_choice_with_its_reason_and_what_it_measured(
    case, pydoc_data, code_data, tmp_path, monkeypatch
):
    """A self-sized budget on a small corpus read many times (the topics, whose validation text repeats their training
    text; code, whose does not; a mixture): `--dry-run --json`, which is the start event of metrics.jsonl, holds each
    choice (shape, context, epoch limit and stop, weight decay), the note that explains it, and what the plan
    measured to make it: the machine's speed and the most-read source's overlap."""
    from fasttrain.planning import sizing
    from fasttrain.planning.repeats import RECALLED
    from fasttrain.planning.speed import Speed

    speed = Speed(((1e6, 1e11),))  # fast enough to read the corpus to its limit in the budget
    monkeypatch.setattr(sizing, "calibrate", lambda cfg, device, update, loss, depths=(): speed)
    sets = ["model.n_layers=0", "model.d_model=0", "model.n_heads=0", "train.max_steps=0", "train.max_time=600"]
    sets += ["train.seq_len=0", "model.max_seq_len=64", 'optim.weight_decay_rule="repeats"']
    if case == "mixture":  # the topics and the code, 3:1 (a budget has no steps to place data.mix changes at)
        sources = f'[{{dir="{pydoc_data}", weight=3}}, {{dir="{code_data}", weight=1}}]'
        sets += ['data.dir=""', "data.inputs=[]", "data.vocab_size=0", f"data.sources={sources}"]
    data = code_data if case == "code" else pydoc_data
    sets += ["data.vocab_size=0"] if case == "code" else []  # prepared with the topics' tokenizer: the folder's
    status, printed = dry_run(*tiny_args(data, tmp_path / "run", *sets, flags=["--quiet"]), "--json")
    assert status == 0, printed
    plan = json.loads(printed)
    notes = plan["notes"]

    def said(start: str) -> str:
        found = [n for n in notes if n.startswith(start)]
        assert len(found) == 1, (start, notes)
        return found[0]

    assert said("model.n_layers = 0: ").startswith(f"model.n_layers = 0: depth {plan['shape']['n_layers']} ")
    assert said("train.seq_len = 0: ").startswith(f"train.seq_len = 0: {plan['seq_len']} ")
    assert plan["speed"] == {"points": [[1e6, 1e11]]}
    overlap = plan["overlap"]
    assert overlap["source"] in [s["name"] for s in plan["sources"]] and 0 <= overlap["fraction"] <= 1, overlap
    assert said(f"train.max_steps = {plan['max_steps']}: ")  # the budget stops at the epoch limit
    if overlap["fraction"] >= RECALLED:  # validation rewards recall: data.max_epochs holds
        assert plan["epoch_limit"] == 10 and case != "code"
    else:  # new text: a lower limit, said with the overlap that set it
        limit = said("optim.weight_decay_rule = repeats: the budget reads")
        assert plan["epoch_limit"] < 10 and f"at most {plan['epoch_limit']:g} times" in limit, (plan, notes)
        assert f"{overlap['fraction']:.1%} of its validation" in limit
    decay = said("optim.weight_decay_rule = repeats: weight decay")
    assert f"weight decay {plan['weight_decay']:g}" in decay or f"-> {plan['weight_decay']:g}: " in decay, decay


def test_the_config_walk_counts_stops_places_climbs_and_returns():
    """benchmarks/studies/config_walk.py's counts of a walk: down from the launch to the plan, down to config/, back up
    to the plan (a climb, and a return), across to shape.py and back (a return, not a climb: the same floor)."""
    from benchmarks.studies.config_walk import counts

    walk = ["training.launch.start_run", "planning.plan.plan_run", "config.prepared.resolve", "planning.plan.notes",
            "planning.shape.size_run", "planning.plan.kernel_reasons"]  # fmt: skip
    assert counts([f"fasttrain.{stop}" for stop in walk]) == {"stops": 6, "places": 4, "climbs": 1, "returns": 2}
