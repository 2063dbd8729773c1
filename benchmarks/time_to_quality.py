"""Time to quality on a CPU: fasttrain's budgeted default against nanochat's recipe, validation bits per byte
after the same seconds of training on the same tokens and cores, at several budgets in one run.

    python -m benchmarks.time_to_quality --nanochat DIR [--corpus large|small] [--budgets 60 180 600]
        [--nanochat-depths 2 4] [--threads 2] [--cache DIR] [--out FILE.json]

nanochat (https://github.com/karpathy/nanochat) is imported, never copied: from the checkout --nanochat DIR
or the environment's NANOCHAT_DIR names, else from an installed `nanochat` package. With neither, the
benchmark is skipped: it says so in one line and exits 0 (`git clone https://github.com/karpathy/nanochat`,
then pass --nanochat with its folder). Written against nanochat 92d63d4 (July 2026).

For each budget (seconds of training: compiling, building the model and evaluating are outside it):
  fasttrain  configs/base.toml with FASTTRAIN_SETS and train.max_time = the budget, compile off, as
             benchmarks/recipe_sweep.py runs its cases; its score is what the run's end event records.
  nanochat   its GPT and MuonAdamW at each --nanochat-depths, driven here (train_nanochat) with
             runs/runcpu.sh's CPU settings and the hyperparameters scripts/base_train.py derives from
             the depth (nanochat_recipe; each number below names the nanochat file it comes from).
Each run is a process of its own with OMP_NUM_THREADS=--threads.

Same tokens: both train on the corpus recipe_sweep prepares (`prepared`: held-out standard-library code,
fasttrain's tokenizer at vocab 4096), read by fasttrain's TokenLoader; nanochat's rows are packed windows
of its sequence length, in the order fasttrain's train.seed draws them. Same score: both are validated on
the first EVAL_TOKENS of the val split, in the windows fasttrain's validation reads (train.batch_size rows
of train.seq_len, in order), through fasttrain's own `validate`: val_bpb = mean cross-entropy in nats x
the val split's tokens / (bytes x ln 2). nanochat's loss is the cross-entropy of its own (soft-capped) logits.

Fitting nanochat's fixed-step recipe to a clock: base_train plans num_iterations steps and places its
schedule on them (runcpu.sh: 5000). Here every point of that schedule is read off PROGRESS = training
seconds / budget instead of step / num_iterations, with the progress fasttrain projects for the end of each
update (its Budget.next_progress, what fasttrain's own schedule runs on): the LR warmup (runcpu.sh's first
40 of 5000 steps, or 40 steps if sooner), the constant stretch, the linear warmdown over the last 65% to 5%
of the peak, Muon's momentum ramp (its first 400 of 5000 steps) and warmdown, and the weight decay's cosine
to zero all fall within the budget whatever the machine's speed. As in fasttrain, an update that starts
within the budget is finished: train_seconds, in the results, says by how much the last one overran it.

Compute: both eager PyTorch (on a CPU compiling does not pay back in runs this short; see
fasttrain/system/device.py, CPU_COMPILE_MIN_STEPS): fasttrain with train.compile=false, nanochat's model
uncompiled and its optimizer's torch.compile'd update functions run as plain PyTorch (fasttrain's
`uncompiled`). Precision is what fasttrain's precision "auto" picks (resolve_precision: bf16 on a CPU with
AVX512-BF16 or AMX, else fp32), given to nanochat through NANOCHAT_DTYPE, its own switch. No shim: on a CPU
nanochat's gpt, optim, common and flash_attention modules import only torch and filelock (torch's own
dependency); flash_attention looks for FlashAttention-3 on CUDA only.

Writes one JSON (default benchmarks/results/cpu-time-to-quality-<corpus>-<date>.json) with the machine,
commit, command, nanochat's source and commit, and every result, and a PNG beside it (same name, .png):
val bpb against the budget in minutes, a line per system and depth.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import nn

from benchmarks.conftest import environment
from benchmarks.recipe_sweep import EVAL_TOKENS, ROOT, load_average, prepared, train_sets
from fasttrain.config import Config, load_config
from fasttrain.data.loader import TokenLoader
from fasttrain.data.prepared_folder import PreparedData, open_prepared
from fasttrain.evaluation.validation import validate
from fasttrain.model.transformer import Transformer
from fasttrain.plot import pyplot, save_figure
from fasttrain.system.device import resolve_precision, uncompiled
from fasttrain.system.distributed import World
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli
from fasttrain.training.objective import NextTokenLoss, batch_loss
from fasttrain.training.schedule import Budget

# --set items on top of configs/base.toml for fasttrain's side: its budgeted default.
FASTTRAIN_SETS: list[str] = []  # configs/base.toml is the budgeted, self-sizing recipe (recipe_sweep's "auto")
NANOCHAT_URL = "https://github.com/karpathy/nanochat"
NANOCHAT_FILES = ("nanochat/gpt.py", "nanochat/optim.py")  # what a checkout must hold: the model and optimizer

# nanochat's CPU run, runs/runcpu.sh (its depth is --nanochat-depths here; it trains depth 6 for 5000 steps):
SEQ_LEN = 512  # --max-seq-len=512
DEVICE_BATCH = 32  # --device-batch-size=32
TOTAL_BATCH = 16_384  # --total-batch-size=16384 tokens a step: one device batch, no gradient accumulation
HEAD_DIM = 64  # --head-dim=64 (base_train's default is 128)
WINDOW_PATTERN = "L"  # --window-pattern=L: full context in every layer (SDPA has no sliding window)
RUNCPU_STEPS = 5000  # --num-iterations=5000: the horizon its step-counted warmups are shares of
# scripts/base_train.py's argument defaults, which runcpu.sh keeps:
ASPECT_RATIO = 64  # --aspect-ratio: model_dim = depth x 64, rounded up to a multiple of the head dim
EMBEDDING_LR = 0.3  # --embedding-lr (AdamW)
UNEMBEDDING_LR = 0.008  # --unembedding-lr (AdamW)
MATRIX_LR = 0.02  # --matrix-lr (Muon)
SCALAR_LR = 0.5  # --scalar-lr (AdamW, resid_lambdas and x0_lambdas)
WEIGHT_DECAY = 0.28  # --weight-decay (Muon's cautious weight decay), before scaling
WARMUP_STEPS = 40  # --warmup-steps
WARMDOWN_RATIO = 0.65  # --warmdown-ratio: the LR falls linearly over this last share of the run
FINAL_LR_FRAC = 0.05  # --final-lr-frac: to this fraction of the peak
# base_train.py's scaling from its reference model (depth 12, whose hyperparameters were tuned):
REFERENCE_DEPTH = 12
REFERENCE_BATCH = 2**19  # B_REF tokens; every LR is scaled by sqrt(TOTAL_BATCH / B_REF)
# base_train.py's get_muon_momentum: 0.85 to 0.97 over the first 400 steps, to 0.90 over the warmdown.
MOMENTUM_START, MOMENTUM, MOMENTUM_END, MOMENTUM_WARMUP_STEPS = 0.85, 0.97, 0.90, 400
SEED = 42  # nanochat/common.py compute_init's torch.manual_seed, which its weight init draws from
# NANOCHAT_DTYPE (nanochat/common.py: its compute dtype) for each precision fasttrain resolves on a CPU
NANOCHAT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Nanochat:
    """Where nanochat is imported from: a checkout, whose folder goes first on sys.path, or the installed package."""

    folder: Path  # the checkout's, or the installed package's own
    installed: bool

    def describe(self) -> dict[str, str | None]:
        """Where it is and its git commit (None outside a git work tree), for the results file."""
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.folder, capture_output=True, text=True)
        return {
            "source": f"installed package at {self.folder}" if self.installed else str(self.folder),
            "commit": commit.stdout.strip() if commit.returncode == 0 else None,
        }


def find_nanochat(given: str | None, named_by: str) -> Nanochat | None:
    """The checkout `given` (by `named_by`: --nanochat or NANOCHAT_DIR), else the installed package, else None.
    UsageError, naming the folder, if `given` is not a nanochat checkout."""
    if given:
        folder = Path(given).expanduser().resolve()
        for name in NANOCHAT_FILES:
            if not (folder / name).is_file():
                raise UsageError(
                    f"{folder} ({named_by}): not a nanochat checkout, it has no {name}; "
                    f"git clone {NANOCHAT_URL} and give its folder"
                )
        return Nanochat(folder, installed=False)
    spec = importlib.util.find_spec("nanochat")
    # origin None: a namespace package, some folder named nanochat without nanochat's __init__.py
    return None if spec is None or spec.origin is None else Nanochat(Path(spec.origin).parent, installed=True)


def scored_config() -> Config:
    """configs/base.toml with FASTTRAIN_SETS and the eval_steps that cover EVAL_TOKENS: the rows fasttrain's
    run is validated on, and so the windows nanochat is scored in too."""
    base = ROOT / "configs/base.toml"
    t = load_config(base, FASTTRAIN_SETS).train
    return load_config(base, [*FASTTRAIN_SETS, f"train.eval_steps={-(-EVAL_TOKENS // (t.batch_size * t.seq_len))}"])


def score(model: nn.Module, data: PreparedData, cfg: Config) -> dict[str, float]:
    """val_loss, val_accuracy, val_ppl and val_bpb of `model` as fasttrain's trainer validates its own (Trainer.
    evaluate: the first cfg.train.eval_steps x batch_size rows of the val split, batched as cfg says), for
    any model called as model(tokens, None) -> logits: fasttrain's Transformer, and nanochat's GPT, whose
    forward(idx, targets=None) returns them. Without autocast ("fp32"): nanochat computes in the dtype its
    NANOCHAT_DTYPE sets, which train_nanochat sets to fasttrain's precision."""
    t, d = cfg.train, cfg.data
    objective = NextTokenLoss(cast(Transformer, model))  # unfused: it only calls model(tokens, documents)
    with TokenLoader(
        data.dir,
        "val",
        t.batch_size,
        t.seq_len,
        sampling="sequential",
        batching=d.batching,
        padding=d.padding,
        eot_id=data.meta["eot_id"],
        seed=t.seed,
        prefetch=0,
        whole=True,
        first_rows=t.eval_steps * t.batch_size,
    ) as loader:
        metrics = validate(
            lambda x, y: batch_loss(objective, x, y, None),
            model,
            loader,
            loader.reader.batches_per_epoch,
            "fp32",
            World(),
            data.bits_per_nat,
        )
    assert metrics is not None  # None only when a stop() given to validate says to give up
    return metrics


def nanochat_recipe(gpt: Any, depth: int, vocab_size: int) -> tuple[Any, dict[str, float]]:
    """nanochat's GPTConfig at `depth` and the arguments of its GPT.setup_optimizer, as scripts/base_train.py
    derives them (build_model_meta, then its scaling steps 3 and 4) with runcpu.sh's settings. `gpt`: the
    nanochat.gpt module. setup_optimizer then scales the AdamW rates by (model_dim / 768) ** -0.5 itself."""

    def config(d: int) -> Any:
        dim = -(-d * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
        heads = dim // HEAD_DIM
        return gpt.GPTConfig(
            sequence_len=SEQ_LEN,
            vocab_size=vocab_size,
            n_layer=d,
            n_head=heads,
            n_kv_head=heads,
            n_embd=dim,
            window_pattern=WINDOW_PATTERN,
        )

    def scaling_params(d: int) -> int:  # base_train's get_scaling_params: what its horizons are counted in
        with torch.device("meta"):
            counts = gpt.GPT(config(d)).num_scaling_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    batch_lr_scale = (TOTAL_BATCH / REFERENCE_BATCH) ** 0.5  # base_train: eta ~ sqrt(B / B_ref)
    # base_train: lambda = lambda_ref sqrt(B / B_ref) (D_ref / D), D the tokens its --target-param-data-ratio
    # plans for each model (12 x scaling params, also when runcpu.sh fixes the steps), so the ratio cancels.
    weight_decay = WEIGHT_DECAY * batch_lr_scale * scaling_params(REFERENCE_DEPTH) / scaling_params(depth)
    return config(depth), {
        "unembedding_lr": UNEMBEDDING_LR * batch_lr_scale,
        "embedding_lr": EMBEDDING_LR * batch_lr_scale,
        "scalar_lr": SCALAR_LR * batch_lr_scale,
        "matrix_lr": MATRIX_LR * batch_lr_scale,
        "weight_decay": weight_decay,
    }


def lr_multiplier(step: int, progress: float) -> float:
    """base_train's get_lr_multiplier for update `step` (0-based) at `progress` (0 to 1) instead of step /
    num_iterations: a linear warmup over WARMUP_STEPS steps or runcpu.sh's share of its run for them, whichever
    ends first (as fasttrain's budgeted warmup; the steps give the first update base_train's 1 / 40 of the
    peak, where its progress, with no speed measured yet, is 0), constant, then linear down to FINAL_LR_FRAC
    over the last WARMDOWN_RATIO of the run."""
    warmup = WARMUP_STEPS / RUNCPU_STEPS
    if progress < warmup and step < WARMUP_STEPS:
        return max((step + 1) / WARMUP_STEPS, progress / warmup)
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    left = max(0.0, 1 - progress) / WARMDOWN_RATIO
    return left + (1 - left) * FINAL_LR_FRAC


def muon_momentum(progress: float) -> float:
    """base_train's get_muon_momentum at `progress`: up from MOMENTUM_START over runcpu.sh's first
    MOMENTUM_WARMUP_STEPS steps, then MOMENTUM, down to MOMENTUM_END over the LR's warmdown."""
    warmup = MOMENTUM_WARMUP_STEPS / RUNCPU_STEPS
    if progress < warmup:
        frac = progress / warmup
        return (1 - frac) * MOMENTUM_START + frac * MOMENTUM
    if progress >= 1 - WARMDOWN_RATIO:
        frac = min(1.0, (progress - (1 - WARMDOWN_RATIO)) / WARMDOWN_RATIO)
        return (1 - frac) * MOMENTUM + frac * MOMENTUM_END
    return MOMENTUM


def weight_decay_multiplier(progress: float) -> float:
    """base_train's get_weight_decay over its scaled weight decay, at `progress`: a cosine from 1 to 0."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_nanochat(checkout: str | None, data_dir: str, depth: int, budget: float) -> dict:
    """nanochat's model at `depth` trained for `budget` seconds on prepared `data_dir` with its recipe (see the
    module docstring), then scored as fasttrain's run is. `checkout`: its folder, None for the installed
    package. Run in a process of its own: nanochat reads NANOCHAT_DTYPE when it is first imported."""
    cfg = scored_config()
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))  # as fasttrain's run resolves it
    os.environ["NANOCHAT_DTYPE"] = NANOCHAT_DTYPES[precision]
    if checkout is not None:
        sys.path.insert(0, checkout)
    gpt = importlib.import_module("nanochat.gpt")
    if not hasattr(gpt.GPT, "setup_optimizer"):
        raise UsageError(f"{gpt.__file__}: a nanochat without GPT.setup_optimizer, older than this benchmark knows")
    data = open_prepared(data_dir)
    config, optimizer_args = nanochat_recipe(gpt, depth, data.vocab_size)
    torch.manual_seed(SEED)
    with torch.device("meta"):  # as base_train builds it: shapes first, then storage, then its own init
        model = gpt.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = model.setup_optimizer(**optimizer_args)
    # Packed windows, as nanochat's own loader packs documents into full rows: no pad targets (its loss
    # ignores -1, not fasttrain's IGNORE_INDEX).
    loader = TokenLoader(
        data.dir,
        "train",
        DEVICE_BATCH,
        SEQ_LEN,
        sampling=cfg.data.sampling,
        eot_id=data.meta["eot_id"],
        seed=cfg.train.seed,
        prefetch=cfg.data.prefetch,
    )
    clock = Budget(max_steps=0, max_time=budget)
    steps, seconds = 0, 0.0
    with loader, uncompiled(True):
        while not clock.reached(steps, seconds):
            began = time.perf_counter()  # as fasttrain's step clock: reading the batch, forward, backward, update
            progress = clock.next_progress(steps, seconds)
            x, y = next(loader)
            model(x, y).backward()
            lr = lr_multiplier(steps, progress)
            for group in optimizer.param_groups:  # as base_train's loop sets them before each update
                group["lr"] = group["initial_lr"] * lr
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(progress)
                    group["weight_decay"] = optimizer_args["weight_decay"] * weight_decay_multiplier(progress)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - began
            steps += 1
    metrics = score(model, data, cfg)
    tokens = steps * DEVICE_BATCH * SEQ_LEN
    return {
        "system": "nanochat",
        "case": f"depth {depth}",
        "budget_seconds": budget,
        "recipe": {
            "model_dim": config.n_embd,
            "n_layer": depth,
            "n_head": config.n_head,
            "seq_len": SEQ_LEN,
            "batch_tokens": TOTAL_BATCH,
            **optimizer_args,
        },
        "params": model.num_scaling_params()["total"],
        "precision": precision,
        "steps": steps,
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": round(tokens / seconds),
        "epochs": round(tokens / data.meta["tokens"]["train"], 2),
        "val_bpb": metrics["val_bpb"],
    }


def run_nanochat(nanochat: Nanochat, data: Path, depth: int, budget: float, threads: int, work: Path) -> dict:
    """train_nanochat in a process of its own with `threads` threads, and the load average around it."""
    checkout = None if nanochat.installed else str(nanochat.folder)
    spec = {"checkout": checkout, "data_dir": str(data), "depth": depth, "budget": budget}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = load_average()
    worker = [sys.executable, "-m", "benchmarks.time_to_quality", "--worker", json.dumps(spec), "--out", str(work)]
    subprocess.run(worker, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)  # stdout: nanochat's prints
    during = load_average()
    return {**json.loads(work.read_text()), "load_average_before": before, "load_average_after_training": during}


def run_fasttrain(data: Path, budget: float, threads: int, out_dir: Path) -> dict:
    """configs/base.toml with FASTTRAIN_SETS trained for `budget` seconds as recipe_sweep trains a case."""
    return {
        "system": "fasttrain",
        "case": " ".join(["configs/base.toml", *FASTTRAIN_SETS]),
        "budget_seconds": budget,
        **train_sets(FASTTRAIN_SETS, data, budget, threads, out_dir),
    }


def plot(record: dict, out: Path) -> Path:
    """val bpb against the budget in minutes, a line per system and case, to `out`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in record["results"]:
        label = f"nanochat {r['case']}" if r["system"] == "nanochat" else "fasttrain (configs/base.toml, budgeted)"
        lines.setdefault(label, []).append((r["budget_seconds"] / 60, r["val_bpb"]))
    for label, points in lines.items():
        minutes, bpb = zip(*sorted(points))
        ax.plot(minutes, bpb, marker="o", label=label)
    budgets = sorted({r["budget_seconds"] / 60 for r in record["results"]})
    ax.set_xscale("log")  # 1, 3 and 10 minutes evenly apart
    ax.set_xticks(budgets, [f"{m:.3g}" for m in budgets])
    ax.minorticks_off()
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("validation bits per byte")
    threads = f"{record['threads']} thread" + "s" * (record["threads"] != 1)
    ax.set_title(f"{record['corpus']} corpus, {threads}, {record['machine']['cpu']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.time_to_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanochat", help="a nanochat checkout (default: $NANOCHAT_DIR, else the installed package)")
    parser.add_argument("--corpus", choices=["large", "small"], default="large")
    parser.add_argument("--budgets", type=float, nargs="+", default=[60.0, 180.0, 600.0], help="seconds of training")
    parser.add_argument("--nanochat-depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fasttrain-recipe-sweep")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # train_nanochat's arguments, as JSON: run_nanochat's
    args = parser.parse_args(argv)
    if args.worker is not None:  # the process run_nanochat starts: its result to --out
        args.out.write_text(json.dumps(train_nanochat(**json.loads(args.worker))))
        return 0
    for flag, values in (("--budgets", args.budgets), ("--nanochat-depths", args.nanochat_depths)):
        if min(values) <= 0:
            raise UsageError(f"{flag} {' '.join(f'{v:g}' for v in values)}: each must be > 0")
    if args.threads <= 0:
        raise UsageError(f"--threads {args.threads}: must be > 0")
    named_by = "--nanochat" if args.nanochat else "NANOCHAT_DIR"
    nanochat = find_nanochat(args.nanochat or os.environ.get("NANOCHAT_DIR"), named_by)
    if nanochat is None:
        print(
            "time_to_quality: skipped, no nanochat to compare with (no --nanochat, no NANOCHAT_DIR, no installed "
            f"nanochat package); git clone {NANOCHAT_URL} and pass --nanochat with its folder"
        )
        return 0
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / f"benchmarks/results/cpu-time-to-quality-{args.corpus}-{today}.json"
    data = prepared(args.corpus, args.cache)
    results = []
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as tmp:
        for i, budget in enumerate(args.budgets):
            results.append(run_fasttrain(data, budget, args.threads, Path(tmp) / f"fasttrain{i}"))
            print(json.dumps(results[-1]), flush=True)
            for depth in args.nanochat_depths:
                work = Path(tmp) / f"nanochat{i}-{depth}.json"
                results.append(run_nanochat(nanochat, data, depth, budget, args.threads, work))
                print(json.dumps(results[-1]), flush=True)
    record = {
        "what": "issue 56: time to quality, fasttrain's budgeted default against nanochat's recipe on held-out text",
        "date": today,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": environment(),
        "command": shlex.join(
            ["python", "-m", "benchmarks.time_to_quality", *(sys.argv[1:] if argv is None else argv)]
        ),
        "nanochat": nanochat.describe(),
        "corpus": args.corpus,
        "eval_tokens": EVAL_TOKENS,
        "threads": args.threads,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} and {plot(record, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
