"""Time to quality on a CPU: recipe changes and model shapes trained for the same seconds, scored on held-out text.

    python -m benchmarks.studies.recipe_sweep --corpus large --budget 120 [--case NAME ...] [--threads 2] [--out FILE]

Every case is configs/base.toml with the tables it had when these cases were defined (TABLES_BEFORE: a tied head,
no embedding norm or value embeddings, one rate) and then its --set items (CASES), or, case "default", base.toml
as it is; trained for --budget seconds of training
(train.max_time, what the schedule is fitted to; compiling, evaluating and saving are outside it), compile
off, without samples, and validated once at the end on the first EVAL_TOKENS of the corpus's validation
split (as many batches as that takes at the case's batch and sequence length), so every case is scored on
the same text; its val_bpb is what the run's end event records.
Each case runs in a process of its own with OMP_NUM_THREADS=--threads.

The corpora are built from the running Python's standard library, so any machine has them, and are held
out from builtin:pydoc, the corpus configs/base.toml was tuned on (its documentation topics, not code):
  large  every .py file of the standard library (site-packages left out), ~31 MB: read about once
  small  the asyncio, email, json and http packages, ~1.1 MB: read many times over
and "pydoc" is the topics alone (92K training tokens; the main job's corpus was, until the stdlib's sources joined
it), for how a budget that reads it 10-20 times does.
Each is written as JSONL, one document a file, and prepared once at vocab 4096 into --cache.

Writes one JSON (default benchmarks/results/recipe/cpu-recipe-<corpus>-<budget>s-<date>.json) with the machine,
the command, the load average around each case and every result. Compare cases within one file: the
figures depend on the CPU (bf16 through AMX or AVX-512, or fp32) and on what else runs on it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from benchmarks.studies.common import ROOT, load_average, prepared, result_header
from fasttrain.checkpoints.run_directory import MEMBERS_DIR
from fasttrain.config import load_config
from fasttrain.planning.sequence_length import contexts
from fasttrain.plot import read_metrics
from fasttrain.system.errors import ArgumentParser, run_cli
from fasttrain.training.phases import phase_seconds, rounds

EVAL_TOKENS = 131_072  # of validation text every case is scored on: 32 batches of 16 x 256


def shape(d_model: int, n_layers: int, head_dim: int = 64) -> list[str]:
    return [f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"model.n_heads={d_model // head_dim}"]


MUON = ["optim.name=muon"]
WSD = ["schedule.decay=wsd", "schedule.cooldown_fraction=0.5"]
SEQ_512 = ["model.max_seq_len=512", "train.seq_len=512"]
RELU2 = ["model.mlp=relu2"]
QK_NORM = ["model.qk_norm=true"]
# name -> --set items on top of configs/base.toml (4 x 192, 4 heads of 48, AdamW lr 2e-3, cosine to 2e-4,
# 16 x 256 tokens a step, tied embeddings).
CASES: dict[str, list[str]] = {
    "base": [],
    "muon": MUON,
    "wsd": WSD,
    "untied": ["model.tie_embeddings=false"],
    "lr 3e-3": ["optim.lr=3e-3", "schedule.min_lr=3e-4"],
    "batch 32": ["train.batch_size=32"],
    "batch 8": ["train.batch_size=8"],
    "2 x 128": shape(128, 2),
    "3 x 128": shape(128, 3),
    "4 x 128": shape(128, 4),
    "2 x 192": shape(192, 2),
    "6 x 192": shape(192, 6),
    "4 x 256": shape(256, 4),
    "2 x 128 muon": shape(128, 2) + MUON,
    "2 x 128 muon wsd": shape(128, 2) + MUON + WSD,
    "muon wsd": MUON + WSD,
    "relu2": RELU2,
    "qk norm": QK_NORM,
    "relu2 qk norm": RELU2 + QK_NORM,
    "2 x 128 relu2 qk norm": shape(128, 2) + RELU2 + QK_NORM,
    "2 x 128 muon relu2 qk norm": shape(128, 2) + MUON + RELU2 + QK_NORM,
    "seq 512": SEQ_512 + ["train.batch_size=8"],
    # nanochat's CPU settings at its depth 2: 2 x 128, 32 x 512 tokens a step, Muon, a long warmdown
    "2 x 128 muon wsd b32 seq 512": shape(128, 2) + MUON + WSD + SEQ_512 + ["train.batch_size=32"],
    "2 x 128 muon wsd seq 512": shape(128, 2) + MUON + WSD + SEQ_512 + ["train.batch_size=8"],
}
# The depth ladder the automatic shape chooses from: width 64 x depth, heads of 64, Muon and a warmdown.
CASES |= {f"depth {d}": shape(64 * d, d) + MUON + WSD for d in (1, 2, 3, 4, 6)}
# nanochat's components, one at a time on depth 2, at equal tokens (--steps: none costs a measurable speed)
CASES |= {
    f"depth 2 {name}": CASES["depth 2"] + sets
    for name, sets in {
        "zero init": ["model.zero_init_projections=true"],
        "embedding norm": ["model.embedding_norm=true"],
        "untied": ["model.tie_embeddings=false"],
        "relu2": RELU2,
        "qk norm": QK_NORM,
    }.items()
}
# Issue 63: nanochat's head, embedding and rates on depth 2, at equal tokens (--steps 200, --seed 1 and 2)
UNTIED_NORMED = ["model.tie_embeddings=false", "model.embedding_norm=true"]
CASES |= {
    f"depth 2 {name}": CASES["depth 2"] + UNTIED_NORMED + sets
    for name, sets in {
        "untied embedding norm": [],
        "untied embedding norm rates": ["optim.embedding_lr=0.05", "optim.head_lr=0.004"],
        "untied embedding norm rates low": ["optim.embedding_lr=0.02", "optim.head_lr=0.002"],
        "untied embedding norm rates high": ["optim.embedding_lr=0.1", "optim.head_lr=0.008"],
        "untied embedding norm rates softcap": [
            "optim.embedding_lr=0.05",
            "optim.head_lr=0.004",
            "model.logit_softcap=15",
        ],
    }.items()
}
# Issue 63, second round: nanochat's other components, one at a time on top of the winner above, at depth 2 and 4
RECIPE = UNTIED_NORMED + ["optim.embedding_lr=0.05", "optim.head_lr=0.004"]
CASES |= {
    f"depth {d} recipe{name}": CASES[f"depth {d}"] + RECIPE + sets
    for d in (2, 3, 4)
    for name, sets in {
        "": [],
        " value embeddings": ["model.value_embeddings=true"],
        " residual scalars": ["model.residual_scalars=true"],
        " value embeddings residual scalars": ["model.value_embeddings=true", "model.residual_scalars=true"],
        " relu2": RELU2,
        " qk norm": QK_NORM,
        " rope 100k": ["model.rope_theta=100000"],
        " zero init": ["model.zero_init_projections=true"],
        " smear": ["model.smear=true"],
        " backout": ["model.backout=true"],
    }.items()
}
# Issue 63, third round: nanochat's Muon, one part at a time, on the recipe base.toml took from the rounds above
DEFAULT_RECIPE = RECIPE + ["model.value_embeddings=true"]
CASES |= {
    f"depth {d} default{name}": CASES[f"depth {d}"] + DEFAULT_RECIPE + sets
    for d in (1, 2, 3, 4)
    for name, sets in {
        "": [],
        " polar express": ['optim.muon.orthogonalisation="polar_express"'],
        " normuon": ["optim.muon.second_moment_beta2=0.9"],
        " cautious wd": ["optim.muon.cautious_weight_decay=true"],
        " nanochat muon": [
            'optim.muon.orthogonalisation="polar_express"',
            "optim.muon.second_moment_beta2=0.9",
            "optim.muon.cautious_weight_decay=true",
        ],
        " rope 100k": ["model.rope_theta=100000"],
        " softcap": ["model.logit_softcap=15"],
        # Issue 63, many epochs (--corpus pydoc): regularisation for a corpus read 10-20 times. nanochat's rule
        # gives its matrices a weight decay of ~4.75 at this batch and token count (torch's Muon decays by lr x wd)
        " wd 0.3": ["optim.weight_decay=0.3"],
        " wd 0.5": ["optim.weight_decay=0.5"],
        " wd 1": ["optim.weight_decay=1"],
        " wd 2": ["optim.weight_decay=2"],
        " wd 4": ["optim.weight_decay=4"],
        " wd 4 cautious": ["optim.weight_decay=4", "optim.muon.cautious_weight_decay=true"],
        " dropout 0.1": ["model.dropout=0.1"],
    }.items()
}
AUTO = ["model.n_layers=0", "model.d_model=0", "model.n_heads=0"]  # the shape chosen for the budget (sizing.py)
CASES["auto"] = AUTO + MUON + WSD
CASES["default"] = []  # configs/base.toml as it is (nothing of TABLES_BEFORE)
# base.toml's head and tables before 2026-11-25, which every case but "default" starts from (a case's sets win)
TABLES_BEFORE = [
    "model.tie_embeddings=true",
    "model.embedding_norm=false",
    "model.value_embeddings=false",
    "optim.embedding_lr=0",
    "optim.head_lr=0",
]


def setting(sets: Sequence[str], key: str, default: int) -> int:
    """The value `sets` give `key`, else configs/base.toml's `default`."""
    found = [int(item.split("=")[1]) for item in sets if item.startswith(f"{key}=")]
    return found[-1] if found else default


def run_case(
    name: str, data: Path, budget: float, threads: int, out_dir: Path, steps: int = 0, seed: int = 1337
) -> dict:
    """Train case `name` on prepared `data` (train_sets) from train.seed `seed`."""
    sets = [*(TABLES_BEFORE if name != "default" else []), *CASES[name], f"train.seed={seed}"]
    return {"case": name, "sets": sets, **train_sets(sets, data, budget, threads, out_dir, steps)}


def train_sets(
    sets: Sequence[str],
    data: Path,
    budget: float,
    threads: int,
    out_dir: Path,
    steps: int = 0,
    *,
    train_compile: str = "false",
    eval_steps: int | None = None,
    evaluate_on_the_way: bool = False,
    timeout: float | None = None,
) -> dict:
    """Train configs/base.toml with `sets` on prepared `data` for `budget` seconds (or `steps` steps, whatever
    the machine's speed) in a process of `threads` threads with train.compile = `train_compile`, score it on
    `eval_steps` batches of the val split (default: its first EVAL_TOKENS): the weights final/ holds, which
    with `evaluate_on_the_way` (the config's train.eval_interval, else only at the end) may be an earlier
    step's (checkpoint.final_weights = "best"); the last step's score too. subprocess.TimeoutExpired, the run
    killed, after `timeout` seconds."""
    length, rows = contexts(setting(sets, "train.batch_size", 16), setting(sets, "train.seq_len", 0))[0]
    batch_tokens = length * rows  # the same at whichever context the plan chooses
    command = [
        f"data.dir={data}",
        f"train.max_time={0 if steps else budget}",
        f"train.max_steps={steps}",
        f"train.compile={train_compile}",
        *([] if evaluate_on_the_way else ["train.eval_interval=1000000"]),
        f"train.eval_steps={eval_steps or -(-EVAL_TOKENS // batch_tokens)}",
        "checkpoint.interval=1000000",
        "train.sample_tokens=0",
        "train.tensorboard=false",
        f"train.out_dir={out_dir}",
        # a budgeted run warms up over a tenth of it at most (schedule.WARMUP_SHARE): a run of steps does the same
        *([f"schedule.warmup_steps={max(2, min(20, steps // 10))}"] if steps else []),
        *sets,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = load_average()
    train = [sys.executable, "-m", "fasttrain.train", str(ROOT / "configs/base.toml"), "--quiet", "--set", *command]
    subprocess.run(train, check=True, env=env, stdout=subprocess.DEVNULL, timeout=timeout)
    during = load_average()
    # The phase whose model final/ holds: the run, or a distilled run's student there, else (its one member published
    # as the run's model) its last round
    events = read_metrics(out_dir if (out_dir / "metrics.jsonl").is_file() else rounds(out_dir).dirs[-1])
    start = next(e for e in events if e["event"] == "start")
    end = next(e for e in events if e["event"] == "end")
    shape = load_config(out_dir / "final" / "config.toml").model  # the shape trained: a case may leave it to the run
    return {
        "plan_notes": start.get("notes", []),  # a distilled run's are its first round's (distilled_from)
        **distilled_from(out_dir),
        "shape": f"{shape.n_layers} x {shape.d_model}",
        "params": start.get("params"),
        "precision": start.get("precision"),
        "compiled": start.get("compile"),
        "steps": end["step"],
        "tokens": end["tokens"],
        "train_seconds": end["train_seconds"],
        "tokens_per_s": round(end["tokens"] / end["train_seconds"]) if end["train_seconds"] else None,
        "epochs": round(end["tokens"] / start["train_tokens"], 2) if start.get("train_tokens") else None,
        "val_bpb": end["weights_val_bpb"],  # of final/'s weights (its output layer scaled where fit_temperature is on)
        "last_val_bpb": end["val_bpb"],
        "weights_step": end["weights_step"],
        "weights_scale": end.get("weights_scale", 1.0),  # 1.0 before 2026-11-30's fit_temperature, or with it off
        # an update's seconds at the speed the plan chose the shape for (since 2026-11-30; None: no timing chose it)
        "timed_step_seconds": end.get("timed_step_seconds"),  # 1.0 before 2026-11-30's fit_temperature, or with it off
        "load_average_before": before,
        "load_average_after_training": during,
    }


def distilled_from(out_dir: Path) -> dict:
    """A distilled run's members (train.distill: out_dir/ensemble/, fasttrain/training/phases.py): their count, training
    seconds and final/'s score, beside the student's that train_sets reports; {} for a run of one phase."""
    members = out_dir / MEMBERS_DIR
    if not (members / "metrics.jsonl").is_file():
        return {}
    events = read_metrics(members)
    start, end = next(e for e in events if e["event"] == "start"), events[-1]
    return {
        "members": load_config(members / "config.toml").model.members,
        "ensemble_train_seconds": end["train_seconds"],
        "ensemble_val_bpb": end["weights_val_bpb"],
        "ensemble_step_seconds": round(end["train_seconds"] / end["step"], 6) if end["step"] else None,
        "ensemble_timed_step_seconds": end.get("timed_step_seconds"),  # what the plan chose their shape for
        # the whole run's plan, as its first round records it: the speed timed, the shape and members it chose
        "plan_notes": ((start.get("phase") or {}).get("whole") or start).get("notes", []),
        "phases": [f"{what}: {seconds:.1f} s" for what, seconds in phase_seconds(out_dir)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.recipe_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=["large", "small", "pydoc"], default="large")
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument("--budget", type=float, default=120.0, help="seconds of training per case")
    lengths.add_argument(
        "--steps",
        type=int,
        default=0,
        help="optimizer steps per case instead (16 x 256 tokens each, unless a case sets"
        " the batch): what a case learns from so many tokens, however busy the machine",
    )
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337, help="train.seed of every case (configs/base.toml's: 1337)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fasttrain-recipe-sweep")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    length = f"{args.steps}steps" if args.steps else f"{args.budget:g}s"
    out = args.out or ROOT / f"benchmarks/results/recipe/cpu-recipe-{args.corpus}-{length}-{today}.json"
    data = prepared(args.corpus, args.cache)
    results = []
    with tempfile.TemporaryDirectory(prefix="recipe-sweep-") as tmp:
        for i, name in enumerate(args.case):
            case_dir = Path(tmp) / f"case{i}"
            results.append(run_case(name, data, args.budget, args.threads, case_dir, args.steps, args.seed))
            print(json.dumps(results[-1]), flush=True)
    record = {
        **result_header(
            "issue 56: recipe changes and shapes of configs/base.toml at equal training time on held-out text",
            "benchmarks.studies.recipe_sweep",
            argv,
            today,
        ),
        "corpus": args.corpus,
        "budget_seconds": None if args.steps else args.budget,
        "steps": args.steps or None,
        "threads": args.threads,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
