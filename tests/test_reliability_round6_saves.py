"""Issue 59, round six, damaged saves, the failures the issue saw in a sharded save's .metadata: a flipped bit that
made the unpickler ask for 24 GB, and one that left DCP's index without its offsets (an AttributeError traceback),
both now found by the CRC-32 state.pt records before .metadata is unpickled. Each case runs all five entry points
that read a save (resume, sample, evaluate, export, export --hf) on a copy of a run: one line naming the file, exit
2, no traceback, and the run directory byte for byte as it was. The rows of tests/test_bad_input.py cover the
other items (a .pt's zip index, saves swapped by name, a state.pt of another save)."""

from __future__ import annotations

import contextlib
import pickletools
import resource
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fasttrain import evaluate, export, sample, train
from fasttrain.checkpoints import checksums
from tests.conftest import tiny_args
from tests.test_checkpoint import run_cli_code
from tests.test_reliability_round5_checkpoints import flip_a_bit
from tests.test_reliability_start import QUICK, snapshot

SHARDED = 'checkpoint.format="sharded"'


@pytest.fixture(scope="module")
def sharded(pydoc_data, tmp_path_factory) -> Path:
    """A finished tiny run saved in sharded folders (read-only: cases copy it)."""
    run = tmp_path_factory.mktemp("round6") / "run"
    assert run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, SHARDED)) == 0
    return run


def bit_flipped(file: Path, at: int, bit: int = 0x10) -> None:
    """Flip `bit` of the byte at offset `at` of `file`."""
    data = bytearray(file.read_bytes())
    data[at] ^= bit
    file.write_bytes(bytes(data))


def build_made_long_binput(folder: Path) -> Path:
    """The first BUILD opcode of the folder's .metadata turned into LONG_BINPUT by one bit: the four bytes after it
    become a memo index near 1.5e9, for which the unpickler asks about 24 GB."""
    metadata = folder / ".metadata"
    data = metadata.read_bytes()
    at = next(pos for op, _, pos in pickletools.genops(data) if op.name == "BUILD")
    assert int.from_bytes(data[at + 1 : at + 5], "little") > 10**8  # the index the flip makes
    bit_flipped(metadata, at)  # b"b" ^ 0x10 == b"r"
    return metadata


def offset_renamed(folder: Path) -> Path:
    """The pickled string "offset" of the folder's .metadata, the key of every shard's byte offset, made "ovfset":
    DCP's _StorageInfo objects then have no offset."""
    metadata = folder / ".metadata"
    data = metadata.read_bytes()
    at = next(pos for op, arg, pos in pickletools.genops(data) if op.name == "SHORT_BINUNICODE" and arg == "offset")
    bit_flipped(metadata, at + 3)  # past the opcode and the length: the "f"
    return metadata


@contextlib.contextmanager
def memory_capped(headroom: int = 4 << 30) -> Iterator[None]:
    """This process's address space limited to what it holds now plus `headroom`: a load that asks for tens of
    gigabytes fails with MemoryError here instead of bringing the machine down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def refused_everywhere(pydoc_data, run: Path, save: Path, expected: str, capsys, sets=()) -> None:
    """Each entry point that reads `save` of `run` (resume auto, sample, evaluate, export, export --hf): exit 2,
    one line starting `error: {expected}`, nothing written or changed in `run`."""
    before = snapshot(run)
    out = run.parent / "export"
    capsys.readouterr()
    for program, args in (
        (train, tiny_args(pydoc_data, run, *QUICK, *sets, "train.max_steps=3", flags=["--resume", "auto"])),
        (sample, [str(save), "--max-new-tokens", "2"]),
        (evaluate, [str(save), "--split", "val"]),
        (export, [str(save), "--out", str(out)]),
        (export, [str(save), "--hf", "--out", str(out)]),
    ):
        code = run_cli_code(program.main, args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {expected}"), err
    assert snapshot(run) == before and not out.exists()


def copied(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("damage", [build_made_long_binput, offset_renamed], ids=["memo-index", "offset-key"])
def test_a_damaged_metadata_is_found_by_its_checksum_before_it_is_unpickled(
    pydoc_data, sharded, tmp_path, capsys, damage: Callable[[Path], Path]
):
    """Item 2: .metadata was unpickled before its CRC-32 was compared: one flipped bit made `sample` ask for 24 GB
    (killed by the OOM killer, no line), another an AttributeError traceback in every entry point."""
    run = copied(sharded, tmp_path)
    save = run / "checkpoints" / "step_0000002"
    metadata = damage(save)
    with memory_capped():  # the old order's unpickling would ask for 24 GB
        refused_everywhere(
            pydoc_data,
            run,
            save,
            f"{metadata}: checksum mismatch, damaged since it was saved (CRC-32 ",
            capsys,
            [SHARDED],
        )


def test_one_flipped_bit_in_a_shard_still_names_the_shard(pydoc_data, sharded, tmp_path, capsys):
    """The state.pt of another save is told apart from one damaged file by no file matching: a flipped bit in the
    .distcp still names the .distcp."""
    run = copied(sharded, tmp_path)
    shard = run / "checkpoints" / "step_0000002" / "__0_0.distcp"
    flip_a_bit(shard)
    refused_everywhere(
        pydoc_data,
        run,
        shard.parent,
        f"{shard}: checksum mismatch, damaged since it was saved (CRC-32 ",
        capsys,
        [SHARDED],
    )


def test_a_sound_save_has_each_shard_read_once_for_its_checksum(sharded, tmp_path, capsys, monkeypatch):
    """Checking .metadata before it is unpickled must not read the whole folder twice: a load compares each shard's
    CRC-32 once (.metadata, a few kilobytes, twice), and reads the other files only to tell a damaged one apart
    from a state.pt of another save."""
    read = []
    crc32 = checksums.crc32
    monkeypatch.setattr(checksums, "crc32", lambda file: read.append(file.name) or crc32(file))
    assert run_cli_code(export.main, [str(sharded / "checkpoints" / "step_0000002"), "--out", str(tmp_path / "e")]) == 0
    shards = [name for name in read if name.endswith(".distcp")]
    assert shards and sorted(shards) == sorted(set(shards)), read
