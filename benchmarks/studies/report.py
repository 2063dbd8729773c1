"""Turn a pytest-benchmark results JSON into a markdown table and a bar chart.

    pytest benchmarks/ --benchmark-only --benchmark-json results.json
    python -m benchmarks.studies.report results.json [--markdown FILE.md] [--chart FILE.png]

The table has a row per case: its name, median and min time, its speed against the strongest stock
implementation of the same case ("no stock op" where the suite times none: the loader, prepare, generation), and
the figures it recorded (GB/s, TFLOP/s, tokens/s, fraction of the floor, MFU, peak memory, host time per call),
under a line naming the machine, versions, commit, date and command; `pytest benchmarks/ --benchmark-only` prints
it after its own table (benchmarks/conftest.py). The chart draws each case's headline figure (GB/s, TFLOP/s or
tokens/s) as one bar per implementation, grouped by case, so every race reads at a glance. Without --markdown
the table is printed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from fasttrain.plot import pyplot, save_figure
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli

COLUMNS = {  # extra_info key: column title, in table order
    "gb_per_s": "GB/s",
    "tflop_per_s": "TFLOP/s",
    "tokens_per_s": "tokens/s",
    "gflops": "GFLOP/s",
    "fraction_of_floor": "of floor",
    "fraction_of_matmul": "of matmul",
    "mfu": "MFU",
    "peak_memory_gib": "peak GiB",
    "peak_extra_gib": "extra GiB",
    "pad_fraction": "on pads",
    "host_us_per_call": "host us/call",
    "timing": "timed by",
}
HEADLINES = ("gb_per_s", "tflop_per_s", "tokens_per_s")  # a case's bar: the first of these it has
# The implementations a user has without fasttrain: eager PyTorch, torch.compile, torch's own fused ops and
# optimizers, the training loop everyone writes first, a block without our kernels. Liger-Kernel is a peer.
STOCK = frozenset({"eager", "compiled", "torch", "torch_foreach", "torch_fused", "plain", "stock"})


def load_results(path: str | Path) -> dict:
    """The JSON pytest-benchmark wrote; UsageError naming the file if it is not one."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), list):
        raise UsageError(f"{path}: no 'benchmarks' list: not a pytest-benchmark results file")
    return results


def case_of(bench: dict) -> tuple[str, str]:
    """(group, implementation): the case's test and parameters without `impl`, and its `impl`
    (fasttrain for cases that have none: they measure fasttrain alone)."""
    params = dict(bench.get("params") or {})
    impl = str(params.pop("impl", "fasttrain"))
    test = bench["name"].split("[")[0].removeprefix("test_")
    return " ".join([test, *(f"{k}={v}" for k, v in params.items())]), impl


def against_stock(benches: Sequence[dict]) -> list[float | None]:
    """Each case's speed against the strongest stock implementation of its group: that one's median time / the
    case's (2.0: twice as fast; the strongest stock case itself 1.0). None where its group has no stock case."""
    fastest: dict[str, float] = {}
    for b in benches:
        group, impl = case_of(b)
        if impl in STOCK:
            fastest[group] = min(fastest.get(group, math.inf), b["stats"]["median"])
    groups = [case_of(b)[0] for b in benches]
    return [fastest[g] / b["stats"]["median"] if g in fastest else None for g, b in zip(groups, benches)]


def duration(t: float) -> str:
    """Seconds `t` in the unit that reads best: "25.0 us", "1.38 ms", "2.10 s"."""
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def _number(v) -> str:
    if isinstance(v, float) and v < 10:
        return f"{v:.3g}"
    return f"{v:,}" if isinstance(v, (int, float)) else str(v)


def markdown(results: dict) -> str:
    """The table, with a first line saying where and how the numbers were measured."""
    benches = results["benchmarks"]
    info = benches[0].get("extra_info", {}) if benches else {}
    commit = results.get("commit_info") or {}
    where = [
        info.get("gpu") or info.get("cpu") or "unknown machine",
        f"torch {info.get('torch', '?')}",
        f"triton {info.get('triton', '?')}",
        f"commit {str(commit.get('id', '?'))[:12]}" + (" (dirty)" if commit.get("dirty") else ""),
        str(results.get("datetime", "?"))[:10],
    ]
    lines = [", ".join(where) + (f"; `{results['command']}`" if results.get("command") else ""), ""]
    keys = [k for k in COLUMNS if any(k in b.get("extra_info", {}) for b in benches)]
    ratios = against_stock(benches)
    stock = ["vs stock"] if any(ratios) else []  # the column only where some case has a stock baseline
    titles = ["case", "implementation", "median", "min", *stock, *(COLUMNS[k] for k in keys)]
    lines.append("| " + " | ".join(titles) + " |")
    lines.append("| --- " * len(titles) + "|")
    for b, ratio in zip(benches, ratios):
        group, impl = case_of(b)
        extra = b.get("extra_info", {})
        cells = [
            group,
            impl,
            duration(b["stats"]["median"]),
            duration(b["stats"]["min"]),
            *([f"{ratio:.2f}x" if ratio else "no stock op"] if stock else []),
            *(_number(extra[k]) if k in extra else "" for k in keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results: dict, out: str | Path) -> Path:
    """One panel per headline figure, a group of bars (one per implementation) per case."""
    plt = pyplot()
    panels: dict[str, dict[str, dict[str, float]]] = {}  # headline -> group -> impl -> value
    for b in results["benchmarks"]:
        extra = b.get("extra_info", {})
        headline = next((k for k in HEADLINES if k in extra), None)
        if headline is not None:
            group, impl = case_of(b)
            panels.setdefault(headline, {}).setdefault(group, {})[impl] = extra[headline]
    if not panels:
        raise UsageError("no case recorded GB/s, TFLOP/s or tokens/s: nothing to chart")
    impls = sorted({impl for groups in panels.values() for bars in groups.values() for impl in bars})
    heights = [len(groups) for groups in panels.values()]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, 1 + 0.5 * sum(heights) + len(panels)), height_ratios=heights, squeeze=False
    )
    width = 0.8 / len(impls)
    for ax, (headline, groups) in zip(axes[:, 0], panels.items()):
        for i, impl in enumerate(impls):
            rows = [(y, bars[impl]) for y, bars in enumerate(groups.values()) if impl in bars]
            ax.barh([y + i * width for y, _ in rows], [v for _, v in rows], height=width, label=impl)
        ax.set_yticks([y + 0.4 - width / 2 for y in range(len(groups))], list(groups), fontsize=7)
        ax.invert_yaxis()
        values = [v for bars in groups.values() for v in bars.values() if v > 0]
        if values and max(values) > 100 * min(values):  # loader and prepare on one axis, say
            ax.set_xscale("log")
        ax.set_xlabel(COLUMNS[headline])
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, Path(out))


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a JSON file from pytest --benchmark-json")
    parser.add_argument("--markdown", help="write the table here (default: print it)")
    parser.add_argument("--chart", help="write the bar chart here (a .png)")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    table = markdown(results)
    if args.markdown:
        try:
            Path(args.markdown).write_text(table, encoding="utf-8")
        except OSError as e:
            raise UsageError(f"{args.markdown}: cannot write ({e.strerror or e})") from None
    else:
        print(table, end="")
    if args.chart:
        print(chart(results, args.chart))
    return 0


if __name__ == "__main__":
    run_cli(main)
