"""A distilled run (train.distill) as a loop of phases, each decided when the one before it ends, from what the run's
folder holds and the seconds its phases took: members of one shape side by side, in one round or more, then one model
of their shape taught by all of them, so that final/ holds one model (one model's memory and cost, and it exports).

Imports from fasttrain: checkpoints.run_directory, checkpoints.saves, compute.device, config, planning.members,
planning.preflight, planning.recorded, system.atomic, system.errors, system.run_lock.

    RUN/ensemble/     the first round of members: an ordinary run (config.toml, checkpoints/, metrics.jsonl, final/)
    RUN/ensemble-2/   a later round (ensemble-3, ...), where the rounds before it read the corpus to its epoch limit
                      with time to spare
    RUN/              the student: train.teacher names every round's final/ (os.pathsep between them, as in PATH);
                      with train.teacher_init it starts from the first member's weights. Its final/ is the run's model.
                      Where the budget held one member and no more, final/ is a copy of that member's ("published").

The run's plan (planning/plan.py, made once) decides the first round: its members and, under train.max_time, their
share of it. Every later choice is `next_phase`'s, made from the rounds' end events, so from the speed measured over
the whole run so far rather than the plan's first short timing: a round that reached its epoch limit with more than
MIN_LEFT of the budget left is followed by another round of as many members as leave the student its time
(`more_members`), and the student trains for the seconds actually left. A new run once its first round has ended,
`--resume auto` in any phase and `--dry-run` all take their phase from `next_phase`; each phase is an ordinary run in its own folder, so it saves,
resumes and refuses as any run does. Which phase a start goes on with is read from the folders: a round until its
metrics.jsonl ends with its end event, then the next decision.

Which folders are the run's is what they record, not when their files were written (a copy that keeps no times,
`cp -r`, writes them in its own order): each phase's start event records when the whole run began (`phase.begun`, set
once by `first_phase`), so a later round, the student in RUN and a published final/ (PUBLISHED) are the run's where
they record what its first round does; an earlier run's, which an --overwrite start left beside it, records its own.
A run whose first round records none (begun before phases recorded it) is read by its files' times (`same_run`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Sequence

from fasttrain.checkpoints.run_directory import MEMBERS_DIR, discard_set_aside, set_aside
from fasttrain.checkpoints.saves import has_saves
from fasttrain.compute.device import use_device
from fasttrain.config import Config, Seconds, load_config
from fasttrain.planning.members import LONE_STUDENT_SHARE, MAX_MEMBERS, MIN_LEFT, TEACHER_COST, ensemble_share
from fasttrain.planning.preflight import Machine, teachers_in_memory
from fasttrain.planning.recorded import start_events
from fasttrain.system.atomic import replace_folder, write_atomically
from fasttrain.system.errors import UsageError
from fasttrain.system.run_lock import other_holder

# In RUN/ensemble: the whole run began with --overwrite, so its student replaces the earlier run in RUN (which stays
# whole until then: the members' rounds touch only their own folders)
REPLACES = "replaces-earlier-run"
# In the round whose one member is the run's model: the run decided to publish it (written before the copy, so a resume
# copies it again rather than deciding anew), as {"begun": the run's phase.begun}
PUBLISHED = "published-into-run"
# What makes a distilled run's phases, which a resume's --set items do not change (the rest they do, as a resume)
PHASE_KEYS = ("model.", "data.", "train.out_dir", "train.max_", "train.teacher", "train.distill", "train.seq_len")
# Phase-making keys that are the whole run's, which a resume takes: train.out_dir names the run, train.max_time is its
# budget and train.distill what made it phases
WHOLE_RUN_KEYS = ("train.out_dir", "train.max_time", "train.distill")
# In the first round's start event, beside phase.begun: the whole run's train.teacher_init, which its student takes
TEACHER_INIT = "teacher_init"


@dataclass(frozen=True)
class Phase:
    """The next ordinary run of a distilled run: `kind` "members" (a round), "student" or "publish" (final/ is the one
    member's: nothing to train); its config, whether it resumes its saves, whether it replaces an earlier run, and when
    the whole run began, which its start event records (the run's identity: see the module's docstring)."""

    kind: str
    cfg: Config
    resume: str | None  # "auto": the phase's own saves go on
    overwrite: bool
    begun: float | None  # None: a run whose first round records none (`same_run`), whose phases record none either
    note: str = ""  # why, where the run decided it at a boundary


@dataclass(frozen=True)
class Ended:
    """A round of members that has ended, as its config.toml and its metrics.jsonl's end event record it."""

    directory: Path
    members: int
    seconds: float  # its training seconds (what train.max_time counts)
    reached_limit: bool  # it stopped at train.max_steps, its epoch limit, not at its share of the budget


def members_dir(run_dir: str | os.PathLike[str], round_number: int = 1) -> Path:
    """Where a distilled run in `run_dir` trains its `round_number`th round of members: absolute, so that a resume from
    anywhere finds them."""
    name = MEMBERS_DIR if round_number == 1 else f"{MEMBERS_DIR}-{round_number}"  # the tools name the first
    return Path(os.path.abspath(run_dir)) / name


def round_folders(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every folder of `run_dir` a round of members is in or was begun in, the first on until one is missing, whoever's
    run it was: where a start first finishes what an --overwrite start killed there left (finish_overwrite)."""
    found: list[Path] = []
    while (folder := members_dir(run_dir, len(found) + 1)).is_dir():
        found.append(folder)
    return found


class Rounds(NamedTuple):
    """The rounds of members begun in a run's folder (`rounds`), and the run's identity their first records."""

    dirs: list[Path]  # the first round's folder, then each later one's, in order; empty: no distilled run there
    begun: float | None  # when the whole run began (`begun_of` the first round): what each of its phases records


def rounds(run_dir: str | os.PathLike[str]) -> Rounds:
    """The rounds of members begun in `run_dir` (each with its config.toml), in order: the first, then each that records
    the run the first began (`same_run`), so an earlier run's later round that an --overwrite start left beside a new
    first round is not this run's."""
    first = members_dir(run_dir)
    if not (first / "config.toml").is_file():
        return Rounds([], None)
    found, begun = [first], begun_of(start_events(first / "metrics.jsonl"))
    while True:
        later = members_dir(run_dir, len(found) + 1)
        recorded = later / "config.toml"
        if not (
            recorded.is_file()
            and same_run(begun, begun_of(start_events(later / "metrics.jsonl")), recorded, found[-1] / "config.toml")
        ):
            return Rounds(found, begun)
        found.append(later)


def teachers(run_dir: str | os.PathLike[str], count: int) -> str:
    """train.teacher of the student of `count` rounds in `run_dir`: their final/ folders, os.pathsep between them."""
    return os.pathsep.join(str(members_dir(run_dir, n) / "final") for n in range(1, count + 1))


def first_phase(cfg: Config, overwrite: bool) -> Phase:
    """The first phase of a new distilled run of `cfg` (RunPlan.cfg): its first round (`ensemble_config`), replacing an
    earlier run's if `overwrite`, the run's identity the time it begins."""
    return Phase("members", ensemble_config(cfg), None, overwrite, round(time.time(), 3))


def ensemble_config(cfg: Config) -> Config:
    """The first round of a distilled plan's `cfg` (RunPlan.cfg with train.distill resolved true): its members, in
    RUN/ensemble, for their share of train.max_time (one member: the whole budget, as no student is planned yet), at
    the weight decay the whole run's plan chose, fixed: every phase trains at it (the student, whose tokens follow
    the time left, too), and none measures the corpus again to choose it."""
    t, members = cfg.train, cfg.model.members
    share = Seconds(round(t.max_time * (ensemble_share(members) if members > 1 else 1.0), 3))
    first = replace(t, distill=False, teacher_init=False, max_time=share, out_dir=str(members_dir(t.out_dir)))
    optim = replace(cfg.optim, weight_decay_rule="fixed", weight_decay=cfg.optim.decay(), weight_decay_chosen=0.0)
    return replace(cfg, train=first, optim=optim)


def phase_items(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """A resume's --set items split into those its phases take (device, intervals, rates, ...) and those that would
    remake a phase (PHASE_KEYS: the shape, data and budget the members recorded, the student's teacher)."""
    remakes = [item.partition("=")[0].strip().startswith(PHASE_KEYS) for item in overrides]
    return [i for i, r in zip(overrides, remakes) if not r], [i for i, r in zip(overrides, remakes) if r]


def remaking_items(overrides: Sequence[str]) -> list[str]:
    """The items of a resume's `overrides` that would remake the phases (`phase_items`), but for the whole run's
    WHOLE_RUN_KEYS: what a resume leaves to what the phases recorded."""
    return [item for item in phase_items(overrides)[1] if item.partition("=")[0].strip() not in WHOLE_RUN_KEYS]


def kept_phase_items(run_dir: str | os.PathLike[str], overrides: Sequence[str]) -> list[str]:
    """The items of a resume's `overrides` that would remake the phases (`phase_items`; the last of each key) and
    are not what the members recorded already (`remaking_items`), which the resume says it leaves out."""
    path = members_dir(run_dir) / "config.toml"
    remakes = {item.partition("=")[0].strip(): item for item in remaking_items(overrides)}  # the last of each key
    recorded, applied = load_config(path), load_config(path, list(remakes.values()))
    teacher_init = recorded_teacher_init(run_dir)

    def value(cfg: Config, key: str) -> object:
        if key == "train.teacher_init" and cfg is recorded and teacher_init is not None:
            return teacher_init  # the round records false (it teaches nothing), its start event the run's
        section, _, name = key.partition(".")
        return getattr(getattr(cfg, section), name, None)

    return [item for key, item in remakes.items() if value(applied, key) != value(recorded, key)]


def recorded_round(directory: Path, overrides: Sequence[str] = ()) -> Config:
    """A round's config as its config.toml records it, in `directory` wherever the run began (a run folder moved or
    copied whole goes on where it now is), with the `overrides` (a resume's --set items) a phase takes."""
    cfg = load_config(directory / "config.toml", phase_items(overrides)[0])
    return replace(cfg, train=replace(cfg.train, out_dir=str(directory)))


def more_members(done: Sequence[Ended], max_time: float, at_once: int, most: int) -> tuple[int, float, str]:
    """How many members a new round adds after the rounds `done` (all ended) of a run of `max_time` seconds, the
    round's seconds, and why in words: the most that train and still leave the student of all of them its time, each
    member as long as the rounds that reached the limit took one (their seconds over their members: the speed
    measured on this machine, this run), `at_once` at most (what the first round trained side by side, which the
    plan found fits) and `most` in all (the student's teacher in memory, at most MAX_MEMBERS); after a lone member,
    the student need have the time for LONE_STUDENT_SHARE of a member's read only. 0 where the last round stopped at
    its share of the budget, or less than MIN_LEFT of it is left."""
    spent, members = sum(r.seconds for r in done), sum(r.members for r in done)
    left = max_time - spent
    limited = [r for r in done if r.reached_limit]
    if not (max_time and done[-1].reached_limit and left > MIN_LEFT * max_time):
        return 0, 0.0, ""
    member = sum(r.seconds for r in limited) / sum(r.members for r in limited)

    def student(total: int) -> float:  # the student reads what a member read, its step 1 + K x TEACHER_COST of one
        return member * (1 + total * TEACHER_COST)

    share = LONE_STUDENT_SHARE if members == 1 else 1.0  # after a lone member, a student of two reading less will do
    added = 0
    for k in range(1, min(most - members, at_once) + 1):
        if k * member + share * student(members + k) <= left:
            added = k
    fitted = f"each member reached the epoch limit in {member:.0f} s"
    if not added:
        if members >= most:  # no room for another teacher: the time is not what stops it
            why = f"{members} members are the most the student can learn from here (memory, or MAX_MEMBERS)"
        else:
            why = f"{fitted}, so one more and a student would need {member + share * student(members + 1):.0f} s"
        then = (
            "the student of all of them follows"
            if members > 1
            else "it stops at the limit, as reading on overfits, and smaller updates that fill the time or a student of "
            "it alone scored no better (docs/performance.md)"
        )
        return 0, 0.0, f"{left:.0f} s left: {why}; {then}"
    seconds = round(left - share * student(members + added), 3)
    return (
        added,
        seconds,
        (
            f"{left:.0f} s left: {fitted}, so {added} more train side by side (for at most {seconds:.0f} s) before the "
            f"student of all {members + added}"
        ),
    )


def student_config(
    first: Config, run_dir: Path, max_time: float, spent: float, teacher_init: bool, count: int
) -> Config:
    """The student's run: `first` (the first round's config, as it recorded it) with one member's shape, its value
    embeddings off, taught by the `count` rounds' final/, in `run_dir`, for what their `spent` training seconds left
    of `max_time` (the whole run's; without one, the members' train.max_steps), starting from the first member's weights if `teacher_init` (the user's
    train.teacher_init, which the rounds, teaching nothing, record false)."""
    left = Seconds(round(max(max_time - spent, 1.0), 3) if max_time else 0.0)
    # Under a budget the student trains for the time left, not to the members' epoch limit: a step costing it more or
    # less than members.TEACHER_COST planned leaves no second unused, and soft targets are not the text itself. A
    # mixture's changes are placed at steps, so there it keeps the members' (rules: data.mix needs train.max_steps).
    steps = 0 if max_time and not first.data.mix else first.train.max_steps
    t = replace(first.train, out_dir=str(run_dir), teacher=teachers(run_dir, count), max_time=left, max_steps=steps)
    return replace(
        first,
        # No value embeddings, where members set them: a Llama cannot hold them, so final/ exports (--hf, --gguf),
        # and a student of a corpus read to its limit is no worse without them (docs/performance.md)
        model=replace(first.model, members=1, value_embeddings=False),
        train=replace(t, teacher_init=teacher_init),
    )


def begun_of(events: Sequence[dict]) -> float | None:
    """When the distilled run began of which the run in a folder (its start `events`) is a phase: the `phase.begun` its
    last new start records (`phase_record`). None: an ordinary run, a phase recorded before phases recorded their run,
    or no start."""
    begun = phase_record(events).get("begun")
    return float(begun) if isinstance(begun, (int, float)) else None


def phase_record(events: Sequence[dict]) -> dict:
    """The `phase` record of the last new start among a run's start `events`; {} where there is none. A resume's start
    is passed over: it goes on with the run begun before it (and one of a phase's own config.toml, `train
    RUN/config.toml --resume auto`, records no phase)."""
    new = [e for e in events if "resumed_from" not in e]
    phase = new[-1].get("phase") if new else None
    return phase if isinstance(phase, dict) else {}


def recorded_teacher_init(run_dir: str | os.PathLike[str]) -> bool | None:
    """The train.teacher_init the distilled run in `run_dir` began with, which its first round records (the round
    itself teaches nothing, so its config.toml says false); None where it records none (begun before it did)."""
    chosen = phase_record(start_events(members_dir(run_dir) / "metrics.jsonl")).get(TEACHER_INIT)
    return chosen if isinstance(chosen, bool) else None


def same_run(begun: float | None, recorded: float | None, path: Path, than: Path) -> bool:
    """Whether a phase that records `recorded` (its `begun_of`) is of the distilled run begun at `begun`, which its first
    round records. A run whose first round records none (begun before phases recorded it, or its first start killed
    before its start event: it trained nothing) is judged by the file times of its phases instead: `path` written after
    `than`, an order a copy that does not keep the times (`cp -r`) can turn round."""
    return recorded == begun if begun is not None else newer(path, than)


def newer(path: Path, than: Path) -> bool:
    """Whether `path` exists and was last written after `than` (which exists)."""
    return path.is_file() and path.stat().st_mtime_ns >= than.stat().st_mtime_ns


def end_event(metrics: Path) -> dict | None:
    """The end event that `metrics` (a run's metrics.jsonl) ends with, written after final/; None if it does not."""
    try:
        lines = metrics.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return None
    return last if isinstance(last, dict) and last.get("event") == "end" else None


def ended(directory: Path) -> Ended | None:
    """The round in `directory` once it has ended; None while it has not."""
    last = end_event(directory / "metrics.jsonl")
    if last is None:
        return None
    cfg = load_config(directory / "config.toml")
    reached = bool(cfg.train.max_steps) and int(last["step"]) >= cfg.train.max_steps
    return Ended(directory, cfg.model.members, float(last["train_seconds"]), reached)


def taught_by(recorded: Path, teacher: str) -> bool:
    """Whether the run whose config.toml is `recorded` was taught by `teacher` (train.teacher), each compared within
    its run's folder: a run folder moved or copied whole still holds its own student."""
    t = load_config(recorded).train
    theirs = [os.path.relpath(p, t.out_dir) for p in t.teacher.split(os.pathsep)] if t.teacher else []
    return theirs == [os.path.relpath(p, recorded.parent) for p in teacher.split(os.pathsep)]


def student_state(run_dir: Path, count: int, begun: float | None) -> str:
    """Where the student of the `count` rounds of the run begun at `begun` in `run_dir` stands: "ended" (its saves and
    end event); "saved" (its saves go on); "none" (no saves of any run, or its start stopped before its first);
    "replaces" (an earlier run's saves, which it replaces as the whole run began with --overwrite, REPLACES) or
    "other" (an earlier run's, not the run's to replace)."""
    recorded, last_round = run_dir / "config.toml", members_dir(run_dir, count)
    ours = (
        recorded.is_file()
        and same_run(begun, begun_of(start_events(run_dir / "metrics.jsonl")), recorded, last_round / "metrics.jsonl")
        and taught_by(recorded, teachers(run_dir, count))
    )
    if ours and end_event(run_dir / "metrics.jsonl") is not None:
        return "ended"
    if not has_saves(run_dir / "checkpoints"):
        return "none"
    if ours:
        return "saved"
    return "replaces" if (members_dir(run_dir) / REPLACES).is_file() else "other"


def published(run_dir: Path, last_round: Path, begun: float | None) -> bool:
    """Whether the run begun at `begun` in `run_dir` has made its final/ that of the one member in `last_round`
    (`publish`, which records so there before it copies)."""
    return same_run(begun, published_by(last_round), run_dir / "final" / "config.toml", last_round / "metrics.jsonl")


def published_by(member: Path) -> float | None:
    """The run (its phase.begun) that made the final/ of the round in `member` its run's model (PUBLISHED); None: none."""
    try:
        record = json.loads((member / PUBLISHED).read_text())
    except (OSError, ValueError):
        return None
    begun = record.get("begun") if isinstance(record, dict) else None
    return float(begun) if isinstance(begun, (int, float)) else None


def replaced_by_another_run(run_dir: Path, begun: float | None) -> bool:
    """Whether another run started in `run_dir` after its distilled run (begun at `begun`) began, and is not its student:
    a resume there is that run's own. A run whose first round records no `begun` (`same_run`): an ordinary run whose
    config.toml is newer than the first round's."""
    recorded = run_dir / "config.toml"
    if begun is None:
        return newer(recorded, members_dir(run_dir) / "config.toml") and not load_config(recorded).train.teacher
    events = start_events(run_dir / "metrics.jsonl")
    if not events or begun_of(events) == begun:  # nothing started there, or the run's own student
        return False
    return float(events[-1].get("time", 0.0)) > begun  # the last start (a resume's too) after the run began


def next_phase(cfg: Config, overrides: Sequence[str] = ()) -> Phase | None:
    """What the distilled run of `cfg` (the user's config; `overrides`: its --set items) begun in train.out_dir trains
    next (a new run's first round is its plan's: ensemble_config): the round begun and not ended (its saves resumed),
    then a new round (`more_members`; replacing an earlier run's round there where the whole run began with
    --overwrite), then the run's last phase: the one member published, or the student (new, or its saves resumed, an
    ended one's too, which evaluates again as any ended run resumed does); None where train.out_dir holds no
    distilled run (an ordinary resume). UsageError where the student would replace saves not the run's to replace."""
    run_dir = Path(os.path.abspath(cfg.train.out_dir))
    found, begun = rounds(run_dir)  # begun: the run's identity, which each phase it starts records
    if not found or replaced_by_another_run(run_dir, begun):
        return None
    ends = [ended(d) for d in found]  # each read once: rounds before the last have ended
    if ends[-1] is None:
        resume = "auto" if has_saves(found[-1] / "checkpoints") else None
        return Phase("members", recorded_round(found[-1], overrides), resume, False, begun)
    done = [r for r in ends if r is not None]
    state = student_state(run_dir, len(found), begun)
    first_round, why = recorded_round(found[0], overrides), ""
    if state == "none" and published(run_dir, found[-1], begun):  # ended: its one member's again (the same copy)
        return Phase("publish", first_round, None, False, begun)
    if state in ("none", "replaces"):  # the student has not begun: a boundary, decided from the rounds' seconds
        room = Machine.of(use_device(first_round.train.device)).available  # read now: the rounds have let theirs go
        most = teachers_in_memory(first_round, room, MAX_MEMBERS)
        added, seconds, why = more_members(done, cfg.train.max_time, first_round.model.members, most)
        if added:
            t = replace(first_round.train, max_time=Seconds(seconds), out_dir=str(members_dir(run_dir, len(found) + 1)))
            # A seed of its own: the same one would train the first round's members over again (their initialisation
            # and their batches' order both come from train.seed), which no ensemble gains from
            t = replace(t, seed=first_round.train.seed + len(found))
            model = replace(first_round.model, members=added)
            replaces = (members_dir(run_dir) / REPLACES).is_file()  # an earlier run's round there, set aside
            return Phase("members", replace(first_round, model=model, train=t), None, replaces, begun, why)
        if sum(r.members for r in done) == 1:
            return Phase("publish", first_round, None, state == "replaces", begun, why)
    if state == "other":
        raise UsageError(
            f"{run_dir / 'checkpoints'}: holds the saves of another run, which the student of {members_dir(run_dir)} "
            "would replace; move them away, or start the whole run over with --overwrite"
        )
    spent = sum(r.seconds for r in done)
    chosen = recorded_teacher_init(run_dir)  # the run's, not a resume's --set: a resume keeps what the phases recorded
    teacher_init = cfg.train.teacher_init if chosen is None else chosen
    student = student_config(first_round, run_dir, cfg.train.max_time, spent, teacher_init, len(found))
    resume = "auto" if state in ("saved", "ended") else None
    return Phase("student", student, resume, state == "replaces", begun, why)


def phase_seconds(run_dir: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """What each ended phase of the distilled run in `run_dir` is and the seconds it trained (its end event's, which
    count a resumed phase's earlier starts too): its rounds, then its student; [] where there is none."""
    run_dir = Path(os.path.abspath(run_dir))
    found, begun = rounds(run_dir)
    spent = [(f"members in {r.directory}", r.seconds) for r in map(ended, found) if r is not None]
    last = end_event(run_dir / "metrics.jsonl")
    if found and last is not None and student_state(run_dir, len(found), begun) == "ended":
        spent.append((f"student in {run_dir}", float(last["train_seconds"])))
    return spent


def discard_earlier_rounds(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Once the distilled run in `run_dir` has ended, where it began with --overwrite (REPLACES): remove the later
    rounds an earlier run left beyond this run's own (an --overwrite replaces the earlier run whole; those are counted
    by no phase and named by no tool), unless another process holds one; returns what it removed."""
    run_dir = Path(os.path.abspath(run_dir))
    if not (members_dir(run_dir) / REPLACES).is_file():
        return []
    own = set(rounds(run_dir).dirs)
    earlier = [d for d in round_folders(run_dir) if d not in own and other_holder(d) is None]
    for folder in earlier:
        shutil.rmtree(folder)
    return earlier


def publish(phase: Phase) -> Path:
    """Copy the one member's final/ (`phase`: "publish") to the run's final/, whole or not at all, replacing an earlier
    run's files where the whole run began with --overwrite: the run's model, as a student's would be. Returns it."""
    member = Path(phase.cfg.train.out_dir)
    run_dir = member.parent
    # Recorded before the copy (`published`): a resume after a kill in the middle copies again, deciding nothing anew
    record = json.dumps({"begun": phase.begun}).encode()
    write_atomically(member / PUBLISHED, lambda f: f.write(record), what="record that final/ is its one member's")
    if phase.overwrite:
        set_aside(run_dir)
    staging = run_dir / f".final.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(member / "final", staging, copy_function=shutil.copyfile)  # written now: what same_run reads
    replace_folder(staging, run_dir / "final", carry=False)  # an earlier run's final/ whole until it is the member's
    if phase.overwrite:
        discard_set_aside(run_dir)
    return run_dir / "final"
