"""A corpus read many times: the best and the last evaluation of runs that read it 2 to 32 times, at equal tokens.

    python -m benchmarks.studies.many_epochs --corpus code-small --depth 2 --epochs 4 8 16 \
        [--case fixed repeats wd=1 distill=4 ...] [--seed 1 2] [--jobs 2] [--out FILE] [--work DIR]

Every run is configs/base.toml at a fixed shape (depth d, width 64 d, heads of 64) and context 256, for the steps
that read the corpus --epochs times over (16 x 256 tokens a step), evaluated 12 times on its whole validation split,
without samples or compiling. A case is what differs:
  fixed      weight decay 0.1 whatever the epochs (optim.weight_decay_rule = "fixed")
  repeats    optim.weight_decay_rule = "repeats" (base.toml's, fasttrain/planning/repeats.py): the decay the plan chooses
  wd=X       weight decay X;  drop=X  model.dropout X (both under the fixed rule);  KEY=VALUE,...  any --set items
  distill=K  one model distilled (train.teacher) from the case model.members=K, trained first where not in the grid,
             for the same steps as one member; distill=K,KEY=VALUE,... sets those for the student too (with
             train.max_steps=N it reads more or less than a member); --work keeps the runs, and a teacher trained
             there by an earlier call, so a grid of students can be run in parts
  bpe=P,...  subword regularisation (BPE-dropout, Provilkov et al. 2020): the training split holds ceil(epochs)
             segmentations of its text, each merge skipped with probability P (the tokenizers library's BPE dropout;
             P = 0: the standard one again), read once in a shuffled order for the standard run's steps; validation
             keeps the standard segmentation. The rule would see one epoch, so give the decay: bpe=0.1,wd=0.49
It records each evaluation's bits per byte: the best, the last (what a run that keeps its last weights gives), and
the weight decay the run trained at (its config.toml). Equal tokens, so any CPU gives the same figures to rounding;
each run is one process of one thread (--jobs of them at once).

The corpora (prepared once at vocab 4096, or --vocab, into --cache; the main job's is the topics with the stdlib's sources):
  pydoc       the Python documentation topics (builtin:pydoc), 93K training tokens of English: its validation
              text repeats its training text (half its 16-token spans are in it)
  docstrings  the standard library's docstrings (builtin:docstrings), 426K tokens of English
  prose       both, the topics and the docstrings, 530K tokens of English
  code-small  the asyncio, email, json and http packages' sources, 254K tokens
  code-1m     the sources of ten packages of the standard library, ~1M tokens

Writes one JSON (default benchmarks/results/recipe/cpu-many-epochs-<corpus>-<date>.json), appending to it when it
exists, so a grid can be run in parts.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers

from benchmarks.studies.common import ROOT, add_runs, load_average, prepared
from fasttrain.config import load_config
from fasttrain.formats.shards import ShardWriter, find_shards, token_blocks
from fasttrain.plot import read_metrics
from fasttrain.system.errors import ArgumentParser, run_cli

TOKENS_PER_STEP = 16 * 256
EVALUATIONS = 12


def case_sets(case: str) -> list[str]:
    """The --set items of a case (the module docstring's)."""
    fixed = 'optim.weight_decay_rule="fixed"'  # base.toml chooses the decay by the repeats rule
    if case == "fixed":
        return [fixed]
    if case == "repeats":
        return ['optim.weight_decay_rule="repeats"']
    if case.startswith("wd="):
        return [fixed, f"optim.weight_decay={case[3:]}"]
    if case.startswith("drop="):
        return [fixed, f"model.dropout={case[5:]}"]
    return case.split(",")


def segmented(data: Path, dropout: float, copies: int) -> Path:
    """A prepared folder beside `data` whose training split is `copies` segmentations of `data`'s training text under
    BPE-dropout `dropout` (made once), its validation split and tokenizer `data`'s. The dropout is not seeded (the
    tokenizers library draws it), so a folder made again differs in its draws."""
    out = data.parent / f"{data.name}-bpe{dropout:g}-x{copies}"
    if (out / "meta.json").exists():
        return out
    spec = json.loads((data / "tokenizer.json").read_text())
    standard = tokenizers.Tokenizer.from_str(json.dumps(spec))
    spec["model"]["dropout"] = dropout or None
    dropped = tokenizers.Tokenizer.from_str(json.dumps(spec))
    meta = json.loads((data / "meta.json").read_text())
    eot = meta["eot_id"]
    tokens = np.concatenate(
        [np.asarray(block, dtype=np.int64) for info in find_shards(data, "train") for block in token_blocks(info)]
    )
    starts = [*np.flatnonzero(tokens == eot), len(tokens)]  # each document begins with end-of-text
    texts = [standard.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]
    out.mkdir()
    with ShardWriter(out / "train_000000.bin", meta["vocab_size"]) as shard:
        for _ in range(copies):
            for text in texts:
                shard.write(np.array([eot, *dropped.encode(text).ids], dtype=np.int64))
    for name in ["tokenizer.json", *meta["shards"]["val"]]:
        shutil.copy(data / name, out / name)
    meta["tokens"]["train"], meta["shards"]["train"] = shard.num_tokens, ["train_000000.bin"]
    meta["documents"]["train"] *= copies
    meta["text_bytes"]["train"] *= copies
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def run_dir(data: Path, depth: int, epochs: float, seed: int, case: str, work: Path) -> Path:
    """Where run_one trains that run."""
    return work / f"{data.name}-d{depth}-e{epochs:g}-s{seed}-{case.replace('=', '').replace(',', '_')}"


def teacher_case(case: str) -> str | None:
    """The ensemble case a distill=K case learns from; None for any other case."""
    first = case.split(",")[0]
    return f"model.members={first[8:]}" if first.startswith("distill=") else None


def run_one(data: Path, depth: int, epochs: float, seed: int, case: str, work: Path) -> dict:
    """One run of the grid, and what its evaluations said; a distill=K case's teacher must be trained already."""
    meta = json.loads((data / "meta.json").read_text())
    train_tokens = meta["tokens"]["train"]
    steps = max(round(epochs * train_tokens / TOKENS_PER_STEP), EVALUATIONS)
    out = run_dir(data, depth, epochs, seed, case, work)
    teacher = teacher_case(case)
    student = [f'train.teacher="{run_dir(data, depth, epochs, seed, teacher, work) / "final"}"'] if teacher else []
    first, _, rest = case.partition(",")
    if first.startswith("bpe="):
        reads = segmented(data, float(first[4:]), math.ceil(epochs))
        case_items = [s for item in rest.split(",") if item for s in case_sets(item)]
    else:
        reads, case_items = data, case_sets(case)
    sets = [
        f'data.dir="{reads}"',
        f"model.n_layers={depth}",
        f"model.d_model={64 * depth}",
        f"model.n_heads={depth}",
        f"train.max_steps={steps}",
        "train.max_time=0",
        f"train.seed={seed}",
        f'train.out_dir="{out}"',
        f"train.eval_interval={max(steps // EVALUATIONS, 1)}",
        "train.eval_steps=1000",  # the whole validation split (fewer rows than this)
        "train.sample_tokens=0",
        "train.seq_len=256",
        "train.log_interval=100000",
        "train.compile=false",
        "checkpoint.interval=100000",
        "train.distill=false",  # one run a case: the ensemble's final/ is the ensemble, a distill=K case the student
        *(student + case.split(",")[1:] if teacher else case_items),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "fasttrain.train", "configs/base.toml", "--quiet", "--overwrite", "--set", *sets]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{out.name}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    events = read_metrics(out)
    curve = [round(e["val_bpb"], 4) for e in events if e["event"] == "eval"]
    start = next(e for e in events if e["event"] == "start")
    recorded = load_config(out / "config.toml")
    return {
        "corpus": data.name,
        "vocab": meta["vocab_size"],
        "depth": depth,
        "epochs": epochs,
        "planned_epochs": start["sources"][0]["planned_epochs"],
        "seed": seed,
        "case": case,
        "teacher": teacher,
        "weight_decay": recorded.optim.decay(),
        "steps": recorded.train.max_steps,  # a case's train.max_steps=N (a student reading more or less) included
        "best": min(curve),
        "last": curve[-1],
        "curve": curve,
        "load_after": load_average(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.many_epochs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, choices=["pydoc", "docstrings", "prose", "code-small", "code-1m"])
    parser.add_argument("--depth", type=int, nargs="+", default=[2])
    parser.add_argument("--epochs", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    parser.add_argument("--case", nargs="+", default=["fixed", "repeats"])
    parser.add_argument("--seed", type=int, nargs="+", default=[1])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096, help="the tokenizer's size the corpus is prepared at")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fasttrain-many-epochs")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--work",
        type=Path,
        help="where the runs train and stay (default: a temporary folder, removed at the end); "
        "a distill=K case's teacher already trained there is not trained again",
    )
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / f"benchmarks/results/recipe/cpu-many-epochs-{args.corpus}-{today}.json"
    data = prepared(args.corpus, args.cache, args.vocab)
    teachers = sorted({t for c in args.case if (t := teacher_case(c)) and t not in args.case})
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pool = stack.enter_context(ThreadPoolExecutor(args.jobs))
        grid: list[tuple[int, float, int, str]] = list(
            itertools.product(args.depth, args.epochs, args.seed, args.case + teachers)
        )
        trained = [g for g in grid if g[3] in teachers and (run_dir(data, *g, work) / "final").is_dir()]
        runs = []
        for students in (False, True):  # the teachers first, then their students
            phase = [g for g in grid if bool(teacher_case(g[3])) == students and g not in trained]
            runs += list(pool.map(lambda g: run_one(data, g[0], g[1], g[2], g[3], work), phase))
    what = "best and last evaluation of runs reading a corpus many times, at equal tokens"
    add_runs(out, runs, what, __spec__.name, argv, today)
    for r in runs:
        print(
            f"{r['corpus']} depth {r['depth']} {r['planned_epochs']:.1f} epochs seed {r['seed']} {r['case']:<10} "
            f"wd {r['weight_decay']:<6g} best {r['best']:.4f} last {r['last']:.4f}"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
