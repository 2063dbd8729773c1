"""A folder written beside its place and put there whole (system/atomic.py's `folder_atomically`, `replace_folder`):
a kill at any moment leaves the folder wholly old or wholly new, never new weights beside an old config.toml; what
the old folder held and the new one does not (an export folder's .git) is kept; a file system that cannot exchange
two names still gets every new file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fasttrain.system import atomic


def folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


OLD = {"model.safetensors": "old weights", "config.toml": "old config"}
NEW = {"model.safetensors": "new weights", "config.toml": "new config"}


@pytest.fixture
def old_and_new(tmp_path) -> tuple[Path, Path]:
    """`final/` holding an earlier export and a clone's .git beside it, and the new export written beside it."""
    final = folder(tmp_path / "final", {**OLD, ".git/HEAD": "ref: main", ".gitattributes": "*.safetensors lfs"})
    return final, folder(tmp_path / ".final.123.tmp", NEW)


def test_the_new_folder_takes_the_old_ones_place_keeping_what_it_did_not_write(old_and_new):
    final, new = old_and_new
    atomic.replace_folder(new, final)
    assert contents(final) == {**NEW, ".git/HEAD": "ref: main", ".gitattributes": "*.safetensors lfs"}
    assert not new.exists()


def test_a_kill_at_the_exchange_leaves_the_folder_wholly_old_or_wholly_new(old_and_new, monkeypatch):
    """Stopped just before the exchange: the old files, all of them; just after it (before the old folder is removed):
    the new ones, all of them, and the old folder whole at the temporary name the next start removes."""
    final, new = old_and_new
    real_exchange = atomic.exchange

    def killed_before(a: Path, b: Path) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "exchange", killed_before)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_folder(new, final)
    assert {k: v for k, v in contents(final).items() if k in OLD} == OLD

    def killed_after(a: Path, b: Path) -> bool:
        if not real_exchange(a, b):
            pytest.skip("this file system cannot exchange two names")
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "exchange", killed_after)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_folder(new, final)
    assert {k: v for k, v in contents(final).items() if k in NEW} == NEW
    assert {k: v for k, v in contents(new).items() if k in OLD} == OLD
    assert (final / ".git" / "HEAD").read_text() == "ref: main"


def test_without_the_exchange_every_new_file_replaces_its_old_one(old_and_new, monkeypatch):
    final, new = old_and_new
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    with atomic.folder_atomically(final) as written:
        for name, text in NEW.items():
            (written / name).write_text(text)
    assert contents(final) == {**NEW, ".git/HEAD": "ref: main", ".gitattributes": "*.safetensors lfs"}
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".final.") and p != new] == []


@pytest.mark.parametrize("can_exchange", [True, False])
def test_without_carrying_nothing_of_the_old_folder_is_left(old_and_new, monkeypatch, can_exchange):
    """How a distilled run publishes its one member's final/ over an earlier run's."""
    final, new = old_and_new
    if not can_exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    atomic.replace_folder(new, final, carry=False)
    assert contents(final) == NEW
    assert not new.exists()


def test_a_new_place_is_a_rename(tmp_path):
    new = folder(tmp_path / ".out.1.tmp", NEW)
    atomic.replace_folder(new, tmp_path / "out")
    assert contents(tmp_path / "out") == NEW and not new.exists()
