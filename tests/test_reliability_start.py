"""Issue 43, a run's start: whatever can refuse a run does so before its directory changes, a start that fails
before its first step leaves the directory as it was (or no directory), --overwrite replaces the earlier run's
files and only those, and a run from model.init_from starts from weights that were checked.

The Hugging Face models here are the saved tiny run exported with `export --hf` (no transformers needed),
damaged where a case needs it; `hf_model` is shared with the bad-input table."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import tokenizers
import torch

from fasttrain import export, plot, train
from fasttrain.system.errors import run_cli
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_args, tiny_config

QUICK = ["train.max_steps=2", "schedule.warmup_steps=1", "train.sample_tokens=0"]


def hf_model(run: Path, out: Path, damage: Callable[[Path], None] | None = None) -> str:
    """The trained run `run` exported in Hugging Face's Llama layout to `out`, then `damage(out)`: a model
    folder model.init_from takes."""
    with contextlib.redirect_stdout(io.StringIO()):
        export.main([str(run), "--hf", "--out", str(out)])
    if damage:
        damage(out)
    return str(out)


def init_from(run: Path, tmp: Path, damage: Callable[[Path], None] | None = None) -> str:
    """The --set item of a run starting from `run` exported to `tmp`/hf and damaged by `damage`."""
    return f"model.init_from={hf_model(run, tmp / 'hf', damage)}"


def edit_config(**changes) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **changes}))

    return damage


def edit_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        tensors = safetensors.torch.load_file(d / "model.safetensors")
        tensors[name] = change(tensors[name]).contiguous()
        safetensors.torch.save_file(tensors, d / "model.safetensors", {"format": "pt"})

    return damage


def nan(t: torch.Tensor) -> torch.Tensor:
    return t.index_fill(0, torch.tensor([1]), float("nan"))


def index_outside(d: Path) -> None:
    """An index whose weight_map names a file beside the model folder, not in it."""
    names = safetensors.torch.load_file(d / "model.safetensors")
    (d / "model.safetensors").rename(d.parent / "elsewhere.safetensors")
    weight_map = {name: "../elsewhere.safetensors" for name in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def another_tokenizer(d: Path) -> None:
    """The model folder's tokenizer.json, with one token more: not the one the data was tokenized with."""
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(["<|another|>"])
    tok.save(str(d / "tokenizer.json"))


def snapshot(directory: Path) -> dict[str, str]:
    """Every file and directory under `directory`, files with a hash of their bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(directory.rglob("*"))
    }


def cli(main, args: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of a command run as `python -m` runs it."""
    with pytest.raises(SystemExit) as done:
        run_cli(main, args)
    return done.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(pydoc_data, tmp_path_factory) -> Path:
    """A finished tiny run (read-only: cases copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, tiny_args(pydoc_data, run, *QUICK))
    assert done.value.code == 0
    return run


def test_overwrite_refused_for_an_init_from_context_shorter_than_seq_len_keeps_the_old_run(
    pydoc_data, trained, tmp_path, capsys
):
    """max_position_embeddings 16 against train.seq_len 32: --overwrite deleted checkpoints/ and final/, then the
    first step died with a ValueError. Now the init_from shape is validated as any config is, first."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    source = hf_model(trained, tmp_path / "hf", edit_config(max_position_embeddings=16))
    code, err = cli(
        train.main, tiny_args(pydoc_data, run, *QUICK, f"model.init_from={source}", flags=["--overwrite"]), capsys
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "train.seq_len = 32 exceeds model.max_seq_len = 16" in err and "hf/config.json" in err
    assert snapshot(run) == before


def out_of_memory(trainer: Trainer):
    raise RuntimeError("CUDA out of memory (simulated)")


@pytest.mark.parametrize("where", ["new nested directory", "directory with a user file", "resumed run", "overwrite"])
def test_a_start_that_fails_before_its_first_step_leaves_the_directory_as_it_was(
    pydoc_data, trained, tmp_path, monkeypatch, where
):
    """A first step that fails (out of memory, a compiler error) left `.lock`, config.toml and metrics.jsonl in
    a new directory, rewrote a resumed run's config.toml and appended to its metrics, and after --overwrite the
    earlier run was gone. Now the start is taken back whole."""
    run = tmp_path / "runs" / "a" / "run" if where == "new nested directory" else tmp_path / "run"
    flags, sets = [], []
    if where == "directory with a user file":
        run.mkdir()
        (run / "notes.txt").write_text("mine")
    elif where in ("resumed run", "overwrite"):
        shutil.copytree(trained, run)
        flags = ["--resume", "auto"] if where == "resumed run" else ["--overwrite"]
        sets = ["train.max_steps=4"]  # a resume that extends the run rewrites config.toml
    before = snapshot(tmp_path)
    monkeypatch.setattr(Trainer, "step", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_cli(train.main, tiny_args(pydoc_data, run, *QUICK, *sets, flags=flags))
    assert snapshot(tmp_path) == before


def test_a_refused_start_creates_no_directory(pydoc_data, trained, tmp_path, capsys):
    """A model folder without weights was refused after the lock had made the run directory: `.lock` alone
    stayed behind."""
    source = hf_model(trained, tmp_path / "hf", lambda d: (d / "model.safetensors").unlink())
    code, err = cli(train.main, tiny_args(pydoc_data, tmp_path / "run", *QUICK, f"model.init_from={source}"), capsys)
    assert code == 2 and "holds no model.safetensors" in err, err
    assert not (tmp_path / "run").exists()


def test_overwrite_replaces_the_earlier_runs_exports_and_plot_and_nothing_else(pydoc_data, trained, tmp_path, capsys):
    """--overwrite kept the earlier run's export/, export-hf/ and curves.png beside the new run's weights."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    hf_model(run, run / "export-hf")
    for command, args in ((export.main, [str(run)]), (plot.main, [str(run)])):
        with contextlib.redirect_stdout(io.StringIO()):
            assert command(args) == 0
    (run / "notes.txt").write_text("mine")
    (run / "wandb").mkdir()
    (run / "wandb" / "offline-run").write_text("not synced yet")
    assert {"export", "export-hf", "curves.png"} <= {p.name for p in run.iterdir()}
    code, err = cli(train.main, tiny_args(pydoc_data, run, *QUICK, flags=["--overwrite"]), capsys)
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.toml",
        "final",
        "metrics.jsonl",
        "notes.txt",
        "tokenizer.json",
        "wandb",
    ]
    assert (run / "notes.txt").read_text() == "mine" and (run / "wandb" / "offline-run").exists()
    assert [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()][0] == "start"


def test_a_resumed_init_from_run_needs_no_source_folder(pydoc_data, trained, tmp_path, capsys):
    """Its weights come from the checkpoint and its shape from config.toml, but the source's config.json was
    read anyway: with the folder gone the resume was refused. A new run there still needs it, and says so."""
    run, sets = tmp_path / "run", [*QUICK, init_from(trained, tmp_path)]
    code, err = cli(train.main, tiny_args(pydoc_data, run, *sets), capsys)
    assert code == 0, err
    shutil.rmtree(tmp_path / "hf")
    code, err = cli(
        train.main, tiny_args(pydoc_data, run, *sets, "train.max_steps=4", flags=["--resume", "auto"]), capsys
    )
    assert code == 0, err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    before = snapshot(run)
    code, err = cli(train.main, tiny_args(pydoc_data, run, *sets, flags=["--overwrite"]), capsys)
    assert code == 2 and err.count("\n") == 1 and "hf/config.json: no such file (model.init_from)" in err, err
    assert snapshot(run) == before


def test_a_resumed_init_from_run_reads_its_checkpoint_not_the_source_weights(
    pydoc_data, trained, tmp_path, capsys, monkeypatch
):
    """A resume read model.init_from's weights (minutes for a large model, at every elastic restart) and then
    replaced them with the checkpoint's. A new run reads them once; so does a Trainer made `resuming` that
    starts anew after all."""
    from fasttrain.training import trainer as trainer_module

    run, sets = tmp_path / "run", [*QUICK, init_from(trained, tmp_path)]
    real, reads = trainer_module.read_hf_llama_weights, []
    monkeypatch.setattr(trainer_module, "read_hf_llama_weights", lambda *args: reads.append(args) or real(*args))
    assert cli(train.main, tiny_args(pydoc_data, run, *sets, flags=["--resume", "auto-or-new"]), capsys)[0] == 0
    assert len(reads) == 1
    code, err = cli(
        train.main, tiny_args(pydoc_data, run, *sets, "train.max_steps=4", flags=["--resume", "auto"]), capsys
    )
    assert code == 0 and len(reads) == 1, err
    fresh = Trainer(tiny_config(pydoc_data, tmp_path / "fresh", *sets), quiet=True, resuming=True)
    assert len(reads) == 1
    fresh.train()
    assert len(reads) == 2
    fresh.close()


def test_an_init_from_folder_without_a_tokenizer_trains_with_a_note(pydoc_data, trained, tmp_path, capsys):
    """Nothing to compare the data's tokenizer with (a folder holding tokenizer.model only, say): the run
    goes on, and says what it assumes."""
    source = init_from(trained, tmp_path, lambda d: (d / "tokenizer.json").unlink())
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, tiny_args(pydoc_data, tmp_path / "run", *QUICK, source))
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "has no tokenizer.json to compare" in out and "assumes the data was tokenized with the model's" in out


def test_init_from_weights_are_the_start_of_the_run(pydoc_data, trained, tmp_path):
    """The Trainer starts from the source's weights as soon as it is built (the doctor checks those)."""
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, init_from(trained, tmp_path)), quiet=True)
    exported = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(trainer.model.embed.weight, exported["model.embed_tokens.weight"])
    trainer.close()


def test_a_start_that_cannot_be_taken_back_still_says_why_it_failed(tmp_path, monkeypatch):
    """A read-only run directory fails the start (its config.toml cannot be written) and then the undo (it cannot be
    restored either): the undo's failure replaced the start's, which is what the user has to mend. Both are said, the
    start's first, in one line."""
    from fasttrain.checkpoints import run_directory
    from fasttrain.system.errors import UsageError

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("the earlier start's\n")
    start = run_directory.RunStart(run)
    start.record()
    (run / "config.toml").write_text("this start's\n")

    def read_only(path, write, what="write"):
        raise UsageError(f"{path}: cannot {what} (Permission denied)")

    monkeypatch.setattr(run_directory, "write_atomically", read_only)
    with pytest.raises(UsageError) as failed:
        with start:
            raise UsageError(f"{run / 'config.toml'}: cannot save the config (Permission denied)")
    said = str(failed.value)
    assert said.startswith(f"{run / 'config.toml'}: cannot save the config (Permission denied) (nor could the start")
    assert said.endswith(f"taken back: {run / 'config.toml'}: cannot restore (Permission denied))") and "\n" not in said
