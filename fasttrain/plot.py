"""Plot a run's curves: training and validation loss (of each source too, for a mixture), and the learning
rate, to a PNG; a [[data.mix]] change is a dotted vertical line.

Imports from fasttrain: system.errors, training.phases.

    python -m fasttrain.plot RUN_DIR [--out FILE]

Reads RUN_DIR/metrics.jsonl (the last run in it, resumes included) and writes
RUN_DIR/curves.png (or FILE). Needs matplotlib, the `plot` extra (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

from fasttrain.system.errors import ArgumentParser, UsageError, run_cli

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The events of `run_dir/metrics.jsonl`; UsageError if it is missing or has a malformed line."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (is {run_dir} a run directory?)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:  # fasttrain writes ASCII JSON: damaged, or not a metrics log
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}); not a metrics log fasttrain wrote") from None
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial line: the last one, or the one before a resumed run's start.
            if number == len(lines) or '"event": "start"' in lines[number]:
                continue
            event = None
        if not isinstance(event, dict):
            raise UsageError(f"{path}:{number}: not a JSON object")
        events.append(event)
    return events


def latest_run(events: list[dict]) -> list[dict]:
    """The events of the run that wrote last, across its resumes: a new run's "start" drops what came before it; a
    resumed run's start (at step s) keeps the earlier events up to step s, dropping those trained again."""
    kept: list[dict] = []
    for e in events:
        if e.get("event") == "start":
            resumed = e.get("resume_step")
            kept = [] if resumed is None else [k for k in kept if k.get("step", 0) <= resumed]
        kept.append(e)
    return kept


def pyplot() -> ModuleType:
    """matplotlib.pyplot drawing to files only; UsageError if matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError('plotting needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, out: Path) -> Path:
    """Write `fig` to `out` and close it; UsageError naming the file if it cannot be written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise UsageError(f"{out}: cannot write ({e.strerror or e})") from None
    except ValueError as e:  # a suffix matplotlib writes no format for
        raise UsageError(f"{out}: cannot write ({e})") from None
    finally:
        plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss (train and validation) and learning rate against step; returns the PNG's path. A distilled run whose
    one member was published into its final/ has no log of its own: its member's (ensemble/) is drawn."""
    from fasttrain.training.phases import members_dir  # the distilled run's layout, only when asked

    plt = pyplot()
    member = members_dir(run_dir)
    logged = member if not (Path(run_dir) / "metrics.jsonl").exists() and (member / "metrics.jsonl").is_file() else None
    source = logged or Path(run_dir)
    events = latest_run(read_metrics(source))
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    mixes = [e for e in events if e.get("event") == "mix"]
    checked = (
        ("train", train, ("step", "loss", "lr")),
        ("eval", evals, ("step", "val_loss")),
        ("mix", mixes, ("step",)),
    )
    for kind, kept, keys in checked:
        lacking = next((e for e in kept if not all(isinstance(e.get(k), (int, float)) for k in keys)), None)
        if lacking is not None:
            raise UsageError(
                f"{source / 'metrics.jsonl'}: the {kind} event {json.dumps(lacking)[:100]} lacks a number for "
                f"one of {', '.join(keys)}"
            )
    if not train and not evals:
        raise UsageError(f"{source / 'metrics.jsonl'}: no train or eval events to plot")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    out = out if out.suffix else out.with_name(f"{out.name}.png")  # what matplotlib writes: said as it is
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1])
    loss_ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss")
    loss_ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
    for key in dict.fromkeys(k for e in evals for k in e if k.startswith("val_loss.")):  # a mixture's sources
        steps = [e for e in evals if key in e]
        loss_ax.plot([e["step"] for e in steps], [e[key] for e in steps], ".--", label=f"validation loss, {key[9:]}")
    for change in mixes:
        for ax in (loss_ax, lr_ax):
            ax.axvline(change["step"], color="gray", linestyle=":", linewidth=1)
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title(f"{run_dir} (its one member, {logged.name}/)" if logged else str(run_dir))
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    lr_ax.plot([e["step"] for e in train], [e["lr"] for e in train], color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    return save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (train.out_dir) holding metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    run_cli(main)
