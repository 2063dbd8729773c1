"""benchmarks.studies.gpu_check: the whole GPU acceptance pack as a dry run on the CPU, and its pieces."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.studies import gpu_check, gpu_quality
from benchmarks.studies.report import main as report_main
from fasttrain.system.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Every stage, on the CPU at tiny sizes, as CI runs it: about 160 s of plumbing alone, so its tests
    are in the second tier."""
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.studies.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


@pytest.mark.subprocess
@pytest.mark.second_tier
def test_dry_run_passes_every_stage_and_writes_the_report(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.FILES)
    results = json.loads((out / "gpu_check.json").read_text())
    stages = results["gpu_check"]["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    for name, record in stages.items():
        assert record["status"] == "pass" and record["checks"], name
    # Every check of the short training run ran for real (on the CPU), the bitwise resume among them.
    assert [c["name"] for c in stages["train"]["checks"]] == [
        "the loss falls",
        "no recompiles after warm-up",
        "a checkpoint resumes bit for bit",
        "document masking (bucketed, compiled flex attention) trains",
    ]
    assert stages["tests"]["figures"]["passed"] > 0 and stages["tests"]["figures"]["failed"] == 0
    assert stages["env"]["figures"]["copy_gb_per_s"] > 0 and stages["env"]["figures"]["matmul_tflop_per_s"] > 0
    # The tuner measured RMSNorm tilings (into a scratch copy of the table, in a dry run).
    (tuned,) = stages["tune"]["figures"]["tilings"].values()
    assert set(tuned) == {"64", "256"} and all(set(e) >= {"forward", "backward", "median_us"} for e in tuned.values())
    # Each benchmark case is tagged with its stage; the kernels race eager PyTorch.
    by_stage = {b["extra_info"]["stage"] for b in results["benchmarks"]}
    assert by_stage == {"kernels", "step"}
    races = stages["kernels"]["figures"]["races"]
    assert {r["rival"] for r in races} >= {"eager"} and all(r["speedup"] > 0 and r["min_speedup"] > 0 for r in races)
    # Each kernel wrapper's host time per call, against stock PyTorch's (the CPU fallback's, in a dry run).
    host = [b for b in results["benchmarks"] if b["name"].startswith("test_host_overhead")]
    assert {b["params"]["op"] for b in host} == {
        "rms_norm",
        "add_rms_norm",
        "cross_entropy",
        "linear_cross_entropy",
        "adamw",
    }
    assert all(b["extra_info"]["host_us_per_call"] > 0 and b["extra_info"]["timing"] == "host" for b in host)
    assert any(r["case"].startswith("host_overhead") for r in races)
    # The ablation: stock and each lever in a process of its own; a GPU-only lever is skipped on the CPU.
    cases = {r["case"]: r for r in stages["ablation"]["figures"]["cases"]}
    assert cases["stock"]["tokens_per_s"] > 0 and cases["stock"]["error"] is None
    assert cases["attention cudnn"]["skipped"] and "needs a CUDA GPU" in cases["attention cudnn"]["error"]
    assert [r["case"] for r in stages["ablation-compile"]["figures"]["cases"]] == ["stock"]
    assert [r["case"] for r in stages["ablation-kernels"]["figures"]["cases"]] == ["stock"]
    assert cases["micro-batch x2"]["batch_size"] == 2 * cases["stock"]["batch_size"]
    assert cases["micro-batch x2"]["tokens_per_update"] == cases["stock"]["tokens_per_update"]  # the same update
    assert len(cases["stock"]["step_ms"]["each"]) == 3
    # Parity: the defaults and stock pieces end 30 steps of the same run at losses within 1%.
    parity = stages["parity"]
    assert [c["name"] for c in parity["checks"]] == [
        "defaults: val_loss within 1% of stock's",
        "defaults: train_loss within 1% of stock's",
    ]
    assert parity["figures"]["stock"]["steps"] == parity["figures"]["defaults"]["steps"] == 30
    # The profile: each kernel setting's step time and where it goes, by category.
    profiled = stages["profile"]["figures"]
    assert list(profiled) == ["fasttrain", "kernels-on", "stock"] and profiled["stock"]["kernels"] == []
    for found in profiled.values():
        assert 0 < found["step_ms"]["min"] <= found["step_ms"]["median"]
        assert min(found["step_ms"]["each"]) == pytest.approx(found["step_ms"]["min"], abs=1e-3)
        assert found["allocator"] == {}  # the CPU has no caching allocator
        assert found["ms_per_step"]["matmul"] > 0 and sum(found["ms_per_step"].values()) > 0
    report = (out / "gpu_check.md").read_text()
    assert "dry run" in report and "## Checks" in report and "a checkpoint resumes bit for bit | pass" in report
    assert "## Every case" in report
    assert "gpu_check (dry run" in proc.stdout and "train    PASS" in proc.stdout


@pytest.mark.subprocess
@pytest.mark.second_tier
def test_dry_run_quality_trains_fasttrain_and_two_depths_of_the_stand_in_nanochat(dry_run):
    _, out = dry_run
    quality = json.loads((out / "gpu_check.json").read_text())["gpu_check"]["stages"]["quality"]
    found = quality["figures"]
    assert found["nanochat"]["source"].endswith("fake_nanochat") and found["failures"] == []
    assert found["fasttrain"]["system"] == "fasttrain" and found["fasttrain"]["budget_seconds"] == 2.0
    # what its plan read and chose, which the next GPU session needs to tell why it trained what it did
    assert any(note.startswith("model.n_layers = 0") for note in found["fasttrain"]["plan_notes"])
    depths = [r["recipe"]["n_layer"] for r in found["nanochat_runs"]]
    assert depths == [found["depth_choice"]["first_depth"], gpu_quality.second_depth(found["nanochat_runs"][0])]
    val = found["fasttrain"]["val_bpb"], *(r["val_bpb"] for r in found["nanochat_runs"])
    assert all(0 < bpb < 20 for bpb in val)
    # both sides scored on every target of the val split, each at its own context
    assert len({r["val_targets"] for r in found["nanochat_runs"]}) == 1
    assert found["nanochat_best"]["val_bpb"] == min(val[1:])
    assert found["lead_bpb"] == pytest.approx(found["nanochat_best"]["val_bpb"] - found["fasttrain"]["val_bpb"])
    assert [c["name"] for c in quality["checks"]] == [
        "fasttrain trained and was scored",
        *(f"nanochat depth {d} trained and was scored" for d in depths),
    ]


def test_the_second_depth_is_on_the_far_side_of_the_first_runs_compute_optimal_tokens():
    def run(depth, tokens):
        return {"recipe": {"n_layer": depth}, "tokens": tokens, "compute_optimal_tokens": 1000}

    assert gpu_quality.second_depth(run(6, 1000)) == 7  # read its tokens out: the best depth is deeper
    assert gpu_quality.second_depth(run(6, 999)) == 5
    assert gpu_quality.second_depth(run(1, 10)) == 2  # no shallower depth


def test_the_first_depth_is_the_deepest_whose_compute_optimal_flops_fit(monkeypatch):
    monkeypatch.syspath_prepend(str(gpu_quality.FAKE_CHECKOUT))
    for name in ("nanochat", "nanochat.gpt", "nanochat.optim"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    gpt = importlib.import_module("nanochat.gpt")
    settings = gpu_quality.GPU
    flops = [gpu_quality.compute_optimal_flops(gpt, d, 4096, settings) for d in range(1, 6)]
    assert flops == sorted(flops)
    assert gpu_quality.first_depth(gpt, 4096, settings, flops[3]) == 4
    assert gpu_quality.first_depth(gpt, 4096, settings, flops[3] * 0.99) == 3
    assert gpu_quality.first_depth(gpt, 4096, settings, 1.0) == 1  # never below depth 1
    for name in ("nanochat", "nanochat.gpt", "nanochat.optim"):  # the stand-in not left for later tests
        sys.modules.pop(name, None)


def test_quality_without_the_carried_corpus_or_checkout_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DIR", raising=False)
    monkeypatch.setattr(gpu_quality, "CORPUS", tmp_path / "stdlib-large")
    found = gpu_quality.compare(tmp_path, time.monotonic() + 60, dry_run=False)
    assert found == {"error": found["error"]} and str(tmp_path / "stdlib-large") in found["error"]
    (tmp_path / "stdlib-large").mkdir()
    (tmp_path / "stdlib-large" / "meta.json").write_text("{}")
    monkeypatch.setattr(gpu_quality, "CHECKOUT", tmp_path / "nanochat")
    found = gpu_quality.compare(tmp_path, time.monotonic() + 60, dry_run=False)
    assert str(tmp_path / "nanochat") in found["error"] and "\n" not in found["error"]


def test_a_nanochat_copy_inside_another_repository_has_no_commit_of_its_own():
    """The H200's results named fasttrain's commit as nanochat's: the carried `git archive` copy sits in fasttrain's
    checkout, whose HEAD git found. The stand-in sits there too."""
    from benchmarks.studies.time_to_quality import Nanochat

    assert Nanochat(gpu_quality.FAKE_CHECKOUT, installed=False).describe()["commit"] is None


def test_fasttrain_alone_runs_no_nanochat_and_a_killed_run_leaves_what_it_had_done(tmp_path, monkeypatch):
    """On the H200 fasttrain's side was killed after 305 s, to leave nanochat its time, and kept nothing of why: one
    side a stage (quality-fasttrain), and a killed run's metrics.jsonl read back a round at a time."""
    monkeypatch.delenv("NANOCHAT_DIR", raising=False)
    corpus = tmp_path / "stdlib-large"
    corpus.mkdir()
    (corpus / "meta.json").write_text('{"vocab_size": 4096}')
    monkeypatch.setattr(gpu_quality, "CORPUS", corpus)
    monkeypatch.setattr(gpu_quality, "CHECKOUT", gpu_quality.FAKE_CHECKOUT)
    limits = []

    def killed(sets, data, budget, tokens, seed, threads, out_dir, timeout):
        limits.append(timeout)
        (out_dir / "ensemble").mkdir(parents=True)
        now = time.time()
        events = [
            {"event": "start", "time": now + 40, "notes": ["model.n_layers = 0: depth 8"]},
            {"event": "compile", "time": now + 60, "step": 1, "seconds": 20.0},
            {"event": "train", "time": now + 90, "step": 10, "seconds_left": 91.0},
        ]
        (out_dir / "ensemble" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        raise subprocess.TimeoutExpired("train", timeout)

    monkeypatch.setattr(gpu_quality, "run_fasttrain", killed)
    found = gpu_quality.compare(tmp_path / "work", time.monotonic() + 300, dry_run=False, sides=("fasttrain",))
    assert "nanochat_runs" not in found and "fasttrain" not in found
    assert 290 < limits[0] < 300  # alone, it has the stage's time, not what nanochat's first depth leaves
    ((failed),) = found["failures"]
    (done,) = failed["progress"]
    assert failed["part"] == "fasttrain" and "killed after" in failed["error"]
    assert done["round"] == "ensemble" and done["notes"] == ["model.n_layers = 0: depth 8"]
    assert 39 < done["started_after_s"] < 41 and 89 < done["last_event_after_s"] < 91
    assert (done["compile_s"], done["last_step"], done["seconds_left"]) == (20.0, 10, 91.0)


@pytest.mark.subprocess
@pytest.mark.second_tier
def test_report_reads_the_results_file(dry_run, capsys):
    _, out = dry_run
    with pytest.raises(SystemExit) as e:
        run_cli(report_main, [str(out / "gpu_check.json")])
    assert e.value.code == 0
    assert "rms_norm" in capsys.readouterr().out


@pytest.mark.subprocess
@pytest.mark.second_tier
def test_combine_merges_stages_and_a_later_failure_wins(dry_run, tmp_path):
    _, out = dry_run
    results = json.loads((out / "gpu_check.json").read_text())
    later = json.loads(json.dumps(results))
    later["gpu_check"]["stages"] = {
        "tests": {
            **results["gpu_check"]["stages"]["tests"],
            "status": "fail",
            "checks": [{"name": "test suite", "ok": False, "detail": "1 failed"}],
        }
    }
    later["benchmarks"] = []
    (tmp_path / "later.json").write_text(json.dumps(later))
    merged = tmp_path / "merged"
    with pytest.raises(SystemExit) as e:
        run_cli(
            gpu_check.main,
            ["--combine", str(out / "gpu_check.json"), str(tmp_path / "later.json"), "--out", str(merged)],
        )
    assert e.value.code == 1  # a failed check
    combined = json.loads((merged / "gpu_check.json").read_text())
    assert combined["gpu_check"]["stages"]["tests"]["status"] == "fail"
    assert combined["gpu_check"]["stages"]["train"]["status"] == "pass"  # kept from the first file
    assert len(combined["benchmarks"]) == len(results["benchmarks"])  # the later file had no cases to replace them
    assert "| tests | test suite | **FAIL** | 1 failed |" in (merged / "gpu_check.md").read_text()


def test_the_ablation_stages_cover_every_lever_once_each_after_its_own_stock():
    from benchmarks.studies.ablation import LEVERS, STAGE_CASES

    assert list(STAGE_CASES) == [s for s in gpu_check.STAGES if s.startswith("ablation")]
    assert all(cases[0] == "stock" for cases in STAGE_CASES.values())
    levers = [case for cases in STAGE_CASES.values() for case in cases[1:]]
    assert sorted(levers) == sorted(LEVERS)


def test_an_ablation_case_without_time_left_is_skipped_not_failed(monkeypatch):
    from benchmarks.studies import ablation

    monkeypatch.setattr(ablation, "stock_settings", lambda: [])
    records = ablation.ablation(["stock", "fp8 head"], 3, deadline=time.monotonic() + 30)
    assert [(r["case"], r["skipped"], r["error"]) for r in records] == [
        ("stock", True, "not reached: out of time"),
        ("fp8 head", True, "not reached: out of time"),
    ]


def test_final_losses_are_the_last_evaluation_and_the_training_tail():
    losses = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5]
    events = [{"event": "train", "step": i, "loss": x} for i, x in enumerate(losses, start=1)]
    events += [{"event": "eval", "step": 6, "val_loss": 5.5}, {"event": "eval", "step": 12, "val_loss": 0.75}]
    assert gpu_check.final_losses(events) == {"val_loss": 0.75, "train_loss": 0.5}  # the last tenth: 1 step
    assert gpu_check.final_losses(events[:3]) == {"val_loss": None, "train_loss": 8.0}
    assert gpu_check.final_losses([]) == {"val_loss": None, "train_loss": None}


def test_late_recompiles_counts_only_those_after_the_first_evaluation():
    log = "\n".join(
        [
            "V1122 guards.py] [0/1] [__recompiles] Recompiling function forward in model.py:80",
            "V1122 guards.py] [0/1] [__recompiles]     triggered by the following guard failure(s):",
            "V1122 guards.py] [0/1] [__recompiles]     - 0/0: ___check_obj_id(self.training)",
            "step      5/10 (50.0%) | loss 7.1",
            "eval step 5: val loss 7.2",
            "V1122 guards.py] [0/2] [__recompiles] Recompiling function forward in model.py:80",
            "V1122 guards.py] [0/2] [__recompiles]     triggered by the following guard failure(s):",
            "V1122 guards.py] [0/2] [__recompiles]     - 0/1: tensor 'x' size mismatch at index 1. expected 64, actual 48",
            "V1122 guards.py] [0/2] [__recompiles]     - 0/0: ___check_obj_id(self.training)",
        ]
    )
    every, late = gpu_check.late_recompiles(log)
    assert every == [
        "forward: 0/0: ___check_obj_id(self.training)",
        "forward: 0/1: tensor 'x' size mismatch at index 1. expected 64, actual 48",
    ]
    assert late == every[1:]
    assert gpu_check.late_recompiles("step 1\nstep 2\n") == ([], [])


@pytest.mark.subprocess
def test_a_command_past_the_stage_limit_is_killed_with_its_children(tmp_path):
    ctx = gpu_check.Context(tmp_path, time.monotonic() + 1, dry_run=True)
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    start = time.monotonic()
    code, _ = gpu_check.run([sys.executable, "-c", script], ctx)
    assert code is None and time.monotonic() - start < 20


def test_races_compare_fasttrain_with_the_fastest_other():
    def case(impl, median, minimum):
        return {
            "name": f"test_x[{impl}]",
            "params": {"n": 1, "impl": impl},
            "stats": {"median": median, "min": minimum},
            "extra_info": {"stage": "kernels"},
        }

    # The fastest other is chosen by median: "other" has the lowest min but not the lowest median.
    rows = gpu_check.races(
        [case("fasttrain", 2.0, 1.0), case("eager", 3.0, 2.9), case("compiled", 2.5, 2.0), case("other", 9.0, 0.5)]
    )
    assert rows == [
        {
            "case": "x n=1",
            "fasttrain_s": 2.0,
            "fasttrain_min_s": 1.0,
            "rival": "compiled",
            "rival_s": 2.5,
            "rival_min_s": 2.0,
            "speedup": 1.25,
            "min_speedup": 2.0,
        }
    ]
    assert gpu_check.races([case("eager", 1.0, 1.0)]) == []  # nothing to race
    results = gpu_check.new_results([], "abc", dry_run=False)
    results["benchmarks"] = [case("fasttrain", 2.0, 1.0), case("compiled", 2.5, 2.0)]
    assert "| x n=1 | 2.00 s | 1.00 s | compiled | 2.50 s | 2.00 s | 1.25x | 2.00x |" in gpu_check.report(results)


def test_the_report_names_the_machine_where_the_env_stage_did_not_run(monkeypatch):
    monkeypatch.setattr(gpu_check, "smi_query", lambda field: {"name": "NVIDIA H200"}[field])
    results = gpu_check.new_results(["--stage", "quality"], "abc", dry_run=False)
    heading, _, when = gpu_check.report(results).splitlines()[:3]
    assert heading == "# GPU acceptance: NVIDIA H200"
    assert when == f"commit abc; {results['datetime']}"  # no empty environment part before it


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "warp"], "invalid choice: 'warp'"),
        (["--combine", "{results}", "--out", "{tmp}/out"], "no 'gpu_check' entry"),
        (["--out", "{file}"], "cannot create it"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "results.json").write_text(json.dumps({"benchmarks": []}))
    (tmp_path / "file").write_text("")
    args = [a.format(results=tmp_path / "results.json", tmp=tmp_path, file=tmp_path / "file" / "sub") for a in args]
    with pytest.raises(SystemExit) as e:
        run_cli(gpu_check.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
