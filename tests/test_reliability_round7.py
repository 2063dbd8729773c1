"""Issue 65, reliability round 7: what decides bf16 on a CPU, and the seams of the budget-sized run.

Each test failed on bb9adb0, through the path where the failure was seen (the CLI where a user saw it).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fasttrain.compute import device as device_module
from fasttrain.compute.device import native_bf16
from fasttrain.compute.distributed import World
from fasttrain.config import OptimConfig, load_config
from fasttrain.data.mixture import token_shares
from fasttrain.optimization.optimizers import Updater, newton_schulz_dtype
from fasttrain.planning import sizing
from fasttrain.planning.plan import plan_run
from fasttrain.planning.sizing import Speed, choose_shape, size_model
from fasttrain.system import machine_load
from fasttrain.system.errors import run_cli
from fasttrain.train import main as train_main
from tests.conftest import tiny_args, tiny_config
from tests.test_sizing import AUTO, cli, depth_in

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
    assert device_module.resolve_precision("auto", CPU) == ("fp32", "")  # nothing to explain: no bf16 to choose


@pytest.mark.parametrize("speedup, expected", [(0.64, "fp32"), (1.19, "fp32"), (1.2, "bf16"), (1.53, "bf16")])
def test_auto_precision_is_bf16_only_where_bf16_was_timed_faster(bf16_hardware, monkeypatch, speedup, expected):
    """Native bf16 is not always faster: an AVX-512 BF16 Xeon without AMX multiplied bf16 at 0.64x its fp32 speed,
    a Zen 4 EPYC at 1.53x. "auto" takes bf16 from BF16_MIN_SPEEDUP, says why where it keeps fp32, and a precision
    set by hand is kept whatever the timing."""
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda: speedup)
    precision, note = device_module.resolve_precision("auto", CPU)
    assert precision == expected
    assert (f"bf16 matmuls ran {speedup:.2f}x its fp32 ones' speed" in note) == (expected == "fp32")
    assert [device_module.resolve_precision(p, CPU) for p in ("fp32", "bf16")] == [("fp32", ""), ("bf16", "")]
    assert device_module.resolve_precision("auto", CPU, recorded="fp32") == ("fp32", "")  # a resume: it chose before


def test_the_bf16_timing_measures_this_cpu():
    """The speedup is a ratio of two real timings (fresh, not the process's cached one): positive and finite, and on
    a CPU without native bf16 (emulated through fp32) below BF16_MIN_SPEEDUP."""
    speedup = device_module.cpu_bf16_speedup.__wrapped__()
    assert 0 < speedup < float("inf")
    if not native_bf16(CPU):
        assert speedup < device_module.BF16_MIN_SPEEDUP


def test_a_resumed_run_keeps_the_precision_auto_chose_for_it(bf16_hardware, pydoc_data, tmp_path, monkeypatch):
    """A run whose timing chose fp32 resumes in fp32 where a new run's timing would now choose bf16 (a busier or
    quieter machine must not change a run's numerics part way), and one that chose bf16 resumes in bf16."""
    for first, then in ((0.64, 1.53), (1.53, 0.64)):
        out = tmp_path / f"run-{first}"
        monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda s=first: s)
        with pytest.raises(SystemExit) as done:
            run_cli(
                train_main, tiny_args(pydoc_data, out, "train.precision=auto", "train.max_steps=2", flags=["--quiet"])
            )
        assert done.value.code == 0
        chosen = load_config(out / "config.toml").train.precision
        assert chosen == ("fp32" if first < 1.2 else "bf16")
        monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda s=then: s)
        cfg = tiny_config(pydoc_data, out, "train.precision=auto", "train.max_steps=4")
        assert plan_run(cfg, World(), CPU, "auto").cfg.train.precision == chosen
        assert plan_run(cfg, World(), CPU).cfg.train.precision != chosen  # a new run in the same folder times again


@pytest.mark.parametrize("shape", [(), AUTO], ids=["fixed", "chosen"])
def test_a_trainer_made_resuming_where_nothing_is_saved_starts_anew(pydoc_data, tmp_path, shape):
    """Trainer(resuming=True) is planned as the run saved in its folder; in a folder with no save yet it is a new
    run, whether its plan would read a recorded one (precision "auto", a shape chosen) or not: it raised "no
    checkpoint saved there yet" there, where a fixed-shape fp32 one started anew."""
    from fasttrain.training.trainer import Trainer

    cfg = tiny_config(pydoc_data, tmp_path / "run", "train.precision=auto", "train.max_steps=2", *shape)
    trainer = Trainer(cfg, quiet=True, resuming=True)
    try:
        assert trainer.train()["step"] == 2
    finally:
        trainer.close()
    again = Trainer(cfg, quiet=True, resuming=True)  # now saved: planned as that run, which resume() goes on with
    try:
        again.resume("auto")
        assert again.resumed_from is not None
    finally:
        again.close()


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
    monkeypatch.setattr("fasttrain.optimization.optimizers.native_bf16", lambda device: False)
    assert newton_schulz_dtype("bf16", CPU) == torch.float32


# Items 2, 3, 5, 6 and 7: the seams of a run sized for its budget (model.n_layers = 0), through the CLI.


def epoch_tokens(folder: Path, tmp_path: Path) -> int:
    """The tokens one epoch of the tiny run's loader reads of `folder`: its rows that fill whole batches."""
    from fasttrain.data.mixture import open_sources
    from fasttrain.planning.repeats import epoch_rows

    cfg = tiny_config(folder, tmp_path, "data.vocab_size=0")
    return epoch_rows(open_sources(cfg.data)[0], cfg, 1) * cfg.train.seq_len


def test_a_mixture_is_sized_by_what_each_source_is_read(pydoc_data, code_data, tmp_path, capsys):
    """A mixture drawing 95% of its rows from a small source is worth what that source's repeats are worth, not
    what one corpus of the sources' summed tokens would be (WRONG RESULT on bb9adb0: a deeper model)."""
    small, large = epoch_tokens(code_data, tmp_path), epoch_tokens(pydoc_data, tmp_path)
    assert small * 5 < large
    cfg = tiny_config(pydoc_data, tmp_path, *AUTO, "model.vocab_size=512")
    per_source = ((0.95, small), (0.05, large))
    # the steps at which the two readings choose different depths: the mixture must get the per-source one
    steps = next(
        s
        for s in range(100, 100_000, 100)
        if choose_shape(cfg, lambda m: s * 128.0, per_source, "").model
        != choose_shape(cfg, lambda m: s * 128.0, ((1.0, small + large),), "").model
    )
    expected = choose_shape(cfg, lambda m: steps * 128.0, per_source, "")
    summed = choose_shape(cfg, lambda m: steps * 128.0, ((1.0, small + large),), "")
    assert expected.model.n_layers < summed.model.n_layers
    mixture = f'data.sources=[{{dir="{code_data}", weight=0.95}}, {{dir="{pydoc_data}", weight=0.05}}]'
    sets = [*AUTO, 'data.dir=""', "data.inputs=[]", mixture, f"train.max_steps={steps}", "data.max_epochs=1e6"]
    assert cli(tiny_args(pydoc_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 0
    out = capsys.readouterr().out
    assert depth_in(out) == expected.model.n_layers, out
    assert f"{expected.effective / expected.params:.2f} training tokens per parameter, a repeated token counted" in out
    assert "its sources read" in out


def test_mix_shares_follow_the_phases_over_the_run():
    mix = [(0, (0.5, 0.5)), (30, (1.0, 0.0))]
    assert token_shares(mix, 100) == pytest.approx((0.3 * 0.5 + 0.7, 0.3 * 0.5))
    assert token_shares(mix, 20) == pytest.approx((0.5, 0.5))  # the change comes after the run's end
    assert token_shares(mix, 0) == (0.5, 0.5)  # a clock alone: the weights it starts with


@pytest.mark.parametrize("flags", [[], ["--dry-run"]])
@pytest.mark.parametrize(
    ("sets", "said"),
    [
        (("model.d_model=33",), "--set: model.d_model: must be even and >= 0"),
        (("model.d_model=1",), "--set: model.d_model: must be even and >= 0"),
        (
            ("model.n_layers=2", "model.d_model=0", "model.n_heads=0", "model.n_kv_heads=3"),
            "model.n_kv_heads = 3 does not divide the 2 heads of width 128 (64 x model.n_layers)",
        ),
    ],
)
def test_shape_keys_the_sizing_cannot_honour_are_one_line(pydoc_data, tmp_path, capsys, flags, sets, said):
    assert cli(tiny_args(pydoc_data, tmp_path / "run", *AUTO, "train.max_steps=2", *sets, flags=flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and said in err and err.startswith("error:"), err
    assert not (tmp_path / "run").exists()


def test_key_value_heads_keep_the_ladder_to_widths_they_divide(pydoc_data, tmp_path, capsys):
    """n_kv_heads = 3 with the heads derived: a depth whose heads (width / 64) it divides, trained (on bb9adb0 an
    invalid 1 x 64 shape that failed at the first step)."""
    args = tiny_args(pydoc_data, tmp_path / "run", *AUTO, "model.n_kv_heads=3", "train.max_steps=2")
    assert cli(args) == 0
    config = load_config(tmp_path / "run" / "config.toml").model
    assert config.n_layers % 3 == 0 and config.n_heads % 3 == 0 and config.n_kv_heads == 3
    assert "model.n_kv_heads = 3 kept, as set" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["n_heads", "n_layers", "d_model"])
def test_a_recorded_shape_edited_to_zero_is_refused_on_resume(pydoc_data, tmp_path, capsys, key):
    run = tmp_path / "run"
    assert cli(tiny_args(pydoc_data, run, *AUTO, "train.max_steps=2", "--quiet")) == 0
    recorded = run / "config.toml"
    recorded.write_text(re.sub(rf"(?m)^{key} = \d+$", f"{key} = 0", recorded.read_text()))
    for flags in (["--resume", "auto", "--dry-run"], ["--resume", "auto"]):
        capsys.readouterr()
        assert cli(tiny_args(pydoc_data, run, *AUTO, "train.max_steps=4", flags=flags)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{recorded}: model.{key} = 0, but a run's config records" in err, err


def test_resume_path_into_a_new_directory_trains_the_checkpoints_shape(pydoc_data, tmp_path, capsys):
    """--resume PATH into a new train.out_dir with model.n_layers = 0: the shape the checkpoint's run trained, from
    its run directory's config.toml or, for a save copied out of its run, from the save itself (bb9adb0 sized a new
    shape for the new budget, then refused the resume)."""
    first = tmp_path / "first"
    assert cli(tiny_args(pydoc_data, first, *AUTO, "train.max_steps=2", "--quiet")) == 0
    shape = load_config(first / "config.toml").model
    lone = tmp_path / "elsewhere" / "saved.pt"
    lone.parent.mkdir()
    shutil.copy(first / "checkpoints" / "step_0000002.pt", lone)
    for i, path in enumerate((first / "checkpoints" / "step_0000002.pt", lone)):
        out = tmp_path / f"second{i}"
        capsys.readouterr()
        # 4000 steps would choose a deeper model for a new run
        assert (
            cli(tiny_args(pydoc_data, out, *AUTO, "train.max_steps=4000", flags=["--resume", str(path), "--dry-run"]))
            == 0
        )
        assert f"the resumed run's shape, {shape.n_layers} x {shape.d_model}" in capsys.readouterr().out
        assert (
            cli(tiny_args(pydoc_data, out, *AUTO, "train.max_steps=3", "--quiet", flags=["--resume", str(path)])) == 0
        )
        resumed = load_config(out / "config.toml").model
        assert (resumed.n_layers, resumed.d_model, resumed.n_heads) == (shape.n_layers, shape.d_model, shape.n_heads)


def test_a_clock_alone_warns_of_a_corpus_read_too_often(pydoc_data, code_data, tmp_path, capsys, monkeypatch):
    """train.max_time alone, a corpus read more than data.max_epochs times: a fixed shape is warned in the run (its
    speed at the first log line; bb9adb0 said nothing). A self-sized run stops at data.max_epochs (the one epoch
    limit: the plan's cap), so its dry run says where it stops and warns of nothing."""
    sets = ["data.vocab_size=0", "data.max_epochs=0.05", "train.max_steps=0", "train.max_time=12"]
    assert cli(tiny_args(code_data, tmp_path / "dry", *AUTO, *sets, flags=["--dry-run"])) == 0
    out = capsys.readouterr().out
    assert (
        "stops when it has read the corpus 0.05 times (data.max_epochs) or earlier" in out
        and "warning: this run" not in out
    )
    fixed = [*sets, "train.max_time=2", "train.log_interval=5", "train.eval_interval=1000", "train.sample_tokens=0"]
    assert cli(tiny_args(code_data, tmp_path / "run", *fixed)) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: this run reads \S+ [\d.]+ times over by step ~\d+, where train.max_time", out), out


def test_a_choice_near_a_boundary_or_timed_on_a_busy_machine_says_so(pydoc_data, tmp_path, monkeypatch):
    """(The busy note's reading of the machine: tests/test_reliability_round8.py.)"""
    cfg = tiny_config(pydoc_data, tmp_path, *AUTO, "train.max_steps=0", "train.max_time=600", "model.vocab_size=512")
    speed = Speed(((1e6, 1e9),))
    # the budget that puts the rule's choice where 20% more tokens would choose a deeper model
    notes = [size_model(cfg, (), 128, 1, CPU, Speed(((1e6, f),)))[1] for f in np.geomspace(1e8, 1e11, 60)]
    assert any("near a boundary: a speed 20% off would choose depth" in n for n in notes)
    assert not all("near a boundary" in n for n in notes)
    # how to keep the shape whatever a timing reads, where another could choose another (issue 101 item 10)
    assert all(("near a boundary" in n) == ("; --set model.n_layers=" in n) for n in notes)
    monkeypatch.setattr(sizing, "calibrate", lambda cfg, device, update, loss, depths=(): speed)
    monkeypatch.setattr(machine_load.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # 2 cores, any machine
    monkeypatch.setattr(machine_load, "others_runnable", lambda: 7)
    note = size_model(cfg, (), 128, 1, CPU, None)[1]
    assert "other programs were running when the machine was timed (7 threads runnable besides this run's" in note
    assert re.search(r"; --set model.n_layers=\d+ keeps this shape whatever a timing reads$", note), note
    steps = replace(cfg, train=replace(cfg.train, max_steps=50))  # both bounds, not a budget it never reaches
    assert "(50 steps or 600 s at ~" in size_model(steps, (), 128, 1, CPU, None)[1]
    given = size_model(cfg, (), 128, 1, CPU, None)[2]  # the plan made again with the speed timed: still says so
    assert "other programs were running" in size_model(cfg, (), 128, 1, CPU, given)[1]
    monkeypatch.setattr(machine_load, "others_runnable", lambda: 0)
    assert "other programs" not in size_model(cfg, (), 128, 1, CPU, None)[1]


def test_the_plans_kernel_line_names_what_the_adamw_kernel_would_update_under_muon(pydoc_data, tmp_path, capsys):
    assert cli(tiny_args(pydoc_data, tmp_path / "run", "optim.name=muon", flags=["--dry-run"])) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "adamw:" in x)
    assert "(for the parameters Muon leaves to AdamW: embeddings, head, norms)" in line, line


def test_a_timed_or_too_short_budget_keeps_to_shapes_the_set_heads_fit(pydoc_data, tmp_path, monkeypatch):
    """n_kv_heads = 3 under a clock: the calibration times depths 3 and 6 (1 and 2 do not fit), and the smallest
    shape a budget too short to time gets is depth 3, not an invalid 1 x 64 that fails at its first step."""
    timed: list[int] = []
    real = sizing.calibrate

    def recording(cfg, device, update=None, loss=sizing.logits_loss, depths=()):
        timed.extend(depths or sizing.fitting_depths(cfg.model)[:2])
        return real(cfg, device, update=update, loss=loss, depths=depths)

    monkeypatch.setattr(sizing, "calibrate", recording)
    base = (*AUTO, "model.n_kv_heads=3", "train.max_steps=0", "model.vocab_size=512")
    cfg = tiny_config(pydoc_data, tmp_path, *base, "train.max_time=60")
    shape, note, speed = size_model(cfg, (), 128, 1, CPU, None)
    assert timed[:2] == [3, 6] and speed is not None and shape.n_layers % 3 == 0, note
    short = tiny_config(pydoc_data, tmp_path, *base, "train.max_time=5")
    assert size_model(short, (), 128, 1, CPU, None)[0].n_layers == 3


def test_a_run_bound_by_its_steps_is_not_near_a_speed_boundary(pydoc_data, tmp_path):
    """Where max_steps ends the run before its clock, the speed does not move its tokens: no boundary note."""
    cfg = tiny_config(pydoc_data, tmp_path, *AUTO, "train.max_steps=300", "train.max_time=600", "model.vocab_size=512")
    for f in np.geomspace(1e12, 1e14, 8):  # so fast that 300 steps end every run first
        assert "near a boundary" not in size_model(cfg, (), 128, 1, CPU, Speed(((1e6, f),)))[1]


def test_a_fixed_depth_names_the_head_key_its_width_cannot_split(pydoc_data, tmp_path, capsys):
    sets = ("model.n_layers=2", "model.d_model=0", "model.n_heads=3", "train.max_steps=2")
    assert cli(tiny_args(pydoc_data, tmp_path / "run", *sets, flags=["--dry-run"])) == 2
    err = capsys.readouterr().err.strip()
    assert "model.n_heads = 3 does not divide width 128 (64 x model.n_layers) into even head sizes" in err, err


# Issue 64 item 4: a fasttrain command bounds OpenMP's spinning, so a busy machine slows it by its share only.


@pytest.mark.parametrize(
    ("given", "expected"), [({}, "10000"), ({"GOMP_SPINCOUNT": "7"}, "7"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)]
)
def test_a_command_bounds_openmps_spin_before_torch_loads_it(given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | given
    # `python -m fasttrain.X` imports the package first, as this does with sys.argv[0] == "-m"
    probe = "import sys; sys.argv[0] = '-m'; import fasttrain, os; print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", str(expected)]
    library = "import fasttrain, os; print(os.environ.get('GOMP_SPINCOUNT'))"  # a program's import: untouched
    assert subprocess.run(
        [sys.executable, "-c", library], env=env, capture_output=True, text=True
    ).stdout.strip() == str(given.get("GOMP_SPINCOUNT"))
