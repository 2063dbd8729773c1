"""Issue 49 (reliability, round five), mixtures and time budgets: each case through the real entry points
(`python -m fasttrain.train` and `evaluate`, by `run_cli`), each failing before its fix."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from fasttrain import evaluate, train
from fasttrain.config import load_config
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_args

QUIET = ("train.sample_tokens=0", "train.log_interval=1", "schedule.warmup_steps=1")


def copy(data: Path, tmp: Path, name: str) -> Path:
    """A copy of the prepared folder `data` at `tmp / name` (a path such as "a/x")."""
    shutil.copytree(data, tmp / name)
    return tmp / name


def sources(folders: list[Path], weights: list[float]) -> list[str]:
    """--set items of a mixture of `folders` by `weights`, in place of the tiny run's data.dir."""
    tables = ", ".join(f'{{dir="{f}", weight={w}}}' for f, w in zip(folders, weights))
    return ['data.dir=""', "data.inputs=[]", f"data.sources=[{tables}]"]


def run(data: Path, out: Path, *sets: str, program=train, argv: list[str] | None = None) -> int:
    """The exit status of `program` (default: a tiny training run of `data` into `out` with `sets`)."""
    with pytest.raises(SystemExit) as done:
        run_cli(program.main, argv if argv is not None else tiny_args(data, out, *QUIET, *sets))
    return done.value.code


def events(out: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_sources_whose_folders_share_a_name_get_distinct_names_and_the_whole_total(pydoc_data, code_data, tmp_path):
    """Item 2: sources a/x, b/x and x0 were named x0, x1, x0: the per-source figures collapsed and the total
    validation loss weighed two sources of three. Now each has its own name (the shortest distinguishing end
    of its path) and the total weighs all three."""
    folders = [copy(pydoc_data, tmp_path, "a/x"), copy(code_data, tmp_path, "b/x"), copy(pydoc_data, tmp_path, "x0")]
    out = tmp_path / "run"
    assert (
        run(
            pydoc_data,
            out,
            "train.max_steps=1",
            "train.eval_steps=2",
            *sources(folders, [0.5, 0.3, 0.2]),
            'train.monitor="val_loss.b/x"',
        )
        == 0
    )
    last = events(out, "eval")[-1]
    names = ["a/x", "b/x", "x0"]
    assert sorted(k.partition(".")[2] for k in last if k.startswith("val_loss.")) == names
    assert last["val_loss"] == pytest.approx(sum(w * last[f"val_loss.{n}"] for w, n in zip([0.5, 0.3, 0.2], names)))
    assert [s["name"] for s in events(out, "start")[0]["sources"]] == names


def test_evaluate_split_val_names_and_totals_sources_as_the_trainer(pydoc_data, code_data, tmp_path, capsys):
    """Item 3: `evaluate --split val` of a mixture of web/prepared and src/prepared reported the last source as
    the total; now its names and total are the trainer's."""
    folders = [copy(pydoc_data, tmp_path, "web/prepared"), copy(code_data, tmp_path, "src/prepared")]
    out = tmp_path / "run"
    assert run(pydoc_data, out, "train.max_steps=1", "train.eval_steps=1000", *sources(folders, [0.25, 0.75])) == 0
    trained = events(out, "eval")[-1]
    capsys.readouterr()
    assert run(pydoc_data, out, program=evaluate, argv=[str(out), "--split", "val"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"loss {trained['val_loss']:.4f}")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["src/prepared", "web/prepared"]
    assert f"loss {trained['val_loss.web/prepared']:.4f}" in lines[2]


def ran_into_a_fraction_change(pydoc_data: Path, code_data: Path, out: Path) -> tuple[str, ...]:
    """A 6-step mixture run into `out` that enters its code-only mix at step 3 (fraction 0.5); its --set items."""
    sets = (
        *sources([pydoc_data, code_data], [0.5, 0.5]),
        "data.mix=[{fraction=0.5, weights=[0, 1]}]",
        "train.eval_interval=100",
        "checkpoint.interval=100",
    )
    assert run(pydoc_data, out, "train.max_steps=6", *sets) == 0
    return sets


def test_a_longer_resume_keeps_a_fraction_change_the_run_had_entered(pydoc_data, code_data, tmp_path, capsys):
    """Item 4: a run of 6 steps entered its code-only mix at step 3 (fraction 0.5); resumed with
    train.max_steps = 24 the change moved to step 12, and steps 7 to 12 went back to the base weights. Now the
    change stays where it began, and the resume says so."""
    out = tmp_path / "run"
    sets = ran_into_a_fraction_change(pydoc_data, code_data, out)
    capsys.readouterr()
    argv = tiny_args(pydoc_data, out, *QUIET, "train.max_steps=24", *sets, flags=["--resume", "auto"])
    assert run(pydoc_data, out, argv=argv) == 0
    assert (
        "resume: data.mix[0] began at step 3 and stays in force (this config alone would place it at step 12)"
        in capsys.readouterr().out
    )
    web = {e["step"]: e[f"tokens.{pydoc_data.name}"] for e in events(out, "train")}
    assert web[3] == web[6] == web[12] == web[24]  # code only from step 3 on
    assert not [e for e in events(out, "mix") if e["step"] == 12]


def test_a_quiet_resume_reports_the_mix_its_loader_keeps(pydoc_data, code_data, tmp_path):
    """A --quiet resume skipped taking the mix its loader keeps along with the notes it did not print: the run
    read code only from step 3 on, but its metrics said the change began at step 12. Quiet or not, the events
    are the same."""
    out = tmp_path / "run"
    sets = ran_into_a_fraction_change(pydoc_data, code_data, out)
    argv = tiny_args(pydoc_data, out, *QUIET, "train.max_steps=24", *sets, flags=["--resume", "auto", "--quiet"])
    assert run(pydoc_data, out, argv=argv) == 0
    assert [e["step"] for e in events(out, "mix")] == [3]


def test_the_replay_of_a_budgeted_mixture_reads_the_mix_the_run_read(pydoc_data, code_data, tmp_path, capsys):
    """Item 5: the replay command a budgeted run prints (a step run of the steps it reached) placed a `fraction`
    change on its own, shorter length (step 2 of 9, where the run changed at step 5 of its 20) and refused a
    `step` change the run never reached. Now it pins each change at the step it took effect and leaves out the
    others: the replay's losses are the run's."""
    from fasttrain.training.trainer import Trainer
    from tests.conftest import tiny_overrides
    from tests.test_time_budget import FakeClock, timed

    out = tmp_path / "budgeted"
    sets = (
        *QUIET,
        *sources([pydoc_data, code_data], [0.5, 0.5]),
        "train.eval_interval=100",
        "checkpoint.interval=100",
        "data.mix=[{fraction=0.25, weights=[0.1, 0.9]}, {step=12, weights=[1, 0]}]",
    )
    budgeted = Trainer(
        load_config(None, [*tiny_overrides(pydoc_data, out), "train.max_steps=20", "train.max_time=9", *sets]),
        clock=FakeClock(),
    )
    timed(budgeted, [1.0]).train()
    budgeted.close()
    said = capsys.readouterr().out
    line = next(line for line in said.splitlines() if line.startswith("  replay "))
    replay = shlex.split(line.partition("--set ")[2].removesuffix(" (step for step)"))
    assert replay[-1] == "data.mix=[{step = 5, weights = [0.1, 0.9]}]"
    again, defaults = tmp_path / "replay", tmp_path / "defaults.toml"  # the Trainer's config: the defaults
    defaults.write_text("")
    assert run(pydoc_data, again, argv=tiny_args(pydoc_data, again, *sets, *replay, config=str(defaults))) == 0
    assert [e["loss"] for e in events(again, "train")] == [e["loss"] for e in events(out, "train")]
    assert [e["step"] for e in events(again, "mix")] == [5]


def test_a_budgeted_mixture_says_what_its_plans_assume(pydoc_data, code_data, tmp_path, capsys):
    """Item 14: a budgeted mixture laid its epochs per source and its mix changes out on train.max_steps alone
    ("read 4545 times over by this run", for a budget that read 9.6). Now the start says the figures hold for
    max_steps only if the budget gets there, and a resume lays them out on the end the budget projects."""
    sets = (
        *sources([pydoc_data, code_data], [0.5, 0.5]),
        "data.mix=[{fraction=0.5, weights=[0, 1]}]",
        "train.max_steps=50000",
        "train.eval_interval=100000",
        "checkpoint.interval=100000",
    )
    out = tmp_path / "run"
    assert run(pydoc_data, out, *sets, "train.max_time=0.2") == 0
    said = capsys.readouterr().out
    assert "times over in 50000 steps, if train.max_time lets the run get that far" in said
    assert "data.mix[0] from step 25000 (if train.max_time lets the run get that far)" in said
    assert "by this run" not in said
    argv = tiny_args(pydoc_data, out, *QUIET, *sets, "train.max_time=0.4", flags=["--resume", "auto"])
    assert run(pydoc_data, out, argv=argv) == 0
    said = capsys.readouterr().out
    assert "data.mix[0] from step 25000 (not reached by step ~" in said
    assert ", where train.max_time is projected to end the run" in said


def test_weights_whose_sum_overflows_are_normalized(pydoc_data, code_data, tmp_path, capsys):
    """Item 8: weights 9e307 and 9e307 (a sum past the largest float) were "normalized to 0, 0", then a
    ValueError traceback. They are divided by the largest first: an even mix."""
    sets = (
        *sources([pydoc_data, code_data], [9e307, 9e307]),
        "data.mix=[{step=1, weights=[1e308, 1e308]}]",
        "train.max_steps=2",
    )
    assert run(pydoc_data, tmp_path / "run", *sets) == 0
    said = capsys.readouterr().out
    assert "note: data.sources weights sum to more than 1.8e308, not 1: normalized to 0.5, 0.5" in said
    assert "note: data.mix[0].weights sum to more than 1.8e308, not 1: normalized to 0.5, 0.5" in said


def test_config_toml_records_mixture_folders_absolute(pydoc_data, code_data, tmp_path, monkeypatch, capsys):
    """Item 12: a run's config.toml recorded [[data.sources]] folders as typed (relative), so evaluate run from
    another directory failed, or would score another folder of that name. They are recorded absolute."""
    base = str(Path("configs/base.toml").resolve())
    monkeypatch.chdir(tmp_path)
    web, code = copy(pydoc_data, tmp_path, "web"), copy(code_data, tmp_path, "code")
    out = tmp_path / "run"
    argv = tiny_args(
        pydoc_data, out, *QUIET, "train.max_steps=1", *sources([Path("web"), Path("code")], [0.5, 0.5]), config=base
    )
    assert run(pydoc_data, out, argv=argv) == 0
    recorded = load_config(out / "config.toml").data.sources
    assert [s.dir for s in recorded] == [str(web), str(code)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert run(pydoc_data, out, program=evaluate, argv=[str(out), "--split", "val"]) == 0
    assert "  web: loss" in capsys.readouterr().out
