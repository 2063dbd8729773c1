"""The Trainer: one run of `python -m fasttrain.train`, also usable from other code.

    trainer = Trainer(load_config("configs/base.toml"))
    summary = trainer.train()          # or drive it yourself:
    loss, grad_norm = trainer.step()
    metrics = trainer.evaluate()

A step is one optimizer update: `accumulation` micro-batches of batch_size x
seq_len tokens, each loss divided by `accumulation` so the summed gradient is the
gradient of the mean loss over the whole update. Then the global gradient norm is
clipped, AdamW steps at the learning rate of the schedule, and the gradients are
cleared. Nothing waits on the GPU except at log, eval and checkpoint points: the
loss and gradient norm stay on the device until they are printed.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fasttrain.atomic import write_atomically
from fasttrain.config import Config, TrainConfig, config_to_toml, save_config
from fasttrain.data import TokenLoader
from fasttrain.errors import UsageError
from fasttrain.metrics import MetricsLog, peak_flops, peak_memory_gb, perplexity
from fasttrain.model import Transformer, generate_text
from fasttrain.optim import build_optimizer
from fasttrain.prepare import ensure_prepared
from fasttrain.runtime import autocast, configure_cuda, resolve_device, resolve_precision, seed_everything
from fasttrain.schedule import lr_at
from fasttrain.tokenizer import Tokenizer

IGNORE_INDEX = -100  # targets with this value (padding) add nothing to the loss or its gradient


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits` (B, T, V) against `targets` (B, T), skipping IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def accumulation_steps(cfg: TrainConfig, world_size: int = 1) -> int:
    """Micro-batches per optimizer step: tokens_per_update / (batch_size x seq_len x world_size)."""
    per_micro_batch = cfg.batch_size * cfg.seq_len * world_size
    if cfg.tokens_per_update == 0:
        return 1
    if cfg.tokens_per_update % per_micro_batch:
        raise UsageError(
            f"train.tokens_per_update = {cfg.tokens_per_update} is not a multiple of batch_size x seq_len x "
            f"world size = {cfg.batch_size} x {cfg.seq_len} x {world_size} = {per_micro_batch}")
    return cfg.tokens_per_update // per_micro_batch


class Trainer:
    """Builds the model, optimizer and data of a Config, and trains, evaluates, samples and checkpoints.

    Construction prepares the data if needed (see `prepare.ensure_prepared`) and
    fills in `cfg.data.dir` and `cfg.model.vocab_size`; nothing is written to
    `train.out_dir` until `train()` or `save_checkpoint()`.
    """

    def __init__(self, cfg: Config, quiet: bool = False):
        self.cfg, t = cfg, cfg.train
        self.quiet = quiet
        self.device = resolve_device(t.device)
        self.precision = resolve_precision(t.precision, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            configure_cuda()
        seed_everything(t.seed)
        self.meta = ensure_prepared(cfg, quiet=quiet)
        self.tokenizer = Tokenizer.load(Path(cfg.data.dir) / "tokenizer.json")
        self.accumulation = accumulation_steps(t)

        self.model = Transformer(cfg.model).to(self.device)
        self.compiled = t.compile is True or (t.compile == "auto" and self.device.type == "cuda")
        # The compiled module shares the parameters; it is what trains and evaluates. Sampling runs
        # the plain module, whose growing sequence lengths would otherwise trigger recompiles.
        self.forward = torch.compile(self.model) if self.compiled else self.model
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.train_loader = TokenLoader(
            cfg.data.dir, "train", t.batch_size, t.seq_len, sampling=cfg.data.sampling, seed=t.seed,
            vocab_size=cfg.model.vocab_size, prefetch=cfg.data.prefetch, device=self.device,
        )
        val_tokens, val_bytes = self.meta["tokens"]["val"], self.meta["text_bytes"]["val"]
        self.bpb_per_nat = val_tokens / (val_bytes * math.log(2))  # val bits per byte for each nat of loss
        self.flops_per_token = self.model.flops_per_token(t.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.global_step = 0  # optimizer updates done
        self.last_lr = 0.0  # the learning rate of the latest update
        self.tokens_seen = 0
        self.best_val_loss = math.inf

    @property
    def tokens_per_step(self) -> int:
        return self.accumulation * self.cfg.train.batch_size * self.cfg.train.seq_len

    def lr(self) -> float:
        """The learning rate of the next update."""
        return lr_at(self.global_step, self.cfg.train.max_steps, self.cfg.optim.lr, self.cfg.schedule)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update; returns its mean loss and pre-clip gradient norm, as device tensors."""
        loss = self.accumulate_gradients()
        grad_norm = self.clip_gradients()
        self.apply_update()
        return loss, grad_norm

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns the mean loss (a device scalar).

        Each micro-batch's loss is divided by the number of micro-batches, so the
        gradients summed in .grad are those of the mean over the whole update.
        """
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.accumulation):
            x, y = next(self.train_loader)
            with autocast(self.precision, self.device):
                loss = cross_entropy_loss(self.forward(x), y) / self.accumulation
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def clip_gradients(self) -> torch.Tensor:
        """Scale the gradients so their global L2 norm is at most optim.max_grad_norm; returns the norm before."""
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        max_norm = self.cfg.optim.max_grad_norm or math.inf  # 0 disables clipping; the norm is still measured
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)

    def apply_update(self) -> None:
        """AdamW step at this step's learning rate, then clear the gradients and advance the step."""
        self.last_lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        self.scaler.step(self.optimizer)  # skips the update if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.tokens_seen += self.tokens_per_step

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte over the first `eval_steps` batches of the val split.

        The same windows every time (sequential, from the start), so evaluations
        along a run compare. Eval mode: no dropout.
        """
        t = self.cfg.train
        loader = TokenLoader(self.cfg.data.dir, "val", t.batch_size, t.seq_len, sampling="sequential",
                             vocab_size=self.cfg.model.vocab_size, prefetch=0, device=self.device)
        batches = min(t.eval_steps, loader.reader.batches_per_epoch)
        total = torch.zeros((), device=self.device)
        self.model.eval()
        try:
            for _ in range(batches):
                x, y = next(loader)
                with autocast(self.precision, self.device):
                    total += cross_entropy_loss(self.forward(x), y).float()
        finally:
            self.model.train()
            loader.close()
        val_loss = total.item() / batches
        self.best_val_loss = min(self.best_val_loss, val_loss)
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss),
                "val_bpb": val_loss * self.bpb_per_nat, "best_val_loss": self.best_val_loss}

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """Text generated from `prompt` (default: train.sample_prompt), the same random draws every call."""
        t = self.cfg.train
        with autocast(self.precision, self.device):
            return generate_text(self.model, self.tokenizer, prompt or t.sample_prompt,
                                 max_new_tokens or t.sample_tokens, seed=t.seed)

    def train(self) -> dict:
        """Train to `train.max_steps`, logging, evaluating and checkpointing on the way; returns a summary.

        Writes `config.toml` (the resolved config), `metrics.jsonl` and checkpoints
        into `train.out_dir`. Compile time (the first step, on a compiled model) is
        reported on its own and kept out of the throughput figures, as is time spent
        evaluating, sampling and saving.
        """
        cfg, t = self.cfg, self.cfg.train
        out = Path(t.out_dir)
        save_config(cfg, out)
        log = MetricsLog(out, t.max_steps, tensorboard=t.tensorboard, quiet=self.quiet)
        try:
            self._announce(log)
            last_eval: dict[str, float] = {}
            meter = _IntervalMeter(self)
            while self.global_step < t.max_steps:
                loss, grad_norm = self.step()
                done = self.global_step == t.max_steps
                if self.global_step == 1 and self.compiled:  # the first step's time is mostly compilation
                    seconds = _synchronized_seconds(meter.start, self.device)
                    log.event("compile", step=1, seconds=round(seconds, 3))
                    log.print(f"compiled the model and ran the first step in {seconds:.1f} s")
                    meter.restart()
                else:
                    meter.add(loss)
                if (self.global_step % t.log_interval == 0 or done) and meter.steps:
                    self._log_train(log, meter, grad_norm.item())
                    meter.restart()
                paused = time.perf_counter()
                if self.global_step % t.eval_interval == 0 or done:
                    last_eval = self._evaluate_and_sample(log)
                if self.global_step % cfg.checkpoint.interval == 0 or done:
                    log.event("checkpoint", step=self.global_step, path=str(self.save_checkpoint()))
                meter.exclude(time.perf_counter() - paused)
            last_eval = last_eval or self._evaluate_and_sample(log)  # nothing left to train: still report
            summary = {"step": self.global_step, "tokens": self.tokens_seen, **last_eval,
                       "out_dir": str(out), "checkpoint": str(self.checkpoint_path(self.global_step))}
            log.event("end", **summary)
            log.print(f"done: {self.global_step} steps, {self.tokens_seen:,} tokens; "
                      f"val loss {last_eval['val_loss']:.3f}, {last_eval['val_bpb']:.3f} bits/byte "
                      f"(best loss {self.best_val_loss:.3f})")
            log.print(f"  config      {out / 'config.toml'}\n  metrics     {log.path}\n"
                      f"  checkpoint  {summary['checkpoint']}\n  data        {cfg.data.dir}\n"
                      f"  plot with   python -m fasttrain.plot {out}")
            return summary
        finally:
            log.close()

    def checkpoint_path(self, step: int) -> Path:
        return Path(self.cfg.train.out_dir) / "checkpoints" / f"step_{step:07d}.pt"

    def save_checkpoint(self) -> Path:
        """Save everything needed to continue this run exactly; returns the file's path.

        Written under a temporary name, fsync'd and renamed, so a crash mid-save
        leaves the earlier checkpoints untouched. Keeps the newest `keep_last`.
        """
        path = self.checkpoint_path(self.global_step)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.global_step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "train_loader": self.train_loader.state_dict(),
            "rng": _rng_state(),
            "config": config_to_toml(self.cfg),
        }
        write_atomically(path, lambda f: torch.save(state, f), what="save checkpoint")
        for old in sorted(path.parent.glob("step_*.pt"))[:-self.cfg.checkpoint.keep_last]:
            old.unlink()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state `save_checkpoint` wrote to `path` into this trainer."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such checkpoint") from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["train_loader"])
        self.global_step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val_loss = state["best_val_loss"]
        _set_rng_state(state["rng"])

    def _announce(self, log: MetricsLog) -> None:
        c, t = self.cfg, self.cfg.train
        params = self.model.num_params()
        log.event("start", params=params, flops_per_token=self.flops_per_token, device=str(self.device),
                  precision=self.precision, compile=self.compiled, accumulation=self.accumulation,
                  tokens_per_step=self.tokens_per_step, train_tokens=self.meta["tokens"]["train"],
                  val_tokens=self.meta["tokens"]["val"])
        log.print(f"model: {params / 1e6:.2f}M parameters ({c.model.n_layers} layers, d_model {c.model.d_model}, "
                  f"{c.model.n_heads} heads, vocab {c.model.vocab_size}, context {c.model.max_seq_len})")
        log.print(f"data: {self.meta['tokens']['train']:,} train / {self.meta['tokens']['val']:,} val tokens "
                  f"in {c.data.dir}")
        log.print(f"run: {t.max_steps} steps x {self.tokens_per_step:,} tokens ({t.batch_size} x {t.seq_len}"
                  f" x {self.accumulation} accumulation) on {self.device}, {self.precision}"
                  f"{', compiled' if self.compiled else ''}; writing to {t.out_dir}")

    def _log_train(self, log: MetricsLog, meter: _IntervalMeter, grad_norm: float) -> None:
        t = self.cfg.train
        loss = meter.loss_sum.item() / meter.steps  # waits for the GPU, so the clock read next is honest
        elapsed, wait = meter.elapsed(), meter.data_wait()
        tokens_per_s = meter.steps * self.tokens_per_step / elapsed
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        record = {
            "step": self.global_step, "progress": round(100 * self.global_step / t.max_steps, 2), "loss": loss,
            "ppl": perplexity(loss), "lr": self.last_lr, "grad_norm": grad_norm,
            "tokens": self.tokens_seen, "tokens_per_s": round(tokens_per_s, 1),
            "step_ms": round(1000 * elapsed / meter.steps, 2), "data_wait_pct": round(100 * wait / elapsed, 2),
            "peak_mem_gb": round(peak_memory_gb(self.device), 3),
        }
        if mfu is not None:
            record["mfu"] = round(mfu, 4)
        log.event("train", **record)
        log.print(
            f"step {self.global_step:>6}/{t.max_steps} ({record['progress']:5.1f}%) | loss {loss:.4f} | "
            f"ppl {record['ppl']:8.2f} | lr {record['lr']:.2e} | grad norm {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s{f' | MFU {100 * mfu:.1f}%' if mfu is not None else ''} | "
            f"{record['step_ms']:.0f} ms/step | data wait {record['data_wait_pct']:.1f}% | "
            f"mem {record['peak_mem_gb']:.2f} GB")
        log.progress(self.global_step, loss=f"{loss:.3f}")

    def _evaluate_and_sample(self, log: MetricsLog) -> dict[str, float]:
        metrics = self.evaluate()
        log.event("eval", step=self.global_step, **metrics)
        log.print(f"eval step {self.global_step}: val loss {metrics['val_loss']:.4f} | ppl {metrics['val_ppl']:.2f} | "
                  f"{metrics['val_bpb']:.4f} bits/byte | best {metrics['best_val_loss']:.4f}")
        if self.cfg.train.sample_tokens:
            text = self.sample()
            log.event("sample", step=self.global_step, prompt=self.cfg.train.sample_prompt, text=text)
            log.print(f"sample: {text!r}")
        return metrics


class _IntervalMeter:
    """Loss and timing of the steps since the last log line, minus time spent evaluating or saving."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.loss_sum = torch.zeros((), device=trainer.device)  # summed on the device: no sync per step
        self.restart()

    def restart(self) -> None:
        self.loss_sum.zero_()
        self.steps = 0
        self.start, self.excluded = time.perf_counter(), 0.0
        self.wait_start = self.trainer.train_loader.wait_seconds

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def data_wait(self) -> float:
        return self.trainer.train_loader.wait_seconds - self.wait_start


def _synchronized_seconds(start: float, device: torch.device) -> float:
    """Seconds since `start`, once queued GPU work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _rng_state() -> dict:
    """Python's, NumPy's and torch's (CPU and every CUDA device) generator states, in types torch.load accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
