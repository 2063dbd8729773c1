"""Compile every Triton kernel variant for real GPU targets on a machine without a GPU, and table what each needs.

Imports from fasttrain_kernels: _backend, _specialization.

    python -m fasttrain_kernels.inspect [--arch sm_80|sm_90|all] [--json]

Triton compiles for a CUDA target without a driver: `triton.compile` lowers a
kernel to PTX and assembles it with the ptxas that ships with Triton. The
variants are those the launchers choose (see fasttrain_kernels/_specialization.py); for each
the table gives num_warps, registers per thread, spilled bytes (registers stored
to local memory because they did not fit) and shared memory per program: what
decides whether a kernel fits a GPU and how many programs share an SM.

Registers and spills come from ptxas's own report (`ptxas -v`), which Triton
prints when its dump_ptxas_log knob is set: CompiledKernel's n_regs and n_spills
are only filled in when a driver loads the binary. Shared memory is Triton's
metadata.shared. Every variant is compiled afresh (a cached one would skip ptxas,
and so its report), into a temporary cache directory, by one process per CPU core.

sm_90 compiles to sm_90a (Hopper's arch-specific features), as Triton does for an H100.
Every variant for both targets (--arch all) takes minutes: a line on stderr says each one done, as it is.
Exit status: 0, or 1 when a variant fails to compile or needs more shared memory
than its target has; 2 for bad arguments, without triton installed, or with
TRITON_INTERPRET=1 (under which triton.jit builds interpreter objects, which
cannot be compiled for a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from fasttrain_kernels import _backend
from fasttrain_kernels._backend import triton
from fasttrain_kernels._specialization import Specialization, divisible_by_16, triton_type


@dataclass(frozen=True)
class Target:
    capability: int
    gpu: str
    shared_limit: int  # bytes of shared memory one program (block) may use


# Every module that launches a kernel (linear cross-entropy reuses the cross-entropy kernels with other widths
# and dtypes). By import path: the package exports functions of the same names as these modules.
MODULES = ("cross_entropy", "linear_cross_entropy", "rms_norm", "adamw", "clip_grad_norm", "newton_schulz")

TARGETS = {
    "sm_80": Target(80, "A100", 166912),  # 163 KB
    "sm_90": Target(90, "H100", 232448),  # 227 KB
}


@dataclass
class Result:
    """One variant compiled for one target; on failure `error` (the compiler's message) instead of figures."""

    arch: str
    kernel: str
    variant: str
    constexprs: dict[str, int]
    num_warps: int | None
    registers: int | None = None
    spill_stores: int | None = None  # bytes per thread
    spill_loads: int | None = None
    shared: int | None = None  # bytes per program
    seconds: float = 0.0
    error: str | None = None


@functools.cache
def all_specializations() -> list[Specialization]:
    """Every distinct variant the launchers of MODULES compile."""
    found = [s for module in MODULES for s in importlib.import_module(f"fasttrain_kernels.{module}").specializations()]
    return list({s.key: s for s in found}.values())


def _triton_source(spec: Specialization):
    """The ASTSource Triton's launcher would build for `spec`'s arguments."""
    from triton.compiler import ASTSource

    names = spec.kernel.arg_names
    signature = dict.fromkeys(names, "constexpr")
    signature.update((name, triton_type(value)) for name, value in spec.args)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name, value in spec.args if divisible_by_16(value)}
    return ASTSource(spec.kernel, signature, dict(spec.constexprs), attrs)


def _ptxas_report(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` output."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas report in Triton's output (did its dump_ptxas_log knob change?): {log!r:.200}")
    return int(registers[1]), int(spills[1]), int(spills[2])


def compile_for(spec: Specialization, arch: str) -> Result:
    """Compile `spec` for `arch` (a key of TARGETS) and read off its resources."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas, and so its report
    # Triton 3.9 warns that its fp-fusion default will change; the launchers run with the default too.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
    result = Result(arch, spec.name, spec.label, dict(spec.constexprs), spec.num_warps)
    options = {} if spec.num_warps is None else {"num_warps": spec.num_warps}
    target = GPUTarget("cuda", TARGETS[arch].capability, 32)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(_triton_source(spec), target=target, options=options)
        result.registers, result.spill_stores, result.spill_loads = _ptxas_report(log.getvalue())
        result.shared, result.num_warps = compiled.metadata.shared, compiled.metadata.num_warps
    except Exception as e:  # noqa: BLE001  (any compiler failure is a result to report, not a crash)
        result.error = f"{type(e).__name__}: {str(e).strip()}"
    result.seconds = time.perf_counter() - start
    return result


def _compile_job(job: tuple[Specialization, str]) -> Result:
    return compile_for(*job)


def _cores() -> int:
    """CPU cores this process may run on (a CI container may get fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def widest(specs: list[Specialization]) -> list[Specialization]:
    """Of the variants that differ only in their row block (BLOCK, and BLOCK_ROWS with it), the one
    with the widest block: where registers, spills and shared memory peak. A quick check."""
    best: dict[tuple, Specialization] = {}
    for spec in specs:
        rest = tuple((k, v) for k, v in spec.constexprs if k not in ("BLOCK", "BLOCK_ROWS"))
        key = (spec.name, tuple((n, triton_type(v)) for n, v in spec.args), rest)
        if key not in best or dict(spec.constexprs).get("BLOCK", 0) > dict(best[key].constexprs).get("BLOCK", 0):
            best[key] = spec
    return list(best.values())


def compile_all(
    archs: list[str],
    pick: Callable[[list[Specialization]], list[Specialization]] = lambda specs: specs,
    progress: bool = True,
) -> tuple[list[Result], float]:
    """The variants `pick` keeps of every variant, for every arch in `archs`, compiled in parallel into a
    fresh cache; (results, seconds), in the order of the jobs. `progress`: a line on stderr first and one per variant
    as it is done (all of them take minutes)."""
    jobs = [(spec, arch) for arch in archs for spec in pick(all_specializations())]
    processes = min(_cores(), len(jobs))
    if progress:
        print(f"compiling {len(jobs)} variants for {', '.join(archs)} on {processes} processes", file=sys.stderr)
    start = time.perf_counter()
    user_cache = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="kernels-inspect-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # the workers inherit it
        try:
            # spawn: forking a process that has imported torch can deadlock in its thread pools.
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_compile_job, job) for job in jobs]
                for done, future in enumerate(as_completed(futures), 1):
                    if progress:
                        print(f"[{done}/{len(jobs)}] {_done_line(future.result())}", file=sys.stderr, flush=True)
                results = [future.result() for future in futures]
        finally:
            if user_cache is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = user_cache
    return results, time.perf_counter() - start


def _done_line(result: Result) -> str:
    """What a progress line says of one variant compiled: where, which, and its time or its error's first line."""
    outcome = f"{result.seconds:.1f} s" if result.error is None else f"error: {result.error.splitlines()[0][:120]}"
    return f"{result.arch} {result.kernel} {result.variant}: {outcome}"


def over_limit(result: Result) -> bool:
    return result.shared is not None and result.shared > TARGETS[result.arch].shared_limit


def _summary(arch: str, results: list[Result]) -> str:
    ok = [r for r in results if r.error is None]
    target = TARGETS[arch]
    parts = [f"{arch} ({target.gpu}): {len(ok)}/{len(results)} variants compiled"]
    if ok:
        most = max(ok, key=lambda r: r.registers or 0)  # set on every compiled variant
        spilling = [r for r in ok if r.spill_stores]
        shared = max(ok, key=lambda r: r.shared or 0)
        kernels = ", ".join(sorted({r.kernel for r in spilling}))
        parts += [
            f"max {most.registers} registers ({most.kernel})",
            f"{len(spilling)} spilling ({kernels})" if spilling else "no spills",
            f"max shared {shared.shared} bytes of {target.shared_limit}",
            f"{sum(r.seconds for r in results):.0f} s of compiling",
        ]
    return ", ".join(parts)


def format_table(results: list[Result]) -> str:
    """One line per result under a header, a summary line per arch."""
    width = max(len(r.variant) for r in results)
    header = (
        f"{'arch':<6} {'kernel':<26} {'variant':<{width}} "
        f"{'warps':>5} {'regs':>4} {'spill':>5} {'shared':>6} {'time':>4}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error is None:
            figures = f"{r.num_warps:>5} {r.registers:>4} {r.spill_stores:>5} {r.shared:>6} {r.seconds:>4.1f}"
            flag = "  over the shared memory limit" if over_limit(r) else ""
        else:
            figures, flag = f"{r.num_warps or '':>5}", f"  error: {r.error.splitlines()[0]}"
        lines.append(f"{r.arch:<6} {r.kernel:<26} {r.variant:<{width}} {figures}{flag}")
    lines.append("")
    lines += [_summary(arch, [r for r in results if r.arch == arch]) for arch in dict.fromkeys(r.arch for r in results)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasttrain_kernels.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", help="sm_80, sm_90 or all (default sm_90)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument(
        "--widest",
        action="store_true",
        help="only the widest-block variant of each kernel, dtype and flag set (about a third)",
    )
    args = parser.parse_args(argv)
    if args.arch != "all" and args.arch not in TARGETS:
        print(f"error: --arch must be one of {', '.join(TARGETS)} or all, not {args.arch!r}", file=sys.stderr)
        return 2
    if not _backend.TRITON_INSTALLED:
        print(f"error: {_backend.MISSING_TRITON}", file=sys.stderr)
        return 2
    if _backend.INTERPRETING:
        print(
            "error: TRITON_INTERPRET=1 is set: triton.jit built interpreter objects, which cannot be compiled "
            "for a GPU; run without it",
            file=sys.stderr,
        )
        return 2
    archs = list(TARGETS) if args.arch == "all" else [args.arch]
    results, seconds = compile_all(archs, widest if args.widest else lambda specs: specs)
    if args.json:
        print(
            json.dumps(
                {
                    "triton": triton.__version__,
                    "seconds": seconds,
                    "targets": {a: dataclasses.asdict(TARGETS[a]) for a in archs},
                    "results": [dataclasses.asdict(r) for r in results],
                },
                indent=1,
            )
        )
    else:
        print(format_table(results))
        print(f"triton {triton.__version__}, {seconds:.0f} s on {min(_cores(), len(results))} processes")
    return 1 if any(r.error is not None or over_limit(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
