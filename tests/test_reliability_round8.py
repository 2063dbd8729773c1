"""Issue 82 (reliability, round eight), items 3 and 5 to 8: documented options the tools misjudged, and messages
that said what was not so.

- `fasttrain doctor` passes the recipe options whose parameters start at zero by design (model.smear,
  model.zero_init_projections): their gradients are zero before the first update, not dead.
- A config rule that needs another setting's value names the value it needs, not the one set.
- A resume with model.zero_init_projections changed goes on, saying in a line that the key changes nothing for it
  (it chooses only the weights a new run starts from); it was refused as a model of another shape.
- A budgeted run on a CPU says that other programs were running when the machine was timed from the threads
  runnable then, not from the load average, which counts for a minute a program that has ended.
- The README's steps after the quickstart, in its order: its fixed-shape run has a directory of its own, and its
  summary says nothing of a budget it has not; a run of steps under a budget has nothing left at its last step; a
  resume of a finished run says in one line that it trains nothing; the summary's plot hint is `fasttrain plot`.

Each case goes through the command line where the failure was seen, but the doctor's second look at a gradient
still zero (a planted fault, as tests/test_doctor.py plants them) and the count of this process's own runnable
threads. Each failed before its fix, but that second look, which holds what the fix keeps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fasttrain import doctor
from fasttrain import train as train_module
from fasttrain.planning import sizing
from fasttrain.planning.sizing import Speed
from fasttrain.system import machine_load
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_args
from tests.test_doctor import doctor as diagnosed
from tests.test_doctor import failed
from tests.test_sizing import AUTO


def command(main, args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command's `main` run as the command line runs it."""
    with pytest.raises(SystemExit) as done:
        run_cli(main, args)
    out, err = capsys.readouterr()
    return done.value.code, out, err


# Item 3: the doctor and parameters that start at zero on purpose.


@pytest.mark.parametrize("option", ["model.smear=true", "model.zero_init_projections=true"])
def test_the_doctor_passes_parameters_that_start_at_zero_by_design(option, pydoc_data, tmp_path, capsys):
    args = tiny_args(pydoc_data, tmp_path, "optim.lr=1e-2", option) + ["--overfit-steps", "150"]
    code, out, _ = command(doctor.main, args, capsys)
    assert code == 0, out
    assert "8 of 8 checks passed" in out
    late = "smear_gate.weight" if option == "model.smear=true" else "blocks.0.attn.qkv.weight"
    assert re.search(f"PASS  gradients .* only after the first update.*{late}", out)


def test_a_gradient_zero_after_the_first_update_still_fails(pydoc_data, tmp_path):
    """The second look is no pass for a parameter whose gradient stays zero: here one cut off by a hook."""

    def cut(trainer):
        trainer.model.blocks[0].attn_norm.weight.register_hook(torch.zeros_like)

    checks = diagnosed(pydoc_data, tmp_path, cut)
    assert failed(checks) == ["gradients", "update"]
    assert "1 of 14 parameters: blocks.0.attn_norm.weight gradient all zero" == checks["gradients"].detail
    assert "1 of 14 parameters unchanged: blocks.0.attn_norm.weight" == checks["update"].detail


# Item 5: a rule that needs a value names the value needed, then the one set.


@pytest.mark.parametrize(
    "given, said",
    [
        (
            ["checkpoint.keep_best=false"],  # base.toml's final_weights = "best"
            'checkpoint.final_weights = "best" needs checkpoint.keep_best = true, not false',
        ),
        (
            ['optim.name="sgd"', "optim.sgd.nesterov=true", "optim.sgd.momentum=0.0"],
            "optim.sgd.nesterov = true needs optim.sgd.momentum > 0, not 0.0",
        ),
    ],
)
def test_a_needs_rule_names_the_value_needed(given, said, pydoc_data, tmp_path, capsys):
    code, _, err = command(train_module.main, tiny_args(pydoc_data, tmp_path, *given), capsys)
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err


# Item 6: an init-only [model] key changed on resume.


def test_a_resume_may_change_an_init_only_key(pydoc_data, tmp_path, capsys):
    """(A key that shapes the model is still refused: tests/test_bad_input.py.)"""
    quick = ["train.max_steps=2", "train.sample_tokens=0", "schedule.warmup_steps=1"]
    assert command(train_module.main, tiny_args(pydoc_data, tmp_path, *quick), capsys)[0] == 0
    flipped = tiny_args(pydoc_data, tmp_path, *quick, "train.max_steps=3", "model.zero_init_projections=true")
    code, out, err = command(train_module.main, [*flipped, "--resume", "auto"], capsys)
    assert code == 0, err
    note = [line for line in out.splitlines() if "zero_init_projections" in line]
    assert note == [
        "resume: model.zero_init_projections = False there, True here: it chooses only the weights a new run starts "
        "from; this run goes on from the checkpoint's"
    ]
    end = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (end["event"], end["step"]) == ("end", 3)


# Item 7: the busy note reads what runs now.


@pytest.mark.parametrize("runnable, said", [(1, None), (4, "3 threads runnable besides this run's, on 2 cores")])
def test_the_busy_note_reads_what_runs_now(runnable, said, pydoc_data, tmp_path, monkeypatch, capsys):
    """Right after another program ended, the 1-minute load average still counts it (1.9 on 2 cores): the run
    queue of that instant holds this process alone, and the plan says nothing of a busy machine; 3 threads of
    other programs runnable as it is timed, and it says so."""
    queue = tmp_path / "loadavg"
    queue.write_text(f"1.90 0.71 0.26 {runnable}/312 4242\n")
    monkeypatch.setattr(machine_load, "RUN_QUEUE", str(queue))
    monkeypatch.setattr(machine_load, "own_runnable", lambda: 1)  # the reading thread, whatever else this one runs
    monkeypatch.setattr(machine_load.os, "getloadavg", lambda: (1.9, 0.71, 0.26))
    monkeypatch.setattr(machine_load.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # 2 cores, any machine
    monkeypatch.setattr(sizing, "calibrate", lambda cfg, device, update, loss, depths=(): Speed(((1e6, 1e9),)))
    budget = tiny_args(pydoc_data, tmp_path / "run", *AUTO, "train.max_steps=0", "train.max_time=60")
    code, out, err = command(train_module.main, [*budget, "--dry-run"], capsys)
    assert code == 0, err
    assert "load average" not in out and "looked busy" not in out
    if said:
        assert f"other programs were running when the machine was timed ({said})" in out, out
    else:
        assert "other programs" not in out, out


def test_this_process_counts_its_own_running_thread():
    assert machine_load.own_runnable() >= 1  # the one reading


# Item 8: the README's own steps, tried in order after the quickstart.

README = Path(__file__).resolve().parents[1] / "README.md"
QUIET = ["train.sample_tokens=0", "train.eval_interval=1000"]
SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "train.max_steps=2"]  # after the README's


def test_the_readmes_fixed_shape_run_after_the_quickstart(pydoc_data, tmp_path, monkeypatch, capsys):
    """The README's fixed shape (its --set items, the shape and steps made test-sized after them) after the
    quickstart's run in runs/base: it trains in a directory of its own (it was refused for the first run's
    checkpoints), its summary has no train.max_time to name and names the plot command the README teaches, and
    its resume, with nothing left to train, says so."""
    fixed = re.search(r"`--set (model\.n_layers=4[^`]*)`", README.read_text()).group(1).split()
    assert "train.out_dir=runs/fixed" in fixed
    base = README.parent / "configs" / "base.toml"
    assert "train.out_dir=runs/fixed" in base.read_text()  # its comment, which repeats the example
    monkeypatch.chdir(tmp_path)
    quickstart = tiny_args(pydoc_data, "runs/base", "train.max_steps=2", *QUIET, config=str(base))
    assert command(train_module.main, quickstart, capsys)[0] == 0
    args = tiny_args(pydoc_data, "runs/base", *QUIET, *fixed, *SMALL, config=str(base))
    code, out, err = command(train_module.main, args, capsys)
    assert code == 0, err
    summary = out[out.index("done: 2 steps") :]
    assert re.search(r"\n  time +\S+ training, \S+ wall time in this process\n", summary), summary
    assert "max_time" not in summary
    assert "\n  plot with   fasttrain plot runs/fixed" in summary
    code, out, err = command(train_module.main, [*args, "--resume", "auto"], capsys)
    assert code == 0, err
    assert (
        "resume: the run is at its end (step 2, train.max_steps = 2): nothing to train, it only evaluates and "
        "reports again; a larger train.max_steps trains on\n"
    ) in out


def test_a_run_of_steps_under_a_budget_has_nothing_left_at_its_end(pydoc_data, tmp_path, capsys):
    """The README's `--set train.max_steps=50` on base.toml's 2-minute budget: the steps end the run, and its
    last line said the rest of the budget was left ("step 50/~50 (100.0%) ... 1m44s left")."""
    args = tiny_args(pydoc_data, tmp_path, "train.max_time=2m", "train.max_steps=3", "train.log_interval=1", *QUIET)
    code, out, err = command(train_module.main, args, capsys)
    assert code == 0, err
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and steps[-1].endswith("| 0s left"), steps
    left = [
        float(json.loads(line)["seconds_left"]) for line in (tmp_path / "metrics.jsonl").open() if '"train"' in line
    ]
    assert left[-1] == 0 and left[0] < 60  # the steps' time at the speed so far, not the 2 minutes' rest


# Item 2: one count of epochs, the loader's.


def test_the_epoch_cap_counts_what_the_loader_reads(code_data, tmp_path, capsys):
    """A self-sized budget on a corpus whose epoch is no whole number of batches (the loader drops each epoch's rows
    that fill no batch): the cap, the sizing note, the start's planned epochs and the warnings all count the loader's
    epochs, so the run stops at data.max_epochs of them and no warning says it reads more. 5ff7105 counted the
    corpus's tokens for the cap (13.0 loader epochs in a run that 'stops at 10') and the sizing note (7.2 where the
    start said 9.33)."""
    from fasttrain.compute.distributed import World
    from fasttrain.config import load_config
    from fasttrain.planning.plan import plan_run
    from fasttrain.training.reporting import epoch_warnings, start_lines
    from tests.conftest import tiny_overrides

    sets = [*AUTO, "data.vocab_size=0", "train.max_steps=0", "train.max_time=600", "train.batch_size=16"]
    cfg = load_config(None, [*tiny_overrides(code_data, tmp_path), *sets])
    fast = Speed(((1e6, 1e13),))  # every depth would read the corpus far more than data.max_epochs times
    plan = plan_run(cfg, World(), torch.device("cpu"), None, fast)
    t = plan.cfg.train
    batches_per_epoch = plan.rows_per_epoch[0] // t.batch_size
    assert plan.sources[0].data.meta["tokens"]["train"] % (t.batch_size * t.seq_len) != 0  # a part batch is dropped
    assert t.max_steps == 10 * batches_per_epoch  # exactly ten of the loader's epochs
    reading = plan.reading(0, 0.0)
    assert reading.epochs == (pytest.approx(10.0),) and epoch_warnings(plan, reading) == []
    sizing_note = next(n for n in plan.notes if n.startswith("model.n_layers = 0"))
    assert ", 10.0 epochs of " in sizing_note, sizing_note
    assert not [line for line in start_lines(plan, reading) if line.startswith("warning")]
