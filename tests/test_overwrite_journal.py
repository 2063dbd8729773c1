"""Issue 59, items 1 and 14: an --overwrite start's set-aside of the earlier run, the put-back of that run and
its deletion once the new run has saved, each killed (SIGKILL) just before every rename, deletion and mkdir it
makes, then the next start through the real command line: a plain one, `--resume auto` and `--resume
auto-or-new`. The earlier run's files come back byte for byte, or the new run's are kept whole once it has
saved, never a mix. And a start killed while writing tokenizer.json leaves no temporary file for good.

The first tier follows every kill point with one of the three starts, in turn; the second tier with each."""

from __future__ import annotations

import os
import shutil
import signal
import traceback
from pathlib import Path
from typing import Callable

import pytest

from fasttrain import train
from fasttrain.checkpoints.run_directory import (
    DISCARDED,
    JOURNAL,
    REPLACED,
    RUN_FILES,
    RunStart,
    finish_overwrite,
    keep_tokenizer,
)
from fasttrain.system import run_lock
from tests.conftest import tiny_args
from tests.test_checkpoint import run_cli_code
from tests.test_reliability_round5_checkpoints import kill_an_overwrite_after_its_first_step
from tests.test_reliability_start import QUICK, snapshot

OPERATIONS = ("rename", "replace", "unlink", "remove", "rmdir", "mkdir")  # shutil.rmtree deletes through these
# A follow-up start: its flags and --set items. A resume asks for fewer steps than were saved, so it is refused
# once it has found the save it would continue (naming it), before it writes anything.
STARTS = {
    "plain": ([], []),
    "auto": (["--resume", "auto"], ["train.max_steps=1"]),
    "auto-or-new": (["--resume", "auto-or-new"], ["train.max_steps=1"]),
}


@pytest.fixture(scope="module")
def earlier(pydoc_data, tmp_path_factory) -> Path:
    """The run an --overwrite replaces: three saves, final/, metrics.jsonl, config.toml, tokenizer.json."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    sets = ("train.max_steps=3", "checkpoint.interval=1", "checkpoint.keep_last=3")
    assert run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, *sets)) == 0
    return run


@pytest.fixture(scope="module")
def newer(pydoc_data, tmp_path_factory) -> Path:
    """The new run, once it has saved (at steps 1 and 2)."""
    run = tmp_path_factory.mktemp("newer") / "run"
    assert run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, "checkpoint.interval=1")) == 0
    return run


@pytest.fixture(scope="module")
def interrupted(pydoc_data, earlier, tmp_path_factory) -> Path:
    """`earlier` with a real --overwrite start in it killed after its first step, before its first save."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    kill_an_overwrite_after_its_first_step(pydoc_data, earlier, run)
    return run


def set_aside(run: Path) -> None:
    """What an --overwrite start does first (Checkpointer.claim, holding the run's lock)."""
    with run_lock.locked(run):
        RunStart(run).claim(overwrite=True)


def copy_of(run: Path, to: Path) -> None:
    shutil.copytree(run, to, symlinks=True)


def saved_new_run(runs: dict[str, Path], to: Path) -> None:
    """The earlier run set aside by an --overwrite start whose run (the newer) has saved, and was killed before
    it deleted the earlier one."""
    copy_of(runs["earlier"], to)
    set_aside(to)
    for name in RUN_FILES:
        if (runs["newer"] / name).is_dir():
            shutil.copytree(runs["newer"] / name, to / name)
        elif (runs["newer"] / name).exists():
            shutil.copy2(runs["newer"] / name, to / name)


def killed_saving(runs: dict[str, Path], to: Path) -> None:
    """The interrupted start, its new run killed while it wrote its first save too: its own checkpoints/ is
    where the earlier run's goes back."""
    copy_of(runs["interrupted"], to)
    (to / "checkpoints").mkdir()
    (to / "checkpoints" / ".step_0000010.pt.99999.tmp").write_bytes(b"half a save")


# scenario: how a run directory is made ready, the operation killed in it, and which run must come out whole
SCENARIOS = {
    "set-aside": (lambda runs, to: copy_of(runs["earlier"], to), set_aside, "earlier"),
    "put-back": (killed_saving, finish_overwrite, "earlier"),
    "deletion": (saved_new_run, finish_overwrite, "newer"),
}


def killed_at(n: int, action: Callable[[], object], operations: tuple[str, ...] = OPERATIONS) -> bool:
    """Run `action()` in a forked child that SIGKILLs itself just before its `n`th call of os.`operations`;
    returns whether it was killed (False: it finished before that call)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            count = 0

            def hooked(original: Callable) -> Callable:
                def call(*args, **kwargs):
                    nonlocal count
                    count += 1
                    if count == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original(*args, **kwargs)

                return call

            for name in operations:
                setattr(os, name, hooked(getattr(os, name)))
            action()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the operation failed in the child (its traceback is above)"
    return False


def files(run: Path) -> dict[str, str]:
    """What the run directory holds (every file's hash), but its lock file (a start rewrites its holder)."""
    return {name: digest for name, digest in snapshot(run).items() if name != run_lock.LOCK_FILE}


def follow_up(start: str, run: Path, pydoc_data: Path, step: int, capsys) -> str:
    """The next start in `run`; "" if it did what a start does with a run whose latest save is at `step` (a plain
    start refused for that run's checkpoints, a resume refused naming that save), else what it did instead."""
    flags, sets = STARTS[start]
    code = run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, *sets, flags=["--quiet", *flags]))
    err = capsys.readouterr().err
    expected = (
        f"holds checkpoints of an earlier run (up to step {step})"
        if start == "plain"
        else f"step_{step:07d}.pt: the run is at step {step}, past train.max_steps = 1"
    )
    return "" if code == 2 and expected in err else f"exit {code}: {err.strip()[:300]}"


def every_kill_point(scenario: str, starts: list[str], runs: dict[str, Path], pydoc_data, tmp_path, capsys) -> int:
    """Kill `scenario`'s operation at each of its kill points in turn (and let it finish, last), each time
    following up with the next of `starts`; returns the number of kill points.
    Fails naming every kill point after which a start found anything but the run that must come out whole."""
    prepare, operation, whole = SCENARIOS[scenario]
    kept, step = files(runs[whole]), {"earlier": 3, "newer": 2}[whole]
    failed, n, killed = [], 0, True
    while killed:
        n += 1
        start, run = starts[n % len(starts)], tmp_path / str(n)
        prepare(runs, run)
        killed = killed_at(n, lambda: operation(run))
        problem = follow_up(start, run, pydoc_data, step, capsys)
        now = files(run)
        if now != kept:
            changed = sorted(k for k in now.keys() | kept.keys() if now.get(k) != kept.get(k))
            problem += f" {len(changed)} entries differ from the {whole} run's: {changed[:6]}"
        if problem:
            failed.append(f"killed before operation {n if killed else 'none'}, then {start}: {problem}")
        shutil.rmtree(run)
    assert not failed, f"{len(failed)} of {n} kill points:\n" + "\n".join(failed)
    return n


@pytest.fixture
def runs(earlier, newer, interrupted) -> dict[str, Path]:
    return {"earlier": earlier, "newer": newer, "interrupted": interrupted}


@pytest.mark.subprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_at_any_point_of_an_overwrite_leaves_one_run_whole(scenario, runs, pydoc_data, tmp_path, capsys):
    """Each kill point followed by one start (plain, --resume auto, --resume auto-or-new in turn)."""
    assert every_kill_point(scenario, list(STARTS), runs, pydoc_data, tmp_path, capsys) > 5


@pytest.mark.second_tier
@pytest.mark.subprocess
@pytest.mark.parametrize("start", list(STARTS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_start_after_a_kill_at_any_point_of_an_overwrite_finds_one_run_whole(
    scenario, start, runs, pydoc_data, tmp_path, capsys
):
    every_kill_point(scenario, [start], runs, pydoc_data, tmp_path, capsys)


def test_an_overwrite_that_ends_leaves_only_the_new_run(earlier, pydoc_data, tmp_path, capsys):
    """A whole --overwrite run: its first save deletes the earlier run, and no journal or folder is left."""
    run = tmp_path / "run"
    copy_of(earlier, run)
    args = tiny_args(pydoc_data, run, *QUICK, "checkpoint.interval=1", flags=["--quiet", "--overwrite"])
    assert run_cli_code(train.main, args) == 0, capsys.readouterr().err
    assert not {JOURNAL, REPLACED, DISCARDED} & set(os.listdir(run))
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_0000001.pt", "step_0000002.pt"]


def test_a_start_killed_while_writing_the_tokenizer_leaves_no_temporary_file(pydoc_data, tmp_path, capsys):
    """Item 14: the temporary .tokenizer.json.<pid>.tmp of a start killed before its rename stayed in the run's top
    level for good. The next start removes it."""
    run = tmp_path / "run"
    run.mkdir()
    assert killed_at(1, lambda: keep_tokenizer(pydoc_data, run), operations=("replace",))
    assert [p.name for p in run.glob(".tokenizer.json.*.tmp")]
    assert run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, flags=["--quiet"])) == 0, capsys.readouterr()
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("left", ["a set-aside folder with no journal", "a damaged journal"])
def test_what_no_journal_explains_is_refused_and_kept(left, earlier, pydoc_data, tmp_path, capsys):
    """A .replaced-by-overwrite/ without a journal (an earlier fasttrain's, or moved by hand) says nothing about
    which files are whose; a journal that is not one fasttrain wrote neither: one line, exit status 2, nothing
    moved or deleted."""
    run = tmp_path / "run"
    copy_of(earlier, run)
    set_aside(run)
    if left == "a damaged journal":
        (run / JOURNAL).write_text('{"phase": "setting-aside", "names": ["../../elsewhere"]}')
    else:
        (run / JOURNAL).unlink()
    before = files(run)
    code = run_cli_code(train.main, tiny_args(pydoc_data, run, *QUICK, flags=["--resume", "auto-or-new"]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert (REPLACED if left != "a damaged journal" else JOURNAL) in err
    assert files(run) == before
