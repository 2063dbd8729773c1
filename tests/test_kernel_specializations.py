"""Training steps after the first launch no Triton kernel variant the first step did not.

Triton compiles a kernel once per specialization: its constexprs and num_warps, each tensor's dtype and
whether its address is 16-byte aligned, each int's width and whether it equals 1 or is a multiple of 16.
A launcher that passed a value changing from step to step in such a position (a step count, an offset)
would compile a new variant in the middle of a run: a pause of milliseconds (from the disk cache) to
seconds (a fresh compile) in a step that benchmarks and MFU read as the kernel's. The run here is the
tiny trainer with every kernel forced on, through the interpreter, with each launch's key recorded.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fasttrain_kernels._backend
import fasttrain_kernels._multi_tensor
from fasttrain.training.trainer import Trainer
from fasttrain_kernels.inspect import MODULES, all_specializations
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    not fasttrain_kernels._backend.INTERPRETING and not torch.cuda.is_available(),
    reason="no GPU, and the kernels were imported without TRITON_INTERPRET=1",
)


def specialization(value) -> object:
    """What Triton specializes a run-time argument on."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return "i64" if not -(2**31) <= value < 2**31 else "i32", value == 1, value % 16 == 0
    return type(value).__name__


class Recording:
    """A kernel that records each launch's specialization key into `keys`, then launches the real one."""

    def __init__(self, kernel, keys: set):
        self.kernel, self.keys = kernel, keys

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args)) | kwargs
            self.keys.add((self.kernel.__name__, tuple((n, specialization(v)) for n, v in sorted(named.items()))))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_no_new_kernel_variant_after_the_first_step(pydoc_data, tmp_path, monkeypatch):
    keys: set = set()
    for module_name in MODULES:
        module = importlib.import_module(f"fasttrain_kernels.{module_name}")
        for s in all_specializations():
            if getattr(module, s.name, None) is s.kernel:
                monkeypatch.setattr(module, s.name, Recording(s.kernel, keys))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: through the interpreter
    if device == "cpu":
        # Each multi-tensor program loops CHUNK // BLOCK times however small its tensor: at 65536 // 1024 the
        # interpreter ran 64 blocks for every one of the tiny model's parameters, every step (most of this
        # test's time). 4 blocks a program: the tables, the constexprs and their keys are as constant per step,
        # and the embedding (16384 elements) now takes the full-chunk path beside the masked one.
        monkeypatch.setattr(fasttrain_kernels._multi_tensor, "CHUNK", 4096)
        monkeypatch.setattr(fasttrain_kernels._multi_tensor, "BLOCK", 1024)
    trainer = Trainer(
        tiny_config(
            pydoc_data,
            tmp_path,
            f"train.device={device}",
            "train.compile=false",
            "kernels.linear_cross_entropy=true",
            "kernels.rms_norm=true",
            "kernels.adamw=true",
            "optim.max_grad_norm=1.0",
        ),
        quiet=True,
    )
    assert trainer.kernels.names() == ["linear_cross_entropy", "rms_norm", "adamw"]
    trainer.step()
    first = set(keys)
    assert {name for name, _ in first} >= {
        "_cross_entropy_kernel",
        "_rms_norm_forward_kernel",
        "_rms_norm_backward_kernel",
        "_adamw_kernel",
        "_sum_squares_kernel",
    }
    for _ in range(4):
        trainer.step()
    assert keys == first, f"new variants after the first step: {sorted(keys - first)[:3]}"
