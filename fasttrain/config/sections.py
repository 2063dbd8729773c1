"""The typed sections of a run's config: one dataclass per TOML table ([model], [data], ...), each field
with its default and what it means, and `Config`, the whole run, one attribute per section.

Imports from fasttrain: config.values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fasttrain.config.values import Seconds


@dataclass
class ModelConfig:
    """[model]: the transformer's shape (LLaMA-style; see fasttrain/model/transformer.py)."""

    vocab_size: int = 0  # embedding rows; 0 = take it from the prepared data's tokenizer
    max_seq_len: int = 256  # longest context the model supports
    d_model: int = 256  # width of the residual stream; 0 = 64 x n_layers
    # Transformer blocks. 0 = chosen for the run's compute (its time budget or steps, the machine's speed, the
    # corpus's size) from a ladder of depth d, width 64 d, heads of 64 (planning/sizing.py); the plan says why.
    n_layers: int = 4
    n_heads: int = 4  # query heads per block; must divide d_model; 0 = d_model / 64
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads; must divide n_heads
    # The MLP: "swiglu" is Llama's down(silu(gate(x)) * up(x)); "relu2" is down(relu(up(x))^2), one matmul
    # fewer per width (modded-nanogpt's and nanochat's). A Hugging Face Llama cannot express relu2.
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    ffn_hidden: int = 0  # MLP hidden width; 0 = 8/3 x d_model (swiglu) or 4 x d_model (relu2), up to multiple_of
    multiple_of: int = 64  # round the default MLP hidden width up to a multiple of this (matmul-friendly)
    # RMS-normalise each head's queries and keys (no weights) before attention, which bounds the attention
    # logits whatever the learning rate does to the q and k weights. A Hugging Face Llama cannot express it.
    qk_norm: bool = False
    # RMS-normalise the token embedding (no weights) before the first block, so the stream starts at unit scale
    # whatever the embedding's learning rate does to it (nanochat's). A Hugging Face Llama cannot express it.
    embedding_norm: bool = False
    # Start each block's output projections (attention's out, the MLP's down) at zero: every block begins as the
    # identity and the model as embedding -> head (modded-nanogpt's and nanochat's init). Init only: Llama-shaped.
    zero_init_projections: bool = False
    # Soft-cap the logits at this value, cap x tanh(logits / cap): a bound on how sure the model can be, which
    # keeps early training from pushing a few logits far out (nanochat's 15). 0 = off. A Llama cannot express it,
    # and the fused linear cross-entropy never holds the logits to cap them (kernels.linear_cross_entropy off).
    logit_softcap: float = 0.0
    # Value embeddings (nanochat's, after ResFormer): alternate blocks, the last included, add a per-token table of
    # their own to attention's values, through a gate per key/value head, 3 sigmoid(a map of the block input's
    # first 12 channels). Lookups: parameters almost free of compute. A Hugging Face Llama cannot express it.
    value_embeddings: bool = False
    # Learned scalars per block (nanochat's): block i reads r_i x stream + s_i x x0, x0 the (normalised) token
    # embedding, r_i from 1.15 down to 1.05 and s_i from 0.2 down to 0.05 across depth at init: every block sees
    # the tokens themselves, not only what earlier blocks made of them. A Hugging Face Llama cannot express it.
    residual_scalars: bool = False
    # Smear (nanochat's): each position adds a learned, gated share of the previous token's embedding,
    # lambda sigmoid(a map of its own first 24 channels) x x[t-1], lambda from 0: cheap bigram information.
    smear: bool = False
    # Backout (nanochat's): the stream after the middle block, times a learned lambda (from 0.2), is taken off the
    # last block's before the final norm: the low-level features the head does not need. Under 3 blocks, a no-op.
    backout: bool = False
    rope_theta: float = 10000.0  # RoPE base: larger stretches the rotary wavelengths for longer contexts
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output projection shares the token-embedding matrix
    dropout: float = 0.0  # on attention weights and residual branches during training
    # Models of this shape trained side by side on the same batches, each from its own initialization, and scored
    # as one: the mean of their probabilities (model/ensemble.py). 0 = 1, or with model.n_layers = 0 under a time
    # budget as many as the budget trains to the corpus's epoch limit (at most 8), where one model reaches it early.
    members: int = 1
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

    # Prepared shards (train_*.bin, val_*.bin, meta.json, tokenizer.json). "" = prepare `inputs` into a cache directory
    # keyed by these settings, reused on the next run. A folder already prepared (`fasttrain prepare --out DIR`) is the
    # data by itself: the keys below left at their defaults take its values; one set otherwise must agree with it.
    dir: str = ""
    # What prepare reads when `dir` holds no prepared data: paths, globs, directories,
    # JSONL or Parquet files, or the embedded corpora builtin:pydoc / docstrings / sources.
    # [] = the prepared folder's inputs, or DEFAULT_INPUTS when there is none.
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
    # The most times a run reads any source over: the shape chosen for a budget (model.n_layers = 0) reads none more
    # and stops there (planning/sizing.py); another run that would read one more is warned as it starts.
    max_epochs: float = 10.0


DEFAULT_INPUTS = ("builtin:pydoc", "builtin:sources")  # what [data] prepares when it names no inputs or folder
DEFAULT_VOCAB = 4096  # the BPE prepare trains when [data] gives no vocab_size


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
    # "newton_schulz": torch.optim.Muon's quintic, the same (a, b, c) every step; "polar_express": a tuned (a, b, c)
    # for each step (Amsel et al. 2025, as nanochat), nearer orthogonal in as many steps
    orthogonalisation: Literal["newton_schulz", "polar_express"] = "newton_schulz"
    # NorMuon (nanochat: 0.9): > 0 evens the orthogonalised step's size across neurons (rows, or a wide matrix's
    # columns) by a running mean of each one's square, decaying by this; 0 = off
    second_moment_beta2: float = 0.0
    cautious_weight_decay: bool = False  # decay only the weights the step moves toward 0 as well (nanochat)


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
    """[optim]: the optimizer and gradient clipping (fasttrain/optimization/optimizers.py).

    beta1, beta2 and eps are AdamW's: they apply to "adamw" and to the AdamW half of "muon".
    Each other optimizer has its own table, which may only be set when it is the one named.
    """

    name: Literal["adamw", "muon", "sgd", "adafactor"] = "adamw"
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.1  # weight decay (decoupled, except SGD's), applied to weight matrices only
    decay_embeddings: bool = False  # also decay the token embedding (norm gains and biases never are)
    # "repeats": a run that reads a corpus more than REPEATS_FREE times, whose validation text is not its training
    # text over again, trains at a weight decay raised for its epochs, up to max_weight_decay (the plan says which
    # and why: fasttrain/planning/repeats.py); "fixed": weight_decay as set.
    weight_decay_rule: Literal["fixed", "repeats"] = "fixed"
    max_weight_decay: float = 6.4  # the rule's ceiling, reached at ~32 epochs (Kim et al. 2025: ~30x the usual 0.1)
    # Written by a run, not set: the decay the "repeats" rule chose for it (0: none chosen), which its resume and
    # replay train at. weight_decay stays what was set, so a new run started from the run's config.toml chooses
    # afresh for its own length rather than taking the chosen value as set (issue 91).
    weight_decay_chosen: float = 0.0
    # Peak learning rates of their own, each following the same schedule (0 = optim.lr): the lookup tables (the
    # token embedding, with a tied head the shared matrix, and any value embeddings), whose rows are updated only
    # when their token appears, and an untied output head. nanochat trains its embedding at ~40x its head's rate.
    embedding_lr: float = 0.0
    head_lr: float = 0.0  # with model.tie_embeddings = true, nothing (the plan says so)
    # The width at which head_lr is the untied head's rate: at another d_model the head trains at head_lr x
    # (head_lr_width / d_model) ** HEAD_LR_POWER, as fast as its best rate was measured to fall with the width, and
    # at the nearest measured width's rate beyond those (optimization/optimizers.py, head_rate). base.toml: 192,
    # where 0.004 was best. 0 = head_lr at every width.
    head_lr_width: int = 0
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator guard
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    muon: MuonConfig = field(default_factory=MuonConfig)
    sgd: SGDConfig = field(default_factory=SGDConfig)
    adafactor: AdafactorConfig = field(default_factory=AdafactorConfig)

    def decay(self) -> float:
        """The weight decay the run trains at: the one the rule chose, where it chose one, else weight_decay."""
        return (
            self.weight_decay_chosen
            if self.weight_decay_rule == "repeats" and self.weight_decay_chosen
            else self.weight_decay
        )


@dataclass
class ScheduleConfig:
    """[schedule]: the learning rate as a function of the step (fasttrain/optimization/schedule.py)."""

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
    # compiling, evaluating, checkpointing or sampling (fasttrain/optimization/schedule.py, docs/training.md).
    max_time: Seconds = Seconds(0.0)
    seed: int = 1337  # seeds Python, NumPy, torch (model init) and data sampling; 0 to 2**32 - 1
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda" or "cuda:N"
    out_dir: str = "runs/base"  # where checkpoints, metrics, samples and the resolved config.toml go
    batch_size: int = 16  # sequences per micro-batch, per process (with seq_len = 0: of 256 tokens)
    # Tokens per training sequence. 0: chosen for the run's planned tokens, 256 below ~7M and 512 from there
    # (if model.max_seq_len allows; packed rows only), batch_size then rows of 256 tokens, and the run's
    # model.max_seq_len the context chosen (planning/sequence_length.py); under max_time alone batch_size is
    # then grown up to 4x where the planned tokens leave enough updates (planning/batch_size.py).
    seq_len: int = 256
    # Tokens per optimizer step; it sets gradient accumulation = tokens_per_update /
    # (batch_size x seq_len x world size). 0 = one micro-batch per step.
    tokens_per_update: int = 0
    # Autocast precision. auto: bf16 on CUDA and on CPUs whose native bf16 matmuls (AVX512-BF16 or AMX)
    # were timed at least 1.2x their fp32 ones, fp32 elsewhere. See compute/device.py, resolve_precision.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile the objective. auto: always on CUDA; on CPU only for runs of at least
    # compute.device.CPU_COMPILE_MIN_STEPS steps, long enough to earn back the compile time.
    compile: Literal["auto", True, False] = "auto"
    # torch.compile's mode: "default"; "max-autotune" (benchmarks matmul and kernel configs while compiling: slower to
    # start, helps long GPU runs; with CUDA graphs) or "max-autotune-no-cudagraphs"; "reduce-overhead" (CUDA graphs:
    # cuts launch overhead of small models on GPU; needs static shapes, so data.padding = "fixed"; no effect on CPU).
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
    # shard_group_size ranks, the groups replicas of each other; see compute/distributed.py).
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    shard_group_size: int = 0  # hsdp only: ranks per shard group, a divisor of the world; 0 = the node's processes
    log_interval: int = 10  # report training metrics every this many steps
    eval_interval: int = 250  # validate (and sample) every this many steps, and at the end
    eval_steps: int = 20  # validation reads the val split's first eval_steps x batch_size rows, in any world
    # Score final/ on the whole val split as the run ends, its closing figure (what `fasttrain evaluate RUN --split val`
    # gives): "auto" where the last evaluation's speed says that costs at most a tenth of the training time or 2
    # minutes (training/run_loop.py, score_final), true always, false never (the run prints that command instead).
    final_eval: Literal["auto", True, False] = "auto"
    # Stop once this many evaluations in a row have not lowered the best validation loss by at
    # least early_stop_min_delta (a final checkpoint is saved, the best one kept); 0 = never.
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    # The validation loss `best` checkpoints and early stopping follow: "val_loss", a mixture's total weighted as
    # data.sources, or "val_loss.NAME", one source's (NAME: its folder's name, as metrics.jsonl records it).
    monitor: str = "val_loss"
    # Distillation: a fasttrain model (a weights directory such as another run's final/, an ensemble's included, or a
    # run directory; several, separated by os.pathsep as in PATH, are one ensemble of all their members) whose probabilities over each batch's next tokens the model learns, not only the tokens
    # themselves: the loss is teacher_weight x the cross-entropy against them + the rest x the next-token loss
    # (optimization/objective.py). Its tokenizer must be the data's. "" = none.
    teacher: str = ""
    teacher_weight: float = 1.0  # 1: the soft targets alone, measured a little better than 0.5 (docs/performance.md)
    # A new run with a teacher (train.teacher, or train.distill's student) starts from the teacher's weights (an
    # ensemble's first member's): each of the model's tensors is the teacher's of that name, which must have its shape
    # (the teacher may hold more, such as value embeddings). Without a teacher it does nothing (the plan records false).
    teacher_init: bool = False
    # An ensemble (model.members above 1, set or chosen) ends distilled into one model of a member's shape: the members
    # train first into out_dir/ensemble/, then one model learns their probabilities (as train.teacher) into out_dir,
    # whose final/ holds it: one model's memory and cost, and it exports. Under train.max_time the plan splits the
    # budget between them, and each round's end decides the next (fasttrain/training/phases.py).
    distill: bool = False
    sample_prompt: str = "The"  # the samples' prompt (<= 65,536 chars); no trailing space: BPE words carry theirs
    sample_tokens: int = 64  # tokens generated per sample; 0 = no samples
    tensorboard: bool = True  # also write TensorBoard event files when tensorboard is installed


@dataclass
class CheckpointConfig:
    """[checkpoint]: how often to save and how many saves to keep."""

    interval: int = 500  # save every this many steps (and at the end)
    keep_last: int = 2  # the newest this many saves are kept, older ones deleted (the best is kept too)
    keep_best: bool = True  # save whenever validation loss reaches a new low, and keep the lowest
    # What final/ holds at the end: the last step's weights, or "best": the best save's (keep_best) where its
    # validation loss is below the last evaluation's, as a small corpus read many times gets worse with more
    # training (nanoGPT keeps only such saves). The checkpoints, and a resume, go on from the last step either way.
    final_weights: Literal["last", "best"] = "last"
    # final/'s output layer scaled by the factor (1 / a temperature) that gives its weights the lowest validation loss,
    # fitted in up to three evaluations of the eval rows after the last: a model that read a small corpus several times
    # is overconfident on new text (training/calibration.py). The checkpoints keep the weights as trained.
    fit_temperature: bool = False
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
    """[kernels]: which of the Triton kernels (fasttrain_kernels/) the model uses. "auto" on a GPU: where the measured
    dispatch table (fasttrain/compute/kernel_table.py) says the kernel beat stock at the run's shapes and mode;
    on a CPU: off, but for the linear cross-entropy."""

    # The loss straight from the final hidden states and the output weight, chunk by chunk,
    # never holding the (tokens x vocab) logits (fasttrain_kernels/linear_cross_entropy.py). On a CPU "auto" is
    # on, fp32 or bf16: its PyTorch path makes the loss and the logits' gradient in one pass, in cache.
    linear_cross_entropy: Literal["auto", True, False] = "auto"
    # Every RMSNorm, with the residual add before it, in one kernel (fasttrain_kernels/rms_norm.py).
    rms_norm: Literal["auto", True, False] = "auto"
    # kernels.FusedAdamW instead of torch's fused AdamW, with the gradient clipping folded into its
    # step (fasttrain_kernels/adamw.py): the clip costs one norm pass over the gradients, no scaling pass.
    adamw: Literal["auto", True, False] = "auto"


@dataclass
class LogConfig:
    """[log]: where metrics go besides metrics.jsonl and the console."""

    # Also log to Weights & Biases (the `wandb` extra): every metrics.jsonl event, the resolved config and the samples;
    # a resumed run continues the same W&B run. WANDB_MODE=offline keeps it on disk (wandb sync uploads it later).
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
