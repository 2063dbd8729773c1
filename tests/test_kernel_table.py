"""The measured dispatch table: its reading, lookup and fallback ("auto" never picks a path measured
slower), the trainer's choice from it, and the committed table against the results it was written from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.studies.dispatch_table import MARGIN, build_table, step_entries, superseded, table_entries
from fasttrain.compute.device import kernels_on
from fasttrain.compute.kernel_table import TABLE, load_table, lookup, run_shapes
from fasttrain.config import KernelsConfig
from fasttrain.system.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # never touched: the capability is given, so this runs without a GPU


def entry(op: str, shape: dict, use: bool, mode: str = "compiled", capability: str = "sm_90") -> dict:
    return {
        "capability": capability,
        "gpu": "test GPU",
        "op": op,
        "mode": mode,
        "shape": shape,
        "use": use,
        "fasttrain_ms": 1.0 if use else 2.0,
        "stock_ms": 1.5,
        "stock": "torch",
    }


SYNTHETIC = [
    entry("rms_norm", {"hidden": 768}, False),
    entry("rms_norm", {"hidden": 4096}, True),
    entry("rms_norm", {"hidden": 8192}, True),
    entry("adamw", {"params": 100_000_000}, True),
    entry("adamw", {"params": 1_000_000_000}, True),
    entry("linear_cross_entropy", {"hidden": 768, "vocab": 50304}, False),
    entry("linear_cross_entropy", {"hidden": 4096, "vocab": 131072}, True),
]


@pytest.mark.parametrize(
    "op,shape,expected",
    [
        ("rms_norm", {"hidden": 768}, False),
        ("rms_norm", {"hidden": 1024}, False),  # nearest, within a factor of two
        ("rms_norm", {"hidden": 5000}, True),
        ("rms_norm", {"hidden": 6000}, True),  # between two that agree
        ("rms_norm", {"hidden": 1600}, None),  # between two that disagree, near neither
        ("rms_norm", {"hidden": 64}, None),  # below everything measured
        ("rms_norm", {"hidden": 65536}, None),  # above
        ("adamw", {"params": 350_000_000}, True),  # bracketed by two wins
        ("linear_cross_entropy", {"hidden": 1024, "vocab": 50304}, False),
        ("linear_cross_entropy", {"hidden": 4096, "vocab": 32000}, None),  # vocab 4x off: no bracketing in 2-D
    ],
)
def test_lookup_takes_the_nearest_measurement_or_none(op, shape, expected):
    found = lookup(SYNTHETIC, "sm_90", op, "compiled", shape)
    assert (None if found is None else found.use) is expected


def test_lookup_keeps_to_the_capability_and_mode():
    assert lookup(SYNTHETIC, "sm_80", "rms_norm", "compiled", {"hidden": 4096}) is None
    assert lookup(SYNTHETIC, "sm_90", "rms_norm", "eager", {"hidden": 4096}) is None
    assert lookup([], "sm_90", "rms_norm", "compiled", {"hidden": 4096}) is None


def test_auto_is_the_tables_verdict_and_explicit_settings_win():
    def chosen(cfg=KernelsConfig(), hidden=4096, params=100_000_000, capability="sm_90", sharded=False):
        shapes = {
            "rms_norm": {"hidden": hidden},
            "adamw": {"params": params},
            "linear_cross_entropy": {"hidden": hidden, "vocab": 131072},
        }
        return kernels_on(cfg, CUDA, sharded, shapes, compiled=True, capability=capability, table=SYNTHETIC).names()

    assert chosen() == ["linear_cross_entropy", "rms_norm", "adamw"]
    assert chosen(hidden=768) == ["adamw"]  # measured slower there: stock
    assert chosen(capability="sm_80") == []  # nothing measured on this GPU: stock
    assert chosen(sharded=True) == ["linear_cross_entropy", "rms_norm"]  # FSDP shards: no AdamW kernel
    forced = KernelsConfig(linear_cross_entropy=True, rms_norm=True, adamw=False)
    assert chosen(forced, hidden=768, capability="sm_80") == ["linear_cross_entropy", "rms_norm"]
    assert kernels_on(KernelsConfig(), CUDA, capability="sm_90", table=SYNTHETIC).names() == []  # no shapes given


def test_a_malformed_table_is_one_line_naming_it(tmp_path):
    assert load_table(tmp_path / "missing.json") == []
    for text in (
        "{",
        '{"entries": [{"op": "softmax"}]}',
        json.dumps({"entries": [entry("adamw", {"params": 0}, True)]}),
    ):
        (tmp_path / "t.json").write_text(text)
        with pytest.raises(UsageError, match="t.json: not a kernel table"):
            load_table(tmp_path / "t.json")


def case(function: str, impl: str, seconds: float, **info) -> dict:
    return {
        "name": f"{function}[x-{impl}]",
        "stats": {"median": seconds},
        "extra_info": {"impl": impl, "gpu": "test GPU", **info},
    }


def test_entries_are_on_only_where_the_kernel_beat_every_stock_path_by_the_margin():
    norm = dict(residual=True, passes="forward+backward", hidden=2048)
    lce = dict(hidden=768, vocab=50304)
    benchmarks = [
        case("test_rms_norm", "fasttrain", 1.0, **norm),
        case("test_rms_norm", "torch", 1.01, **norm),
        case("test_rms_norm", "eager", 3.0, **norm),
        case("test_rms_norm", "compiled", 0.5, **norm),
        case("test_rms_norm", "fasttrain", 1.0, **{**norm, "residual": False}),  # not the trainer's case
        case("test_linear_cross_entropy_fwd_bwd", "fasttrain", 1.0, **lce),
        case("test_linear_cross_entropy_fwd_bwd", "eager", 2.0, **lce),
        case("test_linear_cross_entropy_fwd_bwd", "compiled", 0.9, **lce),
        case("test_linear_cross_entropy_fwd_bwd", "liger", 0.5, **lce),  # not stock: never the rival
        {**case("test_rms_norm", "fasttrain", 1.0, **norm), "extra_info": {"impl": "fasttrain", **norm}},  # a CPU case
    ]
    entries = table_entries(benchmarks, capability="sm_90")
    got = {(e["op"], e["mode"]): (e["use"], e["stock"]) for e in entries}
    # 1.0 against torch's 1.01 is inside the margin: stock. No compiled norm entry without a block A/B:
    # the op-level "compiled" race (0.5) says nothing about a norm inductor fuses into its block.
    assert got == {
        ("rms_norm", "eager"): (False, "torch"),
        ("linear_cross_entropy", "eager"): (True, "eager"),
        ("linear_cross_entropy", "compiled"): (False, "compiled"),
    }
    block = dict(hidden=2048, compiled=True)
    with_block = benchmarks + [
        case("test_block_fwd_bwd", "fasttrain", 1.0, **block),
        case("test_block_fwd_bwd", "stock", 1.1, **block),
        case("test_block_fwd_bwd", "fasttrain", 1.0, hidden=768, compiled=False),  # dry run
        case("test_block_fwd_bwd", "stock", 2.0, hidden=768, compiled=False),
    ]
    compiled_norm = [
        e for e in table_entries(with_block, capability="sm_90") if (e["op"], e["mode"]) == ("rms_norm", "compiled")
    ]
    assert [(e["shape"], e["use"], e["stock"]) for e in compiled_norm] == [({"hidden": 2048}, True, "stock")]
    assert MARGIN < 1
    assert table_entries(benchmarks) == []  # no capability known: nothing to key an entry by


def step_record(case: str, median_ms: float, kernels: list[str], **extra) -> dict:
    shapes = run_shapes(768, 50304, 123_587_328)
    return (
        dict(
            case=case, step_ms={"median": median_ms}, kernels=kernels, capability="sm_90", gpu="test GPU", shapes=shapes
        )
        | extra
    )


def test_a_whole_step_slower_with_autos_kernels_turns_them_off_there():
    slower = [
        step_record("stock", 100.0, []),
        step_record("kernels auto", 104.0, ["adamw", "rms_norm"]),
        step_record("stock", 101.0, []),
        step_record("kernels auto", 103.5, ["adamw", "rms_norm"]),
        step_record("kernels auto", 50.0, ["adamw"], error="out of memory"),  # a failed case counts for nothing
        step_record("fp8 head", 90.0, []),  # another lever: not a kernel verdict
    ]
    verdicts = step_entries(slower)
    assert [(v["op"], v["mode"], v["shape"], v["use"]) for v in verdicts] == [
        ("adamw", "compiled", {"params": 123_587_328}, False),
        ("rms_norm", "compiled", {"hidden": 768}, False),
    ]
    assert verdicts[0]["fasttrain_ms"] == 103.75 and verdicts[0]["stock_ms"] == 100.5
    # Within the margin (1% slower), or faster with two kernels at once: no verdict, the op-level entries stand.
    assert step_entries([step_record("stock", 100.0, []), step_record("kernels auto", 101.0, ["adamw"])]) == []
    assert (
        step_entries([step_record("stock", 100.0, []), step_record("kernels auto", 90.0, ["adamw", "rms_norm"])]) == []
    )
    assert step_entries([step_record("kernels auto", 200.0, ["adamw"])]) == []  # no stock to race
    # One kernel forced on: faster by the margin turns it on there, slower off, level says nothing.
    stock = [step_record("stock", 100.0, []), step_record("stock", 100.0, [])]
    faster = step_entries([*stock, step_record("kernel adamw", 97.0, ["adamw"])])
    assert [(v["op"], v["use"], v["fasttrain_ms"], v["stock"]) for v in faster] == [("adamw", True, 97.0, "whole step")]
    assert [v["use"] for v in step_entries([*stock, step_record("kernel rms_norm", 103.0, ["rms_norm"])])] == [False]
    assert step_entries([*stock, step_record("kernel adamw", 99.0, ["adamw"])]) == []
    # A verdict replaces the op-level entries near its shape, in its capability and mode only.
    near, far = entry("adamw", {"params": 200_000_000}, True), entry("adamw", {"params": 1_000_000_000}, True)
    eager = entry("adamw", {"params": 123_587_328}, True, mode="eager")
    assert [superseded(e, verdicts) for e in (near, far, eager)] == [True, False, False]


def test_a_later_results_file_replaces_an_earlier_ones_entry_at_the_same_shape(tmp_path):
    """Two GPUs of one capability (an H100 and an H200 are both sm_90), or one GPU before and after a
    kernel changed: the newest measurement decides, and the older one's other shapes stay."""
    norm = dict(residual=True, passes="forward+backward", capability="sm_90")
    older = [
        case("test_rms_norm", "fasttrain", 2.0, hidden=768, **norm),
        case("test_rms_norm", "torch", 1.0, hidden=768, **norm),
    ]
    older += [
        case("test_rms_norm", "fasttrain", 1.0, hidden=8192, **norm),
        case("test_rms_norm", "torch", 2.0, hidden=8192, **norm),
    ]
    newer = [
        case("test_rms_norm", "fasttrain", 1.0, hidden=768, **norm),
        case("test_rms_norm", "torch", 2.0, hidden=768, **norm),
    ]
    paths = []
    for name, benchmarks in (("older", older), ("newer", newer)):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps({"benchmarks": benchmarks}))
    got = {e["shape"]["hidden"]: e["use"] for e in build_table(paths)}
    assert got == {768: True, 8192: True}
    assert {e["shape"]["hidden"]: e["use"] for e in build_table(paths[::-1])} == {768: False, 8192: True}
    # Whole-step verdicts: the newer ablation's replaces the older's at its key, and both overrule the ops
    for name, records in (
        ("slower", [step_record("stock", 100.0, []), step_record("kernels auto", 104.0, ["rms_norm"])]),
        ("faster", [step_record("stock", 100.0, []), step_record("kernel rms_norm", 97.0, ["rms_norm"])]),
    ):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(records))
    compiled = [(e["shape"], e["use"], e["stock"]) for e in build_table(paths) if e["mode"] == "compiled"]
    assert compiled == [({"hidden": 768}, True, "whole step")]
    older_last = [*paths[:2], *paths[:1:-1]]
    compiled = [(e["shape"], e["use"], e["stock"]) for e in build_table(older_last) if e["mode"] == "compiled"]
    assert compiled == [({"hidden": 768}, False, "whole step")]


def test_the_committed_table_is_what_the_committed_gpu_results_give():
    committed = json.loads(TABLE.read_text())
    assert committed["entries"] == build_table([str(ROOT / path) for path in committed["source"]])
    assert load_table() == committed["entries"]
    # GPT-2 small compiled: the AdamW kernel wins alone (H200: 1.03 against 1.45 ms with clipping), and since
    # TensorTable stopped rebuilding its tables every step the whole compiled step on the H100 runs level with
    # it (142.1 and 142.6 against 141.9 and 142.0 ms, interleaved): no step verdict, so the op's decides.
    shapes = run_shapes(768, 50304, 123_587_328)
    compiled = kernels_on(KernelsConfig(), CUDA, False, shapes, compiled=True, capability="sm_90")
    assert compiled.names() == ["adamw"]
    assert compiled.reasons == (  # what the plan prints: each verdict with the medians that decided it
        "linear_cross_entropy: auto, off: measured slower than stock here (7.71 against 7.037 ms, compiled)",
        "rms_norm: auto, off: no faster than stock here beyond the table's margin (2.015 against 2.028 ms, stock)",
        "adamw: auto, on: measured faster than stock here (1.034 against 1.448 ms, torch_fused)",
    )
    eager = kernels_on(KernelsConfig(), CUDA, False, shapes, compiled=False, capability="sm_90")
    assert eager.names() == ["linear_cross_entropy", "rms_norm", "adamw"]
