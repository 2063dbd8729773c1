"""The Weights & Biases sink: the metrics.jsonl fields, the config, samples, resuming (through a stand-in
module, so CI needs no wandb), and one real offline run where wandb is installed (no network)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fasttrain.system.errors import UsageError
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_config

EVERY_STEP = [
    "schedule.warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.eval_steps=1",
    "checkpoint.interval=2",
    "log.wandb=true",
    'log.tags=["test"]',
]


class FakeRun:
    def __init__(self, calls: list, id: str | None, **kwargs):
        self.id, self.calls = id or f"run{len(calls)}", calls
        self.config = types.SimpleNamespace(update=lambda d, allow_val_change: calls.append(("config", d)))
        self.summary = types.SimpleNamespace(update=lambda d: calls.append(("summary", d)))
        calls.append(("init", dict(kwargs, id=id)))

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", step, data))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_events_config_samples_and_resuming(pydoc_data, tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda id, **kw: FakeRun(calls, id, **kw), Table=lambda columns, data: (columns, list(data))
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    Trainer(tiny_config(pydoc_data, tmp_path, "train.max_steps=2", *EVERY_STEP), quiet=True).train()
    (_, init), *rest = calls
    assert init["id"] is None and init["tags"] == ["test"] and init["name"] == tmp_path.name
    assert init["resume"] == "allow" and init["config"]["model"]["d_model"] == 32  # the resolved config
    assert (tmp_path / "wandb_run_id").read_text() == "run0"
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    numbers = lambda e: {
        f"{e['event']}/{k}": v
        for k, v in e.items()  # noqa: E731
        if k not in ("event", "time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for e in events:
        if e["event"] in ("train", "eval"):  # the same fields as metrics.jsonl, at the same step
            assert ("log", e["step"], numbers(e)) in rest
    assert ("config", {"start": {k: v for k, v in events[0].items() if k not in ("event", "time")}}) in rest
    samples = [c[2]["samples"] for c in rest if c[0] == "log" and "samples" in c[2]]
    assert samples[-1][0] == ["step", "prompt", "text"] and samples[-1][1][0][:2] == [2, "The"]
    assert rest[-2][0] == "summary" and rest[-1] == ("finish",)

    calls.clear()
    resumed = Trainer(tiny_config(pydoc_data, tmp_path, "train.max_steps=3", *EVERY_STEP), quiet=True)
    resumed.resume("auto")
    resumed.train()
    assert calls[0][1]["id"] == "run0"  # the same W&B run continues


def test_offline_run(pydoc_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    Trainer(tiny_config(pydoc_data, tmp_path, "train.max_steps=1", *EVERY_STEP), quiet=True).train()
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_without_wandb_the_error_names_the_extra(pydoc_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    trainer = Trainer(
        tiny_config(pydoc_data, tmp_path, "train.max_steps=1", "schedule.warmup_steps=1", "log.wandb=true"), quiet=True
    )
    with pytest.raises(UsageError, match=r'log.wandb = true needs the wandb package: pip install -e "\.\[wandb\]"'):
        trainer.train()
    assert not (tmp_path / "config.toml").exists()  # nothing written
