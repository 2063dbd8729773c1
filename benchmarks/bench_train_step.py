"""A whole training step: fasttrain's Trainer against the same model built from stock PyTorch pieces.

GPU (skipped without one): the GPT-2-small config (124M) and the ~350M config at
T = 1024, bf16 autocast, compiled, one micro-batch of the config's batch size per
step. "fasttrain" is [kernels] auto, the measured dispatch table's choice
(fasttrain/compute/kernel_table.py); "kernels-on" forces every kernel on, so a kernel
the table leaves off is still measured in the whole step; "stock" has them all off, which
is the model built from stock pieces: torch.nn.RMSNorm with separate residual adds,
logits + F.cross_entropy, torch.optim.AdamW(fused=True) + clip_grad_norm_, with the
same torch.compile. Both run side by side in one session and record tokens/s, MFU
(PaLM's FLOPs per token at the GPU's peak bf16 rate) and peak memory.

CPU: the step configs/base.toml's 2-minute run trains on a 2-core CPU, 2 x 128 with its recipe
(Muon, the warmdown), 16 x 256 tokens: the README's "CPU step (2 x 128, fp32)". Trainer.step
against a plain PyTorch loop of the same model (forward, F.cross_entropy, backward, clip,
torch.optim.Muon and AdamW), each in fp32 and bf16 autocast, eager and compiled (the plain
loop's model under torch.compile), with its achieved GFLOP/s as a fraction of a 2048^3
matmul's rate in its dtype, measured in the same session (the CPU's practical roofline).
bf16 runs only on CPUs with native bf16 matmuls (emulated bf16 is many times slower than
fp32); the compiled cases only when timing (--benchmark-only), where their compile time
is recorded, outside the timing.

The tokens are random and already on the device: the data pipeline is timed in
bench_data.py. The first calls (compilation, autotuning) are warm-up, not timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import fasttrain_kernels._backend
from benchmarks.conftest import (
    DRY_RUN,
    FIXED_BASE,
    allocator_counts,
    counts_since,
    measure_matmul_rate,
    median_seconds,
    sizes,
    time_device,
)
from fasttrain.compute.device import PRECISIONS, autocast, native_bf16
from fasttrain.config import load_config
from fasttrain.model.ensemble import Ensemble
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import hidden_matrices
from fasttrain.training.metrics import peak_flops
from fasttrain.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KERNELS = {
    "fasttrain": [],  # [kernels] auto
    "kernels-on": ["kernels.linear_cross_entropy=true", "kernels.rms_norm=true", "kernels.adamw=true"],
    "stock": ["kernels.linear_cross_entropy=false", "kernels.rms_norm=false", "kernels.adamw=false"],
}
# Untimed steps before the timed ones. The first compiles; the 2026-11-22 H100 run, after 3, still had
# slow rounds at the start of the session's first case of each config (124M every kernel on: 82, 84, 81,
# 95, 123, then 77-81 ms; 350M: 192, then 99-111), while the stock cases timed after them in the same
# process stayed within 3 ms: more like a process still warming up (allocator growth, GPU clocks, first
# launches) than the kernels. round_ms and the allocator counts of the next run tell which.
WARMUP_STEPS = sizes(10, 2)  # a dry run: 2
GPU_CONFIGS = sizes(["gpt2-small.toml", "gpt-350m.toml"], ["base.toml"])
# A dry run: the base config's model shrunk further, eager fp32 on the CPU (see conftest.DRY_RUN).
GPU_SETTINGS = sizes(
    ["train.compile=true", 'train.precision="bf16"'],
    [
        "train.compile=false",
        'train.precision="fp32"',
        "model.n_layers=2",
        "model.d_model=64",
        "train.batch_size=4",
        "train.seq_len=64",
    ],
)


def random_batches(batch_size: int, seq_len: int, vocab_size: int, device: torch.device):
    """Endless (inputs, targets) of random tokens, made on the device."""
    while True:
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=device)
        yield tokens[:, :-1], tokens[:, 1:]


def make_trainer(config: Path, data_dir: Path, *overrides: str) -> Trainer:
    """The model and optimizer of the run config at `config` on the embedded corpus's tokenizer (the
    model keeps its own vocab size, which may be larger), one micro-batch per step, random tokens;
    nothing written outside `data_dir`."""
    cfg = load_config(
        config,
        [
            f'data.dir="{data_dir}"',
            'data.inputs=["builtin:pydoc"]',
            'data.tokenizer=""',
            "data.vocab_size=4096",
            f'train.out_dir="{data_dir / "run"}"',
            "train.tokens_per_update=0",
            "train.tensorboard=false",
            *(FIXED_BASE if Path(config).name == "base.toml" else ()),
            *overrides,
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    t, vocab_size = trainer.cfg.train, trainer.cfg.model.vocab_size  # the resolved config: vocab_size is known
    trainer.train_loader = random_batches(t.batch_size, t.seq_len, vocab_size, trainer.device)
    return trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-step")  # prepared once by the first trainer, reused after


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_gpu_train_step(benchmark, record, device, data_dir, config, impl):
    trainer = make_trainer(CONFIGS / config, data_dir, f"train.device={device.type}", *GPU_SETTINGS, *KERNELS[impl])
    # Host timing: the step syncs once inside (whether to update), after which the GPU waits for the host's
    # launches, so events could not leave the host out; a step costs its wall time
    before = allocator_counts(device)
    time_device(benchmark, device, trainer.step, rounds=10, events=False, warmup=WARMUP_STEPS)
    allocator = counts_since(before, device)  # warm-up included: a cudaMalloc retry there shows too
    if not DRY_RUN:
        torch.cuda.reset_peak_memory_stats()
        trainer.step()
    median, peak = median_seconds(benchmark), peak_flops(trainer.device)
    flops_per_step = trainer.model.flops_per_token(trainer.cfg.train.seq_len) * trainer.tokens_per_step
    mfu = median and peak and flops_per_step / median / peak
    # Each timed step in order: a spread from one slow round (a late compile, an allocator event) reads
    # differently from steady jitter (the 2026-11-22 H100 run: stdev 14 ms against stock's 0.8)
    stats = getattr(benchmark, "stats", None)
    round_ms = None if stats is None else [round(t * 1e3, 2) for t in stats.stats.data]
    record(
        per_call=trainer.tokens_per_step,
        impl=impl,
        config=config,
        params=trainer.model.num_params(),
        batch_size=trainer.cfg.train.batch_size,
        seq_len=trainer.cfg.train.seq_len,
        dtype=trainer.precision,
        kernels=trainer.kernels.names(),
        compiled=trainer.compiled,
        mfu=round(mfu, 4) if mfu else None,
        peak_memory_gib=None if DRY_RUN else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        round_ms=round_ms,
        allocator=allocator or None,
    )


# The README's CPU step: the shape configs/base.toml's 2-minute run trains on a 2-core CPU, with its recipe (Muon,
# the warmdown) over FIXED_BASE, which keeps 16 x 256 tokens a step. benchmarks/studies/cpu_step.py measures it
# too, and 3 x 192 and 4 x 256, each setting in a process of its own.
CPU_STEP = ("model.n_layers=2", "model.d_model=128", "model.n_heads=2", "optim.name=muon", "schedule.decay=wsd")


def plain_loop_step(trainer: Trainer, teacher: Ensemble | None = None):
    """One step of the loop everyone writes first, on a fresh copy of `trainer`'s model and its batches, in its
    precision and, where it compiles, with the model compiled: forward, F.cross_entropy, backward, clip, then
    torch.optim.Muon on the blocks' matrices (where `trainer` trains with Muon) and AdamW on the rest. With a
    `teacher`, the cross-entropy is against the mean of its members' softmaxes (distillation's soft targets)."""
    model = Transformer(trainer.cfg.model)
    o = trainer.cfg.optim
    matrices = hidden_matrices(model) if o.name == "muon" else []
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    optimizers = [torch.optim.AdamW(rest, lr=o.lr)] + ([torch.optim.Muon(matrices, lr=o.muon.lr)] if matrices else [])
    forward = torch.compile(model) if trainer.compiled else model
    batches = trainer.train_loader

    def step():
        x, y = next(batches)
        target = y.flatten()  # the next tokens, or the teacher's probabilities of them
        with autocast(trainer.precision, trainer.device):
            logits = forward(x)
            if teacher is not None:
                with torch.no_grad():
                    target = torch.stack([m(x).float().softmax(-1) for m in teacher.members]).mean(0).flatten(0, 1)
        F.cross_entropy(logits.flatten(0, 1).float(), target).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


# A distilled run's student on a small corpus (base.toml's shape there, 3 x 192), learning three members of its shape
STUDENT_STEP = ("model.n_layers=3", "model.d_model=192", "model.n_heads=3", "optim.name=muon", "schedule.decay=wsd")
TEACHER_MEMBERS = 3


@pytest.mark.parametrize("impl", ["fasttrain", "plain"])
def test_cpu_student_step(benchmark, record, data_dir, benchmark_disabled, monkeypatch, impl):
    """The step of a distilled run's student (train.distill, train.teacher): its own forward and backward, and the
    forward of a teacher of TEACHER_MEMBERS members whose mean probabilities it learns, in bf16 where the CPU has it;
    Trainer.step against the plain loop (`plain_loop_step` with the teacher). The teacher is initialised at random:
    the time does not depend on what it learned. `per_model_step`: the step over the same loop's without a teacher (the
    planning's 1 + TEACHER_MEMBERS x members.TEACHER_COST)."""
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)
    precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    trainer = make_trainer(
        CONFIGS / "base.toml", data_dir, *STUDENT_STEP, "train.device=cpu", f'train.precision="{precision}"'
    )
    alone = trainer.step if impl == "fasttrain" else plain_loop_step(trainer)
    one_model = None if benchmark_disabled else wall_median(alone, rounds=5)  # the same loop without a teacher
    teacher = Ensemble(replace(trainer.cfg.model, members=TEACHER_MEMBERS)).eval().requires_grad_(False)
    trainer.teacher = teacher  # what train.teacher loads, in memory: a run's teacher is frozen and eager as this one
    step = trainer.step if impl == "fasttrain" else plain_loop_step(trainer, teacher)
    benchmark.pedantic(step, warmup_rounds=1, rounds=5, iterations=1)
    median = median_seconds(benchmark)
    record(
        per_call=trainer.tokens_per_step,
        shape=f"{trainer.cfg.model.n_layers} x {trainer.cfg.model.d_model}",
        teacher_members=TEACHER_MEMBERS,
        dtype=precision,
        batch_size=trainer.cfg.train.batch_size,
        seq_len=trainer.cfg.train.seq_len,
        per_model_step=median and one_model and round(median / one_model, 2),
    )


def wall_median(step: Callable[[], None], rounds: int) -> float:
    """The median wall seconds of `rounds` calls of `step`, after one untimed."""
    step()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


@pytest.fixture(scope="module")
def benchmark_disabled(request) -> bool:
    """True in an untimed run (plain pytest, see conftest.pytest_configure)."""
    return request.config.getoption("benchmark_disable")


@pytest.fixture(scope="module")
def cpu_matmul_gflops(benchmark_disabled) -> dict[str, float]:
    """The CPU's 2048^3 matmul GFLOP/s per precision, measured once (nothing in an untimed run)."""
    if benchmark_disabled:
        return {}
    return {
        p: round(measure_matmul_rate(torch.device("cpu"), 2048, PRECISIONS[p] or torch.float32, repeats=5) / 1e9, 1)
        for p in ("fp32", "bf16")
        if p == "fp32" or native_bf16(torch.device("cpu"))
    }


@pytest.mark.parametrize("impl", ["fasttrain", "plain"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.compile)], ids=["eager", "compiled"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_train_step(
    benchmark, record, data_dir, cpu_matmul_gflops, benchmark_disabled, monkeypatch, precision, compiled, impl
):
    # What a CPU run uses: the PyTorch path. Under the test suite's TRITON_INTERPRET=1 the kernels would run in
    # Triton's interpreter, which measures nothing a user gets (and took 53 s of the suite's 2 cores in bf16).
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)
    if precision == "bf16" and not native_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 matmuls (AVX512-BF16 or AMX); emulated bf16 is slower than fp32")
    if compiled and benchmark_disabled:
        pytest.skip("compiling on CPU takes about a minute: runs only when timing (--benchmark-only)")
    trainer = make_trainer(
        CONFIGS / "base.toml",
        data_dir,
        *CPU_STEP,
        "train.device=cpu",
        f"train.compile={str(compiled).lower()}",
        f'train.precision="{precision}"',
    )
    step = trainer.step if impl == "fasttrain" else plain_loop_step(trainer)
    start = time.perf_counter()
    step()  # compiles, when compiled
    first_step_s = time.perf_counter() - start
    benchmark.pedantic(step, warmup_rounds=1, rounds=5, iterations=1)
    median, m = median_seconds(benchmark), trainer.cfg.model
    flops_per_step = trainer.model.flops_per_token(trainer.cfg.train.seq_len) * trainer.tokens_per_step
    gflops = median and flops_per_step / median / 1e9
    matmul = cpu_matmul_gflops.get(precision)
    record(
        per_call=trainer.tokens_per_step,
        config="base.toml",
        shape=f"{m.n_layers} x {m.d_model}",
        optimizer=trainer.cfg.optim.name,
        params=trainer.model.num_params(),
        batch_size=trainer.cfg.train.batch_size,
        seq_len=trainer.cfg.train.seq_len,
        dtype=precision,
        compiled=compiled,
        first_step_s=round(first_step_s, 2),
        gflops=gflops and round(gflops, 1),
        matmul_gflops=cpu_matmul_gflops,
        fraction_of_matmul=gflops and matmul and round(gflops / matmul, 3),
    )
