"""What a training run tells the user: each event (metrics.jsonl, see metrics.py) and console line,
made from the values it is given. Nothing here reads the trainer.

Imports from fasttrain: checkpoints.run_state, compute.device, config, data.loader, evaluation.loss_sums,
optimization.schedule, planning.plan, planning.sizing, training.metrics.

The training loop hands over a record per step (to IntervalMeter, which sums them on the
device until the next log line), one per evaluation, and one per skip, rollback or stop.
"""

from __future__ import annotations

import importlib.util
import shlex
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fasttrain.checkpoints.run_state import RunState
from fasttrain.compute.device import synchronize
from fasttrain.config import Config, format_duration
from fasttrain.data.loader import TokenLoader
from fasttrain.evaluation.loss_sums import perplexity
from fasttrain.optimization.schedule import PROGRESS_EVENT, Budget
from fasttrain.planning.plan import Reading, RunPlan
from fasttrain.planning.sizing import SENSITIVITY
from fasttrain.training.metrics import MetricsLog, peak_flops, peak_memory_gb


class Kept(NamedTuple):
    """The weights a run's final/ holds: those of `step`, evaluated as `metrics` (checkpoint.final_weights)."""

    step: int
    metrics: dict[str, float]
    scale: float = 1.0  # what their output layer was multiplied by (checkpoint.fit_temperature)


class FinalScore(NamedTuple):
    """final/'s weights on the whole val split (run_loop.score_final): `metrics` (Trainer.evaluate's) over `rows` rows
    of every source, scored in `seconds`; or `metrics` None where the run left that to `fasttrain evaluate`: `seconds`
    is then the estimate, `allowed` (None: train.final_eval = false) what the run allows itself, `stopped_by` the
    signal that cut the scoring short ("" if none did)."""

    metrics: dict[str, float] | None
    rows: int
    seconds: float
    allowed: float | None = None
    stopped_by: str = ""


class IntervalMeter:
    """Loss, hits and timing of the steps since the last log line, minus time spent evaluating or saving.

    Losses and hit counts are summed on the device (no host sync per step); `tokens_seen` and `wait_seconds` (the
    loader's time waiting for data, a running total) are read at the start and at the end of an interval.
    """

    def __init__(self, device: torch.device, tokens_seen: int, wait_seconds: float):
        self.sums = torch.zeros(3, device=device)  # [summed step losses, top-1 hits, counted targets]
        self.restart(tokens_seen, wait_seconds)

    def restart(self, tokens_seen: int, wait_seconds: float) -> None:
        self.sums.zero_()
        self.steps = 0
        self.tokens_start, self.wait_start = tokens_seen, wait_seconds
        self.start, self.excluded = time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, counted: torch.Tensor) -> None:
        """One step's mean loss, top-1 hits and counted targets (device scalars)."""
        self.sums += torch.stack([loss, correct, counted])
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def synchronized_elapsed(self, device: torch.device) -> float:
        """Seconds since the start, once queued GPU work is done."""
        synchronize(device)
        return time.perf_counter() - self.start


def start_lines(plan: RunPlan, reading: Reading) -> list[str]:
    """What a run says of its plan as it starts (a dry run says more: plan_table.py): the model, the data and how
    often each source is read, and the batch and budget."""
    c, t, m, record = plan.cfg, plan.cfg.train, plan.cfg.model, plan.record(reading)
    lines = [
        f"model: {plan.params / 1e6:.2f}M parameters ({m.members} model{'s' * (m.members > 1)} of "
        f"{m.n_layers} layer{'s' * (m.n_layers != 1)}, d_model "
        f"{m.d_model}, {m.n_heads} head{'s' * (m.n_heads != 1)}, vocab {m.vocab_size}, context {m.max_seq_len})"
    ]
    sources = record["sources"]
    if not sources:
        lines.append(f"data: not prepared yet; the run prepares {plan.prepare}")
    elif len(sources) == 1:
        lines.append(f"data: {record['train_tokens']:,} train / {record['val_tokens']:,} val tokens in {c.data.dir}")
    else:
        lines.append(
            f"data: a mixture of {len(sources)} sources, {record['train_tokens']:,} train / "
            f"{record['val_tokens']:,} val tokens:"
        )
        for s in sources:
            read = "" if s["planned_epochs"] is None else f", read {s['planned_epochs']:.2f} times over {reading.words}"
            lines.append(
                f"  {s['name']:<12} weight {s['weight']:.3f}  {s['train_tokens']:,} train / "
                f"{s['val_tokens']:,} val tokens in {s['dir']}{read}"
            )
        for i, (step, weights) in enumerate(reading.changes):
            when = ""
            if t.max_time:
                late = step >= (reading.end or step + 1)
                when = f" (not reached {reading.words})" if late else " (if train.max_time lets the run get that far)"
            lines.append(
                f"  data.mix[{i}] from step {step}{when}: "
                f"{', '.join(f'{name} {w:.3f}' for name, w in zip(plan.names, weights))}"
            )
    lines += epoch_warnings(plan, reading)
    kernels = plan.kernels.names()
    speedups = ["compiled"] * plan.compiled + [f"kernels: {', '.join(kernels)}"] * bool(kernels)
    ranks = f" x {plan.world.size} ranks, {plan.parallel}" if plan.world.size > 1 else ""
    lines.append(
        f"run: {Budget.of(t).describe()} x {plan.tokens_per_step:,} tokens ({t.batch_size} x {t.seq_len}"
        f" x {plan.accumulation} accumulation{ranks}) on {plan.device}, "
        f"{', '.join([plan.precision, *speedups])}; writing to {t.out_dir}"
    )
    return lines


def epoch_warnings(plan: RunPlan, reading: Reading) -> list[str]:
    """A warning for each source `reading` has the run read more than its epoch limit times over (data.max_epochs, or
    the repeats rule's lower limit for new text: plan.epoch_limit), saying what the run does about it (the weight
    decay's growth, the weights final/ keeps) and what would help."""
    c, lines = plan.cfg, []
    decay = f"it trains at weight decay {c.optim.decay():g}" + (
        " (optim.weight_decay_rule = repeats)" if c.optim.weight_decay_rule == "repeats" else ""
    )
    final = "final/ keeps the best weights" if c.checkpoint.final_weights == "best" else "final/ the last step's"
    help = "add data" + (", lower its weight" if len(plan.names) > 1 else "") + ", or train fewer steps"
    limit = f"data.max_epochs = {c.data.max_epochs:g}"
    if plan.epoch_limit < c.data.max_epochs:
        limit = f"the limit of {plan.epoch_limit:g} the plan set for new text"
    for name, e in zip(plan.names, reading.epochs or ()):
        if e > plan.epoch_limit:
            lines.append(
                f"warning: this run reads {name} {f'{e:.1f}' if e >= 0.1 else f'{e:.2g}'} times over"
                f"{f' {reading.words}' * bool(c.train.max_time)}, "
                f"more than {limit}, past which repeats teach it the text more "
                f"than the language: {decay} and {final}; {help}"
            )
    return lines


class Report:
    """The events and lines of one run of `cfg` (resolved), written through `log`."""

    def __init__(
        self,
        log: MetricsLog,
        cfg: Config,
        device: torch.device,
        flops_per_token: float,
        whole_val: bool,
        devices: int,
        timed_step_seconds: float | None = None,
    ):
        """`whole_val`: whether an evaluation reads the whole val split (Trainer.evaluates_whole_split); `devices`: the
        world's, whose tokens the speed counts, so MFU is against all their peaks; `timed_step_seconds`: an update's
        seconds at the speed the plan chose the shape for (sizing.timed_step_seconds), which the end sets beside those
        trained at."""
        self.log, self.cfg, self.device = log, cfg, device
        self.timed_step_seconds = timed_step_seconds
        self.whole_val = whole_val
        self.evaluated_on = "the whole val split" if whole_val else f"the first {cfg.train.eval_steps} val batches"
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops(device, devices)  # None off the GPU table: no MFU then
        self.names: list[str] = []  # the sources' (start), and what was read of each (train)
        self.read: list[tuple[str, int, float]] = []

    def start(self, run: RunState, resumed_from: Path | None, plan: RunPlan, reading: Reading) -> None:
        """The start event, written from the run's `plan` (RunPlan.record), and its console lines; `reading`:
        what the run will read, from where it starts (a resumed run from its step)."""
        self.names = plan.names
        resumed = {"resumed_from": str(resumed_from), "resume_step": run.step} if resumed_from else {}
        self.log.event("start", **plan.record(reading), **resumed)
        for line in start_lines(plan, reading):
            self.log.print(line)
        if resumed_from:
            self.log.print(f"resumed from {resumed_from} at step {run.step}")

    def projected(self, plan: RunPlan, reading: Reading) -> None:
        """The epoch warnings of what a run of a clock alone reads by its projected end (`reading`, from its speed
        so far): its start could not say, not knowing its speed."""
        for line in epoch_warnings(plan, reading):
            self.log.print(line)

    def compiled(self, seconds: float) -> None:
        self.log.event("compile", step=1, seconds=round(seconds, 3))
        self.log.print(f"compiled the model and ran the first step in {seconds:.1f} s")

    def train(self, run: RunState, meter: IntervalMeter, lr: float, grad_norm: float, loader: TokenLoader) -> None:
        """The interval `meter` measured, ending at `run.step`; from the training `loader`, its running total of
        seconds waited and what the run has read of each source so far (recorded for a mixture)."""
        t = self.cfg.train
        loss_sum, correct, counted = meter.sums.tolist()  # waits for the GPU, so the clock read next is honest
        loss = loss_sum / meter.steps
        elapsed, wait = meter.elapsed(), loader.wait_seconds - meter.wait_start
        tokens_per_s = (run.tokens_seen - meter.tokens_start) / elapsed  # real tokens: pads do not count
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        standing = Budget.of(t).standing(run.step, run.train_seconds)
        record: dict[str, Any] = {
            "step": run.step,
            "progress": round(100 * standing.progress, 2),
            "loss": loss,
            "accuracy": round(correct / max(counted, 1), 4),
            "ppl": perplexity(loss),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": run.tokens_seen,
            "tokens_per_s": round(tokens_per_s, 1),
            "step_ms": round(1000 * elapsed / meter.steps, 2),
            "data_wait_pct": round(100 * wait / elapsed, 2),
            "peak_mem_gb": round(peak_memory_gb(self.device), 3),
        }
        if mfu is not None:
            record["mfu"] = round(mfu, 4)
        self.read = list(zip(self.names, loader.source_tokens(), loader.source_epochs()))
        if len(self.names) > 1:
            record.update({f"tokens.{name}": n for name, n, _ in self.read})
            record.update({f"epochs.{name}": round(e, 4) for name, _, e in self.read})
        left = ""  # a time budget: what is left of it, and the step the run will end at
        if standing.seconds_left is not None:
            record.update(final_step=standing.final_step, seconds_left=round(standing.seconds_left, 1))
            left = format_duration(standing.seconds_left)
        self.log.event("train", **record)
        final = f"~{standing.final_step}" if t.max_time else f"{t.max_steps}"
        self.log.print(
            f"step {run.step:>6}/{final} ({record['progress']:5.1f}%) | loss {loss:.4f} | acc "
            f"{100 * record['accuracy']:.1f}% | ppl {record['ppl']:8.2f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s{f' | MFU {100 * mfu:.1f}%' if mfu is not None else ''} | "
            f"{record['step_ms']:.0f} ms/step | data wait {record['data_wait_pct']:.1f}% | mem "
            f"{record['peak_mem_gb']:.2f} GB{f' | {left} left' if left else ''}"
        )
        self.log.progress(run.step, standing.final_step, loss=f"{loss:.3f}", **({"left": left} if left else {}))

    def progress(self, run: RunState, progress: float) -> None:
        """A budgeted run's update: the progress its learning rate was set at (what a replay follows, see
        schedule.recorded_progress), and the seconds trained after it."""
        self.log.event(PROGRESS_EVENT, step=run.step, progress=progress, seconds=round(run.train_seconds, 3))

    def budget_within_one_step(self, run: RunState) -> None:
        self.log.print(
            f"note: train.max_time = {format_duration(self.cfg.train.max_time)} is shorter than one step "
            f"({format_duration(run.train_seconds)} here): the run made that one step"
        )

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation's metrics (Trainer.evaluate's, with best_val_loss)."""
        self.log.event("eval", step=step, **metrics)
        monitored = "" if self.cfg.train.monitor == "val_loss" else f"{self.cfg.train.monitor} "
        self.log.print(
            f"eval step {step}: val loss {metrics['val_loss']:.4f} | "
            f"acc {100 * metrics['val_accuracy']:.1f}% | ppl {metrics['val_ppl']:.2f} | "
            f"{metrics['val_bpb']:.4f} bits/byte | best {monitored}{metrics['best_val_loss']:.4f} | on {self.evaluated_on}"
            + (" (totals weighted as data.sources)" if len(self.names) > 1 else "")
        )
        for name in self.names if len(self.names) > 1 else ():
            self.log.print(
                f"  {name:<12} val loss {metrics[f'val_loss.{name}']:.4f} | {metrics[f'val_bpb.{name}']:.4f} bits/byte"
            )

    def mix_change(self, step: int, mix: list[tuple[int, tuple[float, ...]]], accumulation: int) -> None:
        """Say so when a [[data.mix]] change starts at `step` (`mix`: (first micro-batch, weights) pairs)."""
        for first, weights in mix[1:]:
            if first == step * accumulation:
                self.log.event("mix", step=step, **{f"weight.{n}": w for n, w in zip(self.names, weights)})
                self.log.print(
                    f"mix: from step {step} the weights are "
                    f"{', '.join(f'{n} {w:.3f}' for n, w in zip(self.names, weights))}"
                )

    def sample(self, step: int, text: str) -> None:
        self.log.event("sample", step=step, prompt=self.cfg.train.sample_prompt, text=text)
        self.log.print(f"sample: {text!r}")

    def checkpoint(self, step: int, path: Path, best: bool) -> None:
        self.log.event("checkpoint", step=step, path=str(path), best=best)

    def skip(self, run: RunState, loss: float, grad_norm: float, in_a_row: int) -> None:
        self.log.event(
            "skip", step=run.step, loss=loss, grad_norm=grad_norm, consecutive=in_a_row, skipped_steps=run.skipped_steps
        )
        self.log.print(
            f"step {run.step}: loss {loss} / grad norm {grad_norm} is not finite; "
            f"update skipped ({in_a_row} in a row, {self.cfg.recovery.max_skips} allowed)"
        )

    def uncompiled(self, run: RunState, why: str, compiled_loss: float | None, loss: float) -> None:
        """The compile failed, or the compiled objective's step was not finite where the plain objective's was
        (`compiled_loss`): the run goes on uncompiled."""
        self.log.event("uncompiled", step=run.step, why=why, compiled_loss=compiled_loss, loss=loss)
        if compiled_loss is not None:
            why += f" where the uncompiled model's is (loss {loss:.4f}) on the same batch, a torch.compile fault"
            why += " on this machine"
        self.log.print(
            f"step {run.step}: {why}: training goes on uncompiled (--set train.compile=false skips compiling)"
        )

    def diverged(self, run: RunState, in_a_row: int, has_checkpoint: bool) -> str:
        """Record the end of a diverged run; returns the message to stop with."""
        self.log.event("diverged", step=run.step, rollbacks=run.rollbacks)
        why = (
            f"after {run.rollbacks} rollbacks"
            if has_checkpoint
            else "there is no checkpoint from before the divergence to roll back to"
        )
        return (
            f"stopped at step {run.step}: loss or gradient norm not finite for {in_a_row} steps in a row, and {why}; "
            "lower optim.lr, lengthen schedule.warmup_steps, or run python -m fasttrain.doctor on this config"
        )

    def rollback(self, run: RunState, from_step: int, path: Path) -> None:
        self.log.event("rollback", step=run.step, from_step=from_step, path=str(path), lr_scale=run.lr_scale)
        self.log.print(
            f"rolled back from step {from_step} to {path} (step {run.step}); learning rate now "
            f"x{run.lr_scale:g} (rollback {run.rollbacks} of {self.cfg.recovery.max_rollbacks})"
        )

    def early_stop(self, run: RunState) -> None:
        t = self.cfg.train
        self.log.event(
            "early_stop",
            step=run.step,
            evaluations=run.stale_evals,
            min_delta=t.early_stop_min_delta,
            best_val_loss=run.best_val_loss,
            monitor=t.monitor,
        )
        source = t.monitor.partition(".")[2]  # train.monitor: val_loss, or val_loss.NAME
        self.log.print(
            f"stopping early at step {run.step}: {f'{source} ' if source else ''}validation loss has not "
            f"improved by {t.early_stop_min_delta:g} or more in {run.stale_evals} evaluations "
            f"(best {run.best_val_loss:.4f}, kept as checkpoints/best)"
        )

    def stopped(self, step: int, signal_name: str, path: Path | None) -> None:
        self.log.event("stopped", step=step, signal=signal_name, checkpoint=str(path))

    def end(
        self,
        run: RunState,
        last_eval: dict[str, float],
        checkpoint: Path | None,
        weights: Path,
        kept: Kept,
        final: FinalScore,
        stopped_early: bool,
        wall_seconds: float,
        replay_mix: str = "",
    ) -> dict[str, Any]:
        """The run's summary, reported and returned (what Trainer.train returns), and where everything went, closing with
        `final`, final/'s score on the whole val split (or the command that scores it); `replay_mix`: the --set item
        that pins a budgeted run's mix changes in its replay (mixture.replay_mix)."""
        out, timed = Path(self.cfg.train.out_dir), self.timed_step_seconds
        # Where the run ended, its last evaluation, where its files are, and which step's weights final/ holds
        # (`kept`) with their evaluation (weights_val_loss, ...) and their score on the whole split (final_val_loss, ...).
        scored = final.metrics or {}
        summary: dict[str, Any] = {
            "step": run.step,
            "tokens": run.tokens_seen,
            **last_eval,
            "out_dir": str(out),
            "checkpoint": str(checkpoint),
            "weights": str(weights),
            "weights_step": kept.step,
            "weights_scale": kept.scale,
            **{f"weights_{k}": v for k, v in kept.metrics.items() if k != "best_val_loss"},
            **{f"final_{k}": v for k, v in scored.items()},
            **({"final_val_rows": final.rows, "final_val_seconds": round(final.seconds, 3)} if scored else {}),
            **({} if scored else {"final_val_estimate_seconds": round(final.seconds, 1)}),
            **({"final_val_stopped_by": final.stopped_by} if final.stopped_by else {}),
            "skipped_steps": run.skipped_steps,
            "rollbacks": run.rollbacks,
            "stopped_early": stopped_early,
            "train_seconds": round(run.train_seconds, 3),
            "wall_seconds": round(wall_seconds, 3),
            **({"timed_step_seconds": round(timed, 6)} if timed else {}),
        }
        self.log.event("end", **summary)
        self.log.end_progress()
        self.log.print(
            f"done: {run.step} step{'s' * (run.step != 1)}, {run.tokens_seen:,} tokens; val loss "
            f"{summary['val_loss']:.3f}, {summary['val_bpb']:.3f} bits/byte on {self.evaluated_on} (best "
            f"{'loss' if self.cfg.train.monitor == 'val_loss' else self.cfg.train.monitor} {run.best_val_loss:.3f})"
            + (f"; {run.skipped_steps} steps skipped, {run.rollbacks} rollbacks" if run.skipped_steps else "")
        )
        if len(self.names) > 1 and self.read:
            self.log.print(
                "  read        " + ", ".join(f"{name} {n:,} tokens ({e:.2f} epochs)" for name, n, e in self.read)
            )
        data = self.cfg.data.dir or ", ".join(s.dir for s in self.cfg.data.sources)
        counted = " (what train.max_time counts)" if self.cfg.train.max_time else ""
        self.log.print(
            f"  time        {format_duration(summary['train_seconds'])} training{counted}, "
            f"{format_duration(summary['wall_seconds'])} wall time in this process" + speed_words(run, timed)
        )
        if self.cfg.train.max_time:
            mix = f" {shlex.quote(replay_mix)}" if replay_mix else ""
            self.log.print(
                f"  replay      --set train.max_steps={run.step} train.max_time=0 "
                f"schedule.progress_from={self.log.path}{mix} (step for step)"
            )
        self.log.print(
            f"  config      {out / 'config.toml'}\n  metrics     {self.log.path}\n"
            f"  checkpoint  {summary['checkpoint']}\n  weights     {summary['weights']}{kept_words(run, kept, final)}\n"
            f"  data        {data}\n  plot with   fasttrain plot {out}"
            # the command the README teaches; fasttrain.plot's own hint where it would refuse: matplotlib is an
            # extra, not a dependency
            + ("" if importlib.util.find_spec("matplotlib") else ' (needs matplotlib: pip install -e ".[plot]")')
        )
        self.log.print(self.closing_line(final))  # last: the figure to quote is final/'s on the whole split
        return summary

    def closing_line(self, final: FinalScore) -> str:
        """The run's last line: final/'s score on the whole val split, or the command that gives it and why the run
        left it to that."""
        m, out = final.metrics, self.cfg.train.out_dir
        if m is not None:
            weighted = ", totals weighted as data.sources" if len(self.names) > 1 else ""
            return (
                f"final/: {m['val_bpb']:.4f} bits/byte, val loss {m['val_loss']:.4f} on the whole val split "
                f"({final.rows:,} rows{weighted})"
            )
        why = "train.final_eval = false"
        if final.stopped_by:
            why = f"{final.stopped_by} cut its scoring short"
        elif final.allowed is not None:
            why = (
                f"about {format_duration(final.seconds)} at the last evaluation's speed, more than the "
                f"{format_duration(final.allowed)} the run allows it; train.final_eval = true scores it anyway"
            )
        return f"final/: fasttrain evaluate {out} --split val scores it on the whole val split ({why})"


def speed_words(run: RunState, timed_step_seconds: float | None) -> str:
    """What the time line adds where a timing chose the shape (sizing.timed_step_seconds): an update's time trained
    at against the time the plan chose the shape for, and where they differ by more than a timing is good to
    (sizing.SENSITIVITY), that the shape was chosen for the other (a GPU's timing runs eager steps, a compiled run
    others). Updates, not tokens: the plan counts a batch's slots, padding too, where tokens_seen counts targets."""
    if not (timed_step_seconds and run.step and run.train_seconds > 0):
        return ""
    trained = run.train_seconds / run.step
    ratio = timed_step_seconds / trained  # how many times faster than timed
    words = (
        f"; {1e3 * trained:.3g} ms an update, {ratio:.3g}x the speed of the {1e3 * timed_step_seconds:.3g} ms "
        "its plan chose the shape for"
    )
    low, high = SENSITIVITY
    if not low <= ratio <= high:
        words += " (a shape chosen at this speed could differ: `--dry-run --measure 100` times real steps)"
    return words


def kept_words(run: RunState, kept: Kept, final: FinalScore) -> str:
    """What the weights line adds where final/ holds other weights than the run's last step: an earlier step's, or an
    output layer scaled (checkpoint.fit_temperature); their score unless the closing line gives it on the whole split
    (`final`)."""
    said = []
    if kept.step != run.step:
        said.append(f"step {kept.step}'s, the lowest validation loss")
    if kept.scale != 1:
        said.append(f"the output layer x {kept.scale:g}, fitted on the eval rows")
    if not said:
        return ""
    bpb = kept.metrics.get("val_bpb")
    score = f": {bpb:.3f} bits/byte" if bpb is not None and final.metrics is None else ""
    return f" ({'; '.join(said)}{score}; the checkpoint holds the last step's as trained)"
