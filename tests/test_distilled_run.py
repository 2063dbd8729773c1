"""train.distill (fasttrain/training/phases.py): an ensemble's run ends with its members distilled into one model, so
final/ holds one model and ensemble/ the members; killed in either phase, `--resume auto` ends with the same
weights as a run never stopped; under a time budget the plan holds the student's time too."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fasttrain import train as train_module
from fasttrain.checkpoints.run_directory import JOURNAL, check_new_run, finish_overwrite, set_aside
from fasttrain.compute.distributed import World
from fasttrain.config import Seconds, TrainConfig, load_config, save_config
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.export import export
from fasttrain.model.transformer import flops_per_token, num_params
from fasttrain.planning import repeats, sizing
from fasttrain.planning.members import (
    LONE_STUDENT_SHARE,
    MIS_TIMED,
    TEACHER_COST,
    distill_note,
    distilled,
    ensemble_members,
)
from fasttrain.planning.plan import plan_run
from fasttrain.planning.preflight import estimate_bytes, teacher_bytes, teacher_members, teachers_in_memory
from fasttrain.planning.sizing import MEMORY_SHARE
from fasttrain.planning.speed import Speed
from fasttrain.system.errors import UsageError
from fasttrain.training.phases import (
    PUBLISHED,
    REPLACES,
    TEACHER_INIT,
    Ended,
    end_event,
    ensemble_config,
    kept_phase_items,
    more_members,
    next_phase,
    publish,
    rounds,
)
from fasttrain.training.trainer import Interrupted, Trainer
from tests.conftest import tiny_args, tiny_config
from tests.test_checkpoint import EXACT, hold_lock
from tests.test_plans_unchanged import SPEED

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.toml"  # from any working directory
DISTILLED = [
    "model.members=2",
    "train.distill=true",
    "model.value_embeddings=true",
    "train.max_steps=8",
    "train.sample_tokens=0",
    *EXACT,
]


def train(data, out, *sets: str, flags: tuple[str, ...] = ()) -> None:
    args = tiny_args(data, out, *DISTILLED, *sets, config=str(BASE), flags=["--quiet", *flags])
    assert train_module.main(args) == 0


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_a_distilled_run_leaves_one_model_in_final_and_its_members_in_ensemble(pydoc_data, tmp_path):
    run = tmp_path / "run"
    train(pydoc_data, run)
    student, members = load_trained(run), load_trained(run / "ensemble")
    assert student.cfg.model.members == 1 and members.cfg.model.members == 2
    assert members.cfg.model.value_embeddings and not student.cfg.model.value_embeddings  # so the student exports
    assert (run / "export-hf" / "model.safetensors") in export(run, hf=True)
    assert student.cfg.train.teacher == os.path.abspath(run / "ensemble" / "final")
    assert not student.cfg.train.distill and not members.cfg.train.distill  # each phase an ordinary run
    # base.toml's student starts from the first member (members without value embeddings' tables and gates: a subset)
    assert student.cfg.train.teacher_init and not members.cfg.train.teacher_init
    assert student.cfg.train.max_steps == members.cfg.train.max_steps == 8  # the student reads what a member read
    assert student.cfg.model.n_layers == members.cfg.model.n_layers and student.cfg.model.d_model == 32
    # Each phase's start event says what it is of the run; the first round's holds the whole run's plan
    first, taught = start_event(run / "ensemble"), start_event(run)
    assert first["phase"]["kind"] == "members" and first["phase"]["run"] == str(run)
    assert first["phase"]["whole"]["distill"] is True and first["phase"]["whole"]["members"] == 2
    assert taught["phase"]["kind"] == "student" and "whole" not in taught["phase"]
    assert taught["phase"]["begun"] == first["phase"]["begun"] <= first["time"]  # the run's identity, in each phase
    assert first["phase"][TEACHER_INIT] is True  # the run's, which a resume's student takes (the round records false)


def start_event(run: Path) -> dict:
    """The first start event of `run`'s metrics.jsonl."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "start")


def stop_at(monkeypatch, step: int, where=lambda trainer: True) -> None:
    """SIGINT after `step` of a phase's Trainer that `where` picks."""
    original = Trainer.step

    def stepped(self):
        out = original(self)
        if where(self) and self.run.step == step:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", stepped)


@pytest.mark.parametrize("phase", ["members", "student"])
def test_a_distilled_run_killed_in_either_phase_resumes_to_the_same_model(phase, pydoc_data, tmp_path, monkeypatch):
    """Begun with a relative train.out_dir in one directory, resumed with the command it printed from another."""
    train(pydoc_data, tmp_path / "straight")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run = tmp_path / "a" / "run"
    stopped = str(run / "ensemble") if phase == "members" else str(run)
    stop_at(monkeypatch, 5, lambda trainer: os.path.abspath(trainer.cfg.train.out_dir) == stopped)
    with pytest.raises(Interrupted) as stop:
        train(pydoc_data, "run")
    assert f"train.out_dir={run}" in str(stop.value) and "--resume auto" in str(stop.value)  # the whole run's
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path / "b")
    train(pydoc_data, run, flags=("--resume", "auto"))
    assert sorted(os.listdir(tmp_path / "b")) == []
    for name in ("ensemble", "."):
        straight, resumed = weights(tmp_path / "straight" / name), weights(run / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (name, key)


def test_a_signal_between_phases_stops_at_once_and_says_how_to_go_on(pydoc_data, tmp_path, monkeypatch, capsys):
    """SIGTERM (or Ctrl-C) between a round's end and the next phase found no catcher: the process died without a word
    (exit 143). It stops at once, every phase's files being whole, and says how to go on with the whole run; that
    command leaves out the items that differ from what the phases recorded (a resume would only name them as left
    out). The run ends as one never stopped, its last line counting every phase's seconds, those before the stop too."""
    auto_shape = "model.n_layers=0"  # recorded as the shape the plan chose: a resume's item of it is left out
    train(pydoc_data, tmp_path / "straight", auto_shape)
    run = tmp_path / "run"
    decide = train_module.next_phase

    def signalled(*args, **kwargs):  # the boundary after the members: what the run does next is being decided
        signal.raise_signal(signal.SIGTERM)
        return decide(*args, **kwargs)

    monkeypatch.setattr(train_module, "next_phase", signalled)
    with pytest.raises(Interrupted) as stop:
        train(pydoc_data, run, auto_shape)
    monkeypatch.undo()
    assert stop.value.exit_code == 128 + signal.SIGTERM
    said, _, command = str(stop.value).partition("; resume with: ")
    assert said == "stopped by SIGTERM between the run's phases", said
    argv = shlex.split(command)[3:]  # python -m fasttrain.train CONFIG ...
    assert argv[-2:] == ["--resume", "auto"] and auto_shape not in argv and "model.members=2" in argv, argv
    capsys.readouterr()
    assert train_module.main([item for item in argv if item != "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "a resume keeps what the run's phases recorded" not in out
    line = next(x for x in out.splitlines() if " s trained" in x)
    assert f"members in {run / 'ensemble'}" in line and f"student in {run}" in line, line
    straight, resumed = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_an_overwrite_killed_among_its_members_trains_a_new_student_not_the_earlier_one(
    pydoc_data, tmp_path, monkeypatch
):
    """The earlier distilled run's student (6 steps) stays whole until the new one's student replaces it; a resume
    after the new members does not continue it (which would end 2 steps on from it, not as a run never stopped)."""
    train(pydoc_data, tmp_path / "straight")
    run = tmp_path / "run"
    train(pydoc_data, run, "train.max_steps=6")
    stop_at(monkeypatch, 5, lambda trainer: trainer.cfg.train.out_dir.endswith("ensemble"))
    with pytest.raises(Interrupted):
        train(pydoc_data, run, flags=("--overwrite",))
    assert load_config(run / "config.toml").train.max_steps == 6  # the earlier run, whole meanwhile
    monkeypatch.undo()
    # A plain start names what --resume auto continues: the new members, not the earlier student beside them
    with pytest.raises(UsageError, match=rf"^{run / 'ensemble' / 'checkpoints'}: holds checkpoints .*--resume auto"):
        train(pydoc_data, run)
    train(pydoc_data, run, flags=("--resume", "auto"))
    straight, resumed = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_an_overwrite_removes_the_earlier_runs_later_rounds_once_it_ends(pydoc_data, tmp_path, capsys):
    """An --overwrite replaces the earlier run whole: its later rounds (RUN/ensemble-2 ...), which this run does not
    count, are removed once the run has ended, not left for good; a run begun without --overwrite leaves them be."""
    run = tmp_path / "run"
    train(pydoc_data, run)
    cfg = tiny_config("data", run, "train.distill=true", "train.max_time=600", *VOCAB)
    ended_round(run / "ensemble-2", cfg, members=1, steps=8, seconds=100.0, begun=BEGUN - 600)  # another run's
    train(pydoc_data, run, flags=("--resume", "auto"))  # this run's resume: not begun with --overwrite
    assert (run / "ensemble-2").is_dir()
    capsys.readouterr()
    args = tiny_args(pydoc_data, run, *DISTILLED, config=str(BASE), flags=["--overwrite"])
    assert train_module.main(args) == 0
    assert not (run / "ensemble-2").exists() and rounds(run).dirs == [run / "ensemble"]
    assert (
        f"distill: removed {run / 'ensemble-2'}, a later round of the run --overwrite replaced"
        in capsys.readouterr().out
    )


def test_a_resume_after_an_ordinary_run_replaced_a_distilled_one_is_an_ordinary_resume(pydoc_data, tmp_path):
    """ensemble/ stays beside a run that --overwrite started over it; a resume of that run is the run's own."""
    run = tmp_path / "run"
    train(pydoc_data, run)
    train(pydoc_data, run, "model.members=1", "train.max_steps=4", flags=("--overwrite",))
    train(pydoc_data, run, "model.members=1", "train.max_steps=6", flags=("--resume", "auto"))
    assert load_trained(run).cfg.train.teacher == "" and load_config(run / "config.toml").train.max_steps == 6


def test_a_time_budget_holds_the_members_and_their_student():
    """One model reaches the epoch limit in 100 s of 600: six models side by side without distillation; with it,
    K members then a student costing 1 + K/2 of one: (6 - 1) / 1.5 = 3.33, so 3, the members for 3 / (3 + 1 + 1.5)
    of the budget, the student for the rest."""
    assert TEACHER_COST == 0.5
    shape = replace(sizing.ladder_shape(load_config("configs/base.toml").model, 2), vocab_size=4096)
    t = TrainConfig(max_time=600.0, max_steps=100, seq_len=256)
    rate = flops_per_token(shape, 256) * 1000.0  # 1,000 tokens/s: 100 steps of 1,000 tokens in 100 s
    speed = Speed(((flops_per_token(shape, 256), rate),))
    assert ensemble_members(shape, t, 1000, speed, 8)[0] == 6
    members, note = ensemble_members(shape, replace(t, distill=True), 1000, speed, 8)
    assert members == 3 and "final/" not in note
    assert ensemble_members(shape, replace(t, distill=True, max_time=250.0), 1000, speed, 8)[0] == 1
    cfg = tiny_config("data", "runs/x", "model.members=3", "train.distill=true", "train.max_time=600")
    assert ensemble_config(cfg).train.max_time == pytest.approx(600 * 3 / 5.5, abs=1e-3)
    assert ensemble_config(cfg).train.out_dir == os.path.abspath(os.path.join("runs/x", "ensemble"))
    note = distill_note(3, cfg.train)
    assert "327 s" in note and "273 s" in note and "final/ holds that one model" in note


def test_the_dry_run_says_the_ensemble_is_distilled_and_a_single_model_is_not(pydoc_data, tmp_path, capsys):
    args = tiny_args(pydoc_data, tmp_path / "run", *DISTILLED, flags=["--dry-run", "--json"])
    assert train_module.main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["members"] == 2 and record["distill"] is True
    assert train_module.main([*args, "model.members=1"]) == 0
    assert json.loads(capsys.readouterr().out)["distill"] is False
    assert not (tmp_path / "run").exists()


def killed_among_members(data, tmp_path, monkeypatch) -> Path:
    """tmp_path/run: a distilled run killed after its members' step 5."""
    run = tmp_path / "run"
    stop_at(monkeypatch, 5)
    with pytest.raises(Interrupted):
        train(data, run)
    monkeypatch.undo()
    return run


def test_a_new_run_over_a_killed_members_run_is_refused_before_anything_and_names_the_resume(
    pydoc_data, tmp_path, monkeypatch, capsys
):
    run = killed_among_members(pydoc_data, tmp_path, monkeypatch)
    capsys.readouterr()
    args = tiny_args(pydoc_data, run, *DISTILLED, config=str(BASE), flags=["--dry-run"])
    assert train_module.main(args) == 0  # the dry run says what the run would refuse
    assert f"note: {run / 'ensemble' / 'checkpoints'}: holds checkpoints of an earlier run" in capsys.readouterr().out
    monkeypatch.setattr(train_module, "start_run", lambda *a, **k: pytest.fail("planned before the refusal"))
    with pytest.raises(UsageError, match=r"ensemble.*--resume auto"):
        train(pydoc_data, run)
    assert not (run / "checkpoints").exists() and (run / "ensemble" / "checkpoints").is_dir()


def test_a_resume_takes_its_set_items_into_the_phases_but_not_those_that_make_them(
    pydoc_data, tmp_path, monkeypatch, capsys
):
    run = killed_among_members(pydoc_data, tmp_path, monkeypatch)
    sets = [*DISTILLED, "train.log_interval=3", "model.n_layers=1"]
    args = tiny_args(pydoc_data, run, *sets, config=str(BASE), flags=["--resume", "auto"])
    assert train_module.main(args) == 0
    assert "note: distill: model.n_layers=1: a resume keeps what the run's phases recorded" in capsys.readouterr().out
    for phase in (run / "ensemble", run):
        recorded = load_config(phase / "config.toml")
        assert recorded.train.log_interval == 3 and recorded.model.n_layers == 2, phase


VOCAB = ["model.vocab_size=512"]  # as a run records it, resolved from its data


BEGUN = 1_000_000.0  # when the distilled run of the rounds below began (phases.first_phase): its identity


def ended_round(
    directory: Path,
    cfg,
    members: int,
    steps: int,
    seconds: float,
    max_steps: int = 8,
    begun: float | None = BEGUN,
    teacher_init: bool | None = None,
) -> None:
    """A round of `members` that ended after `steps` of `max_steps` in `seconds`, as its folder records it: a phase of
    the run begun at `begun` (None: of a run begun before phases recorded their run), a first round recording the
    run's `teacher_init` where given."""
    t = replace(cfg.train, max_steps=max_steps, out_dir=str(directory), distill=False, teacher_init=False)
    recorded = replace(cfg, model=replace(cfg.model, members=members), train=t)
    save_config(recorded, directory)
    save_config(recorded, directory / "final")
    phase = {"kind": "members", "begun": begun, **({TEACHER_INIT: teacher_init} if teacher_init is not None else {})}
    start = {"event": "start", **({"phase": phase} if begun is not None else {})}
    end = {"event": "end", "step": steps, "train_seconds": seconds}
    (directory / "metrics.jsonl").write_text(json.dumps(start) + "\n" + json.dumps(end) + "\n")


def test_each_boundary_decides_from_the_seconds_the_rounds_took(tmp_path):
    """One member planned from a slow timing reached its limit in 100 s of 600: another round follows, of as many as
    the first trained at once (what the plan found fits), for the time that leaves the student of all of them its
    own (after a lone member, half a read: 0.5 x (1 + K / 2) of a member's); again while it leaves room for a whole
    read (k x 100 + 100 x (1 + (M + k) / 2) <= left); then the student, for what the rounds left, whatever the plan
    said. A round stopped by its share of the budget, not the limit, is followed by the student alone."""
    run = tmp_path / "run"
    cfg = tiny_config("data", run, "train.distill=true", "train.max_time=600", "train.teacher_init=true", *VOCAB)
    ended_round(run / "ensemble", cfg, members=1, steps=8, seconds=100.0)
    phase = next_phase(cfg)
    assert phase is not None and phase.kind == "members" and phase.resume is None
    assert phase.cfg.model.members == 1 and phase.cfg.train.out_dir == str(run / "ensemble-2")
    assert phase.cfg.train.seed == cfg.train.seed + 1  # not the first round's model over again
    assert LONE_STUDENT_SHARE == 0.5
    assert phase.cfg.train.max_time == pytest.approx(500 - 0.5 * 100 * (1 + 2 * TEACHER_COST))
    assert phase.note.startswith("500 s left: each member reached the epoch limit in 100 s, so 1 more train")
    ended_round(run / "ensemble-2", cfg, members=1, steps=8, seconds=100.0)
    phase = next_phase(cfg)
    assert phase.kind == "members" and phase.cfg.train.out_dir == str(run / "ensemble-3")
    assert phase.cfg.train.max_time == pytest.approx(400 - 100 * (1 + 3 * TEACHER_COST))
    ended_round(run / "ensemble-3", cfg, members=1, steps=8, seconds=120.0)  # slower than the two before
    student = next_phase(cfg)
    assert student is not None and student.kind == "student" and student.resume is None
    assert student.cfg.train.max_time == pytest.approx(280.0) and student.cfg.train.max_steps == 0  # the time left
    assert student.cfg.train.teacher.split(os.pathsep) == [
        str(run / f"ensemble{n}" / "final") for n in ("", "-2", "-3")
    ]
    assert student.cfg.train.teacher_init and student.cfg.model.members == 1
    shutil.rmtree(run / "ensemble-2"), shutil.rmtree(run / "ensemble-3")
    ended_round(run / "ensemble", cfg, members=3, steps=5, seconds=300.0)  # stopped by its share, not the limit
    assert next_phase(cfg).kind == "student"


def test_an_earlier_runs_later_round_left_beside_a_new_first_round_is_not_this_runs(tmp_path):
    """An --overwrite start replaced RUN/ensemble; RUN/ensemble-2 is the earlier run's, which records that run, not
    this one, whenever its files were written: not a round of this run (its members and seconds are not counted, its
    final/ teaches nothing), and the round this run adds there replaces it, as the whole run began with --overwrite."""
    run = tmp_path / "run"
    cfg = tiny_config("data", run, "train.distill=true", "train.max_time=600", *VOCAB)
    ended_round(run / "ensemble", cfg, members=1, steps=8, seconds=100.0)
    ended_round(run / "ensemble-2", cfg, members=3, steps=8, seconds=300.0, begun=BEGUN - 600)  # written after
    (run / "ensemble" / REPLACES).write_text("the student replaces the run in the directory above\n")
    assert rounds(run).dirs == [run / "ensemble"]
    phase = next_phase(cfg)
    assert phase is not None and phase.kind == "members" and phase.cfg.train.out_dir == str(run / "ensemble-2")
    assert phase.cfg.model.members == 1 and phase.overwrite  # 500 s left: not the earlier round's 200


def written_in_order(top: Path, *folders: Path) -> None:
    """Time the files under `top` as a copy that keeps no times (cp -r) leaves them where it copied `folders` (each
    under `top`, one inside another listed before it) last to first: each folder's files a second older than those of
    the folder listed before it."""
    now = time.time_ns()
    for path in (p for p in top.rglob("*") if p.is_file()):
        age = next(n for n, folder in enumerate(folders) if path.is_relative_to(folder))
        os.utime(path, ns=(now - age * 10**9,) * 2)


def test_a_run_folder_copied_without_its_times_keeps_its_rounds_and_its_student(tmp_path):
    """A run of two rounds, its student begun (its saves), copied with new file times in an order that makes
    ensemble-2 older than ensemble and the student's config.toml older than both: the phases record their run, so
    the copy still has both rounds, and its student is the run's, taught by both, and resumed."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    cfg = tiny_config("data", run, "train.distill=true", "train.max_time=600", *VOCAB)
    ended_round(run / "ensemble", cfg, members=1, steps=8, seconds=100.0)
    ended_round(run / "ensemble-2", cfg, members=1, steps=5, seconds=100.0)  # stopped by its share: the student next
    student = next_phase(cfg)
    assert student is not None and student.kind == "student" and student.resume is None and student.begun == BEGUN
    save_config(student.cfg, run)  # the student begun as train_phases begins it: its config, start event, a save
    start = {"event": "start", "time": BEGUN + 300, "phase": {"kind": "student", "begun": BEGUN}}
    resumed = {"event": "start", "time": BEGUN + 400, "phase": None, "resumed_from": "checkpoints/step_0000003.pt"}
    (run / "metrics.jsonl").write_text(f"{json.dumps(start)}\n{json.dumps(resumed)}\n")  # and resumed from its config
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_0000003.pt\n")
    shutil.copytree(run, copy, copy_function=shutil.copyfile)
    written_in_order(copy, copy / "ensemble", copy / "ensemble-2", copy)
    assert rounds(copy).dirs == [copy / "ensemble", copy / "ensemble-2"]
    phase = next_phase(replace(cfg, train=replace(cfg.train, out_dir=str(copy))))
    assert phase is not None and phase.kind == "student" and phase.resume == "auto" and phase.begun == BEGUN
    assert phase.cfg.train.teacher.split(os.pathsep) == [str(copy / d / "final") for d in ("ensemble", "ensemble-2")]
    with open(copy / "metrics.jsonl", "a") as log:  # a new ordinary run there since: a resume is that run's own
        log.write(json.dumps({"event": "start", "time": BEGUN + 500, "phase": None}) + "\n")
    assert next_phase(replace(cfg, train=replace(cfg.train, out_dir=str(copy)))) is None


def test_a_run_begun_before_phases_recorded_their_run_is_read_by_file_times(tmp_path):
    """Phases that record no phase.begun (runs begun before they did): a later round is the run's where it was
    written after the round before it, and final/ the one member's where it was copied after the round ended."""
    run = tmp_path / "run"
    cfg = tiny_config("data", run, "train.distill=true", "train.max_time=600", *VOCAB)
    ended_round(run / "ensemble", cfg, members=1, steps=8, seconds=100.0, begun=None)
    ended_round(run / "ensemble-2", cfg, members=1, steps=8, seconds=100.0, begun=None)
    written_in_order(run, run / "ensemble", run / "ensemble-2")
    assert rounds(run).dirs == [run / "ensemble"]
    written_in_order(run, run / "ensemble-2", run / "ensemble")
    assert rounds(run).dirs == [run / "ensemble", run / "ensemble-2"]
    shutil.rmtree(run / "ensemble-2")
    cfg = replace(cfg, train=replace(cfg.train, max_time=Seconds(120.0)))
    phase = next_phase(cfg)
    assert phase is not None and phase.kind == "publish" and phase.begun is None and phase.note
    publish(phase)
    written_in_order(run, run / "ensemble", run / "final")
    assert next_phase(cfg).note  # final/ older than the round: not taken for its copy
    written_in_order(run, run / "final", run / "ensemble")
    assert not next_phase(cfg).note  # copied after it: the one member's again, deciding nothing anew


def test_one_member_and_too_little_time_for_more_is_the_runs_model_and_says_why(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config("data", run, "train.distill=true", "train.max_time=120", *VOCAB)
    ended_round(run / "ensemble", cfg, members=1, steps=8, seconds=99.0)
    phase = next_phase(cfg)
    assert phase is not None and phase.kind == "publish"
    assert phase.note.startswith("21 s left: each member reached the epoch limit in 99 s, so one more and a student")
    assert "it stops at the limit, as reading on overfits" in phase.note  # why stopping early is the better use
    assert publish(phase) == run / "final" and (run / "final" / "config.toml").is_file()
    again = next_phase(cfg)  # ended: a resume publishes the same member again, deciding nothing anew
    assert again is not None and again.kind == "publish" and not again.note
    assert json.loads((run / "ensemble" / PUBLISHED).read_text()) == {"begun": BEGUN}
    (run / "ensemble" / PUBLISHED).write_text(json.dumps({"begun": BEGUN - 600}))  # another run's final/ there
    assert next_phase(cfg).note  # decided, not taken for this run's
    assert more_members([Ended(run, 1, 99.0, True)], 120.0, 1, 8)[0] == 0
    assert more_members([Ended(run, 1, 99.0, True)], 600.0, 1, 8)[0] == 1  # 501 s left: 99 + 99 x 2 fit
    assert more_members([Ended(run, 1, 99.0, True)], 600.0, 1, 1)[0] == 0  # no teacher of two fits in memory
    # Said as what stops it: the teachers memory holds, not the time; several members go on to their student
    capped = more_members([Ended(run, 2, 99.0, True)], 600.0, 2, 2)[2]
    expected = "2 members are the most the student can learn from here (memory, or MAX_MEMBERS); the student of all"
    assert capped == f"501 s left: {expected} of them follows", capped
    short = more_members([Ended(run, 2, 99.0, True)], 250.0, 2, 8)[2]
    assert "one more and a student would need" in short and short.endswith("the student of all of them follows")


def test_a_published_final_is_an_earlier_run_that_a_new_run_does_not_replace_unasked(tmp_path):
    """The one member's final/, published into RUN, has no checkpoints beside it: a new run there is refused as over
    any earlier run's saves (it would write its own final/ over the run's model), and --overwrite sets it aside. A
    copy into final/ killed before its rename leaves a whole copy of the weights: the next start removes it, once the
    process that wrote it has ended."""
    run = tmp_path / "run"
    cfg = tiny_config("data", run, "train.distill=true", "train.max_time=120", *VOCAB)
    ended_round(run / "ensemble", cfg, members=1, steps=8, seconds=99.0)
    (run / "ensemble" / "final" / "model.safetensors").write_bytes(b"the member's weights")
    publish(next_phase(cfg))
    with pytest.raises(UsageError, match=rf"^{run / 'final'}: holds an earlier run's model; .*--overwrite"):
        check_new_run(run, overwrite=False)
    check_new_run(run, overwrite=True)
    dead, live = run / ".final.999999999.tmp", run / f".final.{os.getpid()}.tmp"  # no process has the first id
    for staging in (dead, live):
        shutil.copytree(run / "final", staging)
    finish_overwrite(run)
    assert not dead.exists() and live.is_dir() and (run / "final" / "model.safetensors").is_file()


def test_a_resume_keeps_the_teacher_init_the_run_began_with(tmp_path):
    """train.teacher_init makes the student, so a resume's --set of it is left out and said, as for the shape: the
    first round's start event records the run's (its config.toml says false: the round teaches nothing)."""
    run = tmp_path / "run"
    cfg = tiny_config("data", run, "train.distill=true", "train.max_steps=8", *VOCAB)
    for began_with, resumed_with in ((True, False), (False, True)):
        ended_round(run / "ensemble", cfg, members=2, steps=8, seconds=10.0, teacher_init=began_with)
        resumed = replace(cfg, train=replace(cfg.train, teacher_init=resumed_with))
        student = next_phase(resumed)
        assert student is not None and student.kind == "student" and student.cfg.train.teacher_init is began_with
        item = f"train.teacher_init={str(resumed_with).lower()}"
        assert kept_phase_items(run, [item]) == [item]
        assert kept_phase_items(run, [f"train.teacher_init={str(began_with).lower()}"]) == []
    ended_round(run / "ensemble", cfg, members=2, steps=8, seconds=10.0)  # begun before the round recorded it
    assert next_phase(replace(cfg, train=replace(cfg.train, teacher_init=True))).cfg.train.teacher_init


def test_an_overwrite_of_a_later_round_killed_before_its_first_save_is_finished_by_the_next_start(pydoc_data, tmp_path):
    """A later round that replaces an earlier run's round in RUN/ensemble-2 starts there with --overwrite; killed before
    its first save, it leaves its journal and the earlier round set aside. The next start puts that round back, as in
    RUN and RUN/ensemble, rather than refusing every start after it."""
    run = tmp_path / "run"
    train(pydoc_data, run)
    later = run / "ensemble-2"
    later.mkdir()
    (later / "metrics.jsonl").write_text('{"event": "start"}\n')  # an earlier run's round: not this run's
    set_aside(later)  # as RunStart.claim(overwrite=True) leaves it, killed before the round's first save
    assert (later / JOURNAL).is_file() and not (later / "metrics.jsonl").exists()
    train(pydoc_data, run, flags=("--resume", "auto"))
    assert not (later / JOURNAL).exists() and (later / "metrics.jsonl").read_text() == '{"event": "start"}\n'


def test_a_single_model_is_a_first_round_where_it_reaches_the_limit_early_at_ten_times_the_speed_timed():
    shape = replace(sizing.ladder_shape(load_config("configs/base.toml").model, 2), vocab_size=4096)
    rate = flops_per_token(shape, 256) * 1000.0  # 1,000 tokens/s: 100 steps of 1,000 tokens in 100 s
    speed = Speed(((flops_per_token(shape, 256), rate),))
    t = TrainConfig(max_time=600.0, max_steps=100, seq_len=256, distill=True)
    assert distilled(shape, t, 1000, speed)  # 100 s of 600
    assert MIS_TIMED == 10
    assert distilled(shape, replace(t, max_time=120.0), 1000, speed)  # 100 s timed: maybe 10 s
    assert not distilled(shape, replace(t, max_time=10.0), 1000, speed)  # beyond 90% of it even at 10x the speed
    assert not distilled(shape, t, 1000, None) and distilled(replace(shape, members=2), t, 1000, None)


@pytest.mark.second_tier
def test_a_budget_timed_slow_still_spends_itself_on_more_members_and_their_student(code_data, tmp_path, monkeypatch):
    """The machine read 6x slow while the plan timed it (as on a machine busy only then; a tiny model's timing reads
    it ~3x fast, for the steps' overheads, so ~2x slow): the plan trains fewer members than the budget holds, which
    reach the epoch limit (2 epochs: seconds, even on a busy machine) early; the run goes on to more rounds, each
    decided from the seconds the rounds took, then a student of all of them for the time left: >= 90% of the budget
    trained, final/ one model learned from two or more."""
    real, overlap, counts = sizing.calibrate, repeats.verbatim_overlap, {"timings": 0, "overlaps": 0}

    def slow(*args, **kwargs):
        counts["timings"] += 1
        speed = real(*args, **kwargs)
        return replace(speed, points=tuple((flops, rate / 6) for flops, rate in speed.points))

    def measured(*args, **kwargs):
        counts["overlaps"] += 1
        return overlap(*args, **kwargs)

    monkeypatch.setattr(sizing, "calibrate", slow)
    monkeypatch.setattr(repeats, "verbatim_overlap", measured)
    run, budget = tmp_path / "run", 90.0
    sets = ["model.n_layers=0", "model.d_model=0", "model.n_heads=0", "model.members=0", "model.max_seq_len=256"]
    sets += ["train.distill=true", "train.seq_len=0", f"train.max_time={budget:g}", "train.max_steps=0"]
    sets += ["train.sample_tokens=0", 'optim.weight_decay_rule="repeats"', "data.max_epochs=2", "data.vocab_size=0"]
    args = tiny_args(code_data, run, *sets, config=str(BASE), flags=["--quiet"])
    assert train_module.main([*args, "--dry-run"]) == 0  # the plan's own measurements: what the whole run makes
    once, counts["timings"], counts["overlaps"] = dict(counts), 0, 0
    assert train_module.main(args) == 0
    assert counts == once and once["overlaps"] == 1  # made once for the run: no phase times or measures again
    begun = [run / "ensemble", *sorted(run.glob("ensemble-*"))]
    assert sum(load_config(d / "config.toml").model.members for d in begun) >= 2
    seeds = [load_config(d / "config.toml").train.seed for d in begun]
    assert len(set(seeds)) == len(seeds)  # each round its own models
    if len(begun) > 1:  # the first member of each of the first two rounds: another model
        first = [{k.removeprefix("members.0."): v for k, v in weights(d).items()} for d in begun[:2]]
        assert not any(torch.equal(first[0][key], first[1][key]) for key in first[1] if key in first[0])
    student = load_trained(run)
    assert student.cfg.model.members == 1 and student.cfg.train.teacher.count(os.pathsep) == len(begun) - 1
    seconds = [end_event(d / "metrics.jsonl")["train_seconds"] for d in (*begun, run)]
    assert sum(seconds) >= 0.9 * budget, seconds
    # Every phase records the epoch limit the plan set, in its start event and its config.toml; the first round, the
    # whole plan: distilled, timed
    whole = start_event(run / "ensemble")["phase"]["whole"]
    assert whole["distill"] is True and whole["speed"] and whole["epoch_limit"] == 2
    # The first round plans its reads at the speed the whole run timed (it had planned them to its epoch limit, as a
    # run of unknown speed): its end is the clock's at that speed, its epochs no more than the limit's
    first = start_event(run / "ensemble")
    assert first["speed"] == whole["speed"]
    assert first["planned_to_step"] <= load_config(run / "ensemble" / "config.toml").train.max_steps
    assert first["sources"][0]["planned_epochs"] <= whole["epoch_limit"]
    for phase in (*begun, run):
        assert start_event(phase)["epoch_limit"] == whole["epoch_limit"], phase
        assert load_config(phase / "config.toml").data.max_epochs == whole["epoch_limit"], phase
        assert load_config(phase / "config.toml").optim.decay() == whole["weight_decay"], phase  # the student's too


@pytest.mark.parametrize("phase", ["members", "student"])
def test_a_distilled_run_moved_elsewhere_resumes_where_it_now_is(phase, pydoc_data, tmp_path, monkeypatch):
    """Killed in either phase, its folder moved (to another node, say): `--resume auto` of the config with the new
    train.out_dir, or of the run's own config.toml (the student's, whose teacher is inside the old folder), ends
    with the weights of a run never stopped, and nothing is written where the run was."""
    train(pydoc_data, tmp_path / "straight")
    run, moved = tmp_path / "old" / "run", tmp_path / "new" / "run"
    stopped = str(run / "ensemble") if phase == "members" else str(run)
    stop_at(monkeypatch, 5, lambda trainer: os.path.abspath(trainer.cfg.train.out_dir) == stopped)
    with pytest.raises(Interrupted):
        train(pydoc_data, run)
    monkeypatch.undo()
    moved.parent.mkdir()
    shutil.move(run, moved)
    if phase == "members":
        train(pydoc_data, moved, flags=("--resume", "auto"))
    else:
        assert train_module.main([str(moved / "config.toml"), "--quiet", "--resume", "auto"]) == 0
    assert not run.exists()
    straight, resumed = weights(tmp_path / "straight"), weights(moved)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_a_distilled_run_copied_without_its_times_resumes_its_own_student(pydoc_data, tmp_path, monkeypatch):
    """Killed in its student, its folder copied by a copy that keeps no times, RUN's own files first (the student's
    config.toml older than the members' log, as an earlier run's would be), the original removed: `--resume auto` of
    the copy goes on with the run's student (not refused as another run's) and ends with the weights of a run never
    stopped."""
    train(pydoc_data, tmp_path / "straight")
    run, copy = tmp_path / "run", tmp_path / "copy"
    stop_at(monkeypatch, 5, lambda trainer: os.path.abspath(trainer.cfg.train.out_dir) == str(run))
    with pytest.raises(Interrupted):
        train(pydoc_data, run)
    monkeypatch.undo()
    shutil.copytree(run, copy, copy_function=shutil.copyfile)
    shutil.rmtree(run)
    written_in_order(copy, copy / "ensemble", copy)
    train(pydoc_data, copy, flags=("--resume", "auto"))
    straight, resumed = weights(tmp_path / "straight"), weights(copy)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


@pytest.mark.subprocess
def test_a_dry_run_is_refused_while_a_round_of_members_trains_as_while_the_student_does(
    pydoc_data, tmp_path, monkeypatch
):
    run = killed_among_members(pydoc_data, tmp_path, monkeypatch)
    holder = hold_lock(run / "ensemble")  # the members' round, resumed by another process
    try:
        for flags in (("--dry-run",), ("--dry-run", "--resume", "auto")):
            with pytest.raises(UsageError, match=rf"^{run / 'ensemble'}: another run \(pid {holder.pid} "):
                train(pydoc_data, run, flags=flags)
    finally:
        holder.kill()
        holder.wait()


def test_the_students_teacher_is_in_the_memory_estimate_and_bounds_the_members(tmp_path):
    """A student's estimate holds its teacher (each member's fp32 weights, their hidden states, the probabilities):
    train.teacher's folders counted by their recorded members; the members a later round adds stop where the student
    of all of them would not fit."""
    cfg = tiny_config("data", tmp_path, *VOCAB)
    ended_round(tmp_path / "a", cfg, members=3, steps=8, seconds=1.0)
    ended_round(tmp_path / "b", cfg, members=1, steps=8, seconds=1.0)
    student = replace(cfg, train=replace(cfg.train, teacher=os.pathsep.join(str(tmp_path / d / "final") for d in "ab")))
    assert teacher_members(student.train.teacher) == 4
    parts = estimate_bytes(student, 4)
    one_member = 4 * num_params(cfg.model)
    assert parts["the teacher"] == teacher_bytes(cfg.model, cfg.train, 4) > 4 * one_member
    assert (
        teacher_bytes(cfg.model, cfg.train, 4) - teacher_bytes(cfg.model, cfg.train, 3) > one_member
    )  # each member's weights and hidden states
    assert "the teacher" not in estimate_bytes(cfg, 4)
    alone = sum(estimate_bytes(cfg, 4).values())
    room = (
        alone + teacher_bytes(cfg.model, cfg.train, 2)
    ) / MEMORY_SHARE  # a student and a teacher of two, not of three
    assert teachers_in_memory(cfg, int(room), 8) == 2 and teachers_in_memory(cfg, int(room * 100), 8) == 8


def test_a_set_train_max_steps_is_no_epoch_limit_and_trains_no_first_round(pydoc_data, tmp_path):
    """base.toml on the small topics at 2 minutes (tests/plans.json's topics-base): one model reaches the epoch limit
    early, a first round of one; with train.max_steps=50 it stops at its steps, which no round follows."""
    sets = [f'data.dir="{pydoc_data}"', "data.vocab_size=0", f'train.out_dir="{tmp_path}"', "train.max_time=120"]
    plan = plan_run(load_config(BASE, sets), World(), torch.device("cpu"), speed=SPEED)
    assert plan.cfg.model.members == 1 and plan.cfg.train.distill
    steps = plan_run(load_config(BASE, [*sets, "train.max_steps=50"]), World(), torch.device("cpu"), speed=SPEED)
    assert steps.cfg.train.max_steps == 50 and not steps.cfg.train.distill


def test_set_members_are_sized_for_their_share_of_the_budget(pydoc_data, tmp_path):
    """model.members = 2 with train.distill and a self-sized shape: the shape was chosen for the whole 120 s while the
    members train for their share of it (half: 2 / (2 + 1 + 2 x 0.5)), the plan's two notes at odds."""
    sets = [f'data.dir="{pydoc_data}"', "data.vocab_size=0", f'train.out_dir="{tmp_path}"', "train.max_time=120"]
    plan = plan_run(load_config(BASE, [*sets, "model.members=2"]), World(), torch.device("cpu"), speed=SPEED)
    sized = next(n for n in plan.notes if "model.n_layers = 0" in n)
    assert plan.cfg.model.members == 2 and plan.cfg.train.distill and "(60 s at" in sized, sized
    alone = plan_run(
        load_config(BASE, [*sets, "model.members=2", "train.distill=false"]), World(), torch.device("cpu"), speed=SPEED
    )
    assert "(120 s at" in next(n for n in alone.notes if "model.n_layers = 0" in n)  # no student: the whole budget


def test_plot_of_a_run_whose_one_member_is_its_final_draws_the_member(tmp_path):
    """RUN holds only ensemble/ and final/ where the budget held one member: `fasttrain plot RUN` read RUN/metrics.jsonl
    and said there was none (is RUN a run directory?)."""
    pytest.importorskip("matplotlib")
    from fasttrain.plot import plot_run

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "ensemble").mkdir()
    events = [{"event": "train", "step": s, "loss": 5.0 - s / 10, "lr": 1e-3} for s in (1, 2, 3)]
    events.append({"event": "eval", "step": 3, "val_loss": 4.8})
    (run / "ensemble" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert plot_run(run) == run / "curves.png" and (run / "curves.png").stat().st_size > 0
