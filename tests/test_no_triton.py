"""Without triton, which the base install leaves out: fasttrain and fasttrain_kernels import, every public kernel's
CPU path gives its eager reference's values and gradients, the main job trains on a CPU with every kernel on, and
the Triton path (TRITON_INTERPRET=1, a CUDA tensor, `python -m fasttrain_kernels.inspect`) stops in one line
naming the package and the pip command.

This environment has triton (the test extra brings it for the interpreter), so each check runs in a new process
whose `import triton` fails as where it is not installed: sys.modules["triton"] = None before anything imports
(importlib.util.find_spec("triton") is None there too). The checks are the functions below, run in that process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttrain_kernels import _backend
from fasttrain_kernels._backend import MISSING_TRITON

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install 'triton>=3.0'"  # what the one line says to run (MISSING_TRITON)


def without_triton(code: str, interpret: bool = False) -> subprocess.CompletedProcess:
    """Run `code` in a new Python from ROOT in which triton cannot be imported, TRITON_INTERPRET=1 if `interpret`
    (conftest sets it in this process; the child gets it only when asked)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (
        {"TRITON_INTERPRET": "1"} if interpret else {}
    )
    return subprocess.run(
        [sys.executable, "-c", f'import sys; sys.modules["triton"] = None\n{code}'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _against_reference(ours, reference, inputs: list[torch.Tensor], tolerance: float, **fixed) -> None:
    """ours(*inputs, **fixed) against reference(fp64 copies, **fixed): outputs, and the inputs' gradients of the
    outputs' sum weighted by fixed random factors."""
    mine = [t.detach().clone().requires_grad_() for t in inputs]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    outs, refs = ours(*mine, **fixed), reference(*exact, **fixed)
    outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
    weights = [torch.randn(o.shape, dtype=torch.float64) for o in refs]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.double(), ref.detach(), rtol=tolerance, atol=tolerance)
    sum(((o.double() * w).sum() for o, w in zip(outs, weights)), torch.zeros((), dtype=torch.float64)).backward()
    sum((r * w).sum() for r, w in zip(refs, weights)).backward()
    for t, e in zip(mine, exact):
        assert t.grad is not None and e.grad is not None
        torch.testing.assert_close(t.grad.double(), e.grad, rtol=tolerance, atol=tolerance)


def check_kernels() -> None:
    """In the child: every public kernel on CPU tensors, with no triton in the process."""
    import fasttrain
    import fasttrain_kernels as k

    assert fasttrain.__version__ and not _backend.TRITON_INSTALLED and not _backend.INTERPRETING
    torch.manual_seed(0)
    x, residual, weight = torch.randn(6, 40), torch.randn(6, 40), torch.randn(40)
    _against_reference(k.rms_norm, k.rms_norm_reference, [x, weight], 1e-5)
    _against_reference(
        lambda x, r, w: k.rms_norm(x, w, residual=r),
        lambda x, r, w: k.rms_norm_reference(x, w, residual=r),
        [x, residual, weight],
        1e-5,
    )
    norm = k.RMSNorm(40)
    torch.testing.assert_close(norm(x), k.rms_norm_reference(x, norm.weight))

    logits, target = torch.randn(7, 50) * 3, torch.tensor([0, 49, 3, -100, 7, 7, 20])
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=15.0)
    _against_reference(k.cross_entropy, k.cross_entropy_reference, [logits], 1e-5, target=target, **options)
    _against_reference(k.CrossEntropyLoss(), k.cross_entropy_reference, [logits], 1e-5, target=target)

    hidden, head, bias = torch.randn(7, 16), torch.randn(50, 16) * 0.3, torch.randn(50)
    _against_reference(
        lambda h, w, b: k.linear_cross_entropy(h, w, target, b, **options),
        lambda h, w, b: k.linear_cross_entropy_reference(h, w, target, b, **options),
        [hidden, head, bias],
        1e-5,
    )
    _against_reference(
        lambda h, w: k.LinearCrossEntropyLoss()(h, w, target),
        lambda h, w: k.linear_cross_entropy_reference(h, w, target),
        [hidden, head],
        1e-5,
    )

    g = torch.randn(20, 12)
    torch.testing.assert_close(k.newton_schulz(g).float(), k.newton_schulz_reference(g).float(), rtol=0.05, atol=0.02)
    m, c = torch.randn(9, 20).bfloat16(), torch.randn(9, 9)
    c = (c + c.T).bfloat16()
    expected = 0.7 * m.double() @ m.double().T - 1.3 * c.double()
    got = k.symmetric_matmul(m, c, alpha=0.7, beta=-1.3)
    torch.testing.assert_close(got.double(), expected, rtol=0.02, atol=0.1)

    params = [torch.randn(30, 8, requires_grad=True), torch.randn(5, requires_grad=True)]
    reference = [p.detach().clone().requires_grad_() for p in params]
    ours = k.FusedAdamW(params, lr=0.01, weight_decay=0.1, max_grad_norm=0.5)
    theirs = torch.optim.AdamW(reference, lr=0.01, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(params, reference):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        torch.nn.utils.clip_grad_norm_(reference, 0.5)
        theirs.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q)

    for p, q in zip(params, reference):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    torch.testing.assert_close(k.clip_grad_norm_(params, 0.5), torch.nn.utils.clip_grad_norm_(reference, 0.5))
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad)

    from fasttrain_kernels import inspect  # compiles for a GPU: it needs triton, and says so

    assert inspect.main([]) == 2
    assert not [m for m, module in sys.modules.items() if m.split(".")[0] == "triton" and module is not None]


def check_the_triton_path_says_what_to_install() -> None:
    """In the child, under TRITON_INTERPRET=1: each kernel, a CUDA tensor's dispatch and a launch raise the one error,
    printed as `name: message`."""
    import importlib
    from types import SimpleNamespace

    import fasttrain  # noqa: F401  (imports under TRITON_INTERPRET=1 too)
    import fasttrain_kernels as k

    rms_norm = importlib.import_module("fasttrain_kernels.rms_norm")  # the module, not the function of its name
    assert _backend.INTERPRETING and not _backend.TRITON_INSTALLED

    x, target = torch.randn(4, 8, requires_grad=True), torch.tensor([0, 1, 2, 3])
    params = [torch.randn(8, requires_grad=True)]
    params[0].grad = torch.ones(8)
    calls = {
        "rms_norm": lambda: k.rms_norm(x, torch.ones(8)),
        "cross_entropy": lambda: k.cross_entropy(x, target),
        "linear_cross_entropy": lambda: k.linear_cross_entropy(x, torch.randn(16, 8), target),
        "symmetric_matmul": lambda: k.symmetric_matmul(torch.randn(4, 8).bfloat16()),
        "newton_schulz": lambda: k.newton_schulz(torch.randn(4, 8)),
        "clip_grad_norm_": lambda: k.clip_grad_norm_(params, 1.0),
        "FusedAdamW": lambda: k.FusedAdamW(params).step(),
        "a CUDA tensor": lambda: _backend.use_triton(SimpleNamespace(is_cuda=True)),
        "a launch": lambda: rms_norm._rms_norm_forward_kernel[(1,)](),
    }
    for name, call in calls.items():
        try:
            call()
        except ModuleNotFoundError as e:
            assert e.name == "triton", (name, e)
            print(f"{name}: {e}")
        else:
            raise AssertionError(f"{name} ran without triton under TRITON_INTERPRET=1")


@pytest.mark.subprocess
def test_without_triton_the_kernels_run_on_cpu_tensors_and_inspect_says_what_to_install():
    done = without_triton("from tests.test_no_triton import check_kernels; check_kernels()")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"error: {MISSING_TRITON}" in done.stderr.splitlines() and INSTALL in MISSING_TRITON, done.stderr


@pytest.mark.subprocess
def test_without_triton_the_main_job_trains_on_a_cpu_with_every_kernel_on(pydoc_data, tmp_path):
    from tests.conftest import tiny_args  # here, not at the top: the children import this module, not conftest

    out = tmp_path / "run"
    kernels = (f"kernels.{op}=true" for op in ("rms_norm", "linear_cross_entropy", "adamw"))
    argv = ["fasttrain.train", *tiny_args(pydoc_data, out, "train.max_steps=3", *kernels)]
    done = without_triton(
        f"import runpy; sys.argv = {argv!r}; runpy.run_module('fasttrain.train', run_name='__main__')"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kernels: linear_cross_entropy, rms_norm, adamw;" in done.stdout and (out / "final").is_dir(), done.stdout


@pytest.mark.subprocess
def test_without_triton_the_triton_path_stops_in_one_line_naming_the_package_and_the_pip_command():
    done = without_triton(
        "from tests.test_no_triton import check_the_triton_path_says_what_to_install as check; check()", interpret=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    said = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert len(said) == 9 and set(said.values()) == {MISSING_TRITON}, done.stdout


def test_the_stand_ins_host_arithmetic_is_tritons():
    """Without triton the launchers' block and grid choices (rms_norm.tilings, cross_entropy.launch_config, the
    specializations) use the stand-in's cdiv and next_power_of_2: the same numbers as triton's."""
    triton = pytest.importorskip("triton")
    stand_in = _backend._MissingModule("triton")
    sizes = [*range(-3, 5000), *(2**k + d for k in range(12, 20) for d in (-1, 0, 1))]
    assert [stand_in.next_power_of_2(n) for n in sizes] == [triton.next_power_of_2(n) for n in sizes]
    assert [stand_in.cdiv(n, d) for n in sizes for d in (1, 3, 64)] == [
        triton.cdiv(n, d) for n in sizes for d in (1, 3, 64)
    ]
