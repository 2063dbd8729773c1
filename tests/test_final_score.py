"""The run's closing figure: final/'s weights scored on the whole val split (run_loop.score_final), what `fasttrain
evaluate RUN --split val` gives, in the end event and as the last line the run prints (issue 101 item 9)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from fasttrain import evaluate
from fasttrain.compute.device import native_bf16
from fasttrain.config import load_config
from fasttrain.evaluation.trained_model import inference_precision, load_trained
from fasttrain.system.errors import run_cli
from fasttrain.training import run_loop
from fasttrain.training.trainer import Trainer
from tests.conftest import spoil_after, tiny_config
from tests.test_mixture import mixture

# Two val batches an evaluation (the split has hundreds): the run's figures are not the whole split's
PARTIAL = ["train.eval_steps=2", "train.sample_tokens=0", 'train.final_eval="auto"']


def end_event(run: Path) -> dict:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "end"][-1]


def evaluated_bpb(run: Path, capsys) -> float:
    """What `fasttrain evaluate RUN --split val` prints as final/'s bits per byte."""
    with pytest.raises(SystemExit) as done:
        run_cli(evaluate.main, [str(run), "--split", "val"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"({run / 'final'})" in out
    found = re.search(r"bpb (\d+\.\d+)", out)
    assert found is not None, out
    return float(found.group(1))


def scores(out: str) -> list[str]:
    """The lines of a run's output that give a score."""
    return [line for line in out.splitlines() if "bits/byte" in line]


@pytest.mark.parametrize("case", ["last", "best", "ensemble", "mixture", "bf16"])
def test_the_run_closes_with_what_evaluate_gives_on_the_whole_split(pydoc_data, code_data, tmp_path, capsys, case):
    """The run ended on "1.962 bits/byte on the first 20 val batches" where `evaluate --split val` gave 1.7805 for
    the same final/: its last score is now final/'s on the whole split, the one evaluate gives, whichever weights
    final/ holds (the last step's, the best step's, an ensemble, a mixture's weighted total), to evaluate's printed
    digits; in bf16 too, which evaluate on a CPU ran in fp32 (1.8342 against the run's 1.83425, accuracy 0.2428
    against 0.2455); the done line keeps the last evaluation's figure, saying what it read."""
    if case == "bf16" and not native_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 instructions: a run there and evaluate both take fp32")
    run = tmp_path / "run"
    if case == "mixture":
        trainer = Trainer(load_config(None, mixture(pydoc_data, code_data, run, "train.max_steps=3", *PARTIAL)))
    else:
        sets = {
            "last": ["train.max_steps=3"],
            # learns for 3 steps, then every update zeroes the weights: final/ holds step 3's
            "best": ["train.max_steps=5", "train.eval_interval=1", "optim.lr=1e-2", 'checkpoint.final_weights="best"'],
            "ensemble": ["train.max_steps=3", "model.members=2"],
            "bf16": ["train.max_steps=3", "train.precision=bf16"],
        }[case]
        trainer = Trainer(tiny_config(pydoc_data, run, *sets, *PARTIAL))
    summary = (spoil_after(trainer, 3) if case == "best" else trainer).train()
    out = capsys.readouterr().out
    end = end_event(run)
    assert end["final_val_bpb"] == summary["final_val_bpb"] and end["final_val_rows"] > 2 * 4
    assert abs(end["final_val_bpb"] - end["val_bpb"]) > 1e-4  # not the last evaluation's figure
    assert abs(end["final_val_bpb"] - evaluated_bpb(run, capsys)) <= 5.1e-5  # evaluate prints 4 decimals
    # evaluate validates as the run did (at this size bf16 and fp32 part in the sixth digit, past what it prints)
    assert inference_precision(load_trained(run).cfg, torch.device("cpu")) == ("bf16" if case == "bf16" else "fp32")
    *_, done, closing = scores(out)
    assert "bits/byte on the first 2 val batches (best" in done
    assert closing.startswith(f"final/: {end['final_val_bpb']:.4f} bits/byte") and "on the whole val split" in closing
    assert out.rstrip("\n").endswith(closing)  # the run's last line
    if case == "best":  # the weights line names the step, its score left to the closing line
        assert end["weights_step"] <= 3 < end["step"]
        assert (
            f"(step {end['weights_step']}'s, the lowest validation loss; the checkpoint holds the last step's as trained)"
            in out
        )


def test_a_run_whose_evaluations_read_the_whole_split_closes_with_their_figure(pydoc_data, tmp_path, capsys):
    """Where evaluations read every val row, final/'s evaluation is its whole-split score: nothing is scored again."""
    sets = ["train.max_steps=2", "train.eval_steps=100000", "train.sample_tokens=0", "train.final_eval=true"]
    summary = Trainer(tiny_config(pydoc_data, tmp_path, *sets)).train()
    assert summary["final_val_bpb"] == summary["val_bpb"] and summary["final_val_seconds"] == 0
    *_, closing = scores(capsys.readouterr().out)
    assert closing.startswith(f"final/: {summary['val_bpb']:.4f} bits/byte") and "on the whole val split" in closing


def test_where_the_whole_split_costs_too_much_the_run_gives_the_command(pydoc_data, tmp_path, capsys, monkeypatch):
    """A whole split that would take more than the run allows (a tenth of its training or two minutes, both 0 here),
    or train.final_eval = false: the run's last line is the command that scores final/, and why it did not."""
    monkeypatch.setattr(run_loop, "FINAL_EVAL_SECONDS", 0.0)
    monkeypatch.setattr(run_loop, "FINAL_EVAL_SHARE", 0.0)
    summary = Trainer(tiny_config(pydoc_data, tmp_path / "auto", "train.max_steps=2", *PARTIAL)).train()
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert "final_val_bpb" not in summary and summary["final_val_estimate_seconds"] > 0
    command = f"final/: fasttrain evaluate {tmp_path / 'auto'} --split val scores it on the whole val split (about "
    assert out[-1].startswith(command) and "the run allows it; train.final_eval = true scores it anyway)" in out[-1]
    assert "bits/byte on the first 2 val batches (best" in scores("\n".join(out))[-1]
    summary = Trainer(
        tiny_config(pydoc_data, tmp_path / "off", "train.max_steps=2", *PARTIAL, "train.final_eval=false")
    ).train()
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert "final_val_bpb" not in summary
    assert (
        last
        == f"final/: fasttrain evaluate {tmp_path / 'off'} --split val scores it on the whole val split (train.final_eval = false)"
    )


def test_a_signal_cuts_the_closing_score_short(pydoc_data, tmp_path, capsys, monkeypatch):
    """Ctrl-C while final/ is scored on the whole split (the run has saved its end): the scoring stops at the next
    batch, and the run ends as usual, its last line the command that scores final/, and why it did not."""
    evaluate = Trainer.evaluate

    def interrupted(self, stop=lambda: False, whole=False):
        if whole:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self, stop, whole)

    monkeypatch.setattr(Trainer, "evaluate", interrupted)
    summary = Trainer(tiny_config(pydoc_data, tmp_path, "train.max_steps=2", *PARTIAL)).train()
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert "final_val_bpb" not in summary and summary["final_val_stopped_by"] == "SIGINT"
    assert (
        last
        == f"final/: fasttrain evaluate {tmp_path} --split val scores it on the whole val split (SIGINT cut its scoring short)"
    )
