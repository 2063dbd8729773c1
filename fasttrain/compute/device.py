"""Where and how a run computes: the device, mixed precision, the Triton kernels switched on, and seeding.

Imports from fasttrain: compute.kernel_table, config, system.errors.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal

import numpy as np
import torch

import fasttrain_kernels._backend
from fasttrain.compute.kernel_table import OPS, load_table, lookup
from fasttrain.config import KernelsConfig, TrainConfig
from fasttrain.system.errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`name` ("auto", "cpu", "cuda", "cuda:N") as a torch.device; UsageError if it is not there. `local_rank`: this
    process's index on its machine under torchrun, which picks its GPU when `name` is "auto" or "cuda"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested, but CUDA is not available on this machine (use cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"device {name!r} requested, but this machine has {count} CUDA device(s)")
        if device.index is None:  # "cuda" means the current device; torch.cuda.set_device needs its index
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# train.compile = "auto" compiles on CPU only for runs this long: compiling the base model takes
# ~1 minute on 2 cores and saves a fraction of a ~0.6 s step, so short runs would not earn it back.
CPU_COMPILE_MIN_STEPS = 2000


# oneDNN's ONEDNN_MAX_CPU_ISA values from which its matmuls take bf16 in hardware (AVX512-BF16, AMX, AVX10);
# below them (SSE41 to AVX512_CORE_VNNI) it emulates bf16 through fp32, whatever the CPU has.
_ONEDNN_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware (elsewhere oneDNN emulates it, slower than fp32): CUDA, or a CPU
    with AVX512-BF16 or AMX not capped below them (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return hardware and _isa_caps_allow_bf16()


def _isa_caps_allow_bf16() -> bool:
    """False where ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA caps this process below bf16 hardware."""
    onednn = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2") and onednn.startswith(_ONEDNN_BF16_ISAS)


# A CPU's bf16 matmuls must run this much faster than its fp32 ones for "auto" to trade fp32's accuracy for them.
# Native bf16 is not always faster: on the 2-core AVX-512 BF16 EPYC (Zen 4) the bf16 step ran 1.53x the fp32 one,
# on a 2-core AVX-512 BF16 Xeon without AMX 0.64-0.72x (oneDNN's bf16 matmuls at about half MKL's fp32 rate).
BF16_MIN_SPEEDUP = 1.2
# The matmul timed (rows, inner, outer): a 4096-token step through a 256-wide block's MLP, a CPU budget's shapes.
BF16_PROBE = (4096, 256, 1024)


@functools.cache
def cpu_bf16_speedup() -> float:
    """This CPU's BF16_PROBE matmul in fp32 over its time in bf16 (above 1: bf16 is faster), each the best of three
    timings of two products, interleaved; measured once a process (~0.1 s)."""
    m, k, n = BF16_PROBE
    a, b = torch.randn(m, k), torch.randn(k, n)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    for x, y in pairs.values():  # untimed: oneDNN builds its kernel on the first call
        x @ y
    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(3):
        for dtype, (x, y) in pairs.items():
            start = time.perf_counter()
            x @ y, x @ y
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def bf16_pays(device: torch.device) -> bool:
    """Whether a run on `device` is better off in bf16 autocast: CUDA, or a CPU with native bf16 matmuls (`native_bf16`)
    that run at least BF16_MIN_SPEEDUP x its fp32 ones (`cpu_bf16_speedup`)."""
    return native_bf16(device) and (device.type == "cuda" or cpu_bf16_speedup() >= BF16_MIN_SPEEDUP)


def resolve_precision(
    precision: Literal["auto", "fp32", "bf16", "fp16"], device: torch.device, recorded: str = ""
) -> tuple[Literal["fp32", "bf16", "fp16"], str]:
    """The precision a run uses, and why where that is not plain: "auto" is bf16 where it pays on the device
    (`bf16_pays`), else fp32, with a note where a CPU with native bf16 timed it too slow to pay; a resumed run's "auto"
    keeps the precision it `recorded` ("fp32", or "bf16" where the device has it natively), so that a timing on a
    busier machine does not change it part way. fp16 needs CUDA."""
    if precision == "auto":
        if recorded == "fp32":
            return "fp32", ""
        if recorded == "bf16" and native_bf16(device):
            return "bf16", ""
        if bf16_pays(device):
            return "bf16", ""
        if device.type != "cpu" or not native_bf16(device):
            return "fp32", ""
        return "fp32", (
            f"train.precision = auto: fp32, as this CPU's bf16 matmuls ran {cpu_bf16_speedup():.2f}x its fp32 ones' "
            f"speed (bf16 needs {BF16_MIN_SPEEDUP:g}x)"
        )
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(f'train.precision = "fp16" needs a CUDA device, not {device.type} (use bf16 or fp32)')
    return precision, ""


def resolve_compile(setting: Literal["auto", True, False], device: torch.device, max_steps: int) -> bool:
    """train.compile resolved: "auto" is on CUDA, and on CPU for runs of CPU_COMPILE_MIN_STEPS or more."""
    if setting == "auto":
        return device.type == "cuda" or (device.type == "cpu" and max_steps >= CPU_COMPILE_MIN_STEPS)
    return setting


def resolve_train(t: TrainConfig, device: torch.device, recorded_precision: str = "") -> tuple[TrainConfig, str]:
    """`t` with its "auto" precision and compile settings replaced by what they resolve to on `device` (a resumed
    run's precision: the one it recorded), as a run's config.toml records them, and `resolve_precision`'s note."""
    precision, note = resolve_precision(t.precision, device, recorded_precision)
    return replace(t, precision=precision, compile=resolve_compile(t.compile, device, t.max_steps)), note


@dataclass(frozen=True)
class Kernels:
    """Which of the Triton kernels (kernels/, see KernelsConfig) a run uses."""

    linear_cross_entropy: bool = False
    rms_norm: bool = False
    adamw: bool = False
    reasons: tuple[str, ...] = field(default=(), compare=False)  # why each op (OPS order) is on or off, for the plan

    def names(self) -> list[str]:
        """The kernels switched on, by name, as a run's start event and line list them."""
        return [op for op in OPS if getattr(self, op)]


def check_kernels(cfg: KernelsConfig, sharded: bool, fp8: str, softcap: float) -> None:
    """UsageError for a kernel set true that cannot run with the rest of the run (see kernels_on)."""
    if sharded and cfg.adamw is True:
        raise UsageError(
            'kernels.adamw = true does not work with train.parallel = "fsdp" yet; set it to "auto" or false'
        )
    if fp8 in ("head", "all") and cfg.linear_cross_entropy is True:
        raise UsageError(
            f'kernels.linear_cross_entropy = true does not work with train.fp8 = "{fp8}": the fused '
            'loss never runs the head\'s matmul; set it to "auto" or false'
        )
    if softcap and cfg.linear_cross_entropy is True:
        raise UsageError(
            f"kernels.linear_cross_entropy = true does not work with model.logit_softcap = {softcap:g}: the fused "
            'loss never holds the logits to cap them; set it to "auto" or false'
        )


def kernels_on(
    cfg: KernelsConfig,
    device: torch.device,
    sharded: bool = False,
    shapes: dict[str, dict[str, int]] | None = None,
    compiled: bool = False,
    capability: str | None = None,
    table: list[dict] | None = None,
    fp8: str = "none",
    softcap: float = 0.0,
    optimizer: str = "adamw",
) -> Kernels:
    """[kernels] resolved for `device`: true and false as they are; "auto" on a GPU is the measured dispatch table's
    verdict (compute/kernel_table.py, or `table`'s entries) for the run's `shapes` (rms_norm {"hidden"},
    linear_cross_entropy {"hidden", "vocab"}, adamw {"params"}), in its mode (`compiled` or eager) on a GPU of its
    `capability` (default: the device's). The AdamW kernel takes whole tensors, so `sharded` turns "auto" off and
    refuses true. On a CPU "auto" is off except the linear cross-entropy (not under TRITON_INTERPRET=1): its PyTorch
    path makes one pass over row blocks in cache where F.cross_entropy streams the logits several times, and measured
    faster at a budget's shapes (docs/performance.md). An FP8 head (`fp8`) and a logit soft-cap (`softcap`) need the
    logits, so each turns its "auto" off and refuses true. An `optimizer` (optim.name) that takes no AdamW step (SGD,
    Adafactor) has the AdamW kernel off whatever kernels.adamw says: nothing would run it."""
    check_kernels(cfg, sharded, fp8, softcap)
    fp8_head = fp8 in ("head", "all")
    measured = {}
    if device.type == "cuda":
        if capability is None:
            capability = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
        entries = load_table() if table is None else table
        mode = "compiled" if compiled else "eager"
        measured = {op: lookup(entries, capability, op, mode, shape) for op, shape in (shapes or {}).items()}
    on, reasons = {}, []
    for op in OPS:
        setting = getattr(cfg, op)
        if op == "adamw" and optimizer not in ("adamw", "muon"):  # Muon leaves embeddings, head and norms to AdamW
            on[op] = False
            reasons.append(f"{op}: off, optim.name = {optimizer} takes no AdamW step")
            continue
        if setting is True or setting is False:  # as set (the combinations that cannot run were refused above)
            on[op] = setting
            reasons.append(f"{op}: {'on' if setting else 'off'}, kernels.{op} = {str(setting).lower()}")
            continue
        if op == "adamw" and sharded:
            on[op], why = False, "off: the AdamW kernel takes whole tensors, not FSDP's shards"
        elif op == "linear_cross_entropy" and fp8_head:
            on[op], why = False, "off: an FP8 head needs the logits"
        elif op == "linear_cross_entropy" and softcap:
            on[op], why = False, "off: model.logit_softcap needs the logits"
        elif device.type == "cuda":
            m = measured.get(op)
            on[op] = m is not None and m.use
            if m is None:
                why = "off: not measured at this shape and mode on this GPU (the dispatch table's)"
            else:
                if m.use:
                    why = "on: measured faster than stock here"
                elif m.fasttrain_ms < m.stock_ms:
                    why = "off: no faster than stock here beyond the table's margin"
                else:
                    why = "off: measured slower than stock here"
                why += f" ({m.fasttrain_ms:.4g} against {m.stock_ms:.4g} ms, {m.stock})"
        elif op == "linear_cross_entropy":  # the PyTorch path, which needs no triton
            on[op] = not fasttrain_kernels._backend.INTERPRETING
            if on[op]:
                why = "on: its PyTorch path makes the loss and its gradient in one pass, in cache"
            else:
                why = "off: TRITON_INTERPRET=1 would run it through Triton's interpreter"
        else:
            on[op], why = False, f"off on the {device.type}"
        reasons.append(f"{op}: auto, {why}")
    return Kernels(**on, reasons=tuple(reasons))


def check_attention(attention: str, device: torch.device) -> None:
    """UsageError naming train.attention where it cannot run on `device`'s kind at all."""
    if device.type != "cuda" and attention not in ("auto", "math"):
        raise UsageError(f'train.attention = "{attention}" needs a CUDA GPU (on a {device.type}: "auto" or "math")')


def use_attention(attention: str, device: torch.device) -> None:
    """Check that train.attention can run on `device`, and activate FlashAttention-3 for "fa3" (a
    process-wide switch of SDPA's flash backend). UsageError naming the key otherwise."""
    check_attention(attention, device)
    if attention == "fa3":
        activate = getattr(torch.nn.attention, "activate_flash_attention_impl", None)
        if activate is None:
            raise UsageError(
                f'train.attention = "fa3": torch {torch.__version__} cannot switch SDPA to FlashAttention-3'
            )
        try:
            activate("FA3")
        except Exception as e:  # whatever the provider raises (not installed, not this GPU): one line
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f'train.attention = "fa3": FlashAttention-3 is not available ({reason})') from None


def check_fp8(fp8: str, device: torch.device) -> None:
    """UsageError naming train.fp8 where `device` cannot run float8 matmuls: a GPU needs FP8 tensor cores
    (sm_89 or newer); a CPU needs a torch whose _scaled_mm runs there (tried once, on a 16 x 16 matmul)."""
    if fp8 == "none":
        return
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise UsageError(
                f'train.fp8 = "{fp8}" needs FP8 tensor cores (sm_89 or newer); this GPU is sm_{major}{minor}'
            )
    elif not _cpu_scaled_mm():
        raise UsageError(f'train.fp8 = "{fp8}": torch {torch.__version__} has no float8 matmul on the {device.type}')


@functools.cache
def _cpu_scaled_mm() -> bool:
    """Whether this torch multiplies float8 matrices on the CPU; a bf16 matmul first, since under an ISA cap oneDNN
    refuses float8 once a bf16 one has run, and the answer must not depend on that."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    try:
        torch.ones(16, 16, dtype=torch.bfloat16) @ torch.ones(16, 16, dtype=torch.bfloat16)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def compile_options(mode: str, coordinate_descent_tuning: bool) -> dict:
    """torch.compile's inductor options for train.compile_mode, with coordinate-descent tuning added when
    asked (torch.compile takes a mode or options, not both, so the mode is spelled out as its options)."""
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode))
    if coordinate_descent_tuning:
        options["coordinate_descent_tuning"] = True
    return options


# The folders under inductor's default cache that key_inductor_cache gives each instruction set.
ISA_CACHE_PREFIX = "fasttrain-isa-"


def key_inductor_cache(device: torch.device) -> str | None:
    """Give a run that compiles on a CPU `device` an inductor cache of its instruction set's own
    (TORCHINDUCTOR_CACHE_DIR, a folder under inductor's default named for ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA):
    inductor's cache key holds neither, and code compiled under one level fails under another (torch 2.13). A folder the
    user chose is kept (not inductor's default, nor another level's inherited from a parent). Returns the folder set, or
    None."""
    if device.type != "cpu":
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = default_cache_dir()
    chosen = os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or base)
    ours = chosen == base or (os.path.dirname(chosen) == base and os.path.basename(chosen).startswith(ISA_CACHE_PREFIX))
    if not ours:
        return None
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip() or "ALL"
    level = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{torch.backends.cpu.get_cpu_capability()}-{onednn}".upper())
    folder = os.path.join(base, ISA_CACHE_PREFIX + level)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def compile_failure(error: Exception) -> str | None:
    """A failure to compile the objective (inductor's C++ compiler missing or failing, a backend error) in a few words
    instead of torch's screens of traceback; None for any other error."""
    # imported here: dynamo takes seconds to import, and a run that compiles has it already (InductorError is one)
    from torch._dynamo.exc import BackendCompilerFailed

    if not isinstance(error, BackendCompilerFailed):
        return None
    inner = error.inner_exception
    said = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    return f"torch.compile could not compile the model ({type(inner).__name__}: {said[:200]})"


@contextlib.contextmanager
def compile_failures() -> Iterator[None]:
    """A compile failure the run cannot step around (Trainer.step goes on uncompiled after one at its first
    step; a later recompile's, an evaluation's) as one UsageError line."""
    try:
        yield
    except Exception as e:
        failure = compile_failure(e)
        if failure is None:
            raise
        raise UsageError(f"{failure}; --set train.compile=false trains without compiling") from None


def uncompiled(eager: bool) -> contextlib.AbstractContextManager:
    """Where compiled code runs as plain PyTorch if `eager` (torch.compile's "force_eager" stance), else as it is."""
    return torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` (nothing for fp32): matmuls in half precision, reductions in fp32."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def use_device(name: str, local_rank: int | None = None) -> torch.device:
    """`resolve_device(name, local_rank)`, made this process's current CUDA device if it is one, with
    fp32 matmuls and convolutions on TF32 tensor cores (a 10-bit mantissa, plenty for training)."""
    device = resolve_device(name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU, which runs it as it is called): before reading a
    clock around GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch.manual_seed covers every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
