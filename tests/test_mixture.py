"""Training on a mixture of prepared sources (issue 40): the blend's shares, a mix that changes, epochs and
tokens per source, per-source validation, exact resume (every batching mode, prefetching, 2 ranks)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain import train
from fasttrain.checkpoints import checkpoint_files, saves
from fasttrain.config import load_config
from fasttrain.data.loader import TokenLoader
from fasttrain.data.mixture import Blend
from fasttrain.model.weights import read_safetensors
from fasttrain.plot import plot_run, read_metrics
from fasttrain.preparation.preparation import COMPLETE, TMP_NAME
from fasttrain.system.errors import UsageError
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_config, tiny_overrides
from tests.test_distributed import single, torchrun, values


def mixture(web: Path, code: Path, out: Path, *sets: str, weights=(0.7, 0.3)) -> list[str]:
    """--set items of a tiny run on web and code by `weights` (the tiny run's data.dir and inputs dropped)."""
    tiny = [s for s in tiny_overrides(web, out) if not s.startswith(("data.dir", "data.inputs", "data.vocab_size"))]
    sources = f'data.sources=[{{dir="{web}", weight={weights[0]}}}, {{dir="{code}", weight={weights[1]}}}]'
    return [*tiny, sources, *sets]


def trainer(web: Path, code: Path, out: Path, *sets: str, **kw) -> Trainer:
    return Trainer(load_config(None, mixture(web, code, out, *sets, **kw)), quiet=True)


def test_blend_shares_match_the_weights_at_every_step_over_1000_steps():
    """Three sources, then a mix that changes at step 600: after every step (a round of 24 rows) each source
    has had its share of the rows since the last change to within one row."""
    rows, change = 24, 600
    phases = [(0, (0.5, 0.3, 0.2)), (change, (0.1, 0.1, 0.8))]
    blend = Blend(phases, rows)
    for step in range(1, 1001):
        positions = np.array(blend.start(step)[0])
        first, weights = phases[step > change]
        since = positions - (np.array(blend.start(first)[0]) if first else 0)
        assert np.abs(since - np.array(weights) * (step - first) * rows).max() <= 1, step
    source, position = blend.plan(1000)
    assert sorted(position[source == 2].tolist()) == list(range(blend.start(1000)[0][2], blend.start(1001)[0][2]))


def test_the_blends_memory_of_rounds_stays_bounded_over_a_long_run():
    """plan() remembers the state after each round it plays (so the next is not replayed from the anchor);
    a long run plays millions of rounds, so only the latest are kept, and a round long past is replayed."""
    from fasttrain.data.mixture import MEMO

    blend, fresh = Blend([(0, (0.6, 0.4))], 8), Blend([(0, (0.6, 0.4))], 8)
    for k in range(5 * MEMO):
        blend.plan(k)
        assert len(blend._memo) <= 2 * MEMO, k
    assert blend.start(3) == fresh.start(3) and blend.start(5 * MEMO) == fresh.start(5 * MEMO)


def test_every_rank_reads_its_part_of_the_one_global_sequence(pydoc_data, code_data):
    """2 ranks of 3 rows read, together, the rows one process of 6 reads: the blend is the same on any
    number of ranks (and so are the sources' tokens counted)."""

    def loader(batch, rank=0, world=1):
        return TokenLoader(
            [pydoc_data, code_data],
            "train",
            batch,
            16,
            seed=3,
            rank=rank,
            world_size=world,
            prefetch=0,
            mix=[(0, (0.6, 0.4))],
        )

    one, ranks = loader(6), [loader(3, r, 2) for r in range(2)]
    for _ in range(50):
        x, _ = next(one)
        assert torch.equal(x, torch.cat([next(r)[0] for r in ranks]))
    assert one.source_tokens() == ranks[1].source_tokens() and sum(one.source_tokens()) == 50 * 6 * 16


def test_a_source_smaller_than_its_share_repeats_and_is_counted(pydoc_data, code_data):
    loader = TokenLoader([pydoc_data, code_data], "train", 8, 32, seed=1, prefetch=0, mix=[(0, (0.2, 0.8))])
    rows = loader.reader.sources[1].rows_per_epoch
    batches = 3 * rows // 8  # code is 80% of the rows: read 2.4 times over
    for _ in range(batches):
        next(loader)
    epochs = loader.source_epochs()
    assert 2.3 < epochs[1] == pytest.approx(loader.positions()[1] / rows) and epochs[0] < 1
    planned = loader.blend.planned_rows(batches)[1] / rows  # as the plan counts them (RunPlan.reading)
    assert planned == pytest.approx(epochs[1], abs=1 / rows)
    assert loader.source_tokens() == [p * 32 for p in loader.positions()]


@pytest.mark.parametrize("batching,padding", [("padded", "fixed"), ("aligned", "fixed"), ("padded", "bucketed")])
def test_the_tokens_read_are_counted_over_many_epochs_of_rows_of_any_length(pydoc_data, batching, padding):
    """Each epoch of a random order drops another tail of rows (those that fill no whole batch), of other lengths:
    every finished epoch was counted as the first one's, so tokens.<source> (and a save's count) drifted from the
    third epoch on."""
    eot = json.loads((pydoc_data / "meta.json").read_text())["eot_id"]
    loader = TokenLoader(
        pydoc_data, "train", 4, 512, batching=batching, padding=padding, eot_id=eot, prefetch=0, seed=0
    )
    per_epoch, read = loader.reader.sources[0].rows_per_epoch // 4, 0
    try:
        for step in range(1, 5 * per_epoch + 2):
            _, y = next(loader)
            read += int((y != -100).sum())
            if step % per_epoch in (0, 1):
                assert loader.source_tokens() == [read], step
    finally:
        loader.close()


@pytest.mark.parametrize("batching", ["packed", "padded", "aligned", "document_mask"])
def test_an_interrupted_mixture_resumes_exactly(pydoc_data, code_data, tmp_path, batching):
    """Through the Trainer, prefetching 2 batches, with a mix change between the save and the end: the
    resumed run's final weights are the uninterrupted run's, bit for bit, and each source's tokens are in
    the checkpoint and metrics.jsonl."""
    mode = ["data.document_mask=true"] if batching == "document_mask" else [f'data.batching="{batching}"']
    sets = [
        *mode,
        "data.prefetch=2",
        "train.max_steps=8",
        "checkpoint.interval=4",
        "train.log_interval=2",
        "train.eval_interval=4",
        "train.sample_tokens=0",
        "data.mix=[{step=6, weights=[0.1, 0.9]}]",
    ]
    straight = trainer(pydoc_data, code_data, tmp_path / "straight", *sets)
    straight.train()
    straight.close()
    first = trainer(pydoc_data, code_data, tmp_path / "resumed", *sets)
    for _ in range(5):  # a step past the save at step 4: the resume goes back to it
        first.step()
    first.save_checkpoint()
    first.close()
    resumed = trainer(pydoc_data, code_data, tmp_path / "resumed", *sets)
    resumed.resume(tmp_path / "resumed" / "checkpoints" / "step_0000005.pt")
    resumed.train()
    resumed.close()
    a, b = (read_safetensors(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = checkpoint_files.load(tmp_path / "straight" / "checkpoints" / "step_0000008.pt")["ranks"][0]["train_loader"]
    last = [e for e in read_metrics(tmp_path / "straight") if e["event"] == "train"][-1]
    name = pydoc_data.name
    assert saved["tokens"] == [last[f"tokens.{name}"], last["tokens.code"]] and sum(saved["tokens"]) == last["tokens"]


def test_a_mix_change_is_exact_at_its_step_logged_and_recorded(pydoc_data, code_data, tmp_path, capsys):
    """A last-25% mix that reads code only: from step 6 of 8 every row is code's, the change is one console
    line and a "mix" event; the weights that do not sum to 1 are normalized, and said so."""
    cfg = load_config(
        None,
        mixture(
            pydoc_data,
            code_data,
            tmp_path,
            "train.max_steps=8",
            "train.log_interval=1",
            "train.sample_tokens=0",
            "data.mix=[{fraction=0.75, weights=[0, 2]}]",
            weights=(3, 1),
        ),
    )
    run = Trainer(cfg)
    run.train()
    run.close()
    out = capsys.readouterr().out
    assert "note: data.sources weights sum to 4, not 1: normalized to 0.75, 0.25" in out
    assert out.count("mix: from step 6 the weights are") == 1
    events = read_metrics(tmp_path)
    mix = [{k: v for k, v in e.items() if k != "time"} for e in events if e["event"] == "mix"]
    assert mix == [{"event": "mix", "step": 6, f"weight.{pydoc_data.name}": 0.0, "weight.code": 1.0}]
    web = {e["step"]: e[f"tokens.{pydoc_data.name}"] for e in events if e["event"] == "train"}
    code = {e["step"]: e["tokens.code"] for e in events if e["event"] == "train"}
    assert web[6] == web[8] and code[8] - code[6] == 2 * 4 * 32  # steps 7 and 8: code only
    assert abs(web[6] / 32 - 0.75 * 6 * 4) <= 1  # before: 3 to 1, to within a row


def test_each_source_is_validated_and_the_total_is_weighted(pydoc_data, code_data, tmp_path):
    """A mixture's evaluation holds each source's loss and bits per byte, as a run on that source alone
    reports them (same seed: same initial model), and their total by weight, which `best` uses."""
    mixed = trainer(pydoc_data, code_data, tmp_path / "m", weights=(0.25, 0.75))
    metrics = mixed.evaluate()
    mixed.close()
    for source, data in (("code", code_data), (pydoc_data.name, pydoc_data)):
        alone = Trainer(tiny_config(data, tmp_path / source, "data.vocab_size=0", "data.inputs=[]"), quiet=True)
        own = alone.evaluate()
        alone.close()
        assert metrics[f"val_loss.{source}"] == own["val_loss"] and metrics[f"val_bpb.{source}"] == own["val_bpb"]
    assert metrics["val_loss"] == pytest.approx(
        0.25 * metrics[f"val_loss.{pydoc_data.name}"] + 0.75 * metrics["val_loss.code"]
    )


def test_best_and_early_stopping_follow_train_monitor(pydoc_data, code_data, tmp_path, capsys):
    """train.monitor = "val_loss.code": the best loss, the `best` checkpoint and early stopping follow code's
    validation loss, not the total. A resume that monitors the total starts its best anew, and a name that is no
    source's loss is one line before anything is written."""
    sets = (
        "train.max_steps=6",
        "train.eval_interval=1",
        "train.eval_steps=1",
        "train.sample_tokens=0",
        "checkpoint.interval=100",
        "schedule.warmup_steps=1",
        "optim.lr=0.03",
        "train.early_stop_patience=3",
        "train.early_stop_min_delta=0.05",
    )

    def loud(*more: str) -> Trainer:
        return Trainer(load_config(None, mixture(pydoc_data, code_data, tmp_path, *sets, *more)))

    run = loud('train.monitor="val_loss.code"')
    run.train()
    run.close()
    evals = [e for e in read_metrics(tmp_path) if e["event"] == "eval"]
    code = [e["val_loss.code"] for e in evals]
    assert [e["best_val_loss"] for e in evals] == [min(code[: i + 1]) for i in range(len(code))]
    best = saves.pointed(tmp_path / "checkpoints", "best")
    assert saves.step_of(best) == evals[code.index(min(code))]["step"]
    assert f"best val_loss.code {min(code):.4f}" in capsys.readouterr().out

    resumed = loud("train.max_steps=7")
    resumed.resume()
    assert resumed.run.best_val_loss == float("inf") and resumed.run.stale_evals == 0
    resumed.close()
    assert "resume: train.monitor is val_loss, not val_loss.code: the best validation loss" in capsys.readouterr().out

    with pytest.raises(
        UsageError,
        match=r"train.monitor = 'val_loss.web': not a validation loss of this run; "
        rf"one of val_loss, val_loss.{pydoc_data.name}, val_loss.code",
    ):
        trainer(pydoc_data, code_data, tmp_path / "other", 'train.monitor="val_loss.web"')
    assert not (tmp_path / "other").exists()


def test_a_rollback_to_a_save_from_before_a_monitor_change_starts_the_best_anew(pydoc_data, code_data, tmp_path):
    """A run monitoring code's loss, resumed monitoring the total: the resume starts the best anew, and so must
    a rollback to a save from before the resume (its best was code's loss, not comparable with the total)."""
    from tests.test_checkpoint import events

    sets = (
        "train.eval_interval=1",
        "train.eval_steps=1",
        "train.sample_tokens=0",
        "checkpoint.interval=2",
        "schedule.warmup_steps=1",
        "train.log_interval=1",
        "recovery.max_skips=2",
    )
    first = Trainer(
        load_config(
            None, mixture(pydoc_data, code_data, tmp_path, *sets, "train.max_steps=4", 'train.monitor="val_loss.code"')
        ),
        quiet=True,
    )
    first.train()
    first.close()
    resumed = Trainer(
        load_config(None, mixture(pydoc_data, code_data, tmp_path, *sets, "train.max_steps=8")), quiet=True
    )
    resumed.resume()
    loss = resumed.loss

    def diverging(x, y, **options):  # training steps 5 and 6, once: the resumed save (step 4) is unproven, so
        sums = loss(x, y, **options)  # the rollback goes to an earlier one, saved monitoring code's loss
        if resumed.model.training and resumed.run.step + 1 in (5, 6) and not resumed.run.rollbacks:
            return sums._replace(loss=sums.loss * float("nan"))
        return sums

    resumed.loss = diverging
    resumed.train()
    resumed.close()
    (rollback,) = events(tmp_path, "rollback")
    assert rollback["step"] < 4  # a save of the first run's (a best one, or step 2's)
    after = events(tmp_path, "eval")[-(8 - rollback["step"]) :]  # the steps trained again after the rollback
    assert [e["step"] for e in after] == list(range(rollback["step"] + 1, 9))
    assert [e["best_val_loss"] for e in after] == [
        min(e["val_loss"] for e in after[: i + 1]) for i in range(len(after))
    ]


def test_a_mixture_run_reports_epochs_warns_and_plots(pydoc_data, code_data, tmp_path, capsys):
    cfg = load_config(
        None,
        mixture(
            pydoc_data,
            code_data,
            tmp_path,
            "train.max_steps=200",
            "train.log_interval=100",
            "train.eval_interval=200",
            "train.sample_tokens=0",
            "train.eval_steps=1",
            "data.max_epochs=0.5",
            weights=(0.1, 0.9),
        ),
    )
    run = Trainer(cfg)
    planned = run.plan.reading().epochs  # what the run warns with
    run.train()
    run.close()
    out = capsys.readouterr().out
    assert f"warning: this run reads code {planned[1]:.1f} times over, more than data.max_epochs = 0.5" in out
    assert f"warning: this run reads {pydoc_data.name}" not in out
    last = [e for e in read_metrics(tmp_path) if e["event"] == "train"][-1]
    assert last["epochs.code"] == pytest.approx(planned[1], abs=0.01)
    pytest.importorskip("matplotlib")
    assert plot_run(tmp_path).stat().st_size > 0


def test_the_tools_read_a_mixture_run(pydoc_data, code_data, tmp_path, capsys):
    """A mixture has no data.dir: its final/ weights carry the run's tokenizer (final/ lacked it, and sample,
    evaluate and export of RUN failed: "tokenizer.json: no such tokenizer file"), the doctor reads every
    source's shards (it read data.dir: ".: no train shards"), and evaluate --split val scores each source
    and their total as the trainer's evaluation does."""
    from fasttrain import doctor, evaluate, train

    sets = mixture(
        pydoc_data,
        code_data,
        tmp_path / "run",
        "train.max_steps=2",
        "train.sample_tokens=0",
        "train.eval_steps=1000",
        weights=(0.25, 0.75),
    )
    assert train.main(["configs/base.toml", "--quiet", "--set", *sets]) == 0
    assert (tmp_path / "run" / "final" / "tokenizer.json").read_bytes() == (pydoc_data / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "run"), "--split", "val"]) == 0
    lines = capsys.readouterr().out.splitlines()
    end = [e for e in read_metrics(tmp_path / "run") if e["event"] == "eval"][-1]
    assert lines[0].startswith(f"loss {end['val_loss']:.4f}")
    assert lines[1].startswith(f"  code: loss {end['val_loss.code']:.4f}")
    assert doctor.main(["configs/base.toml", "--overfit-steps", "1", "--set", *sets]) in (0, 1)
    assert f"from {pydoc_data}, {code_data}" in capsys.readouterr().out


@pytest.mark.subprocess
@pytest.mark.second_tier  # torchrun, 3 runs, and 2 single processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_mixture_on_two_ranks_trains_like_one_process_and_resumes_exactly(pydoc_data, code_data, tmp_path, parallel):
    """2 ranks of 2 rows read the rows one process of 4 reads (same losses); a resumed 2-rank run matches an
    uninterrupted one exactly, and so does (to rounding) one process of 2 rows accumulating 2 that resumes it,
    across the mix change at step 3 (the first two steps' run, without it, refuses a change past its end)."""
    run = [
        "train.max_steps=4",
        "train.log_interval=1",
        "train.eval_interval=2",
        "train.eval_steps=2",
        "checkpoint.interval=2",
        "train.sample_tokens=0",
        "train.tokens_per_update=128",
        f'train.parallel="{parallel}"',
    ]

    def args(out: Path, *sets: str, mix: str = "data.mix=[{step=3, weights=[0.2, 0.8]}]") -> list[str]:
        return ["configs/base.toml", "--set", *mixture(pydoc_data, code_data, out, *run, *sets, mix)]

    one = single(args(tmp_path / "one", "train.batch_size=4"))
    assert one.returncode == 0, one.stderr
    two = torchrun(args(tmp_path / "two", "train.batch_size=2"))
    assert two.returncode == 0, two.stderr
    assert values(tmp_path / "two", "train", "loss") == pytest.approx(
        values(tmp_path / "one", "train", "loss"), rel=1e-5
    )
    assert values(tmp_path / "two", "train", "tokens.code") == values(tmp_path / "one", "train", "tokens.code")
    cut = torchrun(args(tmp_path / "resumed", "train.batch_size=2", "train.max_steps=2", mix="data.mix=[]"))
    assert cut.returncode == 0, cut.stderr
    shutil.copytree(tmp_path / "resumed", tmp_path / "moved")
    resumed = torchrun([*args(tmp_path / "resumed", "train.batch_size=2"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert values(tmp_path / "resumed", "train", "loss") == values(tmp_path / "two", "train", "loss")
    moved = single([*args(tmp_path / "moved", "train.batch_size=2"), "--resume", "auto"])
    assert moved.returncode == 0, moved.stderr
    assert values(tmp_path / "moved", "train", "loss") == pytest.approx(
        values(tmp_path / "two", "train", "loss"), rel=1e-5
    )
    assert values(tmp_path / "moved", "train", "tokens.code") == values(tmp_path / "two", "train", "tokens.code")


def test_a_resume_with_other_weights_says_so_and_weighs_the_validation_loss_anew(
    pydoc_data, code_data, tmp_path, capsys
):
    """[[data.sources]]' weights changed on a resume were taken without a word, and the best of a weighted
    validation loss compared evaluations weighed two ways. The resume says so and starts that best anew; the same
    weights given in other units (2, 1 for 0.7, 0.35 ...) are no change."""
    sets = ["train.max_steps=4", "checkpoint.interval=2", "train.eval_interval=2", "train.sample_tokens=0"]
    first = trainer(pydoc_data, code_data, tmp_path / "run", *sets)
    for _ in range(2):
        first.step()
    first.run.best_val_loss = 1.0
    first.save_checkpoint()
    first.close()
    for weights, said in (((1.4, 0.6), False), ((0.5, 0.5), True)):
        cfg = load_config(None, mixture(pydoc_data, code_data, tmp_path / "run", *sets, weights=weights))
        resumed = Trainer(cfg, quiet=False)
        resumed.resume("auto")
        out = capsys.readouterr().out
        line = "resume: data.sources' weights are 0.5, 0.5 (saved with 0.7, 0.3): read in the new shares from here"
        assert (line in out) == said, out
        assert (resumed.run.best_val_loss == float("inf")) == said
        resumed.close()


def test_a_source_whose_prepare_was_killed_in_its_move_is_finished_by_the_run(pydoc_data, code_data, tmp_path):
    """A prepare killed while moving its whole new data into a [[data.sources]] folder left it without meta.json: the
    run refused the folder, where for data.dir it finishes the move first. It finishes it for a source too."""
    source = tmp_path / "code"
    shutil.copytree(code_data, source)
    staging = source / TMP_NAME
    staging.mkdir()
    names = sorted(p.name for p in source.iterdir() if p.name != TMP_NAME)
    for name in names:  # the new data whole in .prepare-tmp, none of it moved yet
        os.replace(source / name, staging / name)
    (staging / COMPLETE).write_text(json.dumps(names))
    args = [
        "configs/base.toml",
        "--quiet",
        "--set",
        *mixture(pydoc_data, source, tmp_path / "run", "train.max_steps=2"),
    ]
    assert train.main(args) == 0
    assert sorted(p.name for p in source.iterdir()) == names and (tmp_path / "run" / "final").is_dir()
