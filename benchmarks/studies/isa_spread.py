"""How far the main job's fp32 losses move between the instruction sets one CPU can run as: the spread that
tests/test_pinned_losses.py's tolerance is set from.

    python -m benchmarks.studies.isa_spread [--out FILE.json]

oneDNN and ATen pick their kernels by what the CPU offers, and each sums in its own order, so a loss recorded
on one machine differs in its last bits on another. ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap what each
may use, so one machine runs as the older ones too: this runs the pinned test's main job (MAIN_JOB_SETS, with
Muon as configs/base.toml has it and with AdamW; one optimizer step a micro-batch and two) under every pair
of caps the CPU allows, plus the machine as it is, each in a process of its own, and records every loss and
the largest relative difference from the uncapped run's.

Writes benchmarks/results/cpu-step/cpu-isa-spread-<date>.json by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.studies.common import ROOT, result_header
from fasttrain.plot import read_metrics
from fasttrain.preparation.preparation import prepare

# The pinned test's main job: configs/base.toml's recipe and model rule on a small batch for a few steps,
# every step logged, saved at step 3 (for the test's bitwise resume). The data and out dir are added per run.
MAIN_JOB_SETS = (
    "data.vocab_size=512",
    "train.device=cpu",
    'train.precision="fp32"',
    "train.batch_size=4",
    "train.seq_len=64",
    "train.max_steps=6",
    "train.max_time=0",  # steps, not base.toml's budget: the shape it chooses comes from them, untimed
    "train.log_interval=1",
    "train.eval_interval=3",
    "train.eval_steps=2",
    "schedule.warmup_steps=2",
    "train.sample_tokens=0",
    "train.tensorboard=false",
    "checkpoint.interval=3",
)
CASES = {"plain": (), "accumulation": ("train.tokens_per_update=512",)}  # 2 micro-batches of 4 x 64
OPTIMIZERS = {"muon": (), "adamw": ("optim.name=adamw",)}

# Each cap's values, and the /proc/cpuinfo flags a value needs.
ATEN = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
ONEDNN = {
    "SSE41": set(),
    "AVX2": {"avx2", "fma"},
    "AVX512_CORE": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "AVX512_CORE_BF16": {"avx512_bf16"},
    "AVX512_CORE_AMX": {"amx_bf16", "amx_tile"},
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def levels(flags: set[str]) -> dict[str, dict[str, str]]:
    """The name and environment of every pair of caps this CPU can run as, and "best": the machine as it is."""
    found: dict[str, dict[str, str]] = {"best": {}}
    for aten, needs_a in ATEN.items():
        for onednn, needs_o in ONEDNN.items():
            if needs_a <= flags and needs_o <= flags:
                found[f"{aten}/{onednn}"] = {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}
    return found


def losses(data: Path, out: Path, caps: dict[str, str], sets: tuple[str, ...]) -> list[float]:
    """The train and validation losses of the main job run under `caps`, in the order metrics.jsonl has them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_CPU", "ONEDNN_MAX"))} | caps
    command = [sys.executable, "-m", "fasttrain.train", "configs/base.toml", "--quiet", "--set"]
    command += [f"data.dir={data}", f"train.out_dir={out}", *MAIN_JOB_SETS, *sets]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=600)
    events = read_metrics(out)
    return [float(e["loss"]) for e in events if e["event"] == "train"] + [
        float(e["val_loss"]) for e in events if e["event"] == "eval"
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    day = datetime.date.today().isoformat()
    parser.add_argument("--out", default=str(ROOT / f"benchmarks/results/cpu-step/cpu-isa-spread-{day}.json"))
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, list[str]]] = {}
    spread: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pydoc"
        prepare(["builtin:pydoc"], data, vocab_size=512, quiet=True)
        for optimizer, o_sets in OPTIMIZERS.items():
            for case, c_sets in CASES.items():
                key, found = f"{optimizer} {case}", {}
                for level, caps in levels(cpu_flags()).items():
                    found[level] = losses(data, Path(tmp) / f"{optimizer}-{case}-{level}", caps, o_sets + c_sets)
                    print(key, level, [v.hex() for v in found[level]], flush=True)
                best = found["best"]
                spread[key] = max(abs(v - b) / abs(b) for values in found.values() for v, b in zip(values, best))
                runs[key] = {level: [v.hex() for v in values] for level, values in found.items()}
    what = "the main job's fp32 losses (6 steps, 2 evaluations) under every ISA cap this CPU allows"
    result = {
        **result_header(what, "benchmarks.studies.isa_spread", argv, day),
        "max_relative_spread": spread,
        "losses": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(spread, indent=1))


if __name__ == "__main__":
    main()
