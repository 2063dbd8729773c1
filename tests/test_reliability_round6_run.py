"""Issue 59 (reliability, round six), the run: a compiled step that is wrong where the model is not goes on
uncompiled and blames no learning rate, and a compile that fails is one line and the run goes on uncompiled.
Each case runs `python -m fasttrain.train` (its `main` by `run_cli`), and each failed before its fix.

torch.compile is made to misbehave here through its backend, the function that turns the traced graph into
code: one whose code returns NaN for the loss (as inductor's CPU code does under ATEN_CPU_CAPABILITY=avx2 in
torch 2.13), one that fails to compile (as inductor's C++ compile does under ATEN_CPU_CAPABILITY=default).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fasttrain.config import shipped
from fasttrain.optimization.objective import NextTokenLoss
from fasttrain.system.errors import run_cli
from fasttrain.train import main as train_main
from tests.conftest import tiny_args

RUN = ["train.compile=true", "train.max_steps=4", "train.eval_interval=4", "train.sample_tokens=0"]


def nan_loss_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """Compiled code whose loss (the output that carries a gradient) is NaN: the rest is the graph's own."""

    def run(*args):
        return [o * float("nan") if isinstance(o, torch.Tensor) and o.requires_grad else o for o in gm(*args)]

    return run


def failing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    raise RuntimeError("C++ compile error\n\nCommand:\ng++ /tmp/torchinductor_user/xy/cxy.cpp -shared ...")


def compiled_by(monkeypatch, backend) -> None:
    """The Trainer's torch.compile of the objective compiles with `backend` instead of inductor."""
    monkeypatch.setattr(NextTokenLoss, "compile", lambda self, **options: nn.Module.compile(self, backend=backend))


def train(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m fasttrain.train args`."""
    with pytest.raises(SystemExit) as done:
        run_cli(train_main, args)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def events(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == kind]


def test_a_compiled_nan_where_the_model_is_finite_goes_on_uncompiled(pydoc_data, tmp_path, capsys, monkeypatch):
    """Once the run skipped its first steps and stopped at step 3 advising a lower learning rate."""
    compiled_by(monkeypatch, nan_loss_backend)
    code, out, err = train(tiny_args(pydoc_data, tmp_path / "run", *RUN), capsys)
    assert code == 0, err
    said = [line for line in out.splitlines() if "torch.compile" in line]
    assert len(said) == 1 and said[0].startswith("step 1: the compiled model's loss or gradient norm is not finite")
    assert "training goes on uncompiled" in said[0]
    assert "optim.lr" not in out + err and "warmup" not in out + err
    assert not events(tmp_path / "run", "skip")  # step 1 trained, on the plain objective's gradients
    (end,) = events(tmp_path / "run", "end")
    assert end["step"] == 4 and end["skipped_steps"] == 0
    (fallback,) = events(tmp_path / "run", "uncompiled")
    assert fallback["step"] == 1 and fallback["compiled_loss"] != fallback["compiled_loss"]  # NaN


def test_a_model_whose_own_loss_is_not_finite_still_gets_the_advice(pydoc_data, tmp_path, capsys, monkeypatch):
    """The check against the plain objective blames compiled code only where the plain one is finite."""
    real = NextTokenLoss.forward

    def nan_loss(self, *args, **kwargs):
        sums = real(self, *args, **kwargs)
        return sums._replace(loss=sums.loss * float("nan"))

    monkeypatch.setattr(NextTokenLoss, "forward", nan_loss)
    compiled_by(monkeypatch, "eager")
    code, out, err = train(tiny_args(pydoc_data, tmp_path / "run", *RUN, "recovery.max_skips=2"), capsys)
    assert code == 1
    assert "uncompiled" not in out + err
    assert "lower optim.lr, lengthen schedule.warmup_steps" in err


def test_a_compile_that_fails_is_one_line_and_the_run_goes_on_uncompiled(pydoc_data, tmp_path, capsys, monkeypatch):
    """Once torch's traceback of several screens, after the run directory was created; then (issue 59) a one-line
    error. Issue 64: the run goes on as a train.compile=false run would, to the same losses, and says so once."""
    plain = tmp_path / "plain"
    code, out, err = train(tiny_args(pydoc_data, plain, *RUN, "train.compile=false", "train.log_interval=1"), capsys)
    assert code == 0, err
    compiled_by(monkeypatch, failing_backend)
    run = tmp_path / "run"
    code, out, err = train(tiny_args(pydoc_data, run, *RUN, "train.log_interval=1"), capsys)
    assert code == 0, err
    said = [line for line in out.splitlines() + err.splitlines() if "torch.compile" in line]
    assert said == [
        "step 1: torch.compile could not compile the model (RuntimeError: C++ compile error): training goes on "
        "uncompiled (--set train.compile=false skips compiling)"
    ]
    (fallback,) = events(run, "uncompiled")
    assert fallback["step"] == 1 and fallback["compiled_loss"] is None and "C++ compile error" in fallback["why"]
    losses = {e["step"]: e["loss"] for e in events(plain, "train")}  # the compile's step is not logged on its own
    assert {e["step"]: e["loss"] for e in events(run, "train")} == {k: v for k, v in losses.items() if k > 1}
    (end,) = events(run, "end")
    assert end["step"] == 4 and end["skipped_steps"] == 0


def test_a_recompile_that_fails_later_is_one_line(pydoc_data, tmp_path, capsys, monkeypatch):
    """The first step compiles; the evaluation's recompile (no gradients: another graph) fails: the run cannot
    step around that one, and says so in one line."""
    compiles = []

    def first_only(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compiles.append(gm)
        return gm.forward if len(compiles) == 1 else failing_backend(gm, example_inputs)

    compiled_by(monkeypatch, first_only)
    code, out, err = train(tiny_args(pydoc_data, tmp_path / "run", *RUN), capsys)
    assert code == 2 and len(compiles) == 2
    assert err.splitlines() == [
        "error: torch.compile could not compile the model (RuntimeError: C++ compile error); "
        "--set train.compile=false trains without compiling"
    ]


def test_a_dry_run_names_the_config_file_it_planned(pydoc_data, tmp_path, capsys, monkeypatch):
    """A local file `base` wins over the shipped config of that name: the dry run said neither which."""
    shipped_base = shipped.file_of("base")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").write_text(shipped_base.read_text())
    sets = tiny_args(pydoc_data, tmp_path / "run", config="base")
    code, out, err = train([*sets, "--dry-run"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"config: {tmp_path / 'base'} (a file here, not the shipped 'base')"
    code, out, err = train([*sets, "--dry-run", "--json"], capsys)
    assert code == 0 and json.loads(out)["config_file"] == str(tmp_path / "base")
    (tmp_path / "base").unlink()
    code, out, err = train([*sets, "--dry-run"], capsys)
    assert code == 0 and out.splitlines()[0] == f"config: base (shipped, {shipped_base})"
    code, out, err = train([*sets, "--dry-run", "--json"], capsys)
    assert json.loads(out)["config_file"] == str(shipped_base)


def test_a_copied_run_directory_says_its_config_writes_into_the_original(pydoc_data, tmp_path, capsys):
    """train.out_dir is recorded absolute: the copy's config.toml trained into the original, silently. Now a new run
    from it says so, and a resume goes on in the copy."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    code, _, err = train(tiny_args(pydoc_data, original, "train.max_steps=2", "train.sample_tokens=0"), capsys)
    assert code == 0, err
    shutil.copytree(original, copy)
    note = (
        f"note: {copy / 'config.toml'} is the config of the run in {copy}, but its train.out_dir is {original}: "
        f"this run reads and writes there (--set train.out_dir={copy} for the run in this folder)"
    )
    # The run would be refused, the original being a run: the dry run plans, saying so after the note.
    code, out, err = train([str(copy / "config.toml"), "--dry-run"], capsys)
    refused = f"note: {original / 'checkpoints'}: holds checkpoints of an earlier run (up to step 2): the run would "
    assert code == 0 and out.splitlines()[1] == note and out.splitlines()[2].startswith(refused)
    # Resumed, the run is the one in the folder where it now is (a run directory moved or copied whole), said so
    here = (
        f"note: {copy / 'config.toml'} records train.out_dir = {original}: the run goes on in {copy}, where it now is"
    )
    code, out, err = train([str(copy / "config.toml"), "--dry-run", "--resume", "auto"], capsys)
    assert code == 0 and here in out.splitlines()
    code, out, err = train([str(copy / "config.toml"), "--dry-run", "--resume", "auto", "--json"], capsys)
    assert code == 0 and json.loads(out)["out_dir"] == str(copy) and err.splitlines() == [here]
    before = (original / "metrics.jsonl").read_bytes()
    code, out, err = train([str(copy / "config.toml"), "--resume", "auto"], capsys)  # at its end: evaluates again
    assert code == 0 and here in out.splitlines() and (original / "metrics.jsonl").read_bytes() == before
    # No note where the config is its own run's, or where --set chose the folder.
    for args in ([str(original / "config.toml")], [str(copy / "config.toml"), "--set", f"train.out_dir={copy}"]):
        code, out, err = train([*args, "--dry-run", "--resume", "auto"], capsys)
        assert code == 0 and "note:" not in out


def test_a_compile_that_fails_under_dry_run_measure_is_said_and_saves_nothing(
    pydoc_data, tmp_path, capsys, monkeypatch
):
    """--dry-run --measure takes real (compiled) steps; a compile failure there is said on the measured line (its
    steps are the uncompiled ones), and the run directory a dry run never creates is still not there."""
    compiled_by(monkeypatch, failing_backend)
    out_dir = tmp_path / "run"
    code, out, err = train([*tiny_args(pydoc_data, out_dir, *RUN), "--dry-run", "--measure", "2"], capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("measured")]
    assert line.startswith(
        "measured uncompiled (torch.compile could not compile the model (RuntimeError: C++ compile error)): "
    ), line
    assert not out_dir.exists()
