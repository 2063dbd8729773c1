"""What an export may replace, and what a failed one leaves (issue 101): `export --gguf --out` never replaces a file
that is not a GGUF file, and an export that fails (a full disk, simulated) leaves nothing that looks like one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fasttrain import Trainer
from fasttrain.export import main as export_main
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_config

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def run(pydoc_data, tmp_path_factory) -> Path:
    """A tiny trained run with a checkpoint and final/ weights."""
    out = tmp_path_factory.mktemp("run")
    Trainer(tiny_config(pydoc_data, out, "train.max_steps=2", "train.sample_tokens=0"), quiet=True).train()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def exported(args: list[str], capsys) -> tuple[int, str]:
    """The exit status of `fasttrain export ARGS` and what it said on stderr."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, args)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "target",
    [
        lambda run, data: run / "final" / "model.safetensors",
        lambda run, data: run / "config.toml",
        lambda run, data: sorted((run / "checkpoints").glob("step_*.pt"))[-1],
        lambda run, data: data / "train_000000.bin",
    ],
    ids=["final-weights", "config", "checkpoint", "shard"],
)
def test_gguf_out_onto_a_file_that_is_not_gguf_is_refused_and_unchanged(run, pydoc_data, capsys, target):
    path = target(run, pydoc_data)
    before = sha256(path)
    code, err = exported([str(run), "--gguf", "--out", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a GGUF file" in err and str(path) in err, err
    assert sha256(path) == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left either


def test_gguf_out_onto_an_earlier_gguf_export_replaces_it(run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert exported([str(run), "--gguf", "--out", str(out), "--dtype", "fp16"], capsys)[0] == 0
    assert exported([str(run), "--gguf", "--out", str(out)], capsys)[0] == 0  # replaced: it was a GGUF file
    assert gguf.GGUFReader(out).tensors[0].tensor_type == gguf.GGMLQuantizationType.F32
    out.write_bytes(b"GGU")  # shorter than the magic: not a GGUF file
    code, err = exported([str(run), "--gguf", "--out", str(out)], capsys)
    assert code == 2 and "not a GGUF file" in err and out.read_bytes() == b"GGU", err
