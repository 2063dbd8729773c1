"""The main job's numbers, pinned: configs/base.toml run for a few steps on the CPU gives exactly the losses
recorded here (as float.hex, so bit for bit). A refactoring of how a run is planned and assembled must not
change what it computes; a change that is meant to (a new initialization, another data order) records them
anew, and says why in its commit.

The values were recorded on an x86-64 CPU in fp32 with the data of the `pydoc_data` fixture; another CPU
(another BLAS path) may round differently, so a failure on new hardware alone is no regression."""

from __future__ import annotations

import json

import pytest

from fasttrain.train import main as train_main

pytestmark = pytest.mark.subprocess  # a whole run, if in this process


def main_job(data, out, *sets: str) -> list[dict]:
    """The events of the main job on `data`: base.toml's model, a small batch and a few steps, every step logged."""
    assert (
        train_main(
            [
                "configs/base.toml",
                "--quiet",
                "--set",
                f"data.dir={data}",
                "data.vocab_size=512",
                f"train.out_dir={out}",
                "train.device=cpu",
                'train.precision="fp32"',
                "train.batch_size=4",
                "train.seq_len=64",
                "train.max_steps=6",
                "train.log_interval=1",
                "train.eval_interval=3",
                "train.eval_steps=2",
                "schedule.warmup_steps=2",
                "train.sample_tokens=0",
                "train.tensorboard=false",
                "checkpoint.interval=3",
                *sets,
            ]
        )
        == 0
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


PINNED = {
    "": {
        "train": [
            "0x1.8fadc00000000p+2",
            "0x1.8640e40000000p+2",
            "0x1.7c1f2c0000000p+2",
            "0x1.6dbf760000000p+2",
            "0x1.6791700000000p+2",
            "0x1.6b3cb20000000p+2",
        ],
        "val": ["0x1.75baf40000000p+2", "0x1.6d014c0000000p+2"],
    },
    "accumulation": {
        "train": [
            "0x1.8da5bc0000000p+2",
            "0x1.8676dc0000000p+2",
            "0x1.7676140000000p+2",
            "0x1.6e4a6c0000000p+2",
            "0x1.63d7f00000000p+2",
            "0x1.64af1c0000000p+2",
        ],
        "val": ["0x1.701af20000000p+2", "0x1.65e04c0000000p+2"],
    },
}


@pytest.mark.parametrize("case", PINNED)
def test_the_main_jobs_losses_are_pinned(pydoc_data, tmp_path, case):
    sets = ["train.tokens_per_update=512"] if case == "accumulation" else []  # 2 micro-batches of 4 x 64
    events = main_job(pydoc_data, tmp_path, *sets)
    found = {
        "train": [float(e["loss"]).hex() for e in events if e["event"] == "train"],
        "val": [float(e["val_loss"]).hex() for e in events if e["event"] == "eval"],
    }
    assert found == PINNED[case]
