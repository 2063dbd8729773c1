"""The plans of the README's runs, the small corpora and a mixture, whole, against the records in plans.json: a change
to how the plan is computed (planning/) that means to keep its behaviour keeps every figure and every note of these.

Each plan is made at a fixed speed and a fixed 16 GiB of free memory (no machine is timed or asked: these are what
differ from one machine to the next) in fp32 (what "auto" picks differs by CPU), on the test corpora; the paths are
written as {topics}, {code} and {tmp}, and the kernels' reasons, which say what this machine has, are left out. Where a change means to change a plan, record them again and read the
difference before committing it:

    FASTTRAIN_RECORD_PLANS=1 pytest tests/test_plans_unchanged.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fasttrain.compute.distributed import World
from fasttrain.config import load_config
from fasttrain.planning import preflight
from fasttrain.planning.plan import plan_run
from fasttrain.planning.speed import Speed

RECORDS = Path(__file__).with_name("plans.json")
# A 2-core CPU's order of speed: 3e10 FLOP/s at 5 MFLOPs a token (1 x 64), 7e10 at 20 MFLOPs (3 x 192)
SPEED = Speed(((5e6, 3e10), (2e7, 7e10)))
MEMORY = 16 << 30  # bytes free
VARIES = {"kernel_reasons"}  # Triton installed or not, its interpreter on or not


def base(data: Path, out: Path, *sets: str) -> list[str]:
    """configs/base.toml's `--set` items for the prepared folder `data` (its own tokenizer and vocabulary)."""
    return [f'data.dir="{data}"', "data.inputs=[]", "data.vocab_size=0", f'train.out_dir="{out}"',
            "train.device=cpu", 'train.precision="fp32"', *sets]  # fmt: skip


def sources(topics: Path, code: Path, tmp: Path) -> list[str]:
    """The topics and the code mixed 3:1, as data.sources."""
    both = f'[{{dir="{topics}", weight=3}}, {{dir="{code}", weight=1}}]'
    return base(tmp / "none", tmp / "run", 'data.dir=""', f"data.sources={both}")


def case_args(case: str, topics: Path, code: Path, tmp: Path) -> tuple[str, list[str]]:
    """The config file and `--set` items of `case`."""
    run = tmp / "run"
    if case == "gpt2-small":  # the shipped fixed-shape run, planned on the CPU: a run of steps at gpt2's batch
        return "configs/gpt2-small.toml", [*base(topics, run), 'data.tokenizer=""', "train.batch_size=2"]
    if case == "code-steps":  # a shape and a run of steps set: 300 steps read the code ~70 times over
        return "configs/base.toml", [*base(code, run), "model.n_layers=2", "train.max_time=0", "train.max_steps=300"]
    if case == "steps-mixture":  # a run of steps whose mix changes at step 2
        shutil.copytree(topics, tmp / "copy")
        both = f'[{{dir="{topics}", weight=3}}, {{dir="{tmp / "copy"}", weight=1}}]'
        mix = ['data.dir=""', f"data.sources={both}", "data.mix=[{step=2, weights=[1, 1]}]"]
        steps = ["model.n_layers=2", "train.max_time=0", "train.max_steps=300", "train.seq_len=64"]
        return "configs/base.toml", [*base(topics, run), *mix, *steps]
    budget = {"base": [], "10m": ["train.max_time=600"], "30m": ["train.max_time=1800"]}[case.split("-")[-1]]
    if case.startswith("mixture"):
        return "configs/base.toml", [*sources(topics, code, tmp), *budget]
    return "configs/base.toml", [*base(topics if case.startswith("topics") else code, run), *budget]


CASES = ["topics-base", "topics-10m", "topics-30m", "code-base", "code-10m", "mixture-base", "mixture-10m",
         "gpt2-small", "code-steps", "steps-mixture"]  # fmt: skip


def planned(case: str, topics: Path, code: Path, tmp: Path) -> dict:
    """The start event the plan of `case` records, its paths written as placeholders."""
    config, sets = case_args(case, topics, code, tmp)
    plan = plan_run(load_config(config, sets), World(), torch.device("cpu"), speed=SPEED)
    text = json.dumps({k: v for k, v in plan.record().items() if k not in VARIES})
    places = ((tmp, "{tmp}"), (code, "{code}"), (topics, "{topics}"), (topics.name, "{topics.name}"))
    for path, name in places:  # whole paths first: the topics' folder's name is a source's name
        text = text.replace(str(path), name)
    return json.loads(text)


@pytest.mark.parametrize("case", CASES)
def test_the_plan_is_the_one_recorded(case, pydoc_data, code_data, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "available_bytes", lambda device: MEMORY)
    plan = planned(case, pydoc_data, code_data, tmp_path)
    records = json.loads(RECORDS.read_text()) if RECORDS.is_file() else {}
    if os.environ.get("FASTTRAIN_RECORD_PLANS"):
        records[case] = plan
        RECORDS.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")
        pytest.skip(f"recorded in {RECORDS}")
    assert case in records, f"{case}: not in {RECORDS}; record it (the module docstring says how)"
    recorded = records[case]
    changed = {
        k: (recorded.get(k), plan.get(k)) for k in recorded.keys() | plan.keys() if recorded.get(k) != plan.get(k)
    }
    assert not changed, changed
