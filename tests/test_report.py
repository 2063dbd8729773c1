"""benchmarks.studies.report (a results JSON to a markdown table and a bar chart) and benchmarks.studies.profile_step."""

from __future__ import annotations

import json

import pytest

from benchmarks.studies.report import main
from fasttrain.system.errors import run_cli


def case(name: str, params: dict, median: float, minimum: float, **extra) -> dict:
    return {
        "name": name,
        "params": params,
        "stats": {"median": median, "min": minimum},
        "extra_info": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", **extra},
    }


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            {
                "commit_info": {"id": "0123456789abcdef", "dirty": False},
                "datetime": "2026-11-21T10:00:00",
                "command": "pytest benchmarks/ --benchmark-only",
                "benchmarks": [
                    case(
                        "test_rms_norm[H768-fasttrain]",
                        {"hidden": 768, "impl": "fasttrain"},
                        2.5e-5,
                        2.41e-5,
                        gb_per_s=2900.5,
                        fraction_of_floor=0.93,
                        timing="cuda_events",
                    ),
                    case(
                        "test_rms_norm[H768-eager]",
                        {"hidden": 768, "impl": "eager"},
                        8e-5,
                        7.9e-5,
                        gb_per_s=910.2,
                        fraction_of_floor=0.29,
                        timing="cuda_events",
                    ),
                    case(
                        "test_rms_norm[H768-compiled]",
                        {"hidden": 768, "impl": "compiled"},
                        4e-5,
                        3.9e-5,
                        gb_per_s=1820.4,
                        fraction_of_floor=0.58,
                        timing="cuda_events",
                    ),
                    case(
                        "test_gpu_train_step[gpt2-fasttrain]",
                        {"config": "gpt2", "impl": "fasttrain"},
                        0.31,
                        0.305,
                        tokens_per_s=1_057_000,
                        mfu=0.512,
                        timing="host",
                    ),
                    case(
                        "test_host_overhead[rms_norm-fwd-fasttrain]",
                        {"op": "rms_norm", "passes": "fwd", "impl": "fasttrain"},
                        1.834e-5,
                        1.8e-5,
                        host_us_per_call=18.34,
                        timing="host",
                    ),
                ],
            }
        )
    )
    return path


def test_table_and_chart(results, tmp_path, capsys):
    assert main([str(results), "--markdown", str(tmp_path / "t.md"), "--chart", str(tmp_path / "c.png")]) == 0
    table = (tmp_path / "t.md").read_text().splitlines()
    assert table[0].startswith("NVIDIA H100 80GB HBM3, torch 2.11.0, triton 3.6.0, commit 0123456789ab, 2026-11-21")
    assert table[2] == (
        "| case | implementation | median | min | vs stock | GB/s | tokens/s | of floor | MFU | host us/call | timed by |"
    )
    # against the strongest stock case of its group: compiled (40 us), not eager (80 us)
    assert table[4] == (
        "| rms_norm hidden=768 | fasttrain | 25.0 us | 24.1 us | 1.60x | 2,900.5 |  | 0.93 |  |  | cuda_events |"
    )
    assert table[5].startswith("| rms_norm hidden=768 | eager | 80.0 us | 79.0 us | 0.50x | 910.2 |")
    assert table[6].startswith("| rms_norm hidden=768 | compiled | 40.0 us | 39.0 us | 1.00x | 1,820.4 |")
    assert table[7] == (
        "| gpu_train_step config=gpt2 | fasttrain | 310.00 ms | 305.00 ms | no stock op |  | 1,057,000 |  | 0.512 |  | host |"
    )
    assert table[8] == (
        "| host_overhead op=rms_norm passes=fwd | fasttrain | 18.3 us | 18.0 us | no stock op |  |  |  |  | 18.34 | host |"
    )
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.png")


def test_prints_the_table_without_a_file(results, capsys):
    main([str(results)])
    assert "| rms_norm hidden=768 | eager | 80.0 us | 79.0 us | 0.50x | 910.2 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message", [(None, "cannot read"), ("{", "not JSON"), ('{"machine_info": {}}', "no 'benchmarks' list")]
)
def test_bad_results_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit:
        run_cli(main, [str(path)])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err


def test_profile_step_writes_a_trace_and_a_table(tmp_path, capsys):
    from benchmarks.studies.profile_step import main as profile_main

    tiny = [
        "train.device=cpu",
        "train.compile=false",
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.max_seq_len=16",
        "train.batch_size=2",
        "train.seq_len=16",
    ]
    assert profile_main(["configs/base.toml", "--set", *tiny, "--steps", "1", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "aten::mm" in out and f"trace: {tmp_path / 'p' / 'trace.json'}" in out
    assert json.loads((tmp_path / "p" / "trace.json").read_text())["traceEvents"]


def test_profile_categories_count_each_kernel_once_on_cuda():
    """A CPU op carries the device time of the kernel it launched, and so does a user annotation around it:
    only the kernel's own event counts, or a step's matmul time doubles and the idle time reads 0."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    from benchmarks.studies.profile_step import ms_by_category

    op = FunctionEvent(
        id=1, name="aten::mm", thread=0, start_us=0, end_us=50, device_type=DeviceType.CPU, use_device="cuda", stack=[]
    )
    op.append_kernel("sm90_xmma_gemm_bf16", 0, 2000)
    kernel = FunctionEvent(
        id=2,
        name="sm90_xmma_gemm_bf16",
        thread=0,
        start_us=0,
        end_us=2000,
        device_type=DeviceType.CUDA,
        use_device="cuda",
        device_index=0,
        stack=[],
    )
    norm = FunctionEvent(
        id=3,
        name="_rms_norm_forward_kernel",
        thread=0,
        start_us=2000,
        end_us=2500,
        device_type=DeviceType.CUDA,
        use_device="cuda",
        device_index=0,
        stack=[],
    )
    annotation = FunctionEvent(
        id=4,
        name="## Call CompiledFxGraph ##",
        thread=0,
        start_us=0,
        end_us=2500,
        device_type=DeviceType.CUDA,
        use_device="cuda",
        device_index=0,
        stack=[],
        is_user_annotation=True,
    )
    events = EventList([op, kernel, norm, annotation], use_device="cuda")
    events._build_tree()
    assert ms_by_category(events.key_averages(), cuda=True, steps=2) == {"matmul": 1.0, "norm": 0.25}


def test_attention_kernels_named_like_matmuls_count_as_attention():
    """Matmul's pattern came first and caught cudnn's and cutlass's attention kernels (an H100 profile put 7.7 ms of
    attention a step under matmul); plain matmul kernels stay matmul."""
    from benchmarks.studies.profile_step import category

    for name in (
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg_kernel",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, cutlass::bfloat16_t>>",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80",
    ):
        assert category(name) == "attention", name
    for name in ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "nvjet_hsh_128x256_64x4", "aten::mm"):
        assert category(name) == "matmul", name


def test_idle_gaps_are_charged_to_the_host_op_whose_launch_ended_them():
    """Two streams' kernels merge into one timeline; a gap is charged to the innermost and the outermost
    CPU op around the launch of the work after it, with how late that launch came."""
    from benchmarks.studies.profile_step import idle_gaps

    def x(cat, name, ts, dur, tid=1, correlation=None):
        event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}
        return {**event, "args": {"correlation": correlation}} if correlation is not None else event

    trace = {
        "traceEvents": [
            x("user_annotation", "Optimizer.step#FusedAdamW.step", 100, 400),
            x("cpu_op", "fasttrain::adamw", 150, 300),
            x("cuda_driver", "cuLaunchKernel", 320, 5, correlation=3),
            x("cpu_op", "aten::mm", 0, 20),
            x("cuda_runtime", "cudaLaunchKernel", 5, 5, correlation=1),
            x("cuda_runtime", "cudaLaunchKernel", 12, 5, correlation=2),
            x("kernel", "gemm_a", 10, 100, tid=7, correlation=1),
            x("kernel", "gemm_b", 50, 150, tid=8, correlation=2),  # another stream: overlaps, no gap
            x("kernel", "adamw_kernel", 300, 50, tid=7, correlation=3),  # 100 us idle, launched 120 us late
            x("gpu_memset", "Memset", 360, 10, tid=7),  # 10 us idle, no launch known
        ]
    }
    found = idle_gaps(trace, steps=2)
    assert found["ms_per_step"] == pytest.approx((0.100 + 0.010) / 2)
    assert found["by_launcher"] == {"fasttrain::adamw": 0.05, "unknown": 0.005}
    assert found["by_phase"] == {"Optimizer.step#FusedAdamW.step": 0.05, "unknown": 0.005}
    first = found["largest"][0]
    assert first == {
        "ms": 0.1,
        "next": "adamw_kernel",
        "launcher": "fasttrain::adamw",
        "phase": "Optimizer.step#FusedAdamW.step",
        "launch_lag_ms": 0.12,
    }
    assert idle_gaps({"traceEvents": [x("cpu_op", "aten::mm", 0, 20)]}, steps=1)["largest"] == []
