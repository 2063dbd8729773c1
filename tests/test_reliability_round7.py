"""Issue 65, reliability round 7: what decides bf16 on a CPU, and the seams of the budget-sized run.

Each test failed on bb9adb0, through the path where the failure was seen (the CLI where a user saw it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasttrain.config import OptimConfig
from fasttrain.system import device as device_module
from fasttrain.system.device import native_bf16
from fasttrain.training.optimizers import Updater, newton_schulz_dtype

CPU = torch.device("cpu")


@pytest.fixture
def bf16_hardware(monkeypatch):
    """A CPU that reports AVX512-BF16, whatever this one has; no ISA caps in the environment."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def test_native_bf16_honours_the_isa_caps(bf16_hardware, monkeypatch):
    """A bf16 CPU capped to an older instruction set decides as that older machine does (the ISA matrix runs it so)."""
    assert native_bf16(CPU)
    for cap in ("AVX2", "avx512_core", "AVX512_CORE_VNNI", "SSE41"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert not native_bf16(CPU), cap
    for cap in ("AVX512_CORE_BF16", "avx512_core_amx", "ALL", "AVX10_1_512_AMX"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert native_bf16(CPU), cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    for capability in ("AVX2", "DEFAULT"):  # what ATEN_CPU_CAPABILITY=avx2 / default make torch report
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert not native_bf16(CPU), capability
    assert device_module.resolve_precision("auto", CPU) == "fp32"


def test_an_fp32_run_orthogonalises_in_fp32_on_a_bf16_cpu(bf16_hardware):
    """Muon's Newton-Schulz follows the run's precision: an fp32 run is fp32 throughout (its losses must not depend
    on whether the CPU has bf16); a bf16 run on bf16 hardware takes torch's bf16 step."""
    assert newton_schulz_dtype("fp32", CPU) == torch.float32
    assert newton_schulz_dtype("bf16", CPU) == torch.bfloat16
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(8, 8, bias=False)])
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        updater = Updater(model, OptimConfig(name="muon"), CPU, precision)
        assert updater.optimizer.parts["muon"].ns_dtype == dtype, precision


def test_without_bf16_hardware_even_a_bf16_run_orthogonalises_in_fp32(monkeypatch):
    monkeypatch.setattr(device_module, "native_bf16", lambda device: False)
    monkeypatch.setattr("fasttrain.training.optimizers.native_bf16", lambda device: False)
    assert newton_schulz_dtype("bf16", CPU) == torch.float32
