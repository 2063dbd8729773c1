"""The training loop: one train() from its first step to its last, and what happens between the steps.

Imports from fasttrain: checkpoints.checkpoint, checkpoints.run_directory, checkpoints.run_state, checkpoints.saves,
compute.distributed, config, data.loader, model.weights, optimization.schedule, planning.plan, system.errors,
system.signals, training.calibration, training.policies, training.reporting.

After each step the loop asks the policies (policies.py): a streak of non-finite steps rolls the run back to
a save or stops it (Recovery), evaluations that stop improving end it (EarlyStopping). It evaluates, samples
and saves when due, saves and stops on a signal, and hands every value to reporting (reporting.py). The
steps, evaluations, samples and restores are the Trainer's (trainer.py), which hands itself to the loop. After
the last step, write_final carries out which weights the run ends with (policies.better_save) and the scale of their
output layer (calibration.py), and score_final scores them on the whole val split, the run's closing figure.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch
from torch import nn

from fasttrain.checkpoints.checkpoint import Checkpointer
from fasttrain.checkpoints.run_directory import RunStart
from fasttrain.checkpoints.run_state import RunState
from fasttrain.checkpoints.saves import step_of
from fasttrain.compute import distributed
from fasttrain.config import Config, TrainConfig
from fasttrain.data.loader import TokenLoader
from fasttrain.model.weights import export_weights
from fasttrain.optimization.schedule import Budget
from fasttrain.planning.plan import RunPlan
from fasttrain.system.errors import RunStopped
from fasttrain.system.signals import SignalCatcher
from fasttrain.training.calibration import fit_head_scale, output_weights
from fasttrain.training.policies import EarlyStopping, Recovery, better_save, monitor_anew
from fasttrain.training.reporting import FinalScore, IntervalMeter, Kept, Report


class Interrupted(RunStopped):
    """`train()` stopped on SIGINT or SIGTERM after saving a checkpoint; exit_code is 128 + the signal."""


class StepResult(NamedTuple):
    """One optimizer update, over all ranks."""

    loss: torch.Tensor  # mean loss per counted target (a device scalar, as are the next three)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    correct: torch.Tensor  # top-1 hits
    counted: torch.Tensor  # counted targets
    lr: float  # the learning rate of the update
    skipped: bool  # the loss or gradient norm was not finite: no update was made
    progress: float | None  # the progress the schedule set `lr` at (a budgeted run; None: a step run)
    uncompiled: str | None = None  # why the run went uncompiled at this step (Trainer.step), else None
    compiled_loss: float | None = None  # the compiled objective's non-finite loss, if that was why


class Trainable(Protocol):
    """What the loop drives: the Trainer (trainer.py). A rollback replaces `run` and, through restore, `mix`."""

    plan: RunPlan
    run: RunState
    mix: list[tuple[int, tuple[float, ...]]]
    train_loader: TokenLoader
    checkpoints: Checkpointer
    objective: nn.Module  # what trains and evaluates the model: wrapped by DDP or sharded by FSDP, compiled
    resumed_from: Path | None
    eval_seconds: float  # what the last evaluation took

    @property
    def model(self) -> nn.Module:  # the network, whose weights final/ holds (read only: a Trainer's is typed closer)
        ...

    def step(self) -> StepResult: ...

    def finished(self) -> bool: ...

    def evaluate(self, stop: Callable[[], bool] = ..., whole: bool = False) -> dict[str, float] | None: ...

    def val_rows(self, train: TrainConfig | None = None) -> tuple[int, int]: ...

    def sample(self) -> str: ...

    def restore(self, path: Path) -> tuple[RunState, Config, list[str]]: ...


class Loop:
    """One train() of `trainer`, every event told to `report`; `start` (rank 0) is told when the first step is
    done. A resumed run can roll back to the saves from before its resume (Checkpointer.history)."""

    def __init__(self, trainer: Trainable, report: Report, start: RunStart | None):
        self.trainer, self.report, self.start = trainer, report, start
        self.cfg, self.plan = trainer.plan.cfg, trainer.plan
        resumed, t = trainer.resumed_from, self.cfg.train
        self.recovery = Recovery(self.cfg.recovery, trainer.checkpoints.history(resumed) if resumed is not None else ())
        self.early_stopping = EarlyStopping(t.early_stop_patience, t.early_stop_min_delta)

    def run(self) -> tuple[dict[str, float], bool]:
        """Step to the end, asking the policies after each step and evaluation; returns the last evaluation's
        metrics and whether the run stopped early."""
        tr, report, t, world = self.trainer, self.report, self.cfg.train, self.plan.world
        reading = self.plan.reading(tr.run.step, tr.run.train_seconds, tuple(tr.mix))
        report.start(tr.run, tr.resumed_from, self.plan, reading)
        unprojected = reading.end is None  # a clock alone, no speed yet: projected at the first log line
        last_eval: dict[str, float] = {}
        # A resumed run that had stopped early trains no further: it is at its end, as at train.max_steps
        stopped_early, first = self.early_stopping.should_stop(tr.run.stale_evals), tr.run.step
        meter = IntervalMeter(self.plan.device, tr.run.tokens_seen, tr.train_loader.wait_seconds)
        with SignalCatcher() as signals:

            def stop() -> bool:  # asked between evaluation batches: a signal need not wait for the whole of one
                return distributed.any_rank(bool(signals.received), world, self.plan.device)

            if tr.run.eval_due:  # the evaluation a stop cut short, before this run's first step
                last_eval = self._evaluate_and_save(tr.finished(), stop) or last_eval
                if stop():
                    self._stop(signals.received or signal.SIGTERM)
            while not stopped_early and not tr.finished():
                report.mix_change(tr.run.step, tr.mix, self.plan.accumulation)  # a change starting at this step
                result = tr.step()
                if result.uncompiled:  # said before anything of the step, which is the plain one's
                    report.uncompiled(tr.run, result.uncompiled, result.compiled_loss, result.loss.item())
                tr.checkpoints.poll()  # publish a background save that has finished
                if self.start:
                    self.start.started()
                if result.progress is not None:  # what a replay of the run follows
                    report.progress(tr.run, result.progress)
                done = tr.finished()
                if done and tr.run.step - first == 1 and Budget(0, t.max_time).reached(0, tr.run.train_seconds):
                    report.budget_within_one_step(tr.run)  # still a whole step: no partial updates
                exhausted = self.recovery.after_step(result.skipped)
                if result.skipped:
                    report.skip(tr.run, result.loss.item(), result.grad_norm.item(), self.recovery.in_a_row)
                    if exhausted:  # max_skips in a row: back to the latest checkpoint, or stop
                        self._roll_back()
                        meter.restart(tr.run.tokens_seen, tr.train_loader.wait_seconds)
                        continue
                elif tr.run.step == 1 and self.plan.compiled:  # the first step's time is mostly compilation
                    report.compiled(meter.synchronized_elapsed(self.plan.device))
                    meter.restart(tr.run.tokens_seen, tr.train_loader.wait_seconds)
                else:
                    meter.add(result.loss, result.correct, result.counted)
                if (tr.run.step % t.log_interval == 0 or done) and meter.steps:
                    report.train(tr.run, meter, result.lr, result.grad_norm.item(), tr.train_loader)
                    meter.restart(tr.run.tokens_seen, tr.train_loader.wait_seconds)
                    if unprojected:
                        projected = self.plan.reading(tr.run.step, tr.run.train_seconds, tuple(tr.mix))
                        unprojected = projected.end is None  # no seconds counted yet: at the next log line
                        report.projected(self.plan, projected)
                paused = time.perf_counter()
                last_eval = self._evaluate_and_save(done, stop) or last_eval
                meter.exclude(time.perf_counter() - paused)
                if stop():  # every rank together
                    self._stop(signals.received or signal.SIGTERM)
                if self.early_stopping.should_stop(tr.run.stale_evals) and not done:
                    self._save_unless_saved()  # the final state, beside the best one that was kept
                    report.early_stop(tr.run)
                    stopped_early = True
                    break
        if not last_eval:  # nothing trained (resumed at the end): still report
            evaluated = self._evaluate_and_sample()  # never cut short: nothing asks it to stop
            assert evaluated is not None
            last_eval = evaluated[0]
        return last_eval, stopped_early

    def _evaluate_and_save(self, done: bool, stop: Callable[[], bool]) -> dict[str, float] | None:
        """Evaluate and save when due (a new best also saves, with keep_best), not during a streak of skipped steps. An
        evaluation `stop()` cuts short stays due for the stop's save."""
        t, c, run = self.cfg.train, self.cfg.checkpoint, self.trainer.run
        metrics, improved = None, False
        if run.step % t.eval_interval == 0 or done or run.eval_due:
            found = self._evaluate_and_sample(stop)
            run.eval_due = found is None
            if found is None:
                return None
            metrics, improved = found
        if (run.step % c.interval == 0 or done or (improved and c.keep_best)) and self.recovery.may_save():
            self._settle()  # the save still writing first, as save() would wait for it anyway
            self.recovery.saved(self._save(best=improved, keep=self.recovery.target()))  # the way back is kept
        return metrics

    def _evaluate_and_sample(self, stop: Callable[[], bool] = lambda: False) -> tuple[dict[str, float], bool] | None:
        """Evaluate, count it for early stopping, report, and sample; returns the metrics (best_val_loss: the best of
        train.monitor's loss) and whether they lowered it; None if `stop()` cut it short."""
        metrics = self.trainer.evaluate(stop)
        if metrics is None:
            return None
        best_before, run, loss = self.trainer.run.best_val_loss, self.trainer.run, metrics[self.cfg.train.monitor]
        run.stale_evals = self.early_stopping.stale_evals(run.stale_evals, loss, best_before)
        run.best_val_loss = min(best_before, loss)
        if loss < best_before:
            run.best_step = run.step
        metrics["best_val_loss"] = run.best_val_loss
        self.report.evaluation(run.step, metrics)
        if self.cfg.train.sample_tokens:
            self.report.sample(run.step, self.trainer.sample())
        return metrics, loss < best_before

    def _roll_back(self) -> None:
        """Continue from the newest save whose next step was finite (recovery.target) at a lower learning
        rate, and point `latest` back at it; RunStopped if there is none, or every rollback is spent."""
        tr, recovery, world, device = self.trainer, self.recovery, self.plan.world, self.plan.device
        self._settle()  # the save in flight may be the target: published, or failed, first
        distributed.barrier(world)  # rank 0 publishes: after this every rank sees the same saves
        # An earlier save of a resumed run may have been pruned; decided together, so every rank restores one save.
        while (target := recovery.target()) is not None and distributed.any_rank(not target.exists(), world, device):
            recovery.lost(target)
        if target is None or not recovery.can_roll_back(tr.run):
            raise RunStopped(self.report.diverged(tr.run, recovery.in_a_row, target is not None), 1)
        diverged = tr.run
        restored, saved, _ = tr.restore(target)
        rows = scored_rows(tr, saved.train, self.cfg.train)
        monitor_anew(restored, saved, self.cfg, rows)  # a save from before a resume that changed what it monitors
        # time spent on the diverged steps stays spent
        tr.run = replace(recovery.rolled_back(diverged, restored), train_seconds=diverged.train_seconds)
        tr.checkpoints.point_latest(target)
        self.report.rollback(tr.run, diverged.step, target)

    def _save(self, best: bool = False, keep: Path | None = None) -> Path:
        path = self.trainer.checkpoints.save(self.trainer.run, self.trainer.train_loader, best, keep)
        self.report.checkpoint(self.trainer.run.step, path, best)
        return path

    def _save_unless_saved(self) -> Path:
        """The checkpoint of this step: the latest one if it was saved at this step already, else a new save."""
        path = self.trainer.checkpoints.latest()
        if path is None or step_of(path) != self.trainer.run.step:
            path = self._save()
        return path

    def _settle(self) -> None:
        """Wait for the save in flight (every rank); one whose background write failed is no way back."""
        lost = self.trainer.checkpoints.settle()
        if lost is not None:
            self.recovery.lost(lost)

    def _stop(self, signum: int) -> None:
        """Save this step (unless saved already) and end the run with Interrupted: signal `signum` arrived."""
        checkpoints, step = self.trainer.checkpoints, self.trainer.run.step
        path: Path | None = self._save_unless_saved()
        if checkpoints.settle() is not None:  # a background write, done before the process ends, failed
            path = checkpoints.latest()  # (said on stderr) the last complete save, None before any
        name = signal.Signals(signum).name
        self.report.stopped(step, name, path)
        distributed.barrier(self.plan.world)
        raise Interrupted(f"stopped by {name} at step {step}; saved {path}", 128 + signum)


def scored_rows(trainer: Trainable, saved: TrainConfig, now: TrainConfig) -> tuple[int, int] | None:
    """The validation rows a save's evaluations scored (under `saved`) and this run's score (under `now`), what
    policies.monitor_anew compares; None where both read as many batches of as many rows (no loader opened to count)."""
    if saved.eval_steps * saved.batch_size == now.eval_steps * now.batch_size:
        return None
    return trainer.val_rows(saved)[0], trainer.val_rows(now)[0]


def write_final(trainer: Trainable, last_eval: dict[str, float]) -> tuple[Path, Kept]:
    """Write final/ after the last step (`trainer.run`, evaluated as `last_eval`) and return it, the step whose weights
    it holds and their metrics: the last step's, or policies.better_save's (the model takes those), under
    checkpoint.fit_temperature with their output layer scaled by what scores the eval rows best (calibration.py; the
    model takes that too). Rank 0 writes."""
    plan, run, checkpoints, model = trainer.plan, trainer.run, trainer.checkpoints, trainer.model
    cfg, world = plan.cfg, plan.world
    kept = Kept(run.step, last_eval)
    better = better_save(cfg, run, last_eval, checkpoints.best())
    if better is not None:
        checkpoints.restore_weights(better)
        evaluated = trainer.evaluate()  # None only where something cuts it short, and nothing does
        assert evaluated is not None
        kept = Kept(step_of(better), evaluated)
    if cfg.checkpoint.fit_temperature:

        def evaluated_and_released() -> dict[str, float] | None:  # so the next change in place reaches what it reads
            metrics = trainer.evaluate()
            distributed.release_gathered(trainer.objective)
            return metrics

        distributed.release_gathered(trainer.objective)  # after the last evaluation, before output_weights reads them
        scale, metrics = fit_head_scale(output_weights(model), evaluated_and_released, cfg.train.monitor, kept.metrics)
        kept = Kept(kept.step, metrics, scale)
    out = Path(cfg.train.out_dir)
    weights = distributed.full_state(model, None, plan.sharded)[0]  # every rank joins the gather
    if not world.is_main:
        return out / "final", kept
    return export_weights(weights, cfg, out / "final", tokenizer=out / "tokenizer.json")[0], kept


# What the closing score may cost where train.final_eval = "auto": a tenth of the training time, or two minutes where
# that is more (the main job's two-minute run scored its whole split in 29-41 s on 2 CPU cores, docs/training.md).
FINAL_EVAL_SHARE, FINAL_EVAL_SECONDS = 0.1, 120.0


def score_final(trainer: Trainable, kept: Kept, whole_val: bool) -> FinalScore:
    """final/'s weights, which the model holds once write_final has run (`kept`), on the whole val split: the rows
    `fasttrain evaluate RUN --split val` reads, validated as the run validates (on every rank, each its share). An
    evaluation that read the whole split (`whole_val`) scored them already; else they are scored where
    train.final_eval says: "auto" where the last evaluation's speed (rank 0's) puts the whole split within
    FINAL_EVAL_SHARE of the training time or FINAL_EVAL_SECONDS. SIGINT or SIGTERM cuts the scoring short (the run
    has saved its end), leaving it to the command. Every rank calls it, and all decide alike."""
    evaluated, whole = trainer.val_rows()
    if whole_val:
        return FinalScore({k: v for k, v in kept.metrics.items() if k != "best_val_loss"}, whole, 0.0)
    plan, setting = trainer.plan, trainer.plan.cfg.train.final_eval
    estimate = distributed.main_value(trainer.eval_seconds * whole / evaluated, plan.world, plan.device)
    allowed = max(FINAL_EVAL_SHARE * trainer.run.train_seconds, FINAL_EVAL_SECONDS)
    if setting is False or (setting == "auto" and estimate > allowed):
        return FinalScore(None, whole, estimate, None if setting is False else allowed)
    began = time.perf_counter()
    with SignalCatcher() as signals:

        def stop() -> bool:  # asked between batches, on every rank alike
            return distributed.any_rank(bool(signals.received), plan.world, plan.device)

        metrics = trainer.evaluate(stop, whole=True)
    if metrics is None:
        return FinalScore(None, whole, estimate, allowed, signal.Signals(signals.received or signal.SIGTERM).name)
    return FinalScore(metrics, whole, time.perf_counter() - began, allowed)
