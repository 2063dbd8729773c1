"""Score a trained model on text (loss, perplexity and bits per byte) or on lm-evaluation-harness tasks.

Imports from fasttrain: checkpoints.saves, compute.distributed, data.documents, data.loader, data.mixture,
evaluation.loss_sums, evaluation.trained_model, evaluation.validation, formats.prepared_folder, optimization.objective,
preparation.preparation, system.atomic, system.errors, system.run_lock, training.metrics.

    python -m fasttrain.evaluate RUN_DIR|WEIGHTS_DIR|CHECKPOINT (--input PATH [PATH ...] | --split val)
        [--batch-size N] [--text-field FIELD] [--device D]
    python -m fasttrain.evaluate RUN --tasks hellaswag,arc_easy [--num-fewshot N] [--limit N]
        [--include-path DIR] [--output FILE.json] [--batch-size N] [--device D]

--input takes what `fasttrain.prepare --input` takes, tokenized as prepare does into a temporary directory and scored
there on the text's own tokens: each document on its own, after an end-of-text token that conditions its first token
but is neither a target nor a byte, so loss and perplexity are what transformers gives on `[bos] + tokens` and bits per
byte the summed loss in bits over the UTF-8 bytes (score_text). --split val scores the run's own val split as the
trainer's validation does, in one pass over every row, batched as the run did: the loss the mean over every target and
bits per byte that loss in bits times tokens per UTF-8 byte (what the run's end event records as final_val_bpb, where
the run scored final/).

--tasks runs lm-eval's tasks (the `eval` extra; evaluation/harness.py) and prints their scores, also written to the
run's metrics.jsonl as an `eval_tasks` event and with --output to a JSON file; --include-path adds a folder of one's own
task YAML files.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import torch

from fasttrain.checkpoints import saves
from fasttrain.compute.distributed import World
from fasttrain.data.documents import IGNORE_INDEX, Batching
from fasttrain.data.loader import TokenLoader
from fasttrain.data.mixture import normalized, source_names
from fasttrain.evaluation import trained_model
from fasttrain.evaluation.loss_sums import LossSums
from fasttrain.evaluation.trained_model import Trained
from fasttrain.evaluation.validation import mixture_metrics, validate
from fasttrain.formats.prepared_folder import open_prepared
from fasttrain.optimization.objective import NextTokenLoss, batch_loss
from fasttrain.preparation.preparation import prepare
from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli
from fasttrain.system.run_lock import locked
from fasttrain.training.metrics import MetricsLog

if TYPE_CHECKING:  # lm-eval is the optional eval extra
    from lm_eval.tasks import TaskManager


def whole_pass(
    trained: Trained,
    directory: str | Path,
    split: str,
    loss: Callable[[torch.Tensor, torch.Tensor], LossSums],
    batching: Batching,
    bits_per_nat: float,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """loss, accuracy, ppl and bpb (the loss times `bits_per_nat`) of `trained` over every `batching` row of `split` in
    `directory`, in windows of the run's train.seq_len, each batch's sums from `loss(x, y)`."""
    cfg = trained.cfg
    with TokenLoader(
        directory,
        split,
        batch_size,
        cfg.train.seq_len,
        sampling="sequential",
        batching=batching,
        padding=cfg.data.padding,
        eot_id=trained.tokenizer.eot_id,
        vocab_size=cfg.model.vocab_size,
        prefetch=0,
        device=device,
        whole=True,
    ) as loader:
        precision = trained_model.inference_precision(cfg, device)
        metrics = validate(
            loss, trained.model, loader, loader.reader.batches_per_epoch, precision, World(), bits_per_nat
        )
    assert metrics is not None  # None only when a stop() given to validate says to give up
    trained.model.eval()  # validate leaves the model in train mode
    return {name.removeprefix("val_"): value for name, value in metrics.items()}


def score(
    trained: Trained, directory: str | Path, split: str, bits_per_nat: float, batch_size: int, device: torch.device
) -> dict[str, float]:
    """loss, accuracy, ppl and bpb of `trained` over every batch of `split` in `directory`, as the trainer's validation
    counts them: batched and windowed as the run trained, every target counted, end-of-text tokens too.
    `bits_per_nat`: the split's tokens / (UTF-8 bytes x ln 2)."""
    cfg, eot_id = trained.cfg, trained.tokenizer.eot_id
    objective = NextTokenLoss(trained.model)

    def loss(x: torch.Tensor, y: torch.Tensor) -> LossSums:
        return batch_loss(objective, x, y, eot_id if cfg.data.document_mask else None)

    return whole_pass(trained, directory, split, loss, cfg.data.batching, bits_per_nat, batch_size, device)


def score_text(
    trained: Trained, directory: str | Path, split: str, text_bytes: int, batch_size: int, device: torch.device
) -> dict[str, float]:
    """loss, accuracy, ppl and bpb of `trained` on the text's own tokens in `split` of `directory` (`text_bytes` its
    UTF-8 bytes), as transformers scores `[bos] + tokens` of each document: each document on its own (document
    masking), its end-of-text token before it conditioning its first token but no target, every one of its own tokens
    a target; bpb is their summed loss in bits per byte. Whole documents in rows of train.seq_len ("aligned", whatever
    the run's batching): one that fits a row is never cut, so it gets all its context; one longer than a row is scored
    row by row, each row's first tokens with less context than transformers would give them."""
    eot_id = trained.tokenizer.eot_id
    objective = NextTokenLoss(trained.model)
    counted = torch.zeros((), device=device)  # the targets scored: the text's own tokens

    def loss(x: torch.Tensor, y: torch.Tensor) -> LossSums:
        # Masks only where a row holds a second document: one text's windows take the causal path, on a GPU SDPA's
        # kernels rather than a compiled flex_attention (a host sync a batch, which scoring can afford).
        several = bool((x[:, 1:] == eot_id).any())
        sums = batch_loss(objective, x, y.masked_fill(y == eot_id, IGNORE_INDEX), eot_id if several else None)
        counted.add_(sums.counted)
        return sums

    metrics = whole_pass(trained, directory, split, loss, "aligned", 1.0, batch_size, device)
    metrics["bpb"] = metrics["loss"] * counted.item() / (text_bytes * math.log(2))
    return metrics


def score_split(trained: Trained, split: str, batch_size: int, device: torch.device) -> dict[str, float]:
    """The metrics of the run's own `split` as the trainer computes them: of data.dir, or of each [[data.sources]]
    folder and their weighted total (validation.mixture_metrics)."""
    d = trained.cfg.data
    folders = list(zip(source_names(d), [s.dir for s in d.sources])) if d.sources else [("", d.dir)]
    found = []
    for name, directory in folders:
        data = open_prepared(directory)  # meta.json checked whole: bits per byte divide by its counts
        prepared_with = Path(directory) / "tokenizer.json"
        if prepared_with.read_bytes() != trained.tokenizer_path.read_bytes():
            raise UsageError(
                f"{prepared_with}: differs from {trained.tokenizer_path}, the tokenizer the model "
                f"trained with: {directory} was prepared again since, so its token ids are not the "
                "model's; score text with --input instead"
            )
        metrics = score(trained, directory, split, data.bits_per_nat, batch_size, device)
        found.append((name, {f"val_{k}": v for k, v in metrics.items()}))
    weights = normalized([s.weight for s in d.sources]) if d.sources else [1.0]
    return {k.removeprefix("val_"): v for k, v in mixture_metrics(found, weights).items()}


def score_inputs(
    trained: Trained, inputs: Sequence[str], batch_size: int, device: torch.device, text_field: str = "text"
) -> dict[str, float]:
    """The metrics of the text in `inputs` (anything prepare reads), tokenized by the run's tokenizer: score_text's,
    each document's own tokens."""
    with tempfile.TemporaryDirectory(prefix="fasttrain-evaluate-") as tmp:
        # Everything goes into the train split (val_fraction 0); it is only read back here.
        meta = prepare(
            inputs, tmp, tokenizer_path=str(trained.tokenizer_path), val_fraction=0.0, text_field=text_field, quiet=True
        )
        if replaced := meta["invalid_utf8_replaced"]:  # a binary file (a prepared shard, say) would score as noise
            print(
                f"note: {' '.join(inputs)}: {replaced:,} invalid UTF-8 sequences in {meta['text_bytes']['train']:,} "
                "bytes of text, each scored as U+FFFD (a binary file is not text; a prepared data folder is scored "
                "with --split)",
                file=sys.stderr,
            )
        return score_text(trained, tmp, "train", meta["text_bytes"]["train"], batch_size, device)


class ScoredWeights(NamedTuple):
    """Which weights of which run evaluate scored (scored_weights)."""

    run: Path | None  # the run directory; None outside one
    step: int | None  # the step they are from; None where no record says
    scale: float  # the factor final/'s output layer carries (checkpoint.fit_temperature); 1.0 for a checkpoint


def scored_weights(source: Path) -> ScoredWeights:
    """The run directory of weights `source` and their step: a checkpoint's own, or RUN/final's from the run's last
    `end` event (weights_step, or older runs' `step`), with the scale of final/'s output layer it records
    (weights_scale: that step's weights are not final/'s where it is not 1)."""
    real = source.resolve()
    if real.is_file() or saves.is_sharded(real):
        run, match = trained_model.run_directory(real), saves.SAVE_NAME.fullmatch(real.name)
        return ScoredWeights(
            (run if (run / "metrics.jsonl").is_file() else None), (int(match.group(1)) if match else None), 1.0
        )
    run = real.parent
    if real.name != "final" or not (run / "metrics.jsonl").is_file():
        return ScoredWeights(None, None, 1.0)
    step, scale = None, 1.0
    with open(run / "metrics.jsonl", encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"end"' in line:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill: the end before it
                    end = json.loads(line)
                    step, scale = end.get("weights_step", end.get("step", step)), end.get("weights_scale", 1.0)
    return ScoredWeights(run, step, scale)


def score_tasks(
    trained: Trained,
    tasks: Sequence[str],
    num_fewshot: int | None,
    limit: float | None,
    index: TaskManager,
    batch_size: int,
    output: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run `tasks` through lm-eval (`index`: task_index's); print the table, log an eval_tasks event in the run's
    metrics.jsonl (if from a run), write `output`; returns the scores."""
    harness = importlib.import_module("fasttrain.evaluation.harness")
    results = harness.run_tasks(trained, tasks, num_fewshot, limit, batch_size=batch_size, index=index)
    scores = harness.task_scores(results)
    run, step, scale = scored_weights(trained.source)
    record = {
        "step": step,
        "weights_scale": scale,  # final/'s output layer x this: not that step's checkpoint as saved where it is not 1
        "tasks": scores,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "source": str(trained.source),
        "lm_eval": harness.LM_EVAL_VERSION,
    }
    print(harness.scores_table(scores, results.get("n-shot", {})))
    print(f"({trained.source}, step {step}{f', its output layer x {scale:g}' if scale != 1 else ''})")
    if output:
        text = json.dumps(record, indent=2).encode()
        print(f"wrote {write_atomically(output, lambda f: f.write(text), 'write the scores')}")
    if run is not None:
        try:
            with locked(run):  # not while a run trains there: two writers would interleave metrics.jsonl
                log = MetricsLog(run, 0, tensorboard=False, quiet=True)
                log.event("eval_tasks", **record)
                log.close()
        except UsageError as e:
            print(f"note: the scores are not in {run / 'metrics.jsonl'}: {e}", file=sys.stderr)
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory, a weights directory (final/, export/) or a checkpoint file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="text files, globs, directories, JSONL files or builtin:NAME, as prepare takes them",
    )
    what.add_argument("--split", choices=["val"], help="the run's own prepared val split")
    what.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="lm-evaluation-harness tasks, comma-separated (the eval extra: pip install -e '.[eval]')",
    )
    parser.add_argument(
        "--num-fewshot", type=int, metavar="N", help="--tasks: examples in each prompt (default: each task's own)"
    )
    parser.add_argument(
        "--limit", type=float, metavar="N", help="--tasks: at most N documents per task (below 1: that fraction)"
    )
    parser.add_argument("--include-path", metavar="DIR", help="--tasks: a folder of task YAML files of your own")
    parser.add_argument("--output", metavar="FILE", help="--tasks: also write the scores to FILE as JSON")
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="rows per batch (default: the run's train.batch_size)"
    )
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    task_only = [
        flag
        for flag in ("--num-fewshot", "--limit", "--include-path", "--output")
        if getattr(args, flag[2:].replace("-", "_")) is not None
    ]
    if task_only and not args.tasks:
        raise UsageError(f"{task_only[0]}: only with --tasks")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot: must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not (args.limit > 0 and (args.limit < 1 or args.limit.is_integer())):
        raise UsageError(f"--limit: must be a whole number of documents >= 1 or a fraction in (0, 1), got {args.limit}")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise UsageError("--tasks: no task named")
    index = None
    if tasks:  # lm-eval missing, a task it cannot find or cannot run: one line before the model loads
        harness = importlib.import_module("fasttrain.evaluation.harness")
        index = harness.task_index(tasks, args.include_path, args.num_fewshot)
    device = trained_model.inference_device(args.device)
    trained = trained_model.load_trained(args.source, device)
    batch_size = args.batch_size or trained.cfg.train.batch_size
    if index is not None:
        score_tasks(trained, tasks, args.num_fewshot, args.limit, index, batch_size, args.output)
        return 0
    if args.split:
        metrics = score_split(trained, args.split, batch_size, device)
    else:
        metrics = score_inputs(trained, args.input, batch_size, device, args.text_field)
    print(
        f"loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.2f}  bpb {metrics['bpb']:.4f}  "
        f"accuracy {metrics['accuracy']:.4f}  ({trained.source})"
    )
    for name in sorted({k.partition(".")[2] for k in metrics if "." in k}):  # a mixture's sources
        print(
            f"  {name}: loss {metrics[f'loss.{name}']:.4f}  bpb {metrics[f'bpb.{name}']:.4f}  "
            f"accuracy {metrics[f'accuracy.{name}']:.4f}"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
