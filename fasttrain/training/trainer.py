"""The Trainer: one run of `python -m fasttrain.train`, also usable from other code.

Imports from fasttrain: checkpoints.checkpoint, checkpoints.run_directory, checkpoints.run_state, compute.device,
compute.distributed, config, data.loader, data.mixture, data.sampling, evaluation.loss_sums, evaluation.trained_model,
evaluation.validation, formats.tokenizer, model.ensemble, model.generation, model.weights, optimization.objective,
optimization.optimizers, optimization.schedule, planning.plan, planning.sizing, training.launch, training.policies,
training.reporting, training.run_loop.

    trainer = Trainer(load_config("configs/base.toml"))
    summary = trainer.train()          # or drive it yourself:
    result = trainer.step()            # StepResult: loss, grad_norm, correct, counted, lr, skipped
    metrics = trainer.evaluate()

A run ends after `train.max_steps` updates or `train.max_time` seconds of training (the schedule then runs on progress,
so it finishes on time). A step is one optimizer update of `accumulation` micro-batches; its gradient is that of the
mean loss per counted target over all ranks, clipped, then applied (optimizers.Updater). A step whose loss or gradient
norm is not finite is skipped; after `recovery.max_skips` in a row the run rolls back at a lower learning rate, or stops
(policies.Recovery). That check is the one host sync per step.

The Trainer assembles the run's parts from its plan (plan.py, made by launch.start_run), holds its RunState, and runs
the loop (run_loop.py), which asks the policies after each step and evaluation and hands values to reporting. SIGINT and
SIGTERM during `train()` finish the step, save and raise `Interrupted` (exit status 130 / 143); `resume("auto")`
continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, cast

import torch

from fasttrain.checkpoints.checkpoint import Checkpointer
from fasttrain.checkpoints.run_directory import saves_to_resume
from fasttrain.checkpoints.run_state import RunState
from fasttrain.compute import distributed
from fasttrain.compute.device import (
    autocast,
    compile_failure,
    compile_failures,
    compile_options,
    key_inductor_cache,
    seed_everything,
    uncompiled,
    use_attention,
)
from fasttrain.config import Config, TrainConfig
from fasttrain.data.loader import TokenLoader
from fasttrain.data.mixture import Source, kept_mix_notes, replay_mix
from fasttrain.data.sampling import Sampling
from fasttrain.evaluation.loss_sums import LossSums
from fasttrain.evaluation.trained_model import load_teacher, teacher_weights
from fasttrain.evaluation.validation import validate_sources
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.ensemble import build_model
from fasttrain.model.generation import generate_text
from fasttrain.model.weights import read_hf_llama_weights
from fasttrain.optimization.objective import NextTokenLoss, batch_loss, counted_targets
from fasttrain.optimization.optimizers import Updater
from fasttrain.optimization.schedule import Budget, next_update
from fasttrain.planning.plan import RunPlan, accumulation_steps  # noqa: F401 (accumulation_steps: kept for the Python API)
from fasttrain.planning.sizing import timed_step_seconds
from fasttrain.training.launch import check_start, opened, start_run
from fasttrain.training.policies import resumed_under
from fasttrain.training.reporting import Report
from fasttrain.training.run_loop import Interrupted, Loop, StepResult, score_final, scored_rows, write_final  # noqa: F401 (Interrupted: what train() raises)


class Trainer:
    """Builds the model, objective, optimizer and data of a Config, and trains, evaluates, samples and checkpoints.
    Construction prepares the data if needed and keeps the config resolved with what that found (`cfg`); with
    model.init_from the model takes that model's shape and weights. Nothing is written to `train.out_dir` until
    `train()` or `save_checkpoint()`. Under torchrun every rank builds one; only rank 0 prints and writes."""

    def __init__(
        self,
        cfg: Config,
        quiet: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        resuming: bool = False,
        plan: RunPlan | None = None,
    ):
        """`plan`: the run's plan (made by start_run if not given). `clock`: seconds, what train.max_time counts.
        `resuming`: resume() comes next, so model.init_from's weights are read only if train() starts anew; planned as
        the run saved in train.out_dir, or, where nothing is saved there yet, as a new run (which train() starts)."""
        self.clock, self.created = clock, clock()
        plan = plan or start_run(cfg, quiet, "auto" if resuming and saves_to_resume(cfg.train.out_dir) else None)
        if plan.prepare:
            raise ValueError(f"a plan of data not prepared yet ({plan.prepare}): make it with start_run")
        self.plan, self.world, self.device, self.cfg = plan, plan.world, plan.device, plan.cfg
        self.quiet = quiet or not self.world.is_main
        self.precision, self.compiled = plan.precision, plan.compiled
        self.kernels, self.sharded = plan.kernels, plan.sharded
        self.accumulation, self.tokens_per_step, self.recorded = plan.accumulation, plan.tokens_per_step, plan.recorded
        self.sources, self.mix = list(plan.sources), list(plan.mix)  # the mix as a resumed loader keeps it
        self.data = self.sources[0].data
        self.tokenizer = Tokenizer.load(Path(self.data.dir) / "tokenizer.json")
        t = self.cfg.train
        seed_everything(t.seed)
        # `model` is the network: its weights, sampling, checkpoints. `objective` is its loss, what trains
        # and evaluates: inside DDP (or sharded by FSDP), and compiled in place if asked. Sampling runs
        # the plain model, whose growing sequence lengths would otherwise trigger recompiles.
        use_attention(t.attention, self.device)
        self.model = build_model(
            self.cfg.model,
            norm_kernel=self.kernels.rms_norm,
            checkpointing=t.activation_checkpointing,
            attention=t.attention,
            fp8=t.fp8,
        ).to(self.device)
        loss = NextTokenLoss(self.model, fused=self.kernels.linear_cross_entropy, teacher_weight=t.teacher_weight)
        self.objective = distributed.wrap(
            loss, self.model.blocks, self.world, t.parallel, plan.shard_group, self.precision, self.device
        )
        if self.compiled:
            key_inductor_cache(self.device)  # code inductor compiled under another instruction set fails here
            self.objective.compile(options=compile_options(t.compile_mode, t.coordinate_descent_tuning))
        self.updater = Updater(
            self.model, self.cfg.optim, self.device, self.precision, kernel=self.kernels.adamw, sharded=self.sharded
        )
        self.checkpoints = Checkpointer(
            self.cfg, self.model, self.updater.optimizer, self.updater.scaler, self.world, plan.parallel, self.device
        )
        vocab = self.cfg.model.vocab_size
        self.teacher = load_teacher(t.teacher, self.tokenizer, vocab, self.device) if t.teacher else None
        # model.init_from's or train.teacher_init's weights, not read yet (a run whose plan left train.distill one
        # model has no teacher, so nothing to start from)
        from_teacher = t.teacher_init and self.teacher is not None
        self.init_pending = (bool(self.cfg.model.init_from) and not plan.init_missing) or from_teacher
        if self.init_pending and not resuming:
            self._start_from_init()
        self.train_loader = self.loader("train", self.cfg.data.sampling, self.cfg.data.prefetch)
        # `eager`: the compile (the first step's, not training time) failed or gave wrong code: no compiling since
        self.compiling, self.eager = self.compiled, False
        self.run = RunState()
        self.resumed_from: Path | None = None  # the checkpoint `resume` restored, for the start report
        self.eval_seconds = 0.0  # what the last evaluate() took (run_loop.score_final's estimate)

    def _start_from_init(self) -> None:
        """Load model.init_from's weights, or with train.teacher_init the teacher's: where a new run starts."""
        m = self.cfg.model
        if self.teacher is not None and self.cfg.train.teacher_init:
            state = teacher_weights(self.teacher, self.model.state_dict())
        else:
            state = read_hf_llama_weights(m.init_from, m)
        distributed.load_full_model_state(self.model, state, self.sharded)
        self.init_pending = False

    def close(self) -> None:
        """Stop the train loader's prefetch thread and close its files; the Trainer is not used after this."""
        self.train_loader.close()

    def loader(
        self,
        split: str,
        sampling: Sampling,
        prefetch: int,
        whole: bool = False,
        source: Source | None = None,
        first_rows: int = 0,
    ) -> TokenLoader:
        """A loader of this rank's share of `split`, batched as [data] says, of `source` or the mixture of them
        all; `whole`: one pass over every row (`first_rows` > 0: over the first that many)."""
        d, t = self.cfg.data, self.cfg.train
        dirs = [source.dir] if source else [s.dir for s in self.sources]
        return TokenLoader(
            dirs,
            split,
            t.batch_size,
            t.seq_len,
            sampling=sampling,
            batching=d.batching,
            padding=d.padding,
            eot_id=self.tokenizer.eot_id,
            seed=t.seed,
            vocab_size=self.cfg.model.vocab_size,
            prefetch=prefetch,
            device=self.device,
            rank=self.world.rank,
            world_size=self.world.size,
            whole=whole,
            first_rows=first_rows,
            mix=None if source else self.mix,
        )

    def lr(self) -> float:
        """The learning rate of the next update."""
        return self.run.lr_scale * next_update(self.cfg, self.run, self.recorded).lr

    def finished(self) -> bool:
        """Whether the run has reached train.max_steps or spent train.max_time."""
        return Budget.of(self.cfg.train).reached(self.run.step, self.run.train_seconds)

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, grad_scale: torch.Tensor | None = None, teacher: bool = False
    ) -> LossSums:
        """The loss sums of batch (x, y) through the objective (data.document_mask: each end-of-text token in x starts a
        document). `grad_scale`: the loss's factor before the backward; `teacher`: train.teacher's probabilities as
        targets too (training's loss; validation's is the next tokens')."""
        eot_id = self.tokenizer.eot_id if self.cfg.data.document_mask else None
        with uncompiled(self.eager):
            return batch_loss(self.objective, x, y, eot_id, grad_scale, self.teacher if teacher else None)

    def accumulate_gradients(self, batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Forward and backward over the step's micro-batches (by default the train loader's next); returns this rank's
        sums [loss, correct, counted] (3,) on the device. Each micro-batch's summed loss is divided by the update's
        counted targets on all ranks (times the world size, as the reduction averages), so .grad holds the gradient of
        the mean loss per counted target; the ranks reduce in the last backward only."""
        batches = batches or [next(self.train_loader) for _ in range(self.accumulation)]
        counted = distributed.total(cast(torch.Tensor, sum(counted_targets(y) for _, y in batches)).float(), self.world)
        scale = self.world.size / counted
        sums = torch.zeros(3, device=self.device)
        for i, (x, y) in enumerate(batches):
            with distributed.gradient_sync(self.objective, enabled=i == self.accumulation - 1):
                with autocast(self.precision, self.device):
                    out = self.loss(x, y, grad_scale=scale, teacher=True)  # announced: the fused backward is free
                self.updater.scale(out.loss * scale).backward()
            sums += out.detached()
        return sums

    def step(self) -> StepResult:
        """One optimizer update, and the run's counters advanced. A step whose loss or gradient norm is not finite is
        skipped (no update) but counts, in `run.skipped_steps` too. Its seconds count toward train.max_time, rank 0's on
        every rank; a compiled objective's first not. A step whose compile fails, and a compiled objective's non-finite
        step before any finite one, are done again uncompiled on the same batches (compiled code can be wrong where the
        model is not); the run goes on uncompiled and says why."""
        began = self.clock()
        batches = [next(self.train_loader) for _ in range(self.accumulation)]
        compiled_loss, why = None, None
        try:
            loss, grad_norm, correct, counted, finite, targets = self._gradients(batches)
            if not finite and self.compiling:
                compiled_loss = loss.item()
                why = f"the compiled model's loss or gradient norm is not finite (loss {compiled_loss})"
        except Exception as e:
            if (why := compile_failure(e)) is None:
                raise
        if why:
            self.updater.apply(None)  # the compiled step's gradients cleared, no update
            self.eager = True
            loss, grad_norm, correct, counted, finite, targets = self._gradients(batches)
            if not finite and compiled_loss is not None:  # the model's own: the compiled code was right, and stays
                self.eager, compiled_loss, why = False, None, None
        update = next_update(self.cfg, self.run, self.recorded)
        lr = self.run.lr_scale * update.lr
        self.updater.apply(lr if finite else None)
        self.run.step += 1
        self.run.tokens_seen += round(targets)
        self.run.skipped_steps += not finite
        seconds = self.clock() - began
        if update.progress is not None and self.world.distributed:
            seconds = distributed.main_value(seconds, self.world, self.device)
        self.run.train_seconds += 0.0 if self.compiling else seconds
        self.run.decay_from = update.decay_from
        self.compiling = False
        return StepResult(loss, grad_norm, correct, counted, lr, not finite, update.progress, why, compiled_loss)

    def _gradients(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool, float]:
        """The gradients of `batches` accumulated; returns the loss, gradient norm, top-1 hits and counted
        targets over all ranks (device scalars), whether the step may update, and its counted targets."""
        loss_sum, correct, counted = distributed.total(self.accumulate_gradients(batches), self.world)
        loss = loss_sum / counted
        grad_norm = self.updater.clip_gradients()
        # With fp16 an overflowing gradient is the GradScaler's business: it skips and lowers its scale.
        watched = loss if self.precision == "fp16" else loss + grad_norm
        # The one host sync of a step: whether to update, and how many real tokens it trained on.
        finite, targets = torch.stack([torch.isfinite(watched).float(), counted]).tolist()
        return loss, grad_norm, correct, counted, bool(finite), targets

    def evaluate(self, stop: Callable[[], bool] = lambda: False, whole: bool = False) -> dict[str, float] | None:
        """Validation metrics over the first eval_steps x batch_size rows of each source's val split (`whole`: every
        row, as `fasttrain evaluate RUN --split val` reads them), shared among the ranks; a mixture's weighted as
        data.sources. None if `stop()` cut it short. Its seconds (this rank's) are kept in `eval_seconds`."""
        rows = 0 if whole else self.cfg.train.eval_steps * self.cfg.train.batch_size
        began = time.perf_counter()

        def loader(source: Source) -> TokenLoader:
            return self._val_loader(source, rows)

        metrics = validate_sources(self.loss, self.model, self.sources, loader, self.precision, self.world, stop)
        self.eval_seconds = time.perf_counter() - began  # validate's totals wait for the device: an honest clock
        return metrics

    def _val_loader(self, source: Source, rows: int) -> TokenLoader:
        """The first `rows` rows of `source`'s val split (0: all of them) in one pass."""
        return self.loader("val", "sequential", prefetch=0, whole=True, source=source, first_rows=rows)

    def val_rows(self, train: TrainConfig | None = None) -> tuple[int, int]:
        """The val rows `evaluate` reads (under `train`'s eval_steps and batch_size: default the run's), and those of
        the whole split, over every source."""
        t = train or self.cfg.train
        evaluated = whole = 0
        for source in self.sources:
            with self._val_loader(source, t.eval_steps * t.batch_size) as loader:
                read = loader.reader.sources[0]
                evaluated, whole = evaluated + read.whole_rows, whole + read.rows.num_rows
        return evaluated, whole

    def evaluates_whole_split(self) -> bool:
        """Whether `evaluate` reads every source's whole val split (else the first eval_steps batches of some)."""
        evaluated, whole = self.val_rows()
        return evaluated == whole  # a source's rows read are at most its split's: the totals meet only if each does

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """Text generated from `prompt` (default: train.sample_prompt), the same random draws every call."""
        t = self.cfg.train
        with autocast(self.precision, self.device):
            return generate_text(
                self.model, self.tokenizer, prompt or t.sample_prompt, max_new_tokens or t.sample_tokens, seed=t.seed
            )

    def train(self, overwrite: bool = False) -> dict:
        """Train to `train.max_steps` or for `train.max_time`, logging, evaluating and checkpointing; returns a summary.
        Writes `config.toml`, `metrics.jsonl`, checkpoints and `final/` (run_loop.write_final) into `train.out_dir`,
        which it locks (UsageError if another process trains there). A new run refuses a directory holding another run's
        checkpoints unless `overwrite`; all refusals come before anything there changes, and a start that fails before
        its first step is taken back. Compile, evaluation, sampling and saving time stay out of the throughput and the
        time budget."""
        resumed = self.resumed_from is not None
        check_start(self.plan, resumed, overwrite)
        if not resumed and self.init_pending:  # made `resuming`, then started anew
            self._start_from_init()
        with opened(self.plan, self.checkpoints, resumed, overwrite, self.quiet) as (log, start):
            flops = self.plan.flops_per_token
            timed = timed_step_seconds(self.plan.speed, self.cfg.model, self.cfg.train, self.tokens_per_step)
            report = Report(log, self.cfg, self.device, flops, self.evaluates_whole_split(), self.world.size, timed)
            with compile_failures():  # the first step's, before which the start is taken back, or a recompile's
                last_eval, stopped_early = Loop(self, report, start).run()
            final, kept = write_final(self, last_eval)
            scored = score_final(self, kept, report.whole_val)
            latest = self.checkpoints.latest()  # a save in flight waited for first
            replay = replay_mix(self.cfg.data, self.mix, self.accumulation, self.run.step)
            summary = report.end(
                self.run, last_eval, latest, final, kept, scored, stopped_early, self.clock() - self.created, replay
            )
            distributed.barrier(self.world)  # no rank leaves the process group while another still uses it
            return summary

    def restore(self, path: Path) -> tuple[RunState, Config, list[str]]:
        """Load the save at `path` (Checkpointer.restore) and take the mix its loader keeps (mixture.Blend.restart);
        returns the save's RunState, its config, and notes on the world and where the mix differs from the config's."""
        run, saved, notes = self.checkpoints.restore(path, self.train_loader, self.accumulation)
        planned, self.mix = self.mix, list(self.train_loader.blend.phases)
        return run, saved, notes + kept_mix_notes(planned, self.mix, self.accumulation)

    def save_checkpoint(self, best: bool = False) -> Path:
        """Save the run into its checkpoints/ (see checkpoint.py), as the best one too if `best`;
        returns the file. Every rank must call it."""
        return self.checkpoints.save(self.run, self.train_loader, best)

    def resume(self, spec: str | Path = "auto") -> Path:
        """Continue a saved run: `spec` is "auto", a run directory or a checkpoint file (UsageError for another run
        directory's, or one past this run's end). The optimizer's settings are this config's, said so."""
        path = self.checkpoints.resumable(str(spec), self.sources[0].data.dir)
        run, saved, notes = self.restore(path)
        rows = scored_rows(self, saved.train, self.cfg.train)
        lines = resumed_under(path, run, saved, self.cfg, rows, self.recorded)  # UsageError for a save past its end
        lines += self.checkpoints.leave_later_saves(path, run.best_step)
        self.run, changed = run, self.updater.use_configured_hyperparameters()
        if changed:
            lines.insert(0, f"the config's optimizer settings replace the checkpoint's ({'; '.join(changed)})")
        for line in [*notes, *lines] if not self.quiet else ():
            print(f"resume: {line}")
        self.resumed_from = path
        return path
