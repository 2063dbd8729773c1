"""A mixture of prepared sources: which source each training row comes from, and where each source stands.

Imports from fasttrain: config, formats.prepared_folder, formats.tokenizer, preparation.cache, system.errors.

A run's training rows form one global sequence: round k (micro-batch k of every rank) is rows [k R, (k + 1) R), R =
batch_size x world_size, rank r taking [k R + r B, k R + (r + 1) B). The source of each row is Megatron's blend: each
source's deficit grows by its weight every row, and the row comes from the source owed the most (ties: the first
listed), whose deficit drops by one. So each source has its weight's share to within a row at every step, on any number
of ranks, never by chance. A source's own rows come in its own seeded order (loader.py); one smaller than its share is
read again, in a new order.

The weights may change from a given round on (`phases`, from [[data.mix]] tables' steps): the deficits restart from zero
there, so the new shares hold from that round exactly. `Blend.start(k)` is each source's position and deficit at round
k; a loader saves it and a resumed one `restart`s from it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fasttrain.config import DataConfig, MixChange
from fasttrain.formats.prepared_folder import PreparedData, open_prepared
from fasttrain.formats.tokenizer import fingerprint
from fasttrain.preparation.cache import find_prepared
from fasttrain.system.errors import UsageError

MEMO = 256  # round states kept (up to twice as many) besides the anchor: more than a prefetcher runs ahead


def normalized(weights: Sequence[float]) -> tuple[float, ...]:
    """`weights` (finite, >= 0, not all 0) over their sum; if that overflows, divided by the largest first (other
    weights as given, so a saved run's blend stays bit for bit the same)."""
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
    if math.isinf(sum(weights)):
        weights = [w / max(weights) for w in weights]
    total = sum(weights)
    return tuple(w / total for w in weights)


def weights_sum(weights: Sequence[float]) -> str:
    """The sum of `weights` for a message: as a number, or "more than 1.8e308" where it overflows."""
    total = sum(weights)
    return f"{total:g}" if math.isfinite(total) else "more than 1.8e308"


class Blend:
    """Which source each row of the global row sequence comes from. `phases`: (first round, weights) pairs from round 0
    (weights need not sum to 1). Thread-safe (a prefetch thread plans ahead)."""

    def __init__(self, phases: Sequence[tuple[int, Sequence[float]]], rows_per_round: int):
        self.phases = _checked([(int(r), normalized(w)) for r, w in phases])
        self.sources = len(self.phases[0][1])
        if any(len(w) != self.sources for _, w in self.phases):
            raise ValueError("every phase needs one weight per source")
        self.rows_per_round = rows_per_round
        self._lock = threading.Lock()
        zero = (0,) * self.sources, (0.0,) * self.sources
        self._anchor = (0, *zero)  # (round, positions, deficits): where every other state is computed from
        self._memo: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = {}

    def planned_rows(self, rounds: int) -> list[float]:
        """Rows each source gives to the first `rounds` rounds (to within one)."""
        ends = [first for first, _ in self.phases[1:]] + [rounds]
        rows = np.zeros(self.sources)
        for (first, weights), end in zip(self.phases, ends):
            rows += np.array(weights) * max(0, min(end, rounds) - first) * self.rows_per_round
        return rows.tolist()

    def weights_at(self, round_: int) -> tuple[float, ...]:
        return next(w for first, w in reversed(self.phases) if first <= round_)

    def entered(self, round_: int) -> list[int]:
        """The first rounds of the phases begun by the start of round `round_` (a saved position)."""
        return [first for first, _ in self.phases if first <= round_]

    def restart(
        self, round_: int, positions: Sequence[int], deficits: Sequence[float], entered: Sequence[int] | None = None
    ) -> None:
        """Continue from `start(round_)`'s state. `entered`: the first rounds of the phases the saved run had begun
        (None: not recorded), which stay; a phase not begun starts at `round_` at the earliest."""
        if len(positions) != self.sources or len(deficits) != self.sources:
            raise ValueError(f"a state of {len(positions)} sources for a blend of {self.sources}")
        with self._lock:
            if entered is not None:
                kept = [int(r) for r in entered][: len(self.phases)]
                starts = [*kept, *(max(first, round_) for first, _ in self.phases[len(kept) :])]
                self.phases = _checked([(start, weights) for start, (_, weights) in zip(starts, self.phases)])
            self._anchor = (round_, tuple(map(int, positions)), tuple(map(float, deficits)))
            self._memo = {}

    def start(self, round_: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(positions, deficits) at the start of round `round_`: rows taken from each source before it."""
        with self._lock:
            return self._start(round_)

    def plan(self, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in that source's rows) of each of the R rows of round `round_`, int64 (R,) each."""
        with self._lock:
            positions, deficits = self._start(round_)
            if self.sources == 1:
                return np.zeros(self.rows_per_round, dtype=np.int64), positions[0] + np.arange(self.rows_per_round)
            picks, at, taken, owed = self._play(round_, positions, deficits)
            self._remember(round_ + 1, (taken, owed))
        return np.array(picks, dtype=np.int64), np.array(at, dtype=np.int64)

    def _start(self, round_: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        first, positions, deficits = self._anchor
        if round_ < first:
            raise ValueError(f"round {round_} is before the blend's anchor at round {first}")
        if self.sources == 1:  # one source takes every row: nothing to play
            return (positions[0] + (round_ - first) * self.rows_per_round,), deficits
        if round_ in self._memo:
            return self._memo[round_]
        known = [r for r in self._memo if r <= round_]
        if known:
            first = max(known)
            positions, deficits = self._memo[first]
        for r in range(first, round_):
            positions, deficits = self._play(r, positions, deficits)[2:]
            self._remember(r + 1, (positions, deficits))
        return positions, deficits

    def _remember(self, round_: int, state: tuple[tuple[int, ...], tuple[float, ...]]) -> None:
        self._memo[round_] = state
        if len(self._memo) > 2 * MEMO:  # a long run plans millions of rounds: keep the latest MEMO
            self._memo = {r: self._memo[r] for r in sorted(self._memo)[-MEMO:]}

    def _play(
        self, round_: int, positions: tuple[int, ...], deficits: tuple[float, ...]
    ) -> tuple[list[int], list[int], tuple[int, ...], tuple[float, ...]]:
        """The source of each row of round `round_` and the row's position in it, then the state after the
        round (deficits reset where a phase begins)."""
        taken, owed = list(positions), list(deficits)
        if any(first == round_ for first, _ in self.phases):
            owed = [0.0] * self.sources  # a new mix: its shares count from here
        weights = list(enumerate(self.weights_at(round_)))
        picks, at = [], []
        # The hot loop of a mixture's loader: plain lists updated in place (the same sums, in the same order, as
        # adding the weights anew), no numpy call per row.
        for _ in range(self.rows_per_round):
            for j, w in weights:
                owed[j] += w
            best = owed.index(max(owed))  # the first of the sources owed the most
            owed[best] -= 1.0
            picks.append(best)
            at.append(taken[best])
            taken[best] += 1
        return picks, at, tuple(taken), tuple(owed)


def source_names(d: DataConfig) -> list[str]:
    """Each [[data.sources]] table's name in metrics, train.monitor and the console, distinct: its `name`, else the
    shortest ending of its folder's path no other unnamed source's shares ("code", "web/prepared")."""
    given = {s.name for s in d.sources if s.name}
    paths = {i: Path(s.dir).resolve().parts for i, s in enumerate(d.sources) if not s.name}
    names = []
    for i, s in enumerate(d.sources):
        if s.name:
            names.append(s.name)
            continue
        parts = paths[i]
        others = [p for j, p in paths.items() if j != i]
        for k in range(1, len(parts) + 1):
            name = str(Path(*parts[-k:]))
            if name not in given and all(p[-k:] != parts[-k:] for p in others):
                break
        else:  # a name given to another source is this folder's whole path
            raise UsageError(
                f"data.sources[{i}].dir = {s.dir}: every name for it is taken by another source's "
                "`name`; give this source a name of its own"
            )
        names.append(name)
    return names


def _checked(phases: list[tuple[int, tuple[float, ...]]]) -> list[tuple[int, tuple[float, ...]]]:
    """`phases` if they start at round 0 and their rounds never go down; several at one round (changes a resume
    brought forward to its position) leave the last of them in force."""
    if not phases or phases[0][0] != 0 or any(a[0] > b[0] for a, b in zip(phases, phases[1:])):
        raise ValueError(f"phases must start at round 0, in increasing rounds, got {[p[0] for p in phases]}")
    return phases


@dataclass(frozen=True)
class Source:
    """One prepared folder of a run's data, with its name (in metrics; see source_names) and base weight
    (normalized)."""

    name: str
    dir: str
    weight: float
    data: PreparedData


def open_sources(d: DataConfig) -> list[Source]:
    """The run's sources now: the [[data.sources]] folders, checked whole and sharing a tokenizer, or data.dir's /
    data.inputs' one (none while unprepared). UsageError naming the folder and key; never writes."""
    if not d.sources:
        directory, data = find_prepared(d)
        return [Source(Path(directory).name, directory, 1.0, data)] if data else []
    weights = normalized([s.weight for s in d.sources])
    opened = []
    for i, s in enumerate(d.sources):
        try:
            opened.append(open_prepared(s.dir))
        except UsageError as e:
            raise UsageError(f"data.sources[{i}]: {e}") from None
    first = opened[0]
    for i, data in enumerate(opened[1:], 1):
        if data.vocab_size != first.vocab_size:
            raise UsageError(
                f"data.sources[{i}].dir = {data.dir} has a vocabulary of {data.vocab_size} tokens, "
                f"data.sources[0].dir = {first.dir} one of {first.vocab_size}; a mixture needs one "
                f"tokenizer: prepare every source with --tokenizer {first.dir}/tokenizer.json"
            )
        if _tokenizer_sha(data) != _tokenizer_sha(first):
            raise UsageError(
                f"data.sources[{i}].dir = {data.dir} was prepared with another tokenizer than "
                f"data.sources[0].dir = {first.dir} (their tokenizer.json differ); a mixture needs one: "
                f"prepare every source with --tokenizer {first.dir}/tokenizer.json"
            )
    return [Source(n, s.dir, w, data) for n, s, w, data in zip(source_names(d), d.sources, weights, opened)]


def _tokenizer_sha(data: PreparedData) -> str:
    return data.meta.get("tokenizer_sha256") or fingerprint(Path(data.dir) / "tokenizer.json")


def phases(d: DataConfig, max_steps: int, accumulation: int) -> tuple[list[tuple[int, tuple[float, ...]]], list[str]]:
    """The mix of a run as (first round, normalized weights) pairs for `Blend` (a step is `accumulation`
    rounds), and a note for each list of weights that did not sum to 1 (normalized, as docs/data.md says)."""
    if not d.sources:
        return [(0, (1.0,))], []
    given = [(0, "data.sources weights", [s.weight for s in d.sources])]
    given += [(change_step(c, max_steps), f"data.mix[{i}].weights", c.weights) for i, c in enumerate(d.mix)]
    notes = [
        f"{name} sum to {weights_sum(w)}, not 1: normalized to {', '.join(f'{v:.4g}' for v in normalized(w))}"
        for _, name, w in given
        if abs(sum(w) - 1) > 1e-9
    ]
    return [(step * accumulation, normalized(w)) for step, _, w in given], notes


def token_shares(mix: Sequence[tuple[int, Sequence[float]]], rounds: int) -> tuple[float, ...]:
    """Each source's share of a run's rows over its first `rounds` rounds under `mix` ((first round, normalized weights)
    phases); without `rounds` (a clock alone) the starting weights."""
    if rounds <= 0:
        return tuple([w for first, w in mix if first <= 0][-1])  # the last of the phases at round 0 is in force
    ends = [min(first, rounds) for first, _ in mix[1:]] + [rounds]
    spans = [max(0, end - min(first, rounds)) for (first, _), end in zip(mix, ends)]
    return tuple(sum(span * w[i] for span, (_, w) in zip(spans, mix)) / rounds for i in range(len(mix[0][1])))


def replay_mix(d: DataConfig, mix: Sequence[tuple[int, Sequence[float]]], accumulation: int, steps: int) -> str:
    """The `--set` item that makes a replay of a run's first `steps` steps read its mix: each [[data.mix]] change
    (`mix`: its loader's phases) pinned at its step; "" without changes."""
    if not d.mix:
        return ""
    pinned: dict[int, list[float]] = {}  # step -> weights; changes a resume brought to one step: the last holds
    for (first, _), change in zip(mix[1:], d.mix):
        if first // accumulation < steps:
            pinned[first // accumulation] = change.weights
    tables = ", ".join(
        f"{{step = {step}, weights = [{', '.join(repr(float(w)) for w in weights)}]}}"
        for step, weights in pinned.items()
    )
    return f"data.mix=[{tables}]"


def change_step(change: MixChange, max_steps: int) -> int:
    """The first step of a [[data.mix]] change."""
    return change.step or round(change.fraction * max_steps)


def kept_mix_notes(
    planned: Sequence[tuple[int, Sequence[float]]], kept: Sequence[tuple[int, Sequence[float]]], accumulation: int
) -> list[str]:
    """What a resume says where the mix its loader keeps (`kept`, from the saved run: Blend.restart) differs from
    the config's placement (`planned`): phases as (first micro-batch, weights), the base phase first."""
    notes, a = [], accumulation
    for i, ((placed, _), (first, _)) in enumerate(zip(planned[1:], kept[1:])):
        if first < placed:
            notes.append(
                f"data.mix[{i}] began at step {first // a} and stays in force (this config alone would "
                f"place it at step {placed // a})"
            )
        elif first > placed:
            notes.append(
                f"data.mix[{i}] at step {placed // a} is before the saved step: its weights apply "
                f"from step {first // a}"
            )
    return notes
