"""The training step: schedule, decay groups, accumulation, clipping, overfitting, train_loop, evaluation."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttrain import Trainer, train_loop
from fasttrain.checkpoints import saves
from fasttrain.config import ModelConfig, MuonConfig, OptimConfig, ScheduleConfig, TrainConfig
from fasttrain.data.documents import IGNORE_INDEX
from fasttrain.model.transformer import Transformer
from fasttrain.optimization.optimizers import Muon, Updater, build_optimizer, param_groups
from fasttrain.optimization.schedule import lr_at
from fasttrain.plot import read_metrics
from fasttrain.system.errors import UsageError
from fasttrain.training.trainer import accumulation_steps
from tests.conftest import spoil_after, tiny_config
from tests.kernel_checks import assert_fp32_sums_close


@pytest.mark.parametrize(
    "decay, step, expected",
    [
        ("cosine", 0, 1e-3 * 1 / 10),  # warmup: (s + 1) / warmup_steps of the peak
        ("cosine", 9, 1e-3),  # the end of warmup reaches the peak
        ("cosine", 10, 1e-3),  # t = 0 of the decay, which runs over steps 10 to 99: T = 89
        ("cosine", 54, 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 44 / 89))),  # about halfway: near the mean
        ("cosine", 98, 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 88 / 89))),
        ("cosine", 99, 1e-4),  # the last step (of 100) uses min_lr, as schedule.min_lr promises
        ("cosine", 100, 1e-4),
        ("linear", 55, 1e-3 - 9e-4 * 45 / 89),
        ("linear", 99, 1e-4),
        ("constant", 5, 6e-4),
        ("constant", 99, 1e-3),
        ("wsd", 50, 1e-3),  # stable until the cooldown: the last 20% of the 90 decay-phase steps, 82 to 99
        ("wsd", 82, 1e-3),
        ("wsd", 91, 1e-3 - 9e-4 * 9 / 17),
        ("wsd", 99, 1e-4),
    ],
)
def test_schedule_values(decay, step, expected):
    sched = ScheduleConfig(warmup_steps=10, decay=decay, min_lr=1e-4, cooldown_fraction=0.2)
    assert lr_at(step, 100, 1e-3, sched) == pytest.approx(expected, rel=1e-12)


def test_step_decay_multiplies_every_n_steps_down_to_the_floor():
    sched = ScheduleConfig(warmup_steps=10, decay="step", min_lr=1e-4, step_every=20, step_factor=0.5)
    assert [lr_at(s, 100, 1e-3, sched) for s in (9, 29, 30, 50, 70, 90, 99)] == [
        1e-3,
        1e-3,
        5e-4,
        2.5e-4,
        1.25e-4,
        1e-4,
        1e-4,
    ]


def test_schedule_without_warmup_starts_at_the_peak():
    assert lr_at(0, 50, 3e-4, ScheduleConfig(warmup_steps=0, min_lr=0.0)) == 3e-4


def test_decay_groups():
    model = Transformer(ModelConfig(vocab_size=50, max_seq_len=8, d_model=16, n_layers=2, n_heads=2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, rest = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in rest["params"]}
    assert all(n.endswith(("qkv.weight", "out.weight", "gate_up.weight", "down.weight")) for n in decayed)
    assert len(decayed) == 2 * 4
    assert "embed.weight" in undecayed and all("norm" in n for n in undecayed - {"embed.weight"})
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))  # tied counted once
    with_embeddings, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert {names[id(p)] for p in with_embeddings["params"]} == decayed | {"embed.weight"}
    biased = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    d, r = param_groups(biased, 0.1)
    assert [p.shape for p in d["params"]] == [(4, 4)] and len(r["params"]) == 3  # bias, norm weight and bias


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = Transformer(ModelConfig(vocab_size=50, max_seq_len=8, d_model=16, n_layers=2, n_heads=2))
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = OptimConfig(name="muon", lr=1e-3, muon=MuonConfig(lr=0.02))
    updater = Updater(model, cfg, torch.device("cpu"), "fp32")
    muon, adamw = updater.optimizer.parts["muon"], updater.optimizer.parts["adamw"]
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    orthogonalised = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert len(orthogonalised) == 2 * 4 and all(n.startswith("blocks.") for n in orthogonalised)
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "embed.weight" in rest and not rest & orthogonalised and len(rest | orthogonalised) == len(names)
    updater.apply(5e-4)  # half the peak: every group at half its own peak
    assert [g["lr"] for g in updater.optimizer.param_groups] == [0.01, 5e-4, 5e-4]


@pytest.mark.parametrize("nesterov,adjust_lr", [(True, None), (False, "match_rms_adamw")])
def test_muon_steps_as_torchs_muon(nesterov, adjust_lr):
    """Muon's step is torch.optim.Muon's: with a bf16 iteration (torch's) the same floats after three steps;
    with an fp32 one (an fp32 run, a CPU without native bf16) the same moves up to bf16 rounding."""
    torch.manual_seed(0)
    start = [torch.randn(24, 40), torch.randn(40, 24)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    settings = {"lr": 0.02, "weight_decay": 0.1, "nesterov": nesterov, "adjust_lr_fn": adjust_lr}

    def moved(optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> list[torch.Tensor]:
        params = [nn.Parameter(p.clone()) for p in start]
        opt = optimizer(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return [p.detach() - p0 for p, p0 in zip(params, start)]

    theirs = moved(lambda params: torch.optim.Muon(params, **settings))
    in_bf16 = moved(lambda params: Muon(params, ns_dtype=torch.bfloat16, **settings))
    in_fp32 = moved(lambda params: Muon(params, ns_dtype=torch.float32, **settings))
    assert all(torch.equal(ours, t) for ours, t in zip(in_bf16, theirs))
    for ours, t in zip(in_fp32, theirs):
        assert (ours - t).norm() / t.norm() < 0.02


def test_muon_is_refused_where_it_cannot_work(monkeypatch):
    """Only on a torch without torch.optim.Muon: FSDP and HSDP are fine (tests/test_muon_sharded.py)."""
    model = Transformer(ModelConfig(vocab_size=50, max_seq_len=8, d_model=16, n_layers=1, n_heads=2))
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UsageError, match=r"needs torch.optim.Muon, added in torch 2.9; this is torch"):
        build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))


def test_accumulation_steps():
    assert accumulation_steps(TrainConfig(batch_size=8, seq_len=64)) == 1
    assert accumulation_steps(TrainConfig(batch_size=8, seq_len=64, tokens_per_update=8 * 64 * 6), world_size=2) == 3
    with pytest.raises(UsageError, match="tokens_per_update = 3072 is not a multiple of .* = 8 x 64 x 4 = 2048"):
        accumulation_steps(TrainConfig(batch_size=8, seq_len=64, tokens_per_update=3072), world_size=4)


@pytest.mark.parametrize("batching", [[], ["data.batching=padded", "data.padding=longest"]], ids=["packed", "padded"])
def test_accumulation_matches_one_large_batch(pydoc_data, paragraph_data, tmp_path, batching):
    """4 micro-batches of 4 give the loss and gradients of 1 batch of 16 over the same sequences; with
    padding too, where the micro-batches hold different numbers of real tokens (a mean of their
    means would weigh a short document's tokens more)."""
    data = paragraph_data if batching else pydoc_data
    common = ("data.sampling=sequential", "train.seed=5", *batching)
    big = Trainer(tiny_config(data, tmp_path / "a", *common, "train.batch_size=16"), quiet=True)
    small = Trainer(
        tiny_config(data, tmp_path / "b", *common, "train.batch_size=4", "train.tokens_per_update=512"), quiet=True
    )
    assert small.accumulation == 4 and small.tokens_per_step == big.tokens_per_step == 512
    torch.testing.assert_close(
        big.accumulate_gradients(), small.accumulate_gradients()
    )  # [loss, correct, counted] sums
    for p, q in zip(big.model.parameters(), small.model.parameters(), strict=True):
        assert_fp32_sums_close(p.grad, q.grad, "gradient", rtol=1e-4)  # 4 micro-batches sum in another order
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "mode,tuning,options",
    [
        ("max-autotune", False, {"max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": True}),
        ("default", True, {"coordinate_descent_tuning": True}),
        ("default", False, {}),
    ],
)
def test_compile_settings_and_activation_checkpointing_reach_the_model(
    pydoc_data, tmp_path, monkeypatch, mode, tuning, options
):
    """train.compile_mode and train.coordinate_descent_tuning go to torch.compile as inductor options
    (captured here: nothing compiles), train.activation_checkpointing and train.attention to the model."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    trainer = Trainer(
        tiny_config(
            pydoc_data,
            tmp_path,
            "train.compile=true",
            f'train.compile_mode="{mode}"',
            f"train.coordinate_descent_tuning={str(tuning).lower()}",
            'train.attention="math"',
            'train.activation_checkpointing="selective"',
        ),
        quiet=True,
    )
    assert seen == [{"options": options}] and trainer.compiled and trainer.model.checkpointing == "selective"
    assert {block.attn.attention for block in trainer.model.blocks} == {"math"}


def test_a_pinned_attention_backend_gives_the_same_logits(pydoc_data, tmp_path):
    """train.attention changes the kernel, not the result: "math" pinned against SDPA's own choice, and
    flex_attention's causal block mask (forward only: it has no backward on a CPU)."""
    auto = Trainer(tiny_config(pydoc_data, tmp_path / "a"), quiet=True).model.double().eval()
    tokens = torch.randint(0, auto.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        expected = auto(tokens)
        for attention in ("math", "flex"):
            model = Transformer(auto.cfg, attention=attention).double().eval()
            model.load_state_dict(auto.state_dict())
            torch.testing.assert_close(model(tokens), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["linear_cross_entropy", "rms_norm", "adamw"])
def test_kernel_trains_like_plain_pytorch(pydoc_data, tmp_path, kernel):
    """A [kernels] switch (on by default on CUDA) changes no loss, norm or weight beyond fp32 noise."""
    # Validation on 2 batches, not 20: through the interpreter each is a launch of the kernel per row.
    off = [f"kernels.{name}=false" for name in ("linear_cross_entropy", "rms_norm", "adamw")] + ["train.eval_steps=2"]
    plain = Trainer(tiny_config(pydoc_data, tmp_path / "a", *off), quiet=True)
    fused = Trainer(tiny_config(pydoc_data, tmp_path / "b", *off, f"kernels.{kernel}=true"), quiet=True)
    assert fused.kernels.names() == [kernel] and not plain.kernels.names()
    for _ in range(3):
        a, b = plain.step(), fused.step()
        for x, y in ((a.loss, b.loss), (a.grad_norm, b.grad_norm)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for p, q in zip(plain.model.parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plain.evaluate()["val_loss"], fused.evaluate()["val_loss"], rtol=1e-5, atol=0)


def test_the_fused_loss_leaves_its_backward_nothing_to_scale(pydoc_data, tmp_path, monkeypatch):
    """accumulate_gradients announces the factor it multiplies each micro-batch's loss by (world size / counted
    targets) to the fused loss, which folds it into its gradients: the backward's factor is exactly 1."""
    lce = importlib.import_module("fasttrain_kernels.linear_cross_entropy")
    factors = []
    scale_rows = lce._scale_rows_op
    monkeypatch.setattr(lce, "_scale_rows_op", lambda x, w: factors.append(w.item()) or scale_rows(x, w))
    trainer = Trainer(
        tiny_config(
            pydoc_data, tmp_path, "kernels.linear_cross_entropy=true", "kernels.rms_norm=false", "kernels.adamw=false"
        ),
        quiet=True,
    )
    trainer.accumulate_gradients()
    assert factors and set(factors) == {1.0}


def test_clipping_scales_to_the_limit_and_reports_the_norm_before(pydoc_data, tmp_path):
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, "optim.max_grad_norm=0.05"), quiet=True)
    trainer.accumulate_gradients()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    before = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert before > 0.05  # a fresh model's gradient is larger than this limit
    torch.testing.assert_close(trainer.updater.clip_gradients(), before)
    after = [p.grad for p in trainer.model.parameters()]
    torch.testing.assert_close(torch.linalg.vector_norm(torch.stack([g.norm() for g in after])), torch.tensor(0.05))
    for g, a in zip(grads, after):  # the direction is kept
        torch.testing.assert_close(a, g * (0.05 / before), rtol=1e-4, atol=1e-9)


def test_clipping_disabled_measures_but_keeps_gradients(pydoc_data, tmp_path):
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, "optim.max_grad_norm=0"), quiet=True)
    trainer.accumulate_gradients()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    assert trainer.updater.clip_gradients() > 0
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, trainer.model.parameters()))


def _batches(n: int, vocab: int, seed: int, batch: int = 4, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    """n batches of a fixed next-token pattern (each token followed by its successor), as dicts."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, batch, 1), generator=g)
    seqs = (start + torch.arange(seq + 1)) % vocab
    return [{"input_ids": s[:, :-1], "target_ids": s[:, 1:]} for s in seqs]


def _tiny_model(vocab: int = 64) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, max_seq_len=16, d_model=32, n_layers=2, n_heads=2))


def test_train_loop_lowers_the_loss_with_a_dataloader_of_dicts(capsys):
    model = _tiny_model()
    loader = torch.utils.data.DataLoader(_batches(32, 64, seed=1), batch_size=None, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = train_loop(model, loader, optimizer, num_epochs=3, log_interval=8, device="cpu")
    assert history["steps"] == [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96]
    assert history["losses"][-1] < 0.5 * history["losses"][0]
    assert "step 96: loss" in capsys.readouterr().out


def test_train_loop_overfits_a_single_batch_of_tuples():
    model = _tiny_model()
    (batch,) = _batches(1, 64, seed=2)
    x, y = batch["input_ids"], batch["target_ids"].clone()
    y[:, -1] = torch.randint(0, 64, (4,))  # arbitrary targets too: only memorising gets these right
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    history = train_loop(model, [(x, y)] * 150, optimizer, num_epochs=1, log_interval=50, device="cpu")
    assert history["losses"][-1] < 0.05


def test_train_loop_rejects_a_missing_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="CUDA is not available"):
        train_loop(_tiny_model(), _batches(1, 64, seed=0), torch.optim.SGD(_tiny_model().parameters()), 1)


def test_train_loop_ignores_padding_targets():
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    (batch,) = _batches(1, 64, seed=3)
    padded = dict(batch, target_ids=torch.full_like(batch["target_ids"], -100))
    padded["target_ids"][:, :3] = batch["target_ids"][:, :3]
    only = train_loop(model, [padded], optimizer, 1, log_interval=1, device="cpu")["losses"][0]
    with torch.no_grad():
        logits = model(batch["input_ids"])[:, :3]
        expected = nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_ids"][:, :3].flatten())
    assert only == pytest.approx(expected.item(), rel=1e-5)


def test_trainer_overfits_one_batch(pydoc_data, tmp_path):
    """A model that cannot drive the loss on one repeated batch toward 0 has a broken training step."""
    trainer = Trainer(
        tiny_config(
            pydoc_data,
            tmp_path,
            "optim.lr=1e-2",
            "optim.weight_decay=0",
            "schedule.decay=constant",
            "train.max_steps=150",
        ),
        quiet=True,
    )
    x, y = next(trainer.train_loader)
    trainer.train_loader = iter(lambda: (x, y), None)  # the same batch forever
    for _ in range(150):
        result = trainer.step()
    assert result.loss.item() < 0.1
    correct, counted = result.correct.item(), result.counted.item()
    assert counted == 4 * 32 and correct / counted > 0.95  # memorised: almost every next token is the top-1


@pytest.mark.parametrize("batching", ["padded", "aligned"])
def test_document_batches_count_real_tokens_only(paragraph_data, tmp_path, batching):
    """Step loss, tokens_seen and validation loss are per counted target: pads weigh nothing."""
    trainer = Trainer(
        tiny_config(
            paragraph_data,
            tmp_path,
            f"data.batching={batching}",
            "data.padding=bucketed",
            "data.document_mask=true",
            "train.eval_steps=3",
            "train.tokens_per_update=256",
        ),
        quiet=True,
    )

    def summed_loss(batches) -> tuple[float, int]:
        total, counted = 0.0, 0
        with torch.no_grad():
            for x, y in batches:
                documents = (x == trainer.tokenizer.eot_id).cumsum(1)
                logits = trainer.model(x, documents)
                total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                counted += int((y != IGNORE_INDEX).sum())
        return total, counted

    peek = trainer.loader("train", "random", prefetch=0)  # the same settings and seed: the step's batches
    total, counted = summed_loss([next(peek) for _ in range(2)])
    loss = trainer.step().loss
    assert trainer.run.tokens_seen == counted < trainer.tokens_per_step
    assert loss.item() == pytest.approx(total / counted, rel=1e-5)

    # validation's rows: the split's first eval_steps x batch_size, in one pass (bucketed among themselves)
    val = trainer.loader("val", "sequential", prefetch=0, whole=True, first_rows=3 * trainer.cfg.train.batch_size)
    trainer.model.eval()
    total, counted = summed_loss(list(val))
    trainer.model.train()
    assert trainer.evaluate()["val_loss"] == pytest.approx(total / counted, rel=1e-5)


def test_evaluation_reports_bits_per_byte(pydoc_data, tmp_path):
    trainer = Trainer(tiny_config(pydoc_data, tmp_path, "train.eval_steps=3"), quiet=True)
    first = trainer.evaluate()
    assert first == trainer.evaluate()  # the same validation windows every time
    meta = trainer.data.meta
    bpb = first["val_loss"] * meta["tokens"]["val"] / (meta["text_bytes"]["val"] * math.log(2))
    assert first["val_bpb"] == pytest.approx(bpb)
    assert first["val_ppl"] == pytest.approx(math.exp(first["val_loss"]))
    assert abs(first["val_loss"] - math.log(512)) < 0.3
    assert trainer.model.training


def test_the_printed_evaluation_says_what_it_read(pydoc_data, tmp_path, capsys):
    """The eval and done lines' bits per byte were the first eval_steps batches' with nothing saying so (2.041 where
    the whole split gave 1.855): they name what they read, and a run that read less says how to score the whole."""
    run = ["train.max_steps=1", "train.sample_tokens=0"]
    Trainer(tiny_config(pydoc_data, tmp_path / "cut", *run, "train.eval_steps=2")).train()
    out = capsys.readouterr().out
    assert "| on the first 2 val batches\n" in out and "bits/byte on the first 2 val batches (best" in out
    command = f"final/: fasttrain evaluate {tmp_path / 'cut'} --split val scores it on the whole val split ("
    assert command in out  # the tiny runs' train.final_eval = false: scoring it is tests/test_final_score.py's
    Trainer(tiny_config(pydoc_data, tmp_path / "whole", *run, "train.eval_steps=100000")).train()
    out = capsys.readouterr().out
    assert "| on the whole val split\n" in out and "bits/byte on the whole val split (best" in out
    assert "final/: fasttrain evaluate" not in out and out.endswith(" on the whole val split (1,164 rows)\n")


def test_tensorboard_events_when_installed(pydoc_data, tmp_path):
    Trainer(
        tiny_config(pydoc_data, tmp_path, "train.max_steps=2", "train.tensorboard=true", "train.sample_tokens=0"),
        quiet=True,
    ).train()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not events  # an optional extra: without it, nothing, and no error
    else:
        assert len(events) == 1 and events[0].stat().st_size > 0


EVAL_EVERY_STEP = ["train.eval_interval=1", "train.eval_steps=2", "train.sample_tokens=0", "checkpoint.interval=1000"]


def test_early_stopping_ends_the_run_when_validation_stalls(pydoc_data, tmp_path, capsys):
    """min_delta larger than any gain: every evaluation after the first is stale, so patience 2 stops at step 3."""
    trainer = Trainer(
        tiny_config(
            pydoc_data, tmp_path, *EVAL_EVERY_STEP, "train.early_stop_patience=2", "train.early_stop_min_delta=10.0"
        )
    )
    summary = trainer.train()
    assert summary["step"] == 3 and summary["stopped_early"] and trainer.run.stale_evals == 2
    events = [e for e in read_metrics(tmp_path) if e["event"] == "early_stop"]
    assert len(events) == 1 and events[0]["step"] == 3
    assert (
        "stopping early at step 3: validation loss has not improved by 10 or more in 2 evaluations"
        in capsys.readouterr().out
    )
    evals = [e for e in read_metrics(tmp_path) if e["event"] == "eval"]
    best_step = min(evals, key=lambda e: e["val_loss"])["step"]
    saved = {saves.step_of(p) for p in saves.saved_steps(tmp_path / "checkpoints")}
    assert saved >= {best_step, 3}  # the best is kept beside the final state
    assert saves.step_of(saves.pointed(tmp_path / "checkpoints", "best")) == best_step
    resumed = Trainer(tiny_config(pydoc_data, tmp_path, *EVAL_EVERY_STEP, "train.early_stop_patience=2"), quiet=True)
    resumed.resume("auto")
    assert resumed.run.stale_evals == 2  # the count is part of the checkpoint


@pytest.mark.parametrize("fmt", ["file", "sharded"])
def test_final_weights_best_are_the_lowest_validation_losss(pydoc_data, tmp_path, capsys, fmt):
    """checkpoint.final_weights = "best": the run learns for 6 steps, then its weights are zeroed after each update
    (spoil_after), so the lowest validation loss comes before the end; final/ holds that save's weights (evaluated
    again: the same loss; read from a file save or a sharded folder), the checkpoint the last step's, for a
    resume."""
    from fasttrain.checkpoints.checkpoint_files import load
    from fasttrain.model.weights import load_exported

    steps, learnt = 10, 6
    run = [*EVAL_EVERY_STEP, "optim.lr=1e-2", f"train.max_steps={steps}"]
    cfg = tiny_config(pydoc_data, tmp_path, *run, 'checkpoint.final_weights="best"', f'checkpoint.format="{fmt}"')
    summary = spoil_after(Trainer(cfg), learnt).train()
    evals = [e for e in read_metrics(tmp_path) if e["event"] == "eval"]
    uniform = math.log(512)  # the vocabulary the pydoc_data fixture was prepared with (tiny_overrides)
    assert [e["val_loss"] for e in evals[learnt:]] == pytest.approx([uniform] * (steps - learnt), rel=1e-6)
    best = min(evals, key=lambda e: e["val_loss"])
    assert best["val_loss"] < uniform - 0.1 and best["step"] <= learnt  # it learnt before it was spoilt
    assert summary["step"] == steps and summary["val_loss"] == evals[-1]["val_loss"]  # where the run ended
    assert summary["weights_step"] == best["step"]
    assert summary["weights_val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    kept = load(saves.pointed(tmp_path / "checkpoints", "best"))["model"]
    final = load_exported(tmp_path / "final").state_dict()
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in kept)
    assert saves.step_of(saves.pointed(tmp_path / "checkpoints", "latest")) == steps
    assert f"(step {best['step']}'s, the lowest validation loss" in capsys.readouterr().out
    if fmt == "sharded":
        return
    # "last" (the default) keeps the last step's weights whatever the evaluations said
    last = spoil_after(Trainer(tiny_config(pydoc_data, tmp_path / "last", *run)), learnt).train()
    assert last["weights_step"] == steps and last["weights_val_loss"] == last["val_loss"]
    assert last["val_loss"] == pytest.approx(uniform, rel=1e-6)


def test_final_weights_best_needs_the_best_save(pydoc_data, tmp_path):
    with pytest.raises(UsageError, match="checkpoint.final_weights .* needs checkpoint.keep_best"):
        tiny_config(pydoc_data, tmp_path, 'checkpoint.final_weights="best"', "checkpoint.keep_best=false")


def test_early_stopping_waits_while_validation_improves(pydoc_data, tmp_path):
    trainer = Trainer(
        tiny_config(
            pydoc_data, tmp_path, *EVAL_EVERY_STEP, "train.max_steps=5", "optim.lr=1e-2", "train.early_stop_patience=1"
        ),
        quiet=True,
    )
    summary = trainer.train()
    evals = [e for e in read_metrics(tmp_path) if e["event"] == "eval"]
    val = [e["val_loss"] for e in evals]
    assert val == sorted(val, reverse=True)  # each evaluation improved: no stop, all the way
    assert all(0 <= e["val_accuracy"] <= 1 for e in evals)
    assert all(0 <= e["accuracy"] <= 1 for e in read_metrics(tmp_path) if e["event"] == "train")
    assert summary["step"] == 5 and not summary["stopped_early"]


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA L40", 181.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("Mystery", None),
    ],
)
def test_a_gpus_peak_is_its_own_not_a_shorter_names(monkeypatch, name, tflops):
    """MFU's denominator: an L40's name holds "L4", whose peak (121 TFLOP/s) put its MFU 1.5x high."""
    from fasttrain.training import metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda")) == (tflops * 1e12 if tflops else None)
