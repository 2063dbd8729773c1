"""The GPU goals of the open performance issues, judged from benchmark results.

    from benchmarks.studies.goals import judge
    rows = judge(results["benchmarks"])   # [{"goal", "case", "met", "detail"}, ...]

Each goal names the benchmark it reads, which of its cases it covers, and a test of
fasttrain's case against the other implementations of the same case (the same test and
parameters but `impl`): a speed ratio of medians against the fastest of the named rivals,
a fraction of the floor, a memory ratio or an MFU. A case whose rivals were not measured
(Liger not installed, compiled baselines skipped in a dry run) has no row: an unjudged goal is
absent, never passed. The gpu_check report tables the rows under "Goals"; in a dry run they
mean nothing, as its timings do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from benchmarks.studies.report import case_of

# A test: (fasttrain's benchmark, {impl: benchmark} of the same case) -> (met, detail), or None: no rival
Judge = Callable[[dict, dict[str, dict]], "tuple[bool, str] | None"]


def faster(rivals: tuple[str, ...], at_least: float) -> Judge:
    """Met where the fastest of `rivals` takes at least `at_least` times fasttrain's median."""

    def judge(ours: dict, impls: dict[str, dict]) -> tuple[bool, str] | None:
        times = {impl: impls[impl]["stats"]["median"] for impl in rivals if impl in impls}
        if not times:
            return None
        rival = min(times, key=times.get)
        ratio = times[rival] / ours["stats"]["median"]
        return ratio >= at_least, f"{ratio:.3f}x {rival} (goal {at_least:g}x)"

    return judge


def reaches(key: str, at_least: float, shown: str) -> Judge:
    """Met where fasttrain's recorded `key` (of its extra_info) is at least `at_least`; `shown` formats
    the value for the detail, e.g. "MFU {:.3f}"."""

    def judge(ours: dict, impls: dict[str, dict]) -> tuple[bool, str] | None:
        value = ours["extra_info"].get(key)
        return None if value is None else (value >= at_least, f"{shown.format(value)} (goal {at_least:g})")

    return judge


def of_floor(at_least: float) -> Judge:
    """Met where fasttrain reaches `at_least` of the case's floor (its recorded fraction_of_floor)."""
    return reaches("fraction_of_floor", at_least, "{:.2f} of the floor")


def memory(rival: str, at_most: float) -> Judge:
    """Met where fasttrain's peak memory beyond the inputs is at most `at_most` of `rival`'s."""

    def judge(ours: dict, impls: dict[str, dict]) -> tuple[bool, str] | None:
        if rival not in impls:
            return None
        mine, theirs = ours["extra_info"]["peak_extra_gib"], impls[rival]["extra_info"]["peak_extra_gib"]
        ratio = mine / theirs if theirs > 0 else float("inf")
        return ratio <= at_most, f"{mine} GiB, {ratio:.0%} of {rival}'s {theirs} GiB (goal <= {at_most:.0%})"

    return judge


def mfu(at_least: float) -> Judge:
    """Met where the step's recorded model FLOPs utilisation is at least `at_least`."""
    return reaches("mfu", at_least, "MFU {:.3f}")


@dataclass(frozen=True)
class Goal:
    name: str
    test: str  # the benchmark function, e.g. "test_rms_norm"
    covers: Callable[[dict], bool]  # of a case's extra_info: whether the goal applies to it
    judge: Judge


TORCH_NORMS = ("torch", "eager", "compiled")  # torch's own RMSNorm: F.rms_norm, eager ops, or compiled

GOALS = (
    # issue 29: kernels that win at the shapes we train
    Goal(
        "linear + CE >= 1.0x torch.compile",
        "test_linear_cross_entropy_fwd_bwd",
        lambda e: True,
        faster(("compiled",), 1.0),
    ),
    Goal(
        "linear + CE extra memory <= 25% of torch.compile's",
        "test_linear_cross_entropy_fwd_bwd",
        lambda e: True,
        memory("compiled", 0.25),
    ),
    Goal(
        "RMSNorm >= 1.0x torch's own", "test_rms_norm", lambda e: 768 <= e["hidden"] <= 8192, faster(TORCH_NORMS, 1.0)
    ),
    Goal("RMSNorm >= 0.75 of the copy floor", "test_rms_norm", lambda e: 2048 <= e["hidden"] <= 8192, of_floor(0.75)),
    Goal(
        "cross-entropy >= 0.75 of the floor",
        "test_cross_entropy_fwd_bwd",
        lambda e: e["vocab"] >= 131072,
        of_floor(0.75),
    ),
    Goal(
        "cross-entropy >= 1.0x Liger and torch.compile",
        "test_cross_entropy_fwd_bwd",
        lambda e: True,
        faster(("liger", "compiled"), 1.0),
    ),
    Goal("AdamW >= 1.0x torch fused", "test_adamw_step", lambda e: True, faster(("torch_fused",), 1.0)),
    # issue 28: the step faster than stock torch.compile
    Goal(
        "GPT-2-small step >= 1.2x stock",
        "test_gpu_train_step",
        lambda e: e["config"] == "gpt2-small.toml",
        faster(("stock",), 1.2),
    ),
    Goal("GPT-2-small MFU >= 0.46", "test_gpu_train_step", lambda e: e["config"] == "gpt2-small.toml", mfu(0.46)),
    Goal(
        "350M step >= 1.15x stock",
        "test_gpu_train_step",
        lambda e: e["config"] == "gpt-350m.toml",
        faster(("stock",), 1.15),
    ),
)


def judge(benchmarks: list[dict]) -> list[dict]:
    """A row per (goal, fasttrain case it covers and can judge), in GOALS order: goal, case, met, detail."""
    cases: dict[str, dict[str, dict]] = {}  # case -> impl -> benchmark
    for b in benchmarks:
        case, impl = case_of(b)
        cases.setdefault(case, {})[impl] = b
    rows = []
    for goal in GOALS:
        for case, impls in cases.items():
            ours = impls.get("fasttrain")
            if ours is None or ours["name"].split("[")[0] != goal.test or not goal.covers(ours["extra_info"]):
                continue
            verdict = goal.judge(ours, impls)
            if verdict is not None:
                rows.append({"goal": goal.name, "case": case, "met": verdict[0], "detail": verdict[1]})
    return rows
