"""Issue 59 (reliability, round six), the run: a compiled step that is wrong where the model is not goes on
uncompiled and blames no learning rate, and a compile that fails is one line with the run directory as it was.
Each case runs `python -m fasttrain.train` (its `main` by `run_cli`), and each failed before its fix.

torch.compile is made to misbehave here through its backend, the function that turns the traced graph into
code: one whose code returns NaN for the loss (as inductor's CPU code does under ATEN_CPU_CAPABILITY=avx2 in
torch 2.13), one that fails to compile (as inductor's C++ compile does under ATEN_CPU_CAPABILITY=default).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fasttrain.system.errors import run_cli
from fasttrain.train import main as train_main
from fasttrain.training.objective import NextTokenLoss
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


def test_a_compile_that_fails_is_one_line_and_takes_the_start_back(pydoc_data, tmp_path, capsys, monkeypatch):
    """Once torch's traceback of several screens, after the run directory was created."""
    compiled_by(monkeypatch, failing_backend)
    new = tmp_path / "new"
    code, out, err = train(tiny_args(pydoc_data, new, *RUN), capsys)
    assert code == 2
    assert err.splitlines() == [
        "error: torch.compile could not compile the model (RuntimeError: C++ compile error); "
        "--set train.compile=false trains without compiling"
    ]
    assert not new.exists()  # a new directory is removed again
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own")
    code, out, err = train(tiny_args(pydoc_data, mine, *RUN), capsys)
    assert code == 2 and err.startswith("error: torch.compile could not compile")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # one that existed keeps exactly what it had
