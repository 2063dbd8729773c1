"""Run configuration: typed dataclasses, loaded from TOML with command-line overrides.

Each TOML section ([model], [data], ...) maps to one dataclass below. A value is
taken from, in increasing precedence: the dataclass default, the config file, then
`--set section.key=value` on the command line. Everything is checked up front
(names, types, ranges, combinations) so a typo fails in a second, not an hour into
a run. Every problem is a one-line `UsageError` that starts with where the value
came from (the file's path or `--set`), then names the key:

    configs/tiny.toml: train.batch_size: must be > 0, got 0

`save_config` writes the resolved config into the run directory, so a run can
always be reproduced from what it wrote.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, NewType, Sequence, get_args, get_origin, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fasttrain import configs
from fasttrain.system.atomic import read_regular, write_atomically
from fasttrain.system.errors import UsageError

Seconds = NewType("Seconds", float)  # a duration: a number of seconds, or text such as "3m" or "1h30m"
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(text: str) -> float | None:
    """Seconds in `text`: a number ("90", "2.5") or hours, minutes and seconds in that order ("1h30m", "3m",
    "45s", "1m30s"); None if it is neither."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d*)?", text):
        return float(text)
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        return None
    hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return 3600 * hours + 60 * minutes + seconds


@dataclass
class ModelConfig:
    """[model]: the transformer's shape (LLaMA-style; see fasttrain/model/transformer.py)."""

    vocab_size: int = 0  # embedding rows; 0 = take it from the prepared data's tokenizer
    max_seq_len: int = 256  # longest context the model supports
    d_model: int = 256  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads per block; must divide d_model
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads; must divide n_heads
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 x d_model rounded up to multiple_of
    multiple_of: int = 64  # round the SwiGLU hidden width up to a multiple of this (matmul-friendly)
    rope_theta: float = 10000.0  # RoPE base: larger stretches the rotary wavelengths for longer contexts
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output projection shares the token-embedding matrix
    dropout: float = 0.0  # on attention weights and residual branches during training
    # A Hugging Face Llama-family model directory (config.json, safetensors) to continue pre-training:
    # the shape above comes from its config.json, a new run starts from its weights. "" = random init.
    init_from: str = ""


@dataclass
class SourceConfig:
    """One [[data.sources]] table: a prepared folder and its share of the training rows."""

    dir: str = ""  # a folder prepared by `fasttrain prepare` (every source with one tokenizer)
    weight: float = 1.0  # relative share of the training rows; the weights are normalized to sum to 1
    # Its name in metrics (val_loss.NAME, tokens.NAME) and train.monitor; "" = the folder's name, or the shortest
    # ending of its path that tells it from the other sources' ("web/prepared" beside "src/prepared").
    name: str = ""


@dataclass
class MixChange:
    """One [[data.mix]] table: from a step on, the sources' weights change (an annealing mix, say)."""

    step: int = 0  # the first step with these weights; or (not both)
    fraction: float = 0.0  # of train.max_steps: the change is at step round(fraction x max_steps)
    weights: list[float] = field(default_factory=list)  # one per [[data.sources]] table, in their order


@dataclass
class DataConfig:
    """[data]: where training text comes from."""

    # Prepared shards (train_*.bin, val_*.bin, meta.json, tokenizer.json). "" = prepare
    # `inputs` into a cache directory keyed by these settings, reused on the next run.
    # A folder already prepared (`fasttrain prepare --out DIR`) is the data by itself: the keys
    # below left at their defaults take its values; one set otherwise must agree with it.
    dir: str = ""
    # What prepare reads when `dir` holds no prepared data: paths, globs, directories,
    # JSONL or Parquet files, or the embedded corpora builtin:pydoc / builtin:docstrings.
    # [] = the prepared folder's inputs, or builtin:pydoc when there is none.
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"  # the JSONL field or Parquet column holding a document's text
    tokenizer: str = ""  # an existing tokenizer.json to use; "" = prepare trains one
    vocab_size: int = 0  # of the BPE tokenizer prepare trains; 0 = the prepared folder's, or 4096
    val_fraction: float = 0.1  # fraction of documents held out for validation
    sampling: Literal["random", "sequential"] = "random"  # random rows, or one pass in order
    # What a row of a batch holds (fasttrain/data/documents.py): "packed" windows across document
    # boundaries (pre-training), "padded" one document per row (truncated to seq_len, pad
    # targets ignored), or "aligned" rows that start at a document start and pack the next ones after.
    batching: Literal["packed", "padded", "aligned"] = "packed"
    # How short rows are padded: "fixed" to seq_len, "longest" to the batch's longest row, or
    # "bucketed": rows of similar lengths batched together, then cut to the longest.
    padding: Literal["fixed", "longest", "bucketed"] = "fixed"
    # A token attends only to earlier tokens of its own document (documents start at end-of-text
    # tokens); without it a packed or aligned row is one causal sequence across documents.
    document_mask: bool = False
    prefetch: int = 2  # batches prepared ahead by a background thread (at most 64); 0 = load in the training thread
    # A mixture (fasttrain/data/mixture.py): [[data.sources]] tables of prepared folders by weight, instead of
    # `dir` and `inputs`; [[data.mix]] tables change the weights from a step on. [] = the one folder above.
    sources: list[SourceConfig] = field(default_factory=list)
    mix: list[MixChange] = field(default_factory=list)
    max_epochs: float = 4.0  # warn when the run would read a source more than this many times over


@dataclass
class MuonConfig:
    """[optim.muon]: torch.optim.Muon, for the hidden matrices of the blocks when optim.name = "muon"."""

    lr: float = 0.02  # peak learning rate of the Muon group (the rest keeps optim.lr); the schedule scales both alike
    momentum: float = 0.95  # decay of the momentum that Newton-Schulz orthogonalises
    nesterov: bool = True  # orthogonalise the Nesterov look-ahead instead of the momentum itself
    ns_steps: int = 5  # Newton-Schulz iterations per step
    # How the rate is scaled by a matrix's shape (A, B): "original" by sqrt(max(1, A / B)); "match_rms_adamw"
    # by 0.2 sqrt(max(A, B)), which gives updates of AdamW's size, so AdamW's lr carries over.
    adjust_lr: Literal["original", "match_rms_adamw"] = "original"


@dataclass
class SGDConfig:
    """[optim.sgd]: torch.optim.SGD when optim.name = "sgd"."""

    momentum: float = 0.9  # heavy-ball momentum; 0 = plain SGD
    nesterov: bool = False  # Nesterov momentum (needs momentum > 0)


@dataclass
class AdafactorConfig:
    """[optim.adafactor]: torch.optim.Adafactor when optim.name = "adafactor"."""

    beta2_decay: float = -0.8  # the second-moment decay at step t is 1 - t^beta2_decay
    eps1: float = 0.0  # guard of the factored second moment; 0 = the parameter dtype's machine epsilon
    eps2: float = 1e-3  # the smallest parameter scale the update is relative to
    d: float = 1.0  # clip the update's RMS to this


@dataclass
class OptimConfig:
    """[optim]: the optimizer and gradient clipping (fasttrain/training/optimizers.py).

    beta1, beta2 and eps are AdamW's: they apply to "adamw" and to the AdamW half of "muon".
    Each other optimizer has its own table, which may only be set when it is the one named.
    """

    name: Literal["adamw", "muon", "sgd", "adafactor"] = "adamw"
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.1  # weight decay (decoupled, except SGD's), applied to weight matrices only
    decay_embeddings: bool = False  # also decay the token embedding (norm gains and biases never are)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator guard
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    muon: MuonConfig = field(default_factory=MuonConfig)
    sgd: SGDConfig = field(default_factory=SGDConfig)
    adafactor: AdafactorConfig = field(default_factory=AdafactorConfig)


@dataclass
class ScheduleConfig:
    """[schedule]: the learning rate as a function of the step (fasttrain/training/schedule.py)."""

    # Linear ramp from 0 to optim.lr. A run shorter than this warms up over its first tenth (at least 2 steps).
    warmup_steps: int = 100
    # Shape after warmup (wsd = warmup-stable-decay; step = times step_factor every step_every steps).
    decay: Literal["cosine", "linear", "constant", "wsd", "step"] = "cosine"
    min_lr: float = 1e-4  # learning rate of the last step (step: the floor it never goes below; constant: unused)
    cooldown_fraction: float = 0.2  # wsd only: the last fraction of the steps, decayed linearly to min_lr
    step_every: int = 100  # step only: steps between two multiplications by step_factor
    step_factor: float = 0.5  # step only: what the rate is multiplied by every step_every steps
    # Replays a time-budgeted run step for step: the metrics.jsonl (or the run directory) of that run, whose
    # recorded progress the schedule follows instead of a clock (with train.max_steps = the steps it reached
    # and train.max_time = 0). "" = the run's own steps or clock.
    progress_from: str = ""


@dataclass
class TrainConfig:
    """[train]: length, batch, precision, device, monitoring and output of the run."""

    max_steps: int = 2000  # optimizer steps in the whole run; 0 = no step limit (with max_time)
    # A time budget: seconds of training (a number, or a string such as "90s", "3m", "1h30m"), after which the
    # run ends with its schedule finished; with max_steps, whichever comes first. 0 = none. Steps count, not
    # compiling, evaluating, checkpointing or sampling (fasttrain/training/schedule.py, docs/training.md).
    max_time: Seconds = 0.0
    seed: int = 1337  # seeds Python, NumPy, torch (model init) and data sampling; 0 to 2**32 - 1
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda" or "cuda:N"
    out_dir: str = "runs/base"  # where checkpoints, metrics, samples and the resolved config.toml go
    batch_size: int = 16  # sequences per micro-batch, per process
    seq_len: int = 256  # tokens per training sequence
    # Tokens per optimizer step; it sets gradient accumulation = tokens_per_update /
    # (batch_size x seq_len x world size). 0 = one micro-batch per step.
    tokens_per_update: int = 0
    # Autocast precision. auto: bf16 on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16 or
    # AMX), fp32 elsewhere (emulated bf16 is slower than fp32). See system/device.py, resolve_precision.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile the objective. auto: always on CUDA; on CPU only for runs of at least
    # system.device.CPU_COMPILE_MIN_STEPS steps, long enough to earn back the compile time.
    compile: Literal["auto", True, False] = "auto"
    # torch.compile's mode: "default"; "max-autotune" (benchmarks matmul and kernel configs while
    # compiling: slower to start, helps long GPU runs; with CUDA graphs) or "max-autotune-no-cudagraphs";
    # "reduce-overhead" (CUDA graphs: cuts launch overhead of small models on GPU; needs static shapes,
    # so data.padding = "fixed"; no effect on CPU).
    compile_mode: Literal["default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"] = "default"
    # Inductor's coordinate-descent tuning of its generated kernels' block sizes, in any compile_mode
    # (the max-autotune modes already do it): a slower compile for faster elementwise and norm kernels.
    coordinate_descent_tuning: bool = False
    # The attention kernel: "auto" (F.scaled_dot_product_attention picks), one of its backends
    # ("flash", "cudnn", "efficient", "math"), "fa3" (SDPA's flash backend with FlashAttention-3
    # activated, where the installed torch offers it), or "flex" (flex_attention with a causal block
    # mask, compiled). Only "auto", "math" and "flex" run on a CPU. Changes speed, not results.
    attention: Literal["auto", "flash", "cudnn", "efficient", "math", "fa3", "flex"] = "auto"
    # FP8 matmuls (fasttrain/model/fp8.py: float8 with tensorwise current scaling, weights and
    # gradients kept in their dtype): "none", the output "head", the "blocks"' projections, or "all".
    # Needs a GPU with FP8 tensor cores (sm_89+), or a CPU whose torch runs _scaled_mm. The head in
    # FP8 runs the logits and F.cross_entropy: the fused linear cross-entropy skips its matmul.
    fp8: Literal["none", "head", "blocks", "all"] = "none"
    # Recompute activations in backward instead of keeping them, trading compute for memory: "none";
    # "full" (only each block's input is kept, the whole block runs again in backward, ~1/3 more
    # compute); "selective" (a block keeps its matmul and attention outputs and recomputes only the
    # cheap elementwise work: norms, RoPE, SwiGLU's activation, dropout). See model.Transformer.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # Under torchrun with more than one process: "ddp" (every rank holds the whole model), "fsdp" (FSDP2:
    # parameters, gradients and optimizer state sharded over the ranks) or "hsdp" (sharded within groups of
    # shard_group_size ranks, the groups replicas of each other; see system/distributed.py).
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    shard_group_size: int = 0  # hsdp only: ranks per shard group, a divisor of the world; 0 = the node's processes
    log_interval: int = 10  # report training metrics every this many steps
    eval_interval: int = 250  # validate (and sample) every this many steps, and at the end
    eval_steps: int = 20  # validation reads the val split's first eval_steps x batch_size rows, in any world
    # Stop once this many evaluations in a row have not lowered the best validation loss by at
    # least early_stop_min_delta (a final checkpoint is saved, the best one kept); 0 = never.
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    # The validation loss `best` checkpoints and early stopping follow: "val_loss", a mixture's total weighted as
    # data.sources, or "val_loss.NAME", one source's (NAME: its folder's name, as metrics.jsonl records it).
    monitor: str = "val_loss"
    sample_prompt: str = "The"  # the samples' prompt (<= 65,536 chars); no trailing space: BPE words carry theirs
    sample_tokens: int = 64  # tokens generated per sample; 0 = no samples
    tensorboard: bool = True  # also write TensorBoard event files when tensorboard is installed


@dataclass
class CheckpointConfig:
    """[checkpoint]: how often to save and how many saves to keep."""

    interval: int = 500  # save every this many steps (and at the end)
    keep_last: int = 2  # the newest this many saves are kept, older ones deleted (the best is kept too)
    keep_best: bool = True  # save whenever validation loss reaches a new low, and keep the lowest
    # "sharded": a folder each rank writes its own part of (torch.distributed.checkpoint); "file": one file of
    # the whole state, gathered onto rank 0; "auto": sharded under fsdp and hsdp, a file otherwise
    format: Literal["auto", "file", "sharded"] = "auto"
    # copy the state to CPU memory and write it in the background while training goes on (sharded saves only;
    # a step waits for the copy, and for a save still in flight when the next is due, at the end, on a stop)
    async_save: bool = False


@dataclass
class RecoveryConfig:
    """[recovery]: what to do when the loss or gradient norm stops being finite."""

    max_skips: int = 3  # consecutive non-finite steps skipped (no update) before rolling back
    lr_factor: float = 0.5  # a rollback reloads the last good checkpoint and multiplies the learning rate by this
    max_rollbacks: int = 2  # rollbacks allowed in a run; the next divergence stops it (0: stop at once)


@dataclass
class KernelsConfig:
    """[kernels]: which of the Triton kernels (kernels/) the model uses. "auto" on a GPU: where the measured
    dispatch table (fasttrain/system/kernel_table.py) says the kernel beat stock at the run's shapes and mode;
    on a CPU: off, but for the linear cross-entropy under bf16."""

    # The loss straight from the final hidden states and the output weight, chunk by chunk,
    # never holding the (tokens x vocab) logits (kernels/linear_cross_entropy.py). On a CPU "auto" is
    # on under bf16, where its in-cache PyTorch path spares the fp32 copy of the logits.
    linear_cross_entropy: Literal["auto", True, False] = "auto"
    # Every RMSNorm, with the residual add before it, in one kernel (kernels/rms_norm.py).
    rms_norm: Literal["auto", True, False] = "auto"
    # kernels.FusedAdamW instead of torch's fused AdamW, with the gradient clipping folded into its
    # step (kernels/adamw.py): the clip costs one norm pass over the gradients, no scaling pass.
    adamw: Literal["auto", True, False] = "auto"


@dataclass
class LogConfig:
    """[log]: where metrics go besides metrics.jsonl and the console."""

    # Also log to Weights & Biases (the `wandb` extra): every metrics.jsonl event, the resolved
    # config and the samples; a resumed run continues the same W&B run. WANDB_MODE=offline
    # keeps it on disk (wandb sync uploads it later).
    wandb: bool = False
    project: str = "fasttrain"  # the W&B project
    run_name: str = ""  # the W&B run's display name; "" = the name of train.out_dir
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """[eval]: lm-evaluation-harness tasks that `fasttrain train` scores on the final weights, as
    `fasttrain evaluate RUN --tasks ...` would (the eval extra; see docs/tools.md). Checked before training."""

    tasks: list[str] = field(default_factory=list)  # e.g. ["hellaswag", "arc_easy"]; [] = none (the default)
    num_fewshot: int = 0  # examples before each question
    limit: int = 0  # documents per task; 0 = every one
    include_path: str = ""  # a folder of task YAML files of one's own ("" = lm-eval's tasks only)


@dataclass
class Config:
    """A whole run's settings, one attribute per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


OVERRIDE_SOURCE = "--set"  # how errors name values that came from the command line
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; a bound keeps /dev/zero or a mistaken data file out
MAX_EXTENDS = 32  # config files in one `extends` chain
MAX_SEED = 2**32 - 1  # NumPy's generator takes 32-bit seeds; every tool accepts the same range
MAX_PROMPT_CHARS = 65_536  # the model reads at most max_seq_len tokens of a prompt; tokenizing more costs memory
MAX_PREFETCH = 64  # batches read ahead, each held in memory until used
DEFAULT_INPUTS = ("builtin:pydoc",)  # what [data] prepares when it names no inputs and no prepared folder
DEFAULT_VOCAB = 4096  # the BPE prepare trains when [data] gives no vocab_size

# How a TOML value is accepted for each field type: (accepts, convert, what an error says was expected).
# bool is a subclass of int in Python, but `n_layers = true` is a mistake, never a number.
# No setting means anything as inf or nan, and nan would slip through every range check.
_TYPES: dict[Any, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), int, "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), float,
            "a finite number"),
    bool: (lambda v: isinstance(v, bool), bool, "true or false"),
    str: (lambda v: isinstance(v, str), str, "a string"),
    list[str]: (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), list, "a list of strings"),
    list[float]: (lambda v: isinstance(v, list) and all(_TYPES[float][0](x) for x in v), lambda v: list(map(float, v)),
                  "a list of finite numbers"),
    Seconds: (lambda v: (isinstance(v, str) and parse_duration(v) is not None)
              or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
              lambda v: parse_duration(v) if isinstance(v, str) else float(v),
              'seconds or a duration such as "90s", "3m" or "1h30m"'),
}

# Allowed values, checked once all types are right: "section.key" -> (test, "must be ...").
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.vocab_size": _NON_NEGATIVE,
    "model.max_seq_len": _POSITIVE,
    "model.d_model": _POSITIVE,
    "model.n_layers": _POSITIVE,
    "model.n_heads": _POSITIVE,
    "model.n_kv_heads": _NON_NEGATIVE,
    "model.ffn_hidden": _NON_NEGATIVE,
    "model.multiple_of": _POSITIVE,
    "model.rope_theta": _POSITIVE,
    "model.norm_eps": _POSITIVE,
    "model.dropout": _FRACTION,
    "data.inputs": (lambda v: all(v), "a list of non-empty paths"),
    "data.text_field": (bool, "a non-empty field name"),
    "data.vocab_size": (lambda v: v == 0 or v > 256,
                        "0 or > 256 (a byte-level BPE needs the 256 bytes plus an end-of-text token)"),
    "data.val_fraction": _FRACTION,
    "data.prefetch": (lambda v: 0 <= v <= MAX_PREFETCH, f"in [0, {MAX_PREFETCH}] (batches held in memory ahead of use)"),
    "data.max_epochs": _POSITIVE,
    "optim.lr": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.beta1": _FRACTION,
    "optim.beta2": _FRACTION,
    "optim.eps": _POSITIVE,
    "optim.max_grad_norm": _NON_NEGATIVE,
    "optim.muon.lr": _POSITIVE,
    "optim.muon.momentum": _FRACTION,
    "optim.muon.ns_steps": (lambda v: 0 < v < 100, "in [1, 99]"),  # torch.optim.Muon's own limit
    "optim.sgd.momentum": _FRACTION,
    "optim.adafactor.beta2_decay": (lambda v: v <= 0, "<= 0"),
    "optim.adafactor.eps1": _NON_NEGATIVE,
    "optim.adafactor.eps2": _NON_NEGATIVE,
    "optim.adafactor.d": _POSITIVE,
    "schedule.warmup_steps": _NON_NEGATIVE,
    "schedule.min_lr": _NON_NEGATIVE,
    "schedule.cooldown_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "schedule.step_every": _POSITIVE,
    "schedule.step_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "train.max_steps": (lambda v: v >= 0, ">= 0 (0: no step limit, for a run with train.max_time)"),
    "train.max_time": _NON_NEGATIVE,
    "train.device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    "train.out_dir": (bool, "a directory path"),
    "train.batch_size": _POSITIVE,
    "train.seq_len": _POSITIVE,
    "train.tokens_per_update": _NON_NEGATIVE,
    "train.log_interval": _POSITIVE,
    "train.eval_interval": _POSITIVE,
    "train.eval_steps": _POSITIVE,
    "train.early_stop_patience": _NON_NEGATIVE,
    "train.early_stop_min_delta": _NON_NEGATIVE,
    "train.sample_prompt": (lambda v: 0 < len(v) <= MAX_PROMPT_CHARS,
                            f"non-empty (generation starts from it) and at most {MAX_PROMPT_CHARS:,} characters"),
    "train.seed": (lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]"),
    "train.sample_tokens": _NON_NEGATIVE,
    "train.shard_group_size": _NON_NEGATIVE,
    "eval.num_fewshot": _NON_NEGATIVE,
    "eval.limit": _NON_NEGATIVE,  # that it divides the world is checked at launch
    "checkpoint.interval": _POSITIVE,
    "checkpoint.keep_last": _POSITIVE,
    "recovery.max_skips": _POSITIVE,
    "recovery.lr_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "recovery.max_rollbacks": _NON_NEGATIVE,
    "log.project": (bool, "a W&B project name"),
}

# Settings that must agree, checked after the ranges (so n_heads > 0 here):
# (key, relation, other key, is_broken(cfg), why) -> "key = 1 <relation> other = 2 (why)".
_CONFLICTS: list[tuple[str, str, str, Callable[[Config], bool], str]] = [
    ("train.seq_len", "exceeds", "model.max_seq_len", lambda c: c.train.seq_len > c.model.max_seq_len,
     "the model has no positions beyond its context"),
    ("train.max_steps", "and", "train.max_time", lambda c: c.train.max_steps == 0 and c.train.max_time == 0,
     "0 is no limit, and a run needs one: steps, a time budget or both"),
    ("schedule.progress_from", "does not go with", "train.max_time",
     lambda c: bool(c.schedule.progress_from) and c.train.max_time > 0,
     "a replay follows the recorded progress, not a clock: set train.max_time = 0"),
    ("schedule.min_lr", "exceeds", "optim.lr", lambda c: c.schedule.min_lr > c.optim.lr,
     "the schedule decays from lr down to min_lr"),
    ("optim.sgd.nesterov", "needs", "optim.sgd.momentum", lambda c: c.optim.sgd.nesterov and c.optim.sgd.momentum == 0,
     "Nesterov momentum without momentum is plain SGD"),
    ("model.d_model", "is not divisible by", "model.n_heads", lambda c: c.model.d_model % c.model.n_heads != 0,
     "each head gets d_model / n_heads dimensions"),
    ("model.n_heads", "is not divisible by", "model.n_kv_heads",
     lambda c: c.model.n_kv_heads > 0 and c.model.n_heads % c.model.n_kv_heads != 0,
     "each key/value head serves the same number of query heads"),
    ("model.d_model", "/", "model.n_heads", lambda c: (c.model.d_model // c.model.n_heads) % 2 != 0,
     "an odd head size, but RoPE rotates pairs of dimensions"),
    # The world size is only known at launch, where the trainer checks the rest.
    ("train.tokens_per_update", "is not a multiple of", "train.batch_size",
     lambda c: c.train.tokens_per_update % (c.train.batch_size * c.train.seq_len) != 0,
     "it must be a whole number of micro-batches of batch_size x seq_len tokens"),
    ("train.compile_mode", "does not work with", "data.padding",
     lambda c: c.train.compile_mode in ("reduce-overhead", "max-autotune") and c.data.batching != "packed"
     and c.data.padding != "fixed",
     'CUDA graphs replay fixed shapes; use data.padding = "fixed"'),
    # model.vocab_size against the tokenizer: check_vocab, once the tokenizer is known (data.vocab_size is
    # what a BPE is asked for; it may learn fewer, so it cannot be checked here).
]


# Keys that mean something only for some values of another setting: (key or table, the setting, those values).
# Setting one for another value is an error, not silently ignored; config_to_toml leaves it out.
_APPLIES: list[tuple[str, str, tuple[str, ...]]] = [
    *[(f"optim.{key}", "optim.name", ("adamw", "muon")) for key in ("beta1", "beta2", "eps")],
    *[(f"optim.{name}", "optim.name", (name,)) for name in ("muon", "sgd", "adafactor")],
    *[(f"schedule.{key}", "schedule.decay", ("step",)) for key in ("step_every", "step_factor")],
    ("train.shard_group_size", "train.parallel", ("hsdp",)),
]


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated Config from defaults, the TOML file at `path` (None: none), then `overrides`.

    Each override is `section.key=value`, with `value` a TOML literal (`8`, `"cpu"`,
    `["a", "b"]`); text that is not a TOML literal is taken as a bare string, so
    `train.device=cpu` works. Later overrides win. Raises UsageError (one line,
    naming the file or `--set`, and the key) on any problem.

    A config file may start with `extends = "base.toml"` (a path relative to the file):
    the base's values are read first, then this file's replace them key by key. A base
    may extend another; a chain that comes back to a file it passed is an error.
    """
    return _build(_read_layers(path) if path is not None else [], [(OVERRIDE_SOURCE, item) for item in overrides])


def parse_config(text: str, source: str) -> Config:
    """A validated Config from TOML text, such as the one a checkpoint carries; `source` names it in errors."""
    return _build([(_parse_toml(text, source), source)], ())


def _build(layers: Sequence[tuple[dict[str, Any], str]], overrides: Sequence[tuple[str, str]]) -> Config:
    """Defaults, then each parsed TOML document of `layers` (with the source it came from), then
    `overrides` (each `section.key=value` with the flag it came from: --set, --seed, ...); validated."""
    cfg = Config()
    sources: dict[str, str] = {}  # "section.key" -> where its value came from
    for doc, source in layers:
        for section, table in doc.items():
            if not isinstance(table, dict):
                got = f"{_show(table)} ({type(table).__name__})"
                raise UsageError(f"{source}: {section}: expected a [section] table, got {got}")
            part = _section(cfg, section, source)  # checked even when the table is empty
            for key, value in table.items():
                _assign(part, section, key, value, source, sources)
    for source, item in overrides:
        section, key, value = _parse_override(item, source)
        _assign(_section(cfg, section, source), section, key, value, source, sources)
    _validate(cfg, sources)
    _check_applicable(cfg, sources)
    return cfg


def resolve(cfg: Config, data_dir: str, tokenizer_vocab: int, request: dict | None = None) -> Config:
    """A copy of `cfg` with what preparing its data found (prepare.ensure_prepared): the data
    directory, model.vocab_size when it is 0, and the settings the data was prepared with (`request`,
    its meta.json's). The run records this one (config.toml), so it names what was used and loads
    back to the same data, from any working directory: its paths are absolute. UsageError if the
    model's vocabulary is too small for the tokenizer's."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    check_vocab(vocab, tokenizer_vocab, f"{data_dir}/tokenizer.json")
    if cfg.data.sources:  # a mixture names its prepared folders already: recorded absolute, as data.dir is
        sources = [replace(s, dir=_absolute(s.dir)) for s in cfg.data.sources]
        return replace(cfg, data=replace(cfg.data, sources=sources), model=replace(cfg.model, vocab_size=vocab))
    data = replace(cfg.data, dir=data_dir)
    if request:
        data = replace(data, inputs=list(request["inputs"]), tokenizer=request.get("tokenizer") or "",
                       vocab_size=request.get("vocab_size") or 0, val_fraction=request["val_fraction"],
                       text_field=request.get("text_field", "text"))
    data = replace(data, dir=_absolute(data.dir), inputs=[_absolute(i) for i in data.inputs],
                   tokenizer=_absolute(data.tokenizer))
    return replace(cfg, data=data, model=replace(cfg.model, vocab_size=vocab))


def _absolute(spec: str) -> str:
    """A path (or glob) of [data] as an absolute one, so tools run from another directory find it too; an
    embedded corpus (builtin:NAME) and "" (unset) stay as they are."""
    return spec if not spec or spec.startswith("builtin:") else os.path.abspath(spec)


def check_vocab(model_vocab: int, tokenizer_vocab: int, tokenizer: str) -> None:
    """The one check of model.vocab_size, wherever a model meets its tokenizer (a run's resolve, a trained
    model loaded back): UsageError if the model cannot embed every token of `tokenizer`."""
    if model_vocab < tokenizer_vocab:
        raise UsageError(f"model.vocab_size = {model_vocab} is smaller than the {tokenizer_vocab} tokens of {tokenizer}; "
                         "0 takes the size from the tokenizer")


def config_to_toml(cfg: Config) -> str:
    """Render `cfg` as TOML text that `load_config` reads back to an equal Config (keys that do not
    apply are left out: they hold their defaults)."""
    return "\n\n".join(table for section in fields(cfg) for table in _tables(cfg, section.name)) + "\n"


def _tables(cfg: Config, name: str) -> list[str]:
    """The TOML table [name] ("section" or "section.table"), then those nested in it."""
    part, lines, nested = _get(cfg, name), [f"[{name}]"], []
    for f in fields(part):
        key = f"{name}.{f.name}"
        if _applies(cfg, key) is not None:
            continue
        if is_dataclass(getattr(part, f.name)):
            nested += _tables(cfg, key)
        else:
            lines.append(f"{f.name} = {_toml_value(getattr(part, f.name))}")
    return ["\n".join(lines), *nested]


def save_config(cfg: Config, run_dir: str | os.PathLike[str]) -> Path:
    """Write `cfg` to `run_dir/config.toml` (creating `run_dir`) and return that path.

    The write is atomic: a crash leaves either the old file or the new one, never
    half of one. Raises UsageError if the directory or file cannot be written.
    """
    text = config_to_toml(cfg).encode("utf-8")
    return write_atomically(Path(run_dir) / "config.toml", lambda f: f.write(text))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the positional `config` path, repeatable `--set SECTION.KEY=VALUE`, and `--device` and `--seed`
    (the flags sample and evaluate have too, here short for --set train.device / train.seed)."""
    parser.add_argument("config", nargs="?", action=_ConfigPath,
                        help="a TOML config file, or a shipped config by name (fasttrain configs lists them)")
    parser.add_argument(
        "--set", nargs="+", action=_SetItems, default=[], metavar="SECTION.KEY=VALUE",
        help="override config values; VALUE is TOML or a bare string, e.g. --set train.batch_size=8 train.device=cpu",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (--set train.device=D)")
    parser.add_argument("--seed", type=int, help="seeds everything (--set train.seed=S)")


class _ConfigPath(argparse.Action):
    """The positional config path. argparse calls this with None when no positional was left for it, which
    must not undo the path a --set took (see _SetItems)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            return
        if namespace.config is not None:
            parser.error(f"two config files: {namespace.config} and {values}")
        namespace.config = values


class _SetItems(argparse.Action):
    """--set's items, added to those of earlier --sets. nargs="+" takes every argument up to the next flag, so
    in `--set a=b configs/base.toml` it takes the config path too: with no config given yet, the last item of a
    --set that is no SECTION.KEY=VALUE but a file, or named like one (.toml), is the config path."""

    def __call__(self, parser, namespace, values, option_string=None):
        items, last = list(values), values[-1]
        if namespace.config is None and "=" not in last and (last.endswith(".toml") or os.path.isfile(last)):
            namespace.config, items = last, items[:-1]
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), *items])


def config_from_args(args: argparse.Namespace, *more: str) -> Config:
    """Load the Config named by arguments that `add_config_arguments` parsed; `more` overrides come last.
    Errors name the flag a value came from (--set, --device, --seed)."""
    if args.config is None:
        raise UsageError("the following arguments are required: config (a TOML file or a shipped config's name, "
                         "e.g. base; see --help)")
    return _build(_read_layers(configs.locate(args.config)[0]), config_overrides(args, *more))


def config_overrides(args: argparse.Namespace, *more: str) -> list[tuple[str, str]]:
    """The overrides `args` stand for, each with the flag it came from: the --set items, then --device and
    --seed as the train.device and train.seed items they stand for, then `more` (the tool's own, as --set)."""
    flags = [(f"--{name}", f"train.{name}={value}")
             for name, value in (("device", args.device), ("seed", args.seed)) if value is not None]
    return [*[(OVERRIDE_SOURCE, item) for item in args.set], *flags, *[(OVERRIDE_SOURCE, item) for item in more]]


def _read_layers(path: str | os.PathLike[str], chain: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The TOML documents that make up the config file at `path`, each with its path, base first:
    those of the file it `extends` (if any), then its own. `chain`: the files that led here."""
    source = os.fspath(path)
    doc = _read_toml(path)
    base = doc.pop("extends", None)
    if base is None:
        return [(doc, source)]
    if not isinstance(base, str) or not base:
        raise UsageError(f"{source}: extends: expected the path of a config file, got {_show(base)} "
                         f"({type(base).__name__})")
    here = (*chain, os.path.realpath(path))
    if len(here) >= MAX_EXTENDS:
        raise UsageError(f"{source}: extends = {_show(base)}: a chain of more than {MAX_EXTENDS} config files")
    base_path = Path(path).parent / base
    if os.path.realpath(base_path) in here:
        raise UsageError(f"{source}: extends = {_show(base)} comes back to {base_path}: configs cannot extend "
                         "each other in a circle")
    try:
        return [*_read_layers(base_path, here), (doc, source)]
    except UsageError as e:
        if chain:  # the first file in the chain names the problem once
            raise
        raise UsageError(f"{source}: extends = {_show(base)}: {e}") from None


def extended_path(path: str | os.PathLike[str]) -> str | None:
    """What the config file at `path` `extends` (a path relative to it), None if it extends nothing."""
    base = _read_toml(path).get("extends")
    return base if isinstance(base, str) else None


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML document at `path`; UsageError if it is missing, unreadable or malformed."""
    source = os.fspath(path)
    raw = read_regular(path, MAX_CONFIG_BYTES, "config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{source}: invalid TOML: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return _parse_toml(text, source)


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # the message has the line and column
        raise UsageError(f"{source}: invalid TOML: {' '.join(str(e).split())}") from None


def _parse_override(item: str, source: str) -> tuple[str, str, Any]:
    """Split `section.key=value` into its parts, the value parsed as a TOML literal or kept as text."""
    name, eq, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (eq and dot and section) or "" in key.split("."):
        raise UsageError(f"{source} {item}: expected SECTION.KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return section, key, value


def _section(cfg: Config, section: str, source: str) -> Any:
    """The dataclass holding `cfg`'s [section]; UsageError if there is no such section."""
    names = [f.name for f in fields(cfg)]
    if section not in names:
        raise _unknown(source, "section", section, names, lambda s: f"[{s}]")
    return getattr(cfg, section)


def _assign(part: Any, section: str, key: str, value: Any, source: str, sources: dict[str, str]) -> None:
    """Set `part.<key>` (part is the [section] dataclass) to `value` if the key and type check out.

    A key naming a nested table ([optim.muon]) takes a table of its keys, or is dotted (`muon.lr`) to one.
    """
    types = get_type_hints(type(part))
    head, dot, rest = key.partition(".")
    if head not in types or (dot and not is_dataclass(types[head])):
        raise _unknown(source, "key", key, list(types), lambda k: f"{section}.{k}")
    name = f"{section}.{head}"
    if is_dataclass(types[head]):
        table = {rest: value} if dot else value
        if not isinstance(table, dict):
            raise UsageError(f"{source}: {name}: expected a [{name}] table, got {_show(value)} ({type(value).__name__})")
        for k, v in table.items():
            _assign(getattr(part, head), name, k, v, source, sources)
        return
    setattr(part, head, _coerce(value, types[head], f"{source}: {name}"))
    sources.pop(name, None)  # re-inserted: the dict's order is the order values were last set in
    sources[name] = source  # so later range and combination errors can name it


def _unknown(source: str, kind: str, name: str, known: list[str], show: Callable[[str], str]) -> UsageError:
    """The error for a misspelt section or key, suggesting the closest real one if any is close."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {show(close[0])}?" if close else ""
    return UsageError(f"{source}: unknown {kind} {show(name)}{hint}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as field type `tp`, or raise UsageError prefixed with `where`."""
    if get_origin(tp) is list and is_dataclass(get_args(tp)[0]):
        return _tables_of(value, get_args(tp)[0], where)
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        if any(type(value) is type(a) and value == a for a in allowed):
            return value
        expected = "one of " + ", ".join(map(_toml_value, allowed))
    else:
        accepts, convert, expected = _TYPES[tp]
        if accepts(value):
            return convert(value)
    raise UsageError(f"{where}: expected {expected}, got {_show(value)} ({type(value).__name__})")


def _tables_of(value: Any, cls: type, where: str) -> list:
    """`value`, a list of TOML tables ([[data.sources]]), as a list of `cls`, each key checked as its field's type."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{where}: expected a list of tables, got {_show(value)} ({type(value).__name__})")
    types = get_type_hints(cls)
    parts = []
    for i, table in enumerate(value):
        for key in table:
            if key not in types:
                raise _unknown(f"{where}[{i}]", "key", key, list(types), str)
        parts.append(cls(**{k: _coerce(v, types[k], f"{where}[{i}].{k}") for k, v in table.items()}))
    return parts


def _check_mixture(cfg: Config, sources: dict[str, str]) -> None:
    """UsageError for [[data.sources]] and [[data.mix]] tables that cannot make a mixture."""
    d, where = cfg.data, _blame(sources, "data.sources", "data.mix")

    def check_weights(name: str, weights: list[float]) -> None:  # name: "...{}..." with the index in {}
        for i, w in enumerate(weights):
            if w < 0:
                raise UsageError(f"{where}: {name.format(i)}: must be >= 0, got {_show(w)}")
        if not sum(weights) > 0:
            raise UsageError(f"{where}: {name.format('*')}: every weight is 0; give a source a weight above 0")

    if not d.sources:
        if d.mix:
            raise UsageError(f"{where}: data.mix changes the weights of [[data.sources]] tables, but there are none")
        return
    if d.dir or d.inputs:
        raise UsageError(f"{where}: data.sources names the prepared folders of a mixture; leave data.dir and "
                         "data.inputs unset (or give data.dir alone)")
    seen: dict[str, int] = {}
    named: dict[str, int] = {}
    for i, s in enumerate(d.sources):
        if s.name and not re.fullmatch(r"\S+", s.name):
            raise UsageError(f"{where}: data.sources[{i}].name = {_show(s.name)}: a name without spaces, as "
                             "metrics record it (val_loss.NAME)")
        if s.name in named:
            raise UsageError(f"{where}: data.sources[{i}].name = {_show(s.name)} is the name of "
                             f"data.sources[{named[s.name]}] too; give each source a name of its own")
        if s.name:
            named[s.name] = i
        if not s.dir:
            raise UsageError(f"{where}: data.sources[{i}].dir: expected a prepared folder, got \"\"")
        real = os.path.realpath(s.dir)
        if real in seen:
            raise UsageError(f"{where}: data.sources[{i}].dir = {_show(s.dir)} is the folder of "
                             f"data.sources[{seen[real]}] again; name each folder once, with its whole weight")
        seen[real] = i
    check_weights("data.sources[{}].weight", [s.weight for s in d.sources])
    last, max_steps = 0, cfg.train.max_steps
    if d.mix and not max_steps:  # a run on train.max_time alone: its last step is known only at its end
        raise UsageError(f"{where}: data.mix: changes need train.max_steps to be placed at their steps; a run on "
                         "train.max_time alone has none (give train.max_steps too)")
    for i, change in enumerate(d.mix):
        name = f"data.mix[{i}]"
        if (change.step > 0) == (change.fraction > 0) or change.step < 0 or not change.fraction < 1:
            raise UsageError(f"{where}: {name}: give step (>= 1) or fraction (in (0, 1)) of train.max_steps, one of "
                             f"them, got step = {change.step}, fraction = {_show(change.fraction)}")
        step = change.step or round(change.fraction * max_steps)
        placed = f"fraction {_show(change.fraction)} of train.max_steps = {max_steps} is step {step}"
        if step == 0:  # a fraction rounded down to the first step, where data.sources' weights hold
            raise UsageError(f"{where}: {name}: {placed}, the run's first, where the data.sources weights "
                             "apply; give a larger fraction or a step >= 1 (or these weights to data.sources)")
        if step >= max_steps:
            raise UsageError(f"{where}: {name}: the change at step {step} is past the run's last step "
                             f"(train.max_steps = {max_steps})")
        if step <= last:
            raise UsageError(f"{where}: {name}: at step {step}{f' ({placed})' if change.fraction else ''}, not "
                             f"after the change before it (step {last}); list the changes in the order of their "
                             "steps, far enough apart to fall on different steps")
        last = step
        if len(change.weights) != len(d.sources):
            raise UsageError(f"{where}: {name}.weights: {len(change.weights)} weights for {len(d.sources)} "
                             "[[data.sources]] tables; give one per source, in their order")
        check_weights(name + ".weights[{}]", change.weights)


def _validate(cfg: Config, sources: dict[str, str]) -> None:
    """Raise UsageError for the first value out of range, then for the first pair that disagrees."""
    for name, (ok, requirement) in _RANGES.items():
        value = _get(cfg, name)
        if not ok(value):
            raise UsageError(f"{_blame(sources, name)}: {name}: must be {requirement}, got {_show(value)}")
    for name, relation, other, is_broken, why in _CONFLICTS:
        if is_broken(cfg):
            raise UsageError(
                f"{_blame(sources, name, other)}: {name} = {_show(_get(cfg, name))} {relation} "
                f"{other} = {_show(_get(cfg, other))} ({why})"
            )
    _check_mixture(cfg, sources)


def _check_applicable(cfg: Config, sources: dict[str, str]) -> None:
    """UsageError for the first key given that does not apply to the setting it depends on (_APPLIES)."""
    for name in sources:
        rule = _applies(cfg, name)
        if rule is not None:
            setting, allowed = rule
            only = " or ".join(map(_toml_value, allowed))
            raise UsageError(f"{_blame(sources, name, setting)}: {name}: applies only with {setting} = {only}, "
                             f"not {_show(_get(cfg, setting))}")


def _applies(cfg: Config, name: str) -> tuple[str, tuple[str, ...]] | None:
    """None if key or table `name` applies to `cfg`, else the (setting, values) it needs."""
    for key, setting, allowed in _APPLIES:
        if (name == key or name.startswith(key + ".")) and _get(cfg, setting) not in allowed:
            return setting, allowed
    return None


def _get(cfg: Config, name: str) -> Any:
    """The value of "section.key" (or "section.table.key") in `cfg`."""
    value = cfg
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _blame(sources: dict[str, str], *names: str) -> str:
    """Where to send the user about a problem with `names`: the source that set one of them last (--set
    over files, a file over the base it extends: the most recent edit), else the defaults."""
    order = list(sources)
    given = [n for n in names if n in sources]
    return sources[max(given, key=order.index)] if given else "defaults"


def _toml_value(value: Any) -> str:
    """`value` as a TOML literal; covers the types config fields can hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has a "." or an exponent, so it reads back as a float
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string, except that TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if is_dataclass(value):  # a table of a list of tables, inline
        return "{" + ", ".join(f"{f.name} = {_toml_value(getattr(value, f.name))}" for f in fields(value)) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _show(value: Any) -> str:
    """`value` for an error message: as the user would write it in TOML where possible."""
    try:
        text = _toml_value(value)
    except TypeError:  # a table or a date where a plain value was expected
        text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"  # errors stay one short line
