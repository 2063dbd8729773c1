"""Time to quality on a CPU: fasttrain's budgeted default against nanochat run as its authors run it, validation
bits per byte after the same seconds of training (or the same tokens) on the same corpus and cores.

    python -m benchmarks.studies.time_to_quality --nanochat DIR [--corpus large|small|docstrings] [--budgets 60 180 600 | --tokens N ...]
        [--nanochat-depths 1 2 3 4] [--fasttrain-sets KEY=VALUE ...] [--seeds S ...] [--threads 2] [--cache DIR]
        [--out FILE.json]

nanochat (https://github.com/karpathy/nanochat) is imported, never copied: from the checkout --nanochat DIR
or the environment's NANOCHAT_DIR names, else from an installed `nanochat` package. With neither, the
benchmark is skipped: it says so in one line and exits 0 (`git clone https://github.com/karpathy/nanochat`,
then pass --nanochat with its folder). Written against nanochat 92d63d4 (July 2026).

Two modes, each run a process of its own with OMP_NUM_THREADS=--threads:
  --budgets S ...  equal time: each side trains for S seconds of training (the default: 60, 180, 600).
  --tokens N ...   equal tokens: each side trains on N tokens, however long that takes (each rounds N to whole
                   steps of its own batch; the result records the tokens each trained on). This compares the
                   recipes on any CPU, a slow one (AVX2, fp32) included, where a clock would only compare speeds.
--seeds S ... runs every case once a seed (the seed of fasttrain's train.seed, of nanochat's weight init and of
the order both read the training rows in); without it each side keeps its own (fasttrain's train.seed, 1337;
nanochat's compute_init, 42; its rows in fasttrain's order). The results file then gives each case's mean and
spread (largest minus smallest) over the seeds.

The sides:
  fasttrain  configs/base.toml with --fasttrain-sets (default none: the budgeted, self-sizing recipe), as
             benchmarks/studies/recipe_sweep.py's train_sets runs a case, compiled as its own train.compile says ("auto":
             on a CPU only for runs of CPU_COMPILE_MIN_STEPS steps or more; each result says whether it was).
             Under --tokens it runs train.max_steps = N / (batch x seq_len) with train.max_time = 0, and sizes
             its shape for those tokens as it sizes it for a budget.
  nanochat   its GPT and MuonAdamW at each --nanochat-depths (default 1 to 4; `--nanochat-depths` alone: none),
             driven here (train_nanochat) as scripts/base_train.py drives them with runs/runcpu.sh's CPU
             settings: the model torch.compile'd (dynamic=False, as base_train), its optimizer's own compiled
             update functions, its sequence length 512, the hyperparameters base_train derives from the depth
             and the batch (nanochat_recipe; each number below names the nanochat file it comes from).
             (benchmarks/studies/gpu_quality.py drives the same train_nanochat with base_train's GPU defaults
             instead: NanochatSettings.)

Compiling is outside the clock on both sides. fasttrain's trainer keeps a compiled objective's first step out of
its training seconds. nanochat's compile is warmed up first: WARMUP_UPDATES updates at the batch to be trained,
their speed measured (after the first, which compiles), then the weights put back to their init, a fresh
optimizer made, and the timed run started from the same state it would have started from uncompiled.

nanochat's batch (nanochat_batch): runcpu.sh's 16K tokens (32 x 512) where that gives it MIN_UPDATES updates or
more (its recipe needs them: a 40-update warmup, a 400-update momentum ramp), else the largest power of two
that does, down to one row of 512; base_train's LR rule (every rate x sqrt(batch / 2^19)) and weight-decay
rule (T_epoch: x sqrt(batch / 2^19) x D_ref / D) applied to that batch. Under a budget the updates it gets
are the tokens/s measured in the warm-up x the budget / the batch: measured at 16K first, and again at each
smaller batch chosen (a smaller batch may run fewer tokens a second), until the rule keeps the batch. Under
--tokens the batch is the rule's for N tokens.

Same tokens: both train on the corpus recipe_sweep prepares (`prepared`: held-out standard-library code, large or
small, or the standard library's docstrings; fasttrain's tokenizer at vocab 4096), read by fasttrain's TokenLoader;
nanochat's rows are packed windows of its sequence length, in the order the seed draws them.

Same score: both on the whole validation split, each at its own context: non-overlapping packed windows of the
model's sequence length (fasttrain's train.seq_len as its plan chose it; nanochat's 512) cut from each val shard, the shard's
last, shorter window scored too (padded, its missing targets not counted), so that both score every token of
the split but each shard's first, the same targets whatever the context (`whole_split`). bits per byte =
the mean cross-entropy in nats over those targets x the split's tokens / (its UTF-8 bytes x ln 2), the same
bytes for both (fasttrain's own conversion, PreparedData.bits_per_nat). fasttrain's score is its run's end
event, its trainer validating on every row (train.eval_steps = whole_split_steps); nanochat's is `score`,
the same validation through fasttrain's `validate`, of its own (soft-capped) logits, in its compute dtype.

Precision is what fasttrain's precision "auto" picks (resolve_precision: bf16 on a CPU whose native bf16
matmuls were timed at least 1.2x its fp32 ones, else fp32, nanochat's own choice on a CPU), given to nanochat
through NANOCHAT_DTYPE, its own switch. No shim: on a CPU nanochat's gpt,
optim, common and flash_attention modules import only torch and filelock (torch's own dependency).

Fitting nanochat's fixed-step recipe to a clock: base_train plans num_iterations updates and places its
schedule on them. Under --tokens that is N / batch updates, and each point of the schedule is base_train's own
(step / num_iterations). Under a budget every point is read off PROGRESS = training seconds / budget instead,
with the progress fasttrain projects for the end of each update (its Budget.next_progress): the LR warmup
(runcpu.sh's first 40 of 5000 steps, or 40 steps if sooner), the constant stretch, the linear warmdown over the
last 65% to 5% of the peak, Muon's momentum ramp (its first 400 of 5000 steps) and warmdown, and the weight
decay's cosine to zero all fall within the budget whatever the machine's speed. As in fasttrain, an update
that starts within the budget is finished: train_seconds says by how much the last one overran it.

Time a budget on a quiet machine (each result records the load average around it): another process on the
same cores costs nanochat's many small compiled kernels far more than fasttrain. On the 2-core AVX2 EPYC, with
a fasttrain run beside it, nanochat's depth 2 fell from ~7K tokens/s to 0.3-0.8K, fasttrain's 1 x 64 by ~3x.
The equal-token mode does not depend on the machine's speed.

What changed (issue 63): the first version of this harness ran nanochat eager (its model uncompiled, its
optimizer's compiled functions as plain PyTorch), at 16K-token steps whatever the budget (23 updates in 60 s on
the AVX2 machine: never out of its 40-update warmup), and scored both sides in fasttrain's 256-token windows on
the first 131K validation tokens only; its figures are superseded (their files, cpu-time-to-quality-*-2026-11-25.json,
are in git's history).

Writes one JSON (default benchmarks/results/time-to-quality/cpu-time-to-quality-<corpus>[-tokens]-<date>.json) with the
machine, commit, command, nanochat's source and commit, every run and each case's summary over the seeds, and
a PNG beside it (same name, .png): val bpb against the budget in minutes (or the tokens), a line per case. The
JSON is written again after each run, so a study stopped part way keeps every run it finished.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, cast

import torch
from torch import nn

from benchmarks.conftest import synchronize
from benchmarks.studies.common import ROOT, load_average, result_header
from benchmarks.studies.recipe_sweep import prepared, setting, train_sets
from fasttrain.compute.device import resolve_precision
from fasttrain.compute.distributed import World
from fasttrain.config import load_config
from fasttrain.data.documents import Rows
from fasttrain.data.loader import TokenLoader
from fasttrain.evaluation.validation import validate
from fasttrain.formats.prepared_folder import PreparedData, open_prepared
from fasttrain.formats.shards import find_shards
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.objective import NextTokenLoss, batch_loss
from fasttrain.optimization.schedule import Budget
from fasttrain.planning.sequence_length import contexts
from fasttrain.plot import pyplot, save_figure
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli

# --set items on top of configs/base.toml for fasttrain's side, unless --fasttrain-sets gives others.
FASTTRAIN_SETS: list[str] = []  # configs/base.toml is the budgeted, self-sizing recipe (recipe_sweep's "auto")
NANOCHAT_URL = "https://github.com/karpathy/nanochat"
NANOCHAT_FILES = ("nanochat/gpt.py", "nanochat/optim.py")  # what a checkout must hold: the model and optimizer

# nanochat's CPU run, runs/runcpu.sh (its depth is --nanochat-depths here; it trains depth 6 for 5000 steps):
SEQ_LEN = 512  # --max-seq-len=512
TOTAL_BATCH = 16_384  # --total-batch-size=16384 tokens a step, one device batch of 32 rows (--device-batch-size=32)
HEAD_DIM = 64  # --head-dim=64 (base_train's default is 128)
WINDOW_PATTERN = "L"  # --window-pattern=L: full context in every layer (SDPA has no sliding window)
RUNCPU_STEPS = 5000  # --num-iterations=5000: the horizon its step-counted warmups are shares of, under a clock
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
REFERENCE_BATCH = 2**19  # B_REF tokens; every LR is scaled by sqrt(batch / B_REF)
TARGET_PARAM_DATA_RATIO = 12  # --target-param-data-ratio: its compute-optimal tokens per scaling parameter
BATCH_EXPONENT = 0.383  # its batch for D tokens, B_REF x (D / D_REF) ** 0.383 (base_train_batch)
# base_train.py's get_muon_momentum: 0.85 to 0.97 over the first 400 steps, to 0.90 over the warmdown.
MOMENTUM_START, MOMENTUM, MOMENTUM_END, MOMENTUM_WARMUP_STEPS = 0.85, 0.97, 0.90, 400
SEED = 42  # nanochat/common.py compute_init's torch.manual_seed, which its weight init draws from
# NANOCHAT_DTYPE (nanochat/common.py: its compute dtype) for each precision fasttrain resolves on a CPU
NANOCHAT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# What the results file says of how it was measured, and what changed since the first version's files
HARNESS_NOTE = (
    "Compiling is outside the clock on both sides: nanochat torch.compile'd as scripts/base_train.py does (and its "
    "optimizer's own compiled updates), warmed up at its batch and put back to its init before the timed run; "
    "fasttrain compiled as its train.compile says (each result's `compiled`). nanochat's batch is runcpu.sh's 16K "
    "tokens where that leaves it 200 updates, else the largest power of two that does, with base_train's LR and "
    "weight-decay rules for that batch. Both are scored on the whole validation split, each at its own context "
    "(nanochat 512, fasttrain its train.seq_len), on the same target tokens and bytes: fasttrain's final/ (under "
    "base.toml's final_weights = best, its best evaluation's weights, what its user keeps, and since 2026-11-30 "
    "fit_temperature = true, their output layer scaled to a temperature fitted on the validation rows; each result's "
    "last_val_bpb is its last step's at scale 1), nanochat's last step (its script keeps no best). Changed from the "
    "first harness (results of 2026-11-25, superseded), which ran nanochat eager at 16K-token steps whatever the budget "
    "(18 to 60 updates) and scored both sides in 256-token windows on the first 131K validation tokens only."
)
# This harness's own choices:
MIN_UPDATES = 200  # what nanochat's batch must leave it (nanochat_batch): its warmups need a few hundred
WARMUP_UPDATES = 4  # untimed updates before a timed run: the first compiles, the others give the speed
SCORE_ROWS = 32  # validation rows a batch for nanochat (runcpu.sh's device batch); fasttrain's: its batch_size


@dataclass(frozen=True)
class NanochatSettings:
    """How nanochat is run: its model's context and head, where, and which script's rules size its batch and its
    schedule's horizon. The default is runs/runcpu.sh's CPU run; benchmarks/studies/gpu_quality.py gives
    scripts/base_train.py's GPU defaults."""

    device: str = "cpu"
    seq_len: int = SEQ_LEN  # --max-seq-len
    head_dim: int = HEAD_DIM  # --head-dim
    window_pattern: str = WINDOW_PATTERN  # --window-pattern
    device_rows: int = TOTAL_BATCH // SEQ_LEN  # --device-batch-size: rows a forward and backward, at most
    # "runcpu": runcpu.sh's 16K tokens, or the batch that leaves MIN_UPDATES updates (nanochat_batch), under a clock
    # over RUNCPU_STEPS; "base_train": base_train's batch for its compute-optimal horizon (base_train_batch) over
    # that horizon's updates (its --target-param-data-ratio)
    rules: Literal["runcpu", "base_train"] = "runcpu"
    batch: int = 0  # tokens an update instead of the rules' (a dry run's toy batch); 0: the rules'
    compile: bool = True  # torch.compile the model, as base_train does (a dry run on a CPU: not worth its seconds)


@dataclass(frozen=True)
class Nanochat:
    """Where nanochat is imported from: a checkout, whose folder goes first on sys.path, or the installed package."""

    folder: Path  # the checkout's, or the installed package's own
    installed: bool

    def describe(self) -> dict[str, str | None]:
        """Where it is and its git commit (None where it is no work tree's top: a `git archive` copy inside another
        repository, fasttrain's own on a lent GPU, would give that one's), for the results file."""
        git = ["git", "rev-parse", "--show-toplevel", "HEAD"]
        found = subprocess.run(git, cwd=self.folder, capture_output=True, text=True).stdout.split()
        own = len(found) == 2 and Path(found[0]).resolve() == self.folder.resolve()
        return {
            "source": f"installed package at {self.folder}" if self.installed else str(self.folder),
            "commit": found[1] if own else None,
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


def whole_split(data: PreparedData, seq_len: int, rows: int, device: str = "cpu") -> TokenLoader:
    """The val split as both sides are scored on it: packed windows of `seq_len` + 1 tokens at stride `seq_len`,
    each shard's last, shorter one included (`whole`), in file order, `rows` a batch, on `device`. Every token of
    a shard but its first is a target exactly once, whatever `seq_len`: the same targets at every context."""
    return TokenLoader(
        data.dir,
        "val",
        rows,
        seq_len,
        sampling="sequential",
        eot_id=data.meta["eot_id"],
        prefetch=0,
        whole=True,
        device=device,
    )


def whole_split_steps(data: PreparedData, seq_len: int, rows: int) -> int:
    """train.eval_steps for a fasttrain run of `rows` x `seq_len` batches to validate on the whole val split:
    whole_split's rows, a batch at a time."""
    windows = Rows(find_shards(data.dir, "val"), seq_len, "packed", tails=True).num_rows
    return -(-windows // rows)


def score(model: nn.Module, data: PreparedData, seq_len: int, rows: int, device: str = "cpu") -> dict[str, float]:
    """val_loss, val_accuracy, val_ppl and val_bpb of `model` (on `device`) on the whole val split at context
    `seq_len` (whole_split, `rows` a batch) through fasttrain's own `validate`, and val_targets, how many targets
    that is. For any model called as model(tokens, None) -> logits: fasttrain's Transformer (whose trainer
    gives the same figures with train.eval_steps = whole_split_steps), and nanochat's GPT, whose
    forward(idx, targets=None) returns them. Without autocast ("fp32"): nanochat computes in the dtype its
    NANOCHAT_DTYPE sets, which train_nanochat sets to fasttrain's precision."""
    objective = NextTokenLoss(cast(Transformer, model))  # unfused: it only calls model(tokens, documents)
    targets = 0

    def loss(x: torch.Tensor, y: torch.Tensor):
        nonlocal targets
        sums = batch_loss(objective, x, y, None)
        targets += int(sums.counted)
        return sums

    with whole_split(data, seq_len, rows, device) as loader:
        metrics = validate(loss, model, loader, loader.reader.batches_per_epoch, "fp32", World(), data.bits_per_nat)
    assert metrics is not None  # None only when a stop() given to validate says to give up
    return {**metrics, "val_targets": targets}


def nanochat_batch(tokens: float) -> int:
    """nanochat's total batch, in tokens, for a run of `tokens` training tokens (the measured tokens/s x the
    budget, or --tokens): runcpu.sh's TOTAL_BATCH where that leaves MIN_UPDATES updates, else the largest
    power of two that does, and never less than one row of SEQ_LEN (base_train's batch is whole rows)."""
    batch = TOTAL_BATCH
    while batch > SEQ_LEN and tokens / batch < MIN_UPDATES:
        batch //= 2
    return batch


def nanochat_rates(batch: int, reference_over_depth: float) -> dict[str, float]:
    """The arguments of nanochat's GPT.setup_optimizer for a `batch` of tokens, as scripts/base_train.py scales
    its defaults (its steps 3 and 4): every rate x sqrt(batch / B_REF); the weight decay x sqrt(batch / B_REF)
    x D_REF / D, D the tokens its --target-param-data-ratio plans for each model (12 x scaling params, also when
    runcpu.sh fixes the steps), so `reference_over_depth` = the depth-12 model's scaling params over this one's.
    setup_optimizer then scales the AdamW rates by (model_dim / 768) ** -0.5 itself."""
    scale = (batch / REFERENCE_BATCH) ** 0.5  # base_train: eta ~ sqrt(B / B_ref), for AdamW and Muon alike
    return {
        "unembedding_lr": UNEMBEDDING_LR * scale,
        "embedding_lr": EMBEDDING_LR * scale,
        "scalar_lr": SCALAR_LR * scale,
        "matrix_lr": MATRIX_LR * scale,
        "weight_decay": WEIGHT_DECAY * scale * reference_over_depth,
    }


def base_train_batch(reference_over_depth: float) -> int:
    """scripts/base_train.py's batch for a model (its --total-batch-size -1): B_REF x (D / D_REF) ** 0.383 (the
    Power Lines rule) rounded to a power of two, D the tokens its --target-param-data-ratio plans for the model;
    `reference_over_depth` = D_REF / D (nanochat_recipe's)."""
    return 2 ** round(math.log2(REFERENCE_BATCH * reference_over_depth**-BATCH_EXPONENT))


def scaling_params(model: Any) -> int:
    """base_train's get_scaling_params: the block matrices and the head, what its horizons are counted in."""
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def nanochat_recipe(
    gpt: Any, depth: int, vocab_size: int, settings: NanochatSettings = NanochatSettings()
) -> tuple[Any, float]:
    """nanochat's GPTConfig at `depth` as scripts/base_train.py's build_model_meta makes it with `settings`
    (default runcpu.sh's), and nanochat_rates' `reference_over_depth` for it. `gpt`: the nanochat.gpt module."""

    def config(d: int) -> Any:
        dim = -(-d * ASPECT_RATIO // settings.head_dim) * settings.head_dim
        heads = dim // settings.head_dim
        return gpt.GPTConfig(
            sequence_len=settings.seq_len,
            vocab_size=vocab_size,
            n_layer=d,
            n_head=heads,
            n_kv_head=heads,
            n_embd=dim,
            window_pattern=settings.window_pattern,
        )

    with torch.device("meta"):
        reference, model = gpt.GPT(config(REFERENCE_DEPTH)), gpt.GPT(config(depth))
    return config(depth), scaling_params(reference) / scaling_params(model)


def lr_multiplier(step: int, progress: float, horizon: int = RUNCPU_STEPS) -> float:
    """base_train's get_lr_multiplier for update `step` (0-based) at `progress` (0 to 1): a linear warmup over
    WARMUP_STEPS steps or their share of a run of `horizon` steps, whichever ends first, constant, then linear
    down to FINAL_LR_FRAC over the last WARMDOWN_RATIO of the run. With `horizon` the run's own updates and
    `progress` step / horizon it is base_train's; under a clock the horizon is runcpu.sh's (the steps give the
    first update base_train's 1 / 40 of the peak, where its progress, with no speed measured yet, is 0)."""
    warmup = WARMUP_STEPS / horizon
    if progress < warmup and step < WARMUP_STEPS:
        return max((step + 1) / WARMUP_STEPS, progress / warmup)
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    left = max(0.0, 1 - progress) / WARMDOWN_RATIO
    return left + (1 - left) * FINAL_LR_FRAC


def muon_momentum(progress: float, horizon: int = RUNCPU_STEPS) -> float:
    """base_train's get_muon_momentum at `progress`: up from MOMENTUM_START over MOMENTUM_WARMUP_STEPS steps of
    a run of `horizon` (as lr_multiplier's), then MOMENTUM, down to MOMENTUM_END over the LR's warmdown."""
    warmup = MOMENTUM_WARMUP_STEPS / horizon
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


def equal_token_steps(tokens: int, per_step: int) -> int:
    """The steps of `per_step` tokens that come closest to `tokens` (one at least): an equal-token run's length."""
    return max(1, round(tokens / per_step))


def train_nanochat(
    checkout: str | None,
    data_dir: str,
    depth: int,
    budget: float = 0.0,
    tokens: int = 0,
    seed: int | None = None,
    settings: dict | None = None,
) -> dict:
    """nanochat's model at `depth` trained for `budget` seconds, or on `tokens` tokens, on prepared `data_dir`
    with its recipe (see the module docstring) under `settings` (NanochatSettings' fields; default runcpu.sh's),
    then scored on the whole val split at its context. `checkout`: its folder, None for the installed package;
    `seed`: None for its own. Run in a process of its own: nanochat reads NANOCHAT_DTYPE when it is first imported."""
    run = NanochatSettings(**(settings or {}))
    device = torch.device(run.device)
    cfg = load_config(ROOT / "configs/base.toml")  # fasttrain's precision, row order and prefetch, for both sides
    precision = resolve_precision(cfg.train.precision, device)[0]  # as fasttrain's run resolves it
    os.environ["NANOCHAT_DTYPE"] = NANOCHAT_DTYPES[precision]
    if checkout is not None:
        sys.path.insert(0, checkout)
    gpt = importlib.import_module("nanochat.gpt")
    if not hasattr(gpt.GPT, "setup_optimizer"):
        raise UsageError(f"{gpt.__file__}: a nanochat without GPT.setup_optimizer, older than this benchmark knows")
    data = open_prepared(data_dir)
    torch.manual_seed(SEED if seed is None else seed)
    config, reference_over_depth = nanochat_recipe(gpt, depth, data.vocab_size, run)
    with torch.device("meta"):  # as base_train builds it: shapes first, then storage, then its own init
        model = gpt.GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    # as base_train: its inputs never change shape
    compiled = torch.compile(model, dynamic=False) if run.compile else model

    def train_rows(batch: int) -> TokenLoader:
        # Packed windows, as nanochat's own loader packs documents into full rows: no pad targets (its loss
        # ignores -1, not fasttrain's IGNORE_INDEX). At most run.device_rows rows a forward and backward, as
        # base_train's --device-batch-size (runcpu.sh's whole 16K batch is one of 32 rows).
        return TokenLoader(
            data.dir,
            "train",
            min(run.device_rows, batch // run.seq_len),
            run.seq_len,
            sampling=cfg.data.sampling,
            eot_id=data.meta["eot_id"],
            seed=cfg.train.seed if seed is None else seed,
            prefetch=cfg.data.prefetch,
            device=run.device,
        )

    def update(batches: TokenLoader, optimizer: Any, micro_batches: int) -> None:
        for _ in range(micro_batches):  # base_train's gradient accumulation: each loss over their number
            x, y = next(batches)
            (compiled(x, y) / micro_batches).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize(device)  # as base_train's step timing: the update done on the device

    def micro_batches(batch: int) -> int:
        return batch // (min(run.device_rows, batch // run.seq_len) * run.seq_len)

    def warm_up(batch: int) -> float:
        """Compile for `batch`, untimed, and return its tokens/s; the weights back at their init after."""
        optimizer = model.setup_optimizer(**nanochat_rates(batch, reference_over_depth))
        seconds = []
        with train_rows(batch) as batches:
            for _ in range(WARMUP_UPDATES):
                began = time.perf_counter()
                update(batches, optimizer, micro_batches(batch))
                seconds.append(time.perf_counter() - began)
        model.load_state_dict(initial)  # in place: the compiled code keeps its parameters
        return batch * (WARMUP_UPDATES - 1) / sum(seconds[1:])  # the first update compiled

    warm_up_began = time.perf_counter()
    if run.batch or run.rules == "base_train":
        batch = run.batch or base_train_batch(reference_over_depth)
    else:
        batch = nanochat_batch(tokens) if tokens else TOTAL_BATCH
    measured = {batch: warm_up(batch)}
    while run.rules == "runcpu" and not run.batch and not tokens:
        # under a clock: the rule on the speed at the batch it chose, until it keeps it
        chosen = nanochat_batch(measured[batch] * budget)
        if chosen >= batch:  # kept (a smaller batch measured faster than a larger one does not grow it back)
            break
        batch = chosen
        measured[batch] = warm_up(batch)
    warm_up_seconds = time.perf_counter() - warm_up_began
    optimizer_args = nanochat_rates(batch, reference_over_depth)
    optimizer = model.setup_optimizer(**optimizer_args)
    # the tokens base_train plans for this model (--target-param-data-ratio), whatever its --num-iterations
    target_tokens = round(TARGET_PARAM_DATA_RATIO * scaling_params(model))
    updates = equal_token_steps(tokens, batch) if tokens else 0
    horizon = updates or (max(1, target_tokens // batch) if run.rules == "base_train" else RUNCPU_STEPS)
    clock = Budget(max_steps=updates, max_time=0.0 if tokens else budget)
    steps, seconds = 0, 0.0
    gc.collect()  # as base_train after its first step: its setup's garbage collected, the collector off
    gc.freeze()
    gc.disable()
    with train_rows(batch) as batches:
        while not clock.reached(steps, seconds):
            began = time.perf_counter()  # as fasttrain's step clock: reading the batch, forward, backward, update
            # base_train's it / num_iterations where the updates are known; under a clock, the progress projected
            # for the end of this update, as fasttrain's own schedule runs
            progress = steps / updates if updates else clock.next_progress(steps, seconds)
            lr = lr_multiplier(steps, progress, horizon)
            for group in optimizer.param_groups:  # as base_train's loop sets them before each update
                group["lr"] = group["initial_lr"] * lr
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(progress, horizon)
                    group["weight_decay"] = optimizer_args["weight_decay"] * weight_decay_multiplier(progress)
            update(batches, optimizer, micro_batches(batch))
            seconds += time.perf_counter() - began
            steps += 1
    gc.enable()
    # eager: outside the clock, and one more shape not compiled
    metrics = score(model, data, run.seq_len, SCORE_ROWS, run.device)
    trained = steps * batch
    return {
        "system": "nanochat",
        "case": f"depth {depth}",
        "budget_seconds": budget or None,
        "target_tokens": tokens or None,
        "seed": seed,
        "recipe": {
            "model_dim": config.n_embd,
            "n_layer": depth,
            "n_head": config.n_head,
            "seq_len": run.seq_len,
            "batch_tokens": batch,
            "micro_batches": micro_batches(batch),
            "horizon_updates": horizon,
            **optimizer_args,
        },
        "settings": asdict(run),
        "compiled": run.compile,
        # nanochat_batch's inputs: tokens/s at each batch warmed up, and the warm-ups' seconds (outside the clock)
        "warm_up_tokens_per_s": {str(b): round(s) for b, s in measured.items()},
        "warm_up_seconds": round(warm_up_seconds, 1),
        "params": model.num_scaling_params()["total"],
        # base_train's compute-optimal tokens for this depth, and its FLOPs per token (GPT.estimate_flops)
        "compute_optimal_tokens": target_tokens,
        "flops_per_token": model.estimate_flops(),
        "precision": precision,
        "steps": steps,
        "tokens": trained,
        "train_seconds": seconds,
        "tokens_per_s": round(trained / seconds),
        "epochs": round(trained / data.meta["tokens"]["train"], 2),
        "val_bpb": metrics["val_bpb"],
        "val_targets": metrics["val_targets"],
    }


def run_nanochat(
    nanochat: Nanochat,
    data: Path,
    depth: int,
    budget: float,
    tokens: int,
    seed: int | None,
    threads: int,
    work: Path,
    settings: NanochatSettings = NanochatSettings(),
    timeout: float | None = None,
) -> dict:
    """train_nanochat under `settings` in a process of its own with `threads` threads, its result written to
    `work`, and the load average around it. subprocess.TimeoutExpired, the process killed, after `timeout` s."""
    checkout = None if nanochat.installed else str(nanochat.folder)
    spec = {
        "checkout": checkout,
        "data_dir": str(data),
        "depth": depth,
        "budget": budget,
        "tokens": tokens,
        "settings": asdict(settings),
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = load_average()
    worker = [
        sys.executable,
        "-m",
        "benchmarks.studies.time_to_quality",
        "--worker",
        json.dumps({**spec, "seed": seed}),
    ]
    # stdout: nanochat's prints
    command = [*worker, "--out", str(work)]
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=timeout)
    during = load_average()
    return {**json.loads(work.read_text()), "load_average_before": before, "load_average_after_training": during}


def run_fasttrain(
    sets: Sequence[str],
    data: Path,
    budget: float,
    tokens: int,
    seed: int | None,
    threads: int,
    out_dir: Path,
    timeout: float | None = None,
) -> dict:
    """configs/base.toml with `sets` trained for `budget` seconds or on `tokens` tokens as recipe_sweep trains a
    case, compiled as train.compile says, validated on the whole val split at its own context (on the device
    its train.device chooses). subprocess.TimeoutExpired, the run killed, after `timeout` s."""
    geometries = contexts(setting(sets, "train.batch_size", 16), setting(sets, "train.seq_len", 0))
    steps = equal_token_steps(tokens, geometries[0][0] * geometries[0][1]) if tokens else 0  # either: the same
    # whichever context the plan chooses with seq_len 0, enough batches for the whole split (more read all of it)
    eval_steps = max(whole_split_steps(open_prepared(data), length, rows) for length, rows in geometries)
    seeded = [*sets, *([f"train.seed={seed}"] if seed is not None else [])]
    return {
        "system": "fasttrain",
        "case": " ".join(["configs/base.toml", *sets]),
        "budget_seconds": budget or None,
        "target_tokens": tokens or None,
        "seed": seed,
        **train_sets(
            seeded,
            data,
            budget,
            threads,
            out_dir,
            steps,
            train_compile="auto",
            eval_steps=eval_steps,
            evaluate_on_the_way=True,  # as the config evaluates: final/ may hold its best step's weights
            timeout=timeout,
        ),
    }


def summarize(results: Sequence[dict]) -> list[dict]:
    """Each case's val bpb over its seeds, a row per (length, system, case): the mean and the spread (largest
    minus smallest; 0 for one seed)."""
    cases: dict[tuple, list[float]] = {}
    for r in results:
        key = (r["budget_seconds"], r["target_tokens"], r["system"], r["case"])
        cases.setdefault(key, []).append(r["val_bpb"])
    return [
        {
            "budget_seconds": budget,
            "target_tokens": tokens,
            "system": system,
            "case": case,
            "seeds": len(bpb),
            "val_bpb_mean": sum(bpb) / len(bpb),
            "val_bpb_spread": max(bpb) - min(bpb),
        }
        for (budget, tokens, system, case), bpb in cases.items()
    ]


def plot(record: dict, out: Path) -> Path:
    """Mean val bpb against the budget in minutes (or the tokens), a line per system and case, the spread over
    the seeds as error bars, to `out`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_tokens = record["mode"] == "tokens"
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for r in record["summary"]:
        label = f"nanochat {r['case']}" if r["system"] == "nanochat" else f"fasttrain ({r['case']})"
        x = r["target_tokens"] / 1e6 if by_tokens else r["budget_seconds"] / 60
        lines.setdefault(label, []).append((x, r["val_bpb_mean"], r["val_bpb_spread"] / 2))
    for label, points in lines.items():
        xs, bpb, half_spread = zip(*sorted(points))
        ax.errorbar(xs, bpb, yerr=half_spread, marker="o", capsize=3, label=label)
    ticks = sorted({x for points in lines.values() for x, _, _ in points})
    ax.set_xscale("log")  # 1, 3 and 10 minutes evenly apart
    ax.set_xticks(ticks, [f"{x:.3g}" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("millions of training tokens" if by_tokens else "minutes of training")
    ax.set_ylabel("validation bits per byte (whole split)")
    threads = f"{record['threads']} thread" + "s" * (record["threads"] != 1)
    mode = "equal tokens" if by_tokens else "equal time"
    ax.set_title(f"{mode}, {record['corpus']} corpus, {threads}, {record['machine']['cpu']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.time_to_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanochat", help="a nanochat checkout (default: $NANOCHAT_DIR, else the installed package)")
    parser.add_argument("--corpus", choices=["large", "small", "docstrings"], default="large")
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument("--budgets", type=float, nargs="+", help="seconds of training (default: 60 180 600)")
    lengths.add_argument("--tokens", type=int, nargs="+", help="training tokens instead, whatever the time")
    parser.add_argument(
        "--nanochat-depths", type=int, nargs="*", default=[1, 2, 3, 4], help="none: fasttrain's side alone"
    )
    parser.add_argument(
        "--fasttrain-sets",
        nargs="+",
        default=FASTTRAIN_SETS,
        metavar="KEY=VALUE",
        help="--set items on configs/base.toml for fasttrain's side (default none: its budgeted, self-sizing recipe)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="run every case once a seed (default: each side's own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fasttrain-recipe-sweep")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # train_nanochat's arguments, as JSON: run_nanochat's
    args = parser.parse_args(argv)
    if args.worker is not None:  # the process run_nanochat starts: its result to --out
        args.out.write_text(json.dumps(train_nanochat(**json.loads(args.worker))))
        return 0
    budgets: list[float] = [] if args.tokens else args.budgets or [60.0, 180.0, 600.0]
    for flag, values in (
        ("--budgets", budgets),
        ("--tokens", args.tokens),
        ("--nanochat-depths", args.nanochat_depths),
    ):
        if values and min(values) <= 0:
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
    out = (
        args.out
        or ROOT
        / f"benchmarks/results/time-to-quality/cpu-time-to-quality-{args.corpus}{'-tokens' * bool(args.tokens)}-{today}.json"
    )
    data = prepared(args.corpus, args.cache)
    val = open_prepared(data).meta
    header = {
        **result_header(
            "issue 63: time to quality, fasttrain's budgeted default against nanochat run as its authors run it "
            "(compiled, compile outside the clock on both sides), scored on the whole validation split at each "
            "model's own context",
            "benchmarks.studies.time_to_quality",
            argv,
            today,
        ),
        "nanochat": nanochat.describe(),
        "harness": HARNESS_NOTE,
        "corpus": args.corpus,
        "mode": "tokens" if args.tokens else "budget",
        "validation": {"tokens": val["tokens"]["val"], "bytes": val["text_bytes"]["val"]},
        "threads": args.threads,
        "seeds": args.seeds,
    }
    lengths_run = [(0.0, n) for n in args.tokens] if args.tokens else [(b, 0) for b in budgets]
    record = run_cases(args, nanochat, data, lengths_run, header, out)
    print(f"wrote {out} and {plot(record, out.with_suffix('.png'))}")
    return 0


def run_cases(
    args: argparse.Namespace,
    nanochat: Nanochat,
    data: Path,
    lengths_run: Sequence[tuple[float, int]],
    header: dict,
    out: Path,
) -> dict:
    """Every case of the study (each (budget, tokens) of `lengths_run` and seed: fasttrain, then nanochat at each
    depth), the results file `out` (`header`, the summary, the results) written again after each, so a study
    stopped part way keeps every case it finished; the record written last."""
    results: list[dict] = []

    def kept(result: dict) -> dict:  # said, and written with every result before it
        results.append(result)
        print(json.dumps(result), flush=True)
        record = {**header, "summary": summarize(results), "results": results}
        out.write_text(json.dumps(record, indent=1) + "\n")
        return record

    record: dict = {}
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as tmp:
        for i, (budget, tokens) in enumerate(lengths_run):
            for seed in args.seeds or [None]:
                work = Path(tmp) / f"{i}-{seed}"
                record = kept(run_fasttrain(args.fasttrain_sets, data, budget, tokens, seed, args.threads, work))
                for depth in args.nanochat_depths:
                    spec = (nanochat, data, depth, budget, tokens, seed, args.threads)
                    record = kept(run_nanochat(*spec, Path(tmp) / f"{i}-{seed}-nanochat{depth}.json"))
    return record


if __name__ == "__main__":
    sys.exit(run_cli(main))
