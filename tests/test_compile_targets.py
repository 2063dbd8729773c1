"""Every Triton kernel variant the launchers choose compiles for A100 (sm_80) and H100 (sm_90), without a GPU.

The compile runs `python -m fasttrain_kernels.inspect` in a subprocess without TRITON_INTERPRET
(conftest sets it for the kernel tests, and under it triton.jit builds interpreter
objects that cannot be compiled for a GPU). The rest checks that the list of variants
is what the launchers really launch. Both need triton (its compiler, and the Triton path the launches take):
without it (the base install leaves it out; the test extra brings it) this file skips.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import fasttrain_kernels._backend
from fasttrain_kernels._specialization import Specialization, divisible_by_16, triton_type
from fasttrain_kernels.inspect import MODULES, TARGETS, _ptxas_report, all_specializations, widest

ROOT = Path(__file__).resolve().parents[1]

# Spills accepted, and why: (kernel, BLOCK) -> the most bytes a thread may spill, on either target.
ACCEPTED_SPILLS = {
    # The GPU image's 3.6 compiles every variant, the newest the widest of each
    # (test_every_variant_compiles_with_the_gpu_images_triton and
    # test_the_widest_variants_compile_with_the_installed_triton, second tier).
    # Hidden sizes 8193..16384. A 512-thread program may use 128 registers a thread, and the backward keeps
    # its 16384-wide weight row (and dweight partial) in registers across all its rows, besides the row's h,
    # dy (and dh): 4 or 5 x 32 values a thread. ptxas spills 4-152 bytes a thread (Triton 3.6 and 3.9), at
    # most 78 KB a program, one program per SM, so they can stay in L1, while each row moves 130-260 KB
    # through HBM. Whether they cost anything is for a GPU timing to say; the way out, splitting a row
    # over programs, costs a second reduction.
    ("_rms_norm_backward_kernel", 16384): 256,
    # sm_80, 16-bit y at hidden 4097..8192: one 8-byte spill at 40 registers (of 128 allowed), which
    # ptxas chooses for itself; 8 bytes a thread against a row of 65-115 KB.
    ("_rms_norm_forward_kernel", 8192): 16,
    # Triton 3.9 only, sm_90, the all-fp32 backward with a gradient reaching h at hidden 513..1024 (prefetching h,
    # dy and dh): one 8-byte spill at 80 registers, which ptxas chooses for itself, against 48 KiB of rows a tile.
    # Not the widest block, so since the newest Triton compiles only the widest, seen by `inspect --arch all` alone.
    ("_rms_norm_backward_kernel", 1024): 16,
    # Soft-capped logits at vocabularies over 8192, fp32 (Triton 3.9: sm_80; Triton 3.6: both targets): 4-16
    # bytes a thread since rows are looped over by persistent programs, against a row of 32 KiB a block
    # that the program streams. (bf16 soft-capped rows are not prefetched: with Triton 3.6 that spilled 28.)
    ("_cross_entropy_kernel", 8192): 16,
    # Triton 3.6 only, sm_80, soft-capped fused forward + gradient at vocabularies 2049..4096: 4-8 bytes a
    # thread at 40-64 registers, ptxas's own choice, against a 16 KiB fp32 row.
    ("_cross_entropy_kernel", 4096): 8,
    # Triton 3.6 only, sm_80, the fp16 backward with a gradient reaching h at hidden 4097..8192: 4 bytes a
    # thread at 64 registers, against rows of 48-80 KiB.
    ("_rms_norm_backward_kernel", 8192): 8,
}


def _subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without TRITON_INTERPRET, plus `extra`; run from ROOT, `-m fasttrain_kernels.inspect` imports
    this checkout."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **extra}


def _inspect(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fasttrain_kernels.inspect", *args],
        cwd=ROOT,
        env=_subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check_report(run: subprocess.CompletedProcess, archs: list[str], variants: list) -> None:
    """Every variant compiled for every target in `archs`, within its registers, shared memory and spills."""
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    results = json.loads(run.stdout)["results"]
    assert len(results) == len(archs) * len(variants) and {r["arch"] for r in results} == set(archs)
    for r in results:
        what = f"{r['arch']} {r['kernel']} {r['variant']}"
        assert r["error"] is None, f"{what}: {r['error']}"
        assert 0 < r["registers"] <= 255, what
        assert r["shared"] <= TARGETS[r["arch"]].shared_limit, f"{what}: {r['shared']} bytes of shared memory"
        allowed = ACCEPTED_SPILLS.get((r["kernel"], r["constexprs"].get("BLOCK")), 0)
        assert r["spill_stores"] <= allowed, f"{what}: spills {r['spill_stores']} bytes a thread"


@pytest.mark.second_tier
def test_the_widest_variants_compile_with_the_installed_triton():
    """With the newest Triton (what `pip install triton` gives a torch 2.13 user), the widest variant of each
    kernel compiles for the H100 and the A100 (whose shared memory is smaller) within the limits: where shared
    memory and registers peak. Every variant is compiled with the Triton the GPU machines run (below); compiling
    every one with both Tritons took 6 more CPU minutes of CI's 30."""
    _check_report(_inspect("--arch", "all", "--widest", "--json"), ["sm_80", "sm_90"], widest(all_specializations()))


@pytest.mark.subprocess
def test_compiling_says_each_variant_as_it_is_done():
    """`inspect --arch all` printed nothing for minutes (a 180 s timeout killed it silent): a line on stderr first, then
    one per variant as it is compiled."""
    code = "from fasttrain_kernels import inspect; inspect.compile_all(['sm_80', 'sm_90'], lambda specs: specs[:2])"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    said = [line for line in run.stderr.splitlines() if line.startswith(("compiling", "["))]
    assert said[0].startswith("compiling 4 variants for sm_80, sm_90 on "), run.stderr
    assert [line.split("]")[0] for line in said[1:]] == ["[1/4", "[2/4", "[3/4", "[4/4"], run.stderr
    spec = all_specializations()[0]
    assert f"] sm_80 {spec.name} {spec.label}: " in run.stderr  # in the order they are done


def test_widest_keeps_the_widest_block_of_each_variant():
    """`inspect --widest`, the quick check when working on a kernel, compiles one variant of each kernel, argument
    types and other constexprs: the one with the widest block, where registers, spills and shared memory peak."""
    specs = all_specializations()
    kept = widest(specs)

    def rest(s: Specialization) -> tuple:
        others = tuple((k, v) for k, v in s.constexprs if k not in ("BLOCK", "BLOCK_ROWS"))
        return s.name, tuple((n, triton_type(v)) for n, v in s.args), others

    assert len({rest(s) for s in kept}) == len(kept) == len({rest(s) for s in specs}) < len(specs)
    block = {rest(s): dict(s.constexprs).get("BLOCK", 0) for s in kept}
    assert all(dict(s.constexprs).get("BLOCK", 0) <= block[rest(s)] for s in specs)


GPU_IMAGE_TRITON = "3.6.0"  # the GPU machines' Triton (torch 2.11); CI and this venv have torch 2.13's newer one


@pytest.mark.subprocess
@pytest.mark.second_tier
def test_every_variant_compiles_with_the_gpu_images_triton(tmp_path):
    """The same check with the Triton the GPU machines run, installed beside this one (pip, no dependencies)
    and put first on the compiling process's path: its ptxas and register allocation differ from the newer
    Triton's (a 28-byte spill in one cross-entropy variant on sm_90 was found this way)."""
    target = tmp_path / "triton"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            f"triton=={GPU_IMAGE_TRITON}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(f"cannot install triton {GPU_IMAGE_TRITON}: {(pip.stderr.strip().splitlines() or ['?'])[-1]}")
    version = subprocess.run(
        [sys.executable, "-c", "import triton; print(triton.__version__)"],
        capture_output=True,
        text=True,
        env=_subprocess_env(PYTHONPATH=str(target)),
    )
    assert version.stdout.strip() == GPU_IMAGE_TRITON, version.stderr[-2000:]
    _check_report(
        _inspect("--arch", "all", "--json", PYTHONPATH=str(target)), ["sm_80", "sm_90"], all_specializations()
    )


# ----------------------------------------------------------------------------- the list is the launchers'


def _normal(name: str, types: dict[str, str], constexprs: dict, num_warps: int | None) -> tuple:
    return name, tuple(sorted(types.items())), tuple(sorted(constexprs.items())), num_warps


def _listed() -> set[tuple]:
    return {
        _normal(s.name, {n: triton_type(v) for n, v in s.args}, dict(s.constexprs), s.num_warps)
        for s in all_specializations()
    }


class _Recorder:
    """Stands in for a Triton kernel: records each launch's argument types, constexprs and num_warps."""

    def __init__(self, kernel, constexpr_names: set[str], launches: list[tuple]):
        self.kernel, self.constexpr_names, self.launches = kernel, constexpr_names, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps: int | None = None, **kwargs):
            values = dict(zip(self.kernel.arg_names, args)) | kwargs
            values = {n: v.dtype if isinstance(v, torch.Tensor) else v for n, v in values.items()}
            types = {n: triton_type(v) for n, v in values.items() if n not in self.constexpr_names}
            constexprs = {n: v for n, v in values.items() if n in self.constexpr_names}
            self.launches.append(_normal(self.kernel.__name__, types, constexprs, num_warps))

        return launch


@pytest.fixture
def launches(monkeypatch) -> list[tuple]:
    """Launch through the Triton path on the CPU (as under the interpreter), into recorders instead of kernels."""
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", True)
    recorded: list[tuple] = []
    constexprs: dict[str, set[str]] = {}
    for s in all_specializations():
        constexprs.setdefault(s.name, set()).update(n for n, _ in s.constexprs)
    for module_name in MODULES:
        module = importlib.import_module(f"fasttrain_kernels.{module_name}")
        for s in all_specializations():
            if getattr(module, s.name, None) is s.kernel:
                monkeypatch.setattr(module, s.name, _Recorder(s.kernel, constexprs[s.name], recorded))
    return recorded


def _check(launches: list[tuple]) -> None:
    assert launches, "nothing was launched"
    missing = [k for k in launches if k not in _listed()]
    assert not missing, f"launched but not in the list: {missing[:3]}"


@pytest.mark.parametrize("vocab", [4096, 131072, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_launches_are_listed(launches, vocab, dtype):
    from fasttrain_kernels.cross_entropy import cross_entropy

    logits = torch.zeros(2, vocab, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, vocab - 1])
    for softcap in (None, 30.0):
        cross_entropy(logits, target, softcap=softcap, label_smoothing=0.1, z_loss=1e-4).backward()
        with torch.no_grad():
            cross_entropy(logits, target, softcap=softcap)
    _check(launches)
    blocks = {dict(k[2])["BLOCK"] for k in launches}
    assert blocks == {4096 if vocab == 4096 else 8192}


@pytest.mark.parametrize("hidden", [64, 768])
@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast", "fp16 autocast", "bf16"])
def test_linear_cross_entropy_launches_are_listed(launches, hidden, precision):
    from fasttrain_kernels.linear_cross_entropy import linear_cross_entropy

    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision.split()[0], torch.float16)
    param = torch.bfloat16 if precision == "bf16" else torch.float32
    h = torch.zeros(4, hidden, dtype=compute, requires_grad=True)
    weight = torch.zeros(4096, hidden, dtype=param, requires_grad=True)
    bias = torch.zeros(4096, dtype=param, requires_grad=True)
    target = torch.tensor([0, 1, 2, 4095])
    with torch.autocast("cpu", dtype=compute, enabled=precision.endswith("autocast")):
        for reduction in ("mean", "none"):
            loss = linear_cross_entropy(h, weight, target, bias, reduction=reduction, softcap=30.0, chunk_rows=2)
            loss.sum().backward()
    _check(launches)


@pytest.mark.parametrize("hidden", [64, 768, 16384])
@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast", "bf16"])
def test_rms_norm_launches_are_listed(launches, hidden, precision):
    from fasttrain_kernels.rms_norm import rms_norm

    compute = torch.float32 if precision == "fp32" else torch.bfloat16
    param = torch.bfloat16 if precision == "bf16" else torch.float32
    stream = torch.zeros(3, hidden, dtype=param, requires_grad=True)
    delta = torch.zeros(3, hidden, dtype=compute, requires_grad=True)
    for trained in (True, False):
        weight = torch.ones(hidden, dtype=param, requires_grad=trained)
        y = rms_norm(stream, weight, out_dtype=compute)
        y2, h = rms_norm(delta, weight, residual=stream, out_dtype=compute)
        (y.sum() + y2.sum() + h.sum()).backward()  # a gradient reaching h
        rms_norm(delta, weight, residual=stream, out_dtype=compute)[0].sum().backward()  # none reaching h
    _check(launches)
    tiles = {(dict(k[2])["BLOCK"], dict(k[2])["BLOCK_ROWS"], k[3]) for k in launches}
    assert tiles == {64: {(64, 64, 8)}, 768: {(1024, 4, 8)}, 16384: {(16384, 1, 16)}}[hidden]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw_and_clipping_launches_are_listed(launches, dtype):
    from fasttrain_kernels.adamw import FusedAdamW
    from fasttrain_kernels.clip_grad_norm import clip_grad_norm_

    params = [torch.nn.Parameter(torch.zeros(100, dtype=dtype)) for _ in range(2)]
    for p in params:
        p.grad = torch.zeros_like(p)
    clip_grad_norm_(params, 1.0)
    for max_grad_norm in (None, 1.0):
        FusedAdamW(params, max_grad_norm=max_grad_norm).step()
    _check(launches)
    assert {k[0] for k in launches} == {"_sum_squares_kernel", "_scale_kernel", "_adamw_kernel"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_newton_schulz_launches_are_listed(launches, dtype):
    from fasttrain_kernels.newton_schulz import symmetric_matmul

    s = symmetric_matmul(torch.zeros(40, 72, dtype=dtype))
    symmetric_matmul(s, s, alpha=2.0315, beta=-4.775)
    _check(launches)
    assert [dict(k[2])["HAS_C"] for k in launches] == [False, True]


def test_the_list_spans_the_project_shapes():
    blocks: dict[str, set[int]] = {}
    for s in all_specializations():
        blocks.setdefault(s.name, set()).add(dict(s.constexprs).get("BLOCK"))  # the matmul's tiles are not BLOCK
    assert blocks["_cross_entropy_kernel"] == {4096, 8192}  # vocabularies 4K..256K, MAX_BLOCK 8192
    assert blocks["_scale_rows_kernel"] == {2**k for k in range(6, 14)}  # hidden 64.. and vocabularies
    assert blocks["_rms_norm_forward_kernel"] == blocks["_rms_norm_backward_kernel"] == {2**k for k in range(6, 15)}
    assert len({s.key for s in all_specializations()}) == len(all_specializations())  # deduplicated


# ----------------------------------------------------------------------------- pieces of kernels.inspect


def test_argument_types_are_tritons():
    """The signature kernels.inspect builds gives each argument the type and divisibility mark Triton's launcher
    would (ints equal to 1, which Triton turns into constants, are not among the example values)."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = [0, 16, 17, -100, 2**31 - 16, 2**31, 2**40, 0.5, 1e-8]
    tensors = [torch.zeros(4, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64)]
    for value, example in [*zip(values, values), *((t, t.dtype) for t in tensors)]:
        kind, mark = native(BaseBackend, value, False, True, True)
        assert (triton_type(example), divisible_by_16(example)) == (kind, mark == "D"), value


def test_ptxas_reports_are_read():
    for tool in ("ptxas", "ptxas-blackwell"):  # Triton 3.9 uses the second for sm_90
        log = (
            f"{tool} info    : Compiling entry function 'k' for 'sm_90a'\n"
            f"{tool} info    : Function properties for k\n"
            "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
            f"{tool} info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]\n"
        )
        assert _ptxas_report(log) == (168, 12, 16)
    with pytest.raises(RuntimeError, match="no ptxas report"):
        _ptxas_report("")


def test_specialization_needs_every_argument():
    kernel = all_specializations()[0].kernel
    with pytest.raises(ValueError, match="do not match"):
        Specialization.of(kernel, 4, dict(BLOCK=64), logits_ptr=torch.float32)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--arch", "sm_70"], {}, "--arch must be one of sm_80, sm_90 or all"),
        ([], {"TRITON_INTERPRET": "1"}, "TRITON_INTERPRET=1"),
    ],
)
def test_cli_refuses_bad_input(args, env, message):
    run = subprocess.run(
        [sys.executable, "-m", "fasttrain_kernels.inspect", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_subprocess_env() | env,
        timeout=300,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], run.stderr
