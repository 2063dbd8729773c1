"""What an export may replace, and what a failed one leaves (issue 101): `export --gguf --out` never replaces a file
that is not a GGUF file, and an export that fails (a full disk, simulated) leaves nothing that looks like one."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from fasttrain import Trainer
from fasttrain.export import main as export_main
from fasttrain.system import atomic
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


def full_disk(monkeypatch, room: int) -> None:
    """The files fasttrain writes (system/atomic.py's) take `room` bytes in all, then a write fails with ENOSPC after
    writing what fits, as on a full disk."""
    left = [room]
    real_open = open

    class File:
        def __init__(self, f):
            self.f = f

        def write(self, data) -> int:
            size = memoryview(data).nbytes
            if size > left[0]:
                self.f.write(bytes(memoryview(data).cast("B")[: left[0]]))
                left[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= size
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr(atomic, "open", lambda path, mode="r": File(real_open(path, mode)), raising=False)


def listing(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags", [[], ["--hf"]], ids=["fasttrain", "hf"])
def test_an_export_that_fills_the_disk_leaves_nothing_that_looks_like_an_export(
    run, tmp_path, capsys, monkeypatch, flags
):
    assert exported([str(run), "--out", str(tmp_path / "whole"), *flags], capsys)[0] == 0
    weights = (tmp_path / "whole" / "model.safetensors").stat().st_size
    full_disk(monkeypatch, weights + 10)  # the weights fit, the tokenizer after them does not
    code, err = exported([str(run), "--out", str(tmp_path / "new"), *flags], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{tmp_path / 'new'}/" in err and f"no space left on the device holding {tmp_path}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]  # no lone model.safetensors, no temporary folder
    before = listing(tmp_path / "whole")
    full_disk(monkeypatch, weights + 10)
    code, err = exported([str(run), "--out", str(tmp_path / "whole"), *flags], capsys)  # over the earlier export
    assert code == 2 and "no space left on the device" in err, err
    assert listing(tmp_path / "whole") == before and sorted(p.name for p in tmp_path.iterdir()) == ["whole"]


def test_a_gguf_export_that_fills_the_disk_says_so(run, tmp_path, capsys, monkeypatch):
    def short_write(self, **_) -> None:  # numpy's tofile on a full disk: an OSError with no errno
        raise OSError("12288 requested and 2568 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    free = [0]
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=free[0], f_frsize=real(p).f_frsize))
    out = tmp_path / "model.gguf"
    code, err = exported([str(run), "--gguf", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out}: cannot write the GGUF file (no space left on the device holding {tmp_path})" in err, err
    assert list(tmp_path.iterdir()) == []
    free[0] = 1 << 20  # room enough: a short write for another reason says what numpy said
    code, err = exported([str(run), "--gguf", "--out", str(out)], capsys)
    assert code == 2 and "(12288 requested and 2568 written)" in err, err

    def no_space(self, **_) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", no_space)
    code, err = exported([str(run), "--gguf", "--out", str(out)], capsys)
    assert code == 2 and f"(no space left on the device holding {tmp_path})" in err, err
    assert list(tmp_path.iterdir()) == []
