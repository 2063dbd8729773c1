"""Issue 65 (reliability, round seven), items 8 to 10: what a new user meets on a first run and the runs after it.

- A budgeted run resumed with a larger train.max_time goes on at the learning rate it had (it jumped back up,
  its progress measured against the new budget), and still ends on time; an inductor cache of its own for each
  instruction set a CPU run compiles under; the plan's memory line names a Muon run's state as Muon's.
- The README's first commands in its order: the dry run after the quickstart prints the plan and says in one line
  what the run would do; the quickstart run again is refused before the machine is timed or a plan note printed.
- The small things of a first run: "1 layer", "1 head", "1 step"; the progress bar closed before the summary,
  with "left" once; `fasttrain plot` without matplotlib names the extra, as the summary does; `fasttrain sample
  --help` names `fasttrain sample`.

Each case goes through the command line where the failure was seen (`python -m fasttrain.train`, `fasttrain`,
`fasttrain plot`), but the schedule's, whose fake clock (tests/test_time_budget.py) needs a Trainer, and the
inductor cache's, which checks the folder chosen and compiles nothing. Each failed before its fix, but the wsd
case, which holds what the fix keeps.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import replace

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from fasttrain import cli, plot, sample
from fasttrain import train as train_module
from fasttrain.compute.device import ISA_CACHE_PREFIX, key_inductor_cache
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import hidden_matrices
from fasttrain.system.errors import run_cli
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_args, tiny_config
from tests.test_time_budget import budgeted, events

QUIET = ["train.sample_tokens=0", "train.eval_interval=1000"]


def command(main, args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command's `main` run as the command line runs it."""
    with pytest.raises(SystemExit) as done:
        run_cli(main, args)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def killed_after(steps: int, seconds: float):
    """Step durations of `seconds` each, then a kill (kill -9 as far as the run directory knows) at the next."""
    for _ in range(steps):
        yield seconds
    raise KeyboardInterrupt


# Item 8: the schedule of a resumed budget, the inductor cache, the memory line.


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_a_budget_made_longer_on_resume_goes_on_at_the_rate_it_had(decay, pydoc_data, tmp_path, capsys):
    """Killed 6 s into a 10 s budget (saved at step 6), resumed with 20 s: the decay goes on from the progress the
    run had reached, 0.6, its rest spread over the 14 s left, so the rate falls on by less a step than before the
    resume (it went back up, the progress measured against the new budget: 0.35), and the run ends at 20 s on
    min_lr."""
    args = ("train.max_steps=0", "schedule.warmup_steps=2", f"schedule.decay={decay}", "checkpoint.interval=1")
    first = budgeted(pydoc_data, tmp_path, killed_after(6, 1.0), *args, "train.max_time=10")
    with pytest.raises(KeyboardInterrupt):
        first.train()
    first.close()
    resumed = budgeted(pydoc_data, tmp_path, [1.0], *args, "train.max_time=20", quiet=False)
    resumed.resume("auto")
    said = capsys.readouterr().out
    summary = resumed.train()
    assert (summary["step"], summary["train_seconds"]) == (20, 20.0)
    lrs = [e["lr"] for e in events(tmp_path, "train")]
    assert len(lrs) == 20
    before, after = lrs[4] - lrs[5], lrs[5] - lrs[6]  # the last step before the resume, the first after it
    assert 0 < after < before  # still decaying, by less a step: the rest is spread over a longer budget
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] == resumed.cfg.schedule.min_lr
    progress = [e["progress"] for e in events(tmp_path, "progress")]
    assert progress[5:7] == pytest.approx([6 / 10, 6 / 10 + (1 - 6 / 10) / 14])  # a 14th of the rest a second
    assert (
        f"resume: train.max_time 10s -> 20s: the {decay} schedule goes on from where it stood, the rest of it "
        f"spread over what is left of 20s of training, at most {resumed.cfg.train.max_steps} steps, "
        f"so the learning rate at step 6 is {lrs[6]:.3g} (the saved run's next was {lrs[5] - before:.3g})" in said
    )


def test_a_warmup_stable_decay_run_made_longer_before_its_cooldown_moves_the_cooldown(pydoc_data, tmp_path):
    """Where laying the schedule over the new budget leaves the rate as it was (a wsd run before its cooldown,
    at the peak), it is laid so: the cooldown, the last cooldown_fraction (0.2) of the schedule after the warmup
    (to progress 0.2), moves from 8.4 s of the 10 to 16.8 s of the 20."""
    args = ("train.max_steps=0", "schedule.warmup_steps=1", "schedule.decay=wsd", "checkpoint.interval=1")
    first = budgeted(pydoc_data, tmp_path, killed_after(3, 1.0), *args, "train.max_time=10")
    with pytest.raises(KeyboardInterrupt):
        first.train()
    first.close()
    resumed = budgeted(pydoc_data, tmp_path, [1.0], *args, "train.max_time=20")
    resumed.resume("auto")
    assert resumed.train()["train_seconds"] == 20.0
    lrs = [e["lr"] for e in events(tmp_path, "train")]
    peak = resumed.cfg.optim.lr
    assert resumed.cfg.schedule.cooldown_fraction == 0.2 and resumed.run.decay_from == 0.2
    assert lrs[:16] == [peak] * 16 and lrs[16] < peak and lrs[-1] == resumed.cfg.schedule.min_lr


def test_each_instruction_set_compiles_into_an_inductor_cache_of_its_own(pydoc_data, tmp_path, monkeypatch):
    """A compiled CPU run keys inductor's cache on ATEN_CPU_CAPABILITY's level and ONEDNN_MAX_CPU_ISA (code compiled
    under one failed under another); a folder the user set is kept, inductor's default or another level's
    (inherited from the process that started this one) is not the user's."""
    base = default_cache_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", base)  # what torch sets once it has compiled in a process
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")

    def folder_at(level: str, onednn: str | None = None) -> str | None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
        if onednn:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
        return key_inductor_cache(cpu)

    avx2, avx512 = folder_at("AVX2"), folder_at("AVX512")
    assert avx2 == os.path.join(base, f"{ISA_CACHE_PREFIX}AVX2-ALL") and avx512 != avx2
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == avx512
    assert folder_at("AVX512", onednn="avx2") == os.path.join(base, f"{ISA_CACHE_PREFIX}AVX512-AVX2")
    assert key_inductor_cache(torch.device("meta")) is None  # a GPU's cache is left to torch
    mine = str(tmp_path / "my-cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    assert folder_at("AVX2") is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == mine

    # The Trainer of a compiled run sets it before anything compiles (building it compiles nothing yet).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", base)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    Trainer(tiny_config(pydoc_data, tmp_path / "run", "train.compile=true"), quiet=True).close()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == avx2


def test_the_plans_memory_line_names_and_counts_a_muon_runs_state(pydoc_data, tmp_path, capsys):
    """Muon keeps one momentum buffer for each hidden matrix where AdamW keeps two moments: 4 bytes a value less."""
    plans = {}
    for name in ("adamw", "muon"):
        args = [*tiny_args(pydoc_data, tmp_path / name, f'optim.name="{name}"'), "--dry-run"]
        code, out, err = command(train_module.main, args, capsys)
        assert code == 0, err
        plans[name] = out
        code, out, err = command(train_module.main, [*args, "--json"], capsys)
        plans[name + " bytes"] = json.loads(out)["memory_bytes"]
    assert (
        "memory: about" in plans["muon"] and "(parameters, gradients, Muon momentum and AdamW state " in plans["muon"]
    )
    assert "(parameters, gradients and AdamW state " in plans["adamw"] and "Muon" not in plans["adamw"]
    with torch.device("meta"):
        model = Transformer(replace(tiny_config(pydoc_data, tmp_path).model, vocab_size=512))
    hidden = sum(p.numel() for p in hidden_matrices(model))
    assert plans["adamw bytes"] - plans["muon bytes"] == 4 * hidden


# Item 9: the README's commands in its order.


def test_the_readmes_first_commands_work_in_its_order(pydoc_data, tmp_path, capsys, monkeypatch):
    """The quickstart's run, then its dry run (the plan, and in one line what the run would do: exit 0, nothing
    written), then the quickstart again: refused with the run's own line before anything is planned (the
    machine timed for seconds, a note printed of a model it would not train)."""
    run = tmp_path / "base"
    code, _, err = command(train_module.main, tiny_args(pydoc_data, run, "train.max_steps=2", *QUIET), capsys)
    assert code == 0, err
    written = sorted(run.rglob("*"))
    refusal = (
        f"{run / 'checkpoints'}: holds checkpoints of an earlier run (up to step 2); continue it with --resume "
        "auto, start over with --overwrite, or set train.out_dir elsewhere"
    )
    code, out, err = command(train_module.main, [*tiny_args(pydoc_data, run, *QUIET), "--dry-run"], capsys)
    assert code == 0 and not err, err
    assert f"note: {refusal.replace('; continue', ': the run would refuse to start there; continue')}" in out
    assert "memory: about" in out and sorted(run.rglob("*")) == written
    code, out, err = command(train_module.main, [*tiny_args(pydoc_data, run, *QUIET), "--dry-run", "--json"], capsys)
    assert code == 0 and json.loads(out)["params"] and "the run would refuse to start there" in err

    def planned(*args, **kwargs):
        raise AssertionError("planned a run it then refuses")

    monkeypatch.setattr(train_module, "start_run", planned)
    monkeypatch.setattr(train_module, "plan_run", planned)
    code, out, err = command(train_module.main, tiny_args(pydoc_data, run, *QUIET), capsys)
    assert (code, err) == (2, f"error: {refusal}\n") and "note:" not in out
    code, out, err = command(
        train_module.main, [*tiny_args(pydoc_data, tmp_path / "new", *QUIET), "--resume", "auto"], capsys
    )
    assert code == 2 and "nothing to resume" in err and not (tmp_path / "new").exists()
    code, out, err = command(
        train_module.main, [*tiny_args(pydoc_data, tmp_path / "new", *QUIET), "--resume", "auto", "--dry-run"], capsys
    )
    assert code == 2 and "nothing to resume" in err and not (tmp_path / "new").exists()


# Item 10: the small things of a first run.


def test_one_layer_one_head_and_one_step_are_singular(pydoc_data, tmp_path, capsys):
    args = tiny_args(pydoc_data, tmp_path, "model.n_layers=1", "model.n_heads=1", "train.max_steps=1", *QUIET)
    code, out, err = command(train_module.main, args, capsys)
    assert code == 0, err
    # the members too, one as well (issue 91: only config.toml said how many a one-model run trained)
    assert "model: 0.05M parameters (1 model of 1 layer, d_model 32, 1 head, vocab 512, context 32)" in out
    assert "\ndone: 1 step, 128 tokens;" in out


def test_a_run_on_a_terminal_closes_its_bar_before_the_summary(pydoc_data, tmp_path, capsys, monkeypatch):
    """The bar (tqdm, on standard error, shown on a terminal) drawn last once the summary was printed, and its
    "left" said twice; the summary's plot hint, without matplotlib, names the extra that installs it."""
    errors = sys.stderr
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys, "stderr", sys.stdout)  # the bar and the lines in the order the terminal shows them
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    args = tiny_args(pydoc_data, tmp_path, "train.max_steps=3", "train.max_time=1h", "train.log_interval=1", *QUIET)
    code, out, err = command(train_module.main, args, capsys)
    assert code == 0, out
    summary = out[out.index("done: 3 steps") :]
    assert "\r" not in summary and "step/s" not in summary  # nothing of the bar after it
    assert re.search(r"left=(\d+[hms])+\]", out) and not re.search(r"left=\S+ left", out)  # "left=59m59s]"
    assert f'plot with   fasttrain plot {tmp_path} (needs matplotlib: pip install -e ".[plot]")' in summary

    monkeypatch.setattr(sys, "stderr", errors)
    code, out, err = command(plot.main, [str(tmp_path)], capsys)
    assert (code, err) == (2, 'error: plotting needs matplotlib: pip install -e ".[plot]"\n')


def test_each_tool_names_itself_as_the_user_ran_it(capsys):
    """`fasttrain sample --help` (and its errors) say `fasttrain sample`, `python -m fasttrain sample` says that,
    and `python -m fasttrain.sample` still its module."""
    code, out, _ = command(cli.main, ["sample", "--help"], capsys)
    assert code == 0 and out.startswith("usage: fasttrain sample ")
    code, _, err = command(cli.main, ["sample", "runs/base", "--bogus"], capsys)
    assert code == 2 and err.startswith("error: fasttrain sample: unrecognized arguments: --bogus")
    code, out, _ = command(lambda argv: cli.main(argv, "python -m fasttrain"), ["train", "--help"], capsys)
    assert code == 0 and out.startswith("usage: python -m fasttrain train ")
    code, out, _ = command(sample.main, ["--help"], capsys)
    assert code == 0 and out.startswith("usage: python -m fasttrain.sample ")
