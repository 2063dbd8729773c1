"""The Trainer: one run of `python -m fasttrain.train`, also usable from other code.

    trainer = Trainer(load_config("configs/base.toml"))
    summary = trainer.train()          # or drive it yourself:
    loss, grad_norm = trainer.step()
    metrics = trainer.evaluate()

A step is one optimizer update: `accumulation` micro-batches of batch_size x
seq_len tokens, each loss weighted by its share of the update's counted targets
(all of them when rows are packed; the padded ones are ignored), so the summed
gradient is the gradient of the mean loss per real token over the whole update,
over all ranks. Then the global gradient norm is
clipped, AdamW steps at the learning rate of the schedule, and the gradients are
cleared. A step whose loss or gradient norm is not finite is skipped instead (no
update); after `recovery.max_skips` in a row the run rolls back to its latest
checkpoint at a lower learning rate, or stops (`recovery.max_rollbacks`). The
finiteness check is the one host sync per step; otherwise nothing waits on the GPU
except at log, eval and checkpoint points.

SIGINT (Ctrl-C) and SIGTERM during `train()` finish the current step, save a
checkpoint and raise `Interrupted` (exit status 130 / 143 from the command line);
`resume("auto")` continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from fasttrain import checkpoint, distributed
from fasttrain.config import Config, TrainConfig, config_to_toml, save_config
from fasttrain.data import TokenLoader
from fasttrain.errors import RunStopped, UsageError
from fasttrain.export import export_weights
from fasttrain.metrics import MetricsLog, peak_flops, peak_memory_gb, perplexity
from fasttrain.model import IGNORE_INDEX, Transformer, generate_text
from fasttrain.optim import build_optimizer
from fasttrain.prepare import ensure_prepared
from fasttrain.runtime import (
    autocast, configure_cuda, resolve_device, resolve_precision, seed_everything, switched_on,
)
from fasttrain.schedule import lr_at
from fasttrain.tokenizer import Tokenizer

class Interrupted(RunStopped):
    """`train()` stopped on SIGINT or SIGTERM after saving a checkpoint; exit_code is 128 + the signal."""


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
    `train.out_dir` until `train()` or `save_checkpoint()`. Call `resume()` before
    `train()` to continue a saved run.

    Under torchrun (see fasttrain/distributed.py) every rank builds a Trainer: each
    reads its own part of the data, the gradients are averaged (DDP) or sharded
    (FSDP), the logged loss is the mean over ranks, and only rank 0 prints and writes.
    """

    def __init__(self, cfg: Config, quiet: bool = False):
        self.cfg, t = cfg, cfg.train
        self.world = distributed.world_from_env()
        self.quiet = quiet or not self.world.is_main
        self.device = resolve_device(t.device, self.world.local_rank if self.world.distributed else None)
        self.precision = resolve_precision(t.precision, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            configure_cuda()
        distributed.start(self.world, self.device)
        seed_everything(t.seed)
        if not self.world.is_main:
            distributed.barrier(self.world)  # rank 0 prepares the data first; the others then find it
        self.meta = ensure_prepared(cfg, quiet=self.quiet)
        if self.world.is_main:
            distributed.barrier(self.world)
        self.tokenizer = Tokenizer.load(Path(cfg.data.dir) / "tokenizer.json")
        self.accumulation = accumulation_steps(t, self.world.size)

        # The [kernels] switched on, by name (the Triton kernels need Triton installed).
        self.kernels = [k for k, on in dataclasses.asdict(cfg.kernels).items() if switched_on(on, self.device)]
        self.parallel = t.parallel if self.world.distributed else "none"  # what a checkpoint records too
        self.fsdp = self.parallel == "fsdp"
        if self.fsdp and "adamw" in self.kernels:  # its multi-tensor kernel takes whole tensors, not DTensor shards
            if cfg.kernels.adamw is True:
                raise UsageError('kernels.adamw = true does not work with train.parallel = "fsdp" yet; '
                                 'set it to "auto" or false')
            self.kernels.remove("adamw")
        self.model = Transformer(cfg.model, norm_kernel="rms_norm" in self.kernels,
                                 loss_kernel="linear_cross_entropy" in self.kernels).to(self.device)
        self.compiled = switched_on(t.compile, self.device)
        # `forward(tokens, targets)` is what trains and evaluates (through `loss`): the model inside its
        # DDP wrapper (or sharded by FSDP), compiled if asked. Sampling runs the plain module, whose
        # growing sequence lengths would otherwise trigger recompiles.
        self.wrapped = distributed.wrap(self.model, self.world, t.parallel, self.precision, self.device)
        self.forward = torch.compile(self.wrapped) if self.compiled else self.wrapped
        self.hits = torch.zeros(2, device=self.device)  # [top-1 hits, counted targets] of `loss` calls since reset
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, kernel="adamw" in self.kernels)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.train_loader = self.loader("train", cfg.data.sampling, cfg.data.prefetch)
        val_tokens, val_bytes = self.meta["tokens"]["val"], self.meta["text_bytes"]["val"]
        self.bpb_per_nat = val_tokens / (val_bytes * math.log(2))  # val bits per byte for each nat of loss
        self.flops_per_token = self.model.flops_per_token(t.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.global_step = 0  # optimizer updates done
        self.last_lr = 0.0  # the learning rate of the latest update
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.lr_scale = 1.0  # multiplies the schedule; each rollback after divergence lowers it
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient norm, in all
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.step_hits = torch.zeros(2, device=self.device)  # `hits` of the latest step, averaged over ranks
        self.stale_evals = 0  # evaluations in a row without improving on the best by early_stop_min_delta
        self.stopped_early = False
        self.resumed_from: Path | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.train.out_dir) / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        """Token slots per optimizer update, over all ranks (pads included; `tokens_seen` counts real ones)."""
        return self.accumulation * self.cfg.train.batch_size * self.cfg.train.seq_len * self.world.size

    def loader(self, split: str, sampling: str, prefetch: int) -> TokenLoader:
        """A loader of this rank's share of `split`, batched as [data] says."""
        d, t = self.cfg.data, self.cfg.train
        return TokenLoader(d.dir, split, t.batch_size, t.seq_len, sampling=sampling, batching=d.batching,
                           padding=d.padding, eot_id=self.tokenizer.eot_id, seed=t.seed,
                           vocab_size=self.cfg.model.vocab_size, prefetch=prefetch, device=self.device,
                           rank=self.world.rank, world_size=self.world.size)

    def lr(self) -> float:
        """The learning rate of the next update."""
        return self.lr_scale * lr_at(self.global_step, self.cfg.train.max_steps, self.cfg.optim.lr, self.cfg.schedule)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update; returns its mean loss and pre-clip gradient norm, as device tensors.

        If either is not finite the update is skipped: weights and optimizer state stay
        as they were, the step still counts, and `skipped_steps` goes up.
        """
        loss = distributed.mean(self.accumulate_gradients(), self.world)  # every rank decides alike below
        self.step_hits = distributed.mean(self.hits.clone(), self.world)  # the ratio is what counts
        grad_norm = self.clip_gradients()
        # With fp16 an overflowing gradient is the GradScaler's business: it skips and lowers its scale.
        watched = loss if self.precision == "fp16" else loss + grad_norm
        # The one host sync of a step: whether to update, and how many real tokens it trained on.
        finite, targets = torch.stack([torch.isfinite(watched).float(), self.step_hits[1]]).tolist()
        self.apply_update(skip=not finite)
        self.tokens_seen += round(targets * self.world.size)
        return loss, grad_norm

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of batch (x, y) through the training module; its top-1 hits and
        counted targets are added to `hits` (the step and the evaluation reset and read them).
        With data.document_mask, each end-of-text token in x starts a new document."""
        documents = (x == self.tokenizer.eot_id).cumsum(1) if self.cfg.data.document_mask else None
        loss, hits = self.forward(x, y, accuracy=True, documents=documents)
        self.hits += hits
        return loss

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns this rank's part of the loss (a device scalar).

        Each micro-batch's mean loss is weighted by its counted targets over those of the
        whole update on all ranks (times the world size, since the gradient reduction
        averages over ranks), so the gradients summed in .grad are those of the mean
        loss per counted target. With several ranks the gradients are reduced across
        them in the last backward only. Returns this rank's term of the update's loss
        times the world size (their mean over ranks, which `step` takes, is the loss).
        """
        batches = [next(self.train_loader) for _ in range(self.accumulation)]
        counts = torch.stack([(y != IGNORE_INDEX).sum() for _, y in batches]).float()
        weights = counts / distributed.mean(counts.sum(), self.world)  # mean over ranks: x world size / total
        loss_sum = torch.zeros((), device=self.device)
        self.hits.zero_()
        for i, (x, y) in enumerate(batches):
            with distributed.gradient_sync(self.wrapped, enabled=i == self.accumulation - 1):
                with autocast(self.precision, self.device):
                    loss = self.loss(x, y) * weights[i]
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def clip_gradients(self) -> torch.Tensor:
        """Scale the gradients so their global L2 norm is at most optim.max_grad_norm; returns the norm before.

        With the AdamW kernel only the norm is computed here: the optimizer applies the clip
        as it reads the gradients in its step, so the gradients themselves stay unscaled.
        """
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        if "adamw" in self.kernels:
            return self.optimizer.grad_norm()
        max_norm = self.cfg.optim.max_grad_norm or math.inf  # 0 disables clipping; the norm is still measured
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        return norm.full_tensor() if self.fsdp else norm  # FSDP's is a DTensor (already reduced over ranks)

    def apply_update(self, skip: bool = False) -> None:
        """AdamW step at this step's learning rate (none if `skip`), then clear the gradients and advance."""
        self.last_lr = self.lr()
        if skip:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            for group in self.optimizer.param_groups:
                group["lr"] = self.last_lr
            self.scaler.step(self.optimizer)  # skips the update if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte over the first `eval_steps` batches of the val split.

        The same rows every time (sequential, from the start, batched as in training),
        so evaluations along a run compare. Eval mode: no dropout. With several ranks
        each takes its share of those rows (as many as one process with their batch
        sizes summed). The loss is the mean over every counted target of all ranks.
        """
        loader = self.loader("val", "sequential", prefetch=0)
        batches = min(self.cfg.train.eval_steps, loader.reader.batches_per_epoch)
        total = torch.zeros((), device=self.device)  # summed loss of the counted targets
        self.hits.zero_()
        self.model.eval()
        try:
            for _ in range(batches):
                x, y = next(loader)
                with autocast(self.precision, self.device):
                    loss = self.loss(x, y)
                total += loss.float() * (y != IGNORE_INDEX).sum()  # x this batch's counted targets, as in training
        finally:
            self.model.train()
            loader.close()
        loss_sum, correct, counted = distributed.mean(torch.cat([total[None], self.hits]), self.world).tolist()
        val_loss = loss_sum / max(counted, 1)
        self.best_val_loss = min(self.best_val_loss, val_loss)
        return {"val_loss": val_loss, "val_accuracy": correct / max(counted, 1), "val_ppl": perplexity(val_loss),
                "val_bpb": val_loss * self.bpb_per_nat, "best_val_loss": self.best_val_loss}

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """Text generated from `prompt` (default: train.sample_prompt), the same random draws every call."""
        t = self.cfg.train
        with autocast(self.precision, self.device):
            return generate_text(self.model, self.tokenizer, prompt or t.sample_prompt,
                                 max_new_tokens or t.sample_tokens, seed=t.seed)

    def train(self, overwrite: bool = False) -> dict:
        """Train to `train.max_steps`, logging, evaluating and checkpointing on the way; returns a summary.

        Writes `config.toml` (the resolved config), `metrics.jsonl`, checkpoints and,
        at the end, the final weights (`final/`, see fasttrain/export.py) into
        `train.out_dir`. A new run refuses a directory that holds another run's
        checkpoints unless `overwrite`, which deletes them first. Compile time (the
        first step, on a compiled model) is reported on its own and kept out of the
        throughput figures, as is time spent evaluating, sampling and saving.
        """
        t = self.cfg.train
        out = Path(t.out_dir)
        if self.resumed_from is None:
            self._claim(out, overwrite)
        if self.world.is_main:
            save_config(self.cfg, out)
        log = MetricsLog(out if self.world.is_main else None, t.max_steps, tensorboard=t.tensorboard,
                         quiet=self.quiet)
        try:
            self._announce(log)
            last_eval: dict[str, float] = {}
            meter = _IntervalMeter(self)
            with _SignalCatcher() as signals:
                while self.global_step < t.max_steps:
                    loss, grad_norm = self.step()
                    done = self.global_step == t.max_steps
                    if self.consecutive_skips:
                        if self._on_skip(log, loss.item(), grad_norm.item()):  # rolled back to the latest checkpoint
                            meter.restart()
                            continue
                    elif self.global_step == 1 and self.compiled:  # the first step's time is mostly compilation
                        seconds = _synchronized_seconds(meter.start, self.device)
                        log.event("compile", step=1, seconds=round(seconds, 3))
                        log.print(f"compiled the model and ran the first step in {seconds:.1f} s")
                        meter.restart()
                    else:
                        meter.add(loss, self.step_hits)
                    if (self.global_step % t.log_interval == 0 or done) and meter.steps:
                        self._log_train(log, meter, grad_norm.item())
                        meter.restart()
                    paused = time.perf_counter()
                    last_eval = self._evaluate_and_save(log, done) or last_eval
                    meter.exclude(time.perf_counter() - paused)
                    if distributed.any_rank(bool(signals.received), self.world, self.device):  # stop together
                        self._stop(log, signals.received or signal.SIGTERM)
                    if t.early_stop_patience and self.stale_evals >= t.early_stop_patience and not done:
                        self._stop_early(log)
                        break
            summary = self._finish(log, last_eval or self._evaluate_and_sample(log))  # nothing trained: still report
            distributed.barrier(self.world)  # no rank leaves the process group while another still uses it
            return summary
        finally:
            log.close()

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly: what a checkpoint file holds.

        Every rank must call it (FSDP gathers the full model and optimizer state, and each
        rank's loader position and random state are collected into "ranks").
        """
        model, optimizer = distributed.full_state(self.model, self.optimizer, self.fsdp)
        return {
            "model": model,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "step": self.global_step,  # the LR schedule's position too
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "lr_scale": self.lr_scale,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "stale_evals": self.stale_evals,
            "ranks": distributed.gather({"train_loader": self.train_loader.state_dict(),
                                         "rng": checkpoint.rng_state()}, self.world),
            "parallel": self.parallel,
            "config": config_to_toml(self.cfg),
        }

    def save_checkpoint(self, best: bool = False) -> Path:
        """Save `state_dict()` into the run's checkpoints/ (see fasttrain/checkpoint.py); returns the file.

        Keeps the newest `checkpoint.keep_last` saves, and the best one: this save if `best`.
        Every rank must call it; rank 0 writes, and the others wait until it has.
        """
        state = self.state_dict()
        path = checkpoint.path_for(self.checkpoint_dir, self.global_step)
        if self.world.is_main:
            path = checkpoint.save(state, self.checkpoint_dir, self.global_step, self.cfg.checkpoint.keep_last, best)
        distributed.barrier(self.world)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state `save_checkpoint` wrote to `path` into this trainer.

        The checkpoint must come from a model of the same shape as this config's;
        otherwise a UsageError names the [model] keys that differ.
        """
        state = checkpoint.load(path, self.device)
        checkpoint.check_same_model(state, self.cfg, path)
        saved = (len(state.get("ranks", [])), state.get("parallel"))
        if saved != (self.world.size, self.parallel):
            raise UsageError(f"{path}: saved by {saved[0]} process(es) ({saved[1]}); this run has "
                             f"{self.world.size} ({self.parallel}): resume with the same torchrun --nproc_per_node "
                             "and train.parallel")
        try:
            distributed.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"], self.fsdp)
            self.scaler.load_state_dict(state["scaler"])
            mine = state["ranks"][self.world.rank]
            self.train_loader.load_state_dict(mine["train_loader"])
            checkpoint.set_rng_state(mine["rng"])
            self.global_step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.best_val_loss, self.lr_scale = state["best_val_loss"], state["lr_scale"]
            self.skipped_steps, self.rollbacks = state["skipped_steps"], state["rollbacks"]
            self.stale_evals = state["stale_evals"]
        except (RuntimeError, ValueError, KeyError, TypeError, UsageError) as e:
            raise UsageError(f"{path}: cannot continue from it ({str(e).splitlines()[0]})") from None
        self.consecutive_skips = 0

    def resume(self, spec: str | Path = "auto") -> Path:
        """Continue a saved run: `spec` is "auto" (this run's latest save), a run directory or a checkpoint file."""
        path = checkpoint.resolve(str(spec), self.cfg.train.out_dir)
        self.load_checkpoint(path)
        self.resumed_from = path
        return path

    def _claim(self, out: Path, overwrite: bool) -> None:
        """Make `out` ready for a new run: refuse another run's checkpoints, or delete them if `overwrite`."""
        saved = checkpoint.saved_steps(self.checkpoint_dir)
        if saved and not overwrite:
            raise UsageError(
                f"{self.checkpoint_dir}: holds checkpoints of an earlier run (up to step "
                f"{checkpoint.step_of(saved[-1])}); continue it with --resume auto, start over with --overwrite, "
                "or set train.out_dir elsewhere")
        if overwrite and self.world.is_main:
            for old in (self.checkpoint_dir, out / "final", out / "tensorboard"):
                shutil.rmtree(old, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        distributed.barrier(self.world)  # every rank checked before rank 0 deleted anything

    def _evaluate_and_save(self, log: MetricsLog, done: bool) -> dict[str, float] | None:
        """Evaluate and save when due; a new best validation loss also saves, with checkpoint.keep_best."""
        t, c = self.cfg.train, self.cfg.checkpoint
        metrics, improved = None, False
        if self.global_step % t.eval_interval == 0 or done:
            previous_best = self.best_val_loss
            metrics = self._evaluate_and_sample(log)
            improved = metrics["val_loss"] < previous_best
            enough = metrics["val_loss"] < previous_best - t.early_stop_min_delta
            self.stale_evals = 0 if enough else self.stale_evals + 1
        if self.global_step % c.interval == 0 or done or (improved and c.keep_best):
            self._save(log, best=improved)
        return metrics

    def _finish(self, log: MetricsLog, last_eval: dict[str, float]) -> dict:
        """Export the final weights, then log and print the summary of the run, and where everything went."""
        out = Path(self.cfg.train.out_dir)
        weights = distributed.full_state(self.model, None, self.fsdp)[0]
        final = export_weights(weights, self.cfg, out / "final")[0] if self.world.is_main else out / "final"
        summary = {"step": self.global_step, "tokens": self.tokens_seen, **last_eval, "out_dir": str(out),
                   "checkpoint": str(checkpoint.pointed(self.checkpoint_dir, "latest")), "weights": str(final),
                   "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "stopped_early": self.stopped_early}
        log.event("end", **summary)
        log.print(f"done: {self.global_step} steps, {self.tokens_seen:,} tokens; "
                  f"val loss {last_eval['val_loss']:.3f}, {last_eval['val_bpb']:.3f} bits/byte "
                  f"(best loss {self.best_val_loss:.3f})"
                  + (f"; {self.skipped_steps} steps skipped, {self.rollbacks} rollbacks" if self.skipped_steps else ""))
        log.print(f"  config      {out / 'config.toml'}\n  metrics     {log.path}\n"
                  f"  checkpoint  {summary['checkpoint']}\n  weights     {final}\n  data        {self.cfg.data.dir}\n"
                  f"  plot with   python -m fasttrain.plot {out}")
        return summary

    def _save(self, log: MetricsLog, best: bool = False) -> Path:
        path = self.save_checkpoint(best)
        log.event("checkpoint", step=self.global_step, path=str(path), best=best)
        return path

    def _on_skip(self, log: MetricsLog, loss: float, grad_norm: float) -> bool:
        """Report a skipped update; after `recovery.max_skips` in a row roll back (True) or stop."""
        r = self.cfg.recovery
        log.event("skip", step=self.global_step, loss=loss, grad_norm=grad_norm,
                  consecutive=self.consecutive_skips, skipped_steps=self.skipped_steps)
        log.print(f"step {self.global_step}: loss {loss} / grad norm {grad_norm} is not finite; "
                  f"update skipped ({self.consecutive_skips} in a row, {r.max_skips} allowed)")
        if self.consecutive_skips < r.max_skips:
            return False
        latest = checkpoint.pointed(self.checkpoint_dir, "latest")
        if latest is None or self.rollbacks >= r.max_rollbacks:
            why = "there is no checkpoint to roll back to" if latest is None else f"after {self.rollbacks} rollbacks"
            log.event("diverged", step=self.global_step, rollbacks=self.rollbacks)
            raise RunStopped(
                f"stopped at step {self.global_step}: loss or gradient norm not finite for {self.consecutive_skips} "
                f"steps in a row, and {why}; lower optim.lr, lengthen schedule.warmup_steps, or run "
                "python -m fasttrain.doctor on this config", 1)
        keep = self.lr_scale * r.lr_factor, self.rollbacks + 1, self.skipped_steps
        diverged_at = self.global_step
        self.load_checkpoint(latest)
        self.lr_scale, self.rollbacks, self.skipped_steps = keep
        log.event("rollback", step=self.global_step, from_step=diverged_at, path=str(latest), lr_scale=self.lr_scale)
        log.print(f"rolled back from step {diverged_at} to {latest} (step {self.global_step}); "
                  f"learning rate now x{self.lr_scale:g} (rollback {self.rollbacks} of {r.max_rollbacks})")
        return True

    def _stop_early(self, log: MetricsLog) -> None:
        """End the run here: validation has not improved enough for train.early_stop_patience evaluations."""
        t = self.cfg.train
        self._save_unless_saved(log)  # the final state, beside the best one that was kept
        self.stopped_early = True
        log.event("early_stop", step=self.global_step, evaluations=self.stale_evals,
                  min_delta=t.early_stop_min_delta, best_val_loss=self.best_val_loss)
        log.print(f"stopping early at step {self.global_step}: validation loss has not improved by "
                  f"{t.early_stop_min_delta:g} or more in {self.stale_evals} evaluations "
                  f"(best {self.best_val_loss:.4f}, kept as checkpoints/best)")

    def _save_unless_saved(self, log: MetricsLog) -> Path:
        """The checkpoint of this step: the latest one if it was saved at this step already, else a new save."""
        path = checkpoint.pointed(self.checkpoint_dir, "latest")
        if path is None or checkpoint.step_of(path) != self.global_step:
            path = self._save(log)
        return path

    def _stop(self, log: MetricsLog, signum: int) -> None:
        path = self._save_unless_saved(log)
        name = signal.Signals(signum).name
        log.event("stopped", step=self.global_step, signal=name, checkpoint=str(path))
        distributed.barrier(self.world)
        raise Interrupted(f"stopped by {name} at step {self.global_step}; saved {path}", 128 + signum)

    def _announce(self, log: MetricsLog) -> None:
        c, t = self.cfg, self.cfg.train
        params = self.model.num_params()
        log.event("start", params=params, flops_per_token=self.flops_per_token, device=str(self.device),
                  precision=self.precision, compile=self.compiled, kernels=self.kernels, world_size=self.world.size,
                  parallel=self.parallel,
                  accumulation=self.accumulation,
                  tokens_per_step=self.tokens_per_step, train_tokens=self.meta["tokens"]["train"],
                  val_tokens=self.meta["tokens"]["val"],
                  **({"resumed_from": str(self.resumed_from), "resume_step": self.global_step} if self.resumed_from else {}))
        log.print(f"model: {params / 1e6:.2f}M parameters ({c.model.n_layers} layers, d_model {c.model.d_model}, "
                  f"{c.model.n_heads} heads, vocab {c.model.vocab_size}, context {c.model.max_seq_len})")
        log.print(f"data: {self.meta['tokens']['train']:,} train / {self.meta['tokens']['val']:,} val tokens "
                  f"in {c.data.dir}")
        speedups = ["compiled"] * self.compiled + [f"kernels: {', '.join(self.kernels)}"] * bool(self.kernels)
        ranks = f" x {self.world.size} ranks, {self.parallel}" if self.world.distributed else ""
        log.print(f"run: {t.max_steps} steps x {self.tokens_per_step:,} tokens ({t.batch_size} x {t.seq_len}"
                  f" x {self.accumulation} accumulation{ranks}) on {self.device}, {', '.join([self.precision, *speedups])}; "
                  f"writing to {t.out_dir}")
        if self.resumed_from:
            log.print(f"resumed from {self.resumed_from} at step {self.global_step}")

    def _log_train(self, log: MetricsLog, meter: _IntervalMeter, grad_norm: float) -> None:
        t = self.cfg.train
        loss = meter.loss_sum.item() / meter.steps  # waits for the GPU, so the clock read next is honest
        correct, counted = meter.hits.tolist()
        elapsed, wait = meter.elapsed(), meter.data_wait()
        tokens_per_s = (self.tokens_seen - meter.tokens_start) / elapsed  # real tokens: pads do not count
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        record = {
            "step": self.global_step, "progress": round(100 * self.global_step / t.max_steps, 2), "loss": loss,
            "accuracy": round(correct / max(counted, 1), 4), "ppl": perplexity(loss), "lr": self.last_lr, "grad_norm": grad_norm,
            "tokens": self.tokens_seen, "tokens_per_s": round(tokens_per_s, 1),
            "step_ms": round(1000 * elapsed / meter.steps, 2), "data_wait_pct": round(100 * wait / elapsed, 2),
            "peak_mem_gb": round(peak_memory_gb(self.device), 3),
        }
        if mfu is not None:
            record["mfu"] = round(mfu, 4)
        log.event("train", **record)
        log.print(
            f"step {self.global_step:>6}/{t.max_steps} ({record['progress']:5.1f}%) | loss {loss:.4f} | "
            f"acc {100 * record['accuracy']:.1f}% | "
            f"ppl {record['ppl']:8.2f} | lr {record['lr']:.2e} | grad norm {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s{f' | MFU {100 * mfu:.1f}%' if mfu is not None else ''} | "
            f"{record['step_ms']:.0f} ms/step | data wait {record['data_wait_pct']:.1f}% | "
            f"mem {record['peak_mem_gb']:.2f} GB")
        log.progress(self.global_step, loss=f"{loss:.3f}")

    def _evaluate_and_sample(self, log: MetricsLog) -> dict[str, float]:
        metrics = self.evaluate()
        log.event("eval", step=self.global_step, **metrics)
        log.print(f"eval step {self.global_step}: val loss {metrics['val_loss']:.4f} | "
                  f"acc {100 * metrics['val_accuracy']:.1f}% | ppl {metrics['val_ppl']:.2f} | "
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
        self.hits = torch.zeros(2, device=trainer.device)  # [top-1 hits, counted targets]
        self.restart()

    def restart(self) -> None:
        self.loss_sum.zero_()
        self.hits.zero_()
        self.steps = 0
        self.tokens_start = self.trainer.tokens_seen
        self.start, self.excluded = time.perf_counter(), 0.0
        self.wait_start = self.trainer.train_loader.wait_seconds

    def add(self, loss: torch.Tensor, hits: torch.Tensor) -> None:
        self.loss_sum += loss
        self.hits += hits
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


class _SignalCatcher:
    """While active, SIGINT and SIGTERM only set `received`, so training can stop at a step boundary.

    The first signal of each kind puts the previous handler back, so a second Ctrl-C
    stops at once (a checkpoint save cut short leaves the earlier ones intact).
    Signals can only be caught in the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _SignalCatcher:
        self.received: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._catch) for s in self.SIGNALS}
        return self

    def _catch(self, signum: int, frame) -> None:
        self.received = signum
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
