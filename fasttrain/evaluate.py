"""Score a trained model on text: loss, perplexity and bits per byte.

    python -m fasttrain.evaluate RUN_DIR|WEIGHTS_DIR|CHECKPOINT (--input PATH [PATH ...] | --split val)
        [--batch-size N] [--text-field FIELD] [--device D]

--input takes what `python -m fasttrain.prepare --input` takes (text files, globs,
directories, JSONL, builtin:NAME): the text is tokenized with the run's tokenizer the
way prepare does it (an end-of-text token before each document) into a temporary
directory, and scored there. --split val scores the run's own prepared val split.

Scoring is the trainer's validation (fasttrain/training/validation.py, validate) in one pass over every row,
as the run batches them ([data] batching, train.seq_len), the last batch part-full and
each shard's short last window included: the loss is the mean over every target, and
bits per byte is that loss, in bits, times the text's tokens per UTF-8 byte. With
--split val this is the trainer's val_bpb whenever its evaluation covered the whole
split (train.eval_steps large enough).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from fasttrain.data.loader import TokenLoader
from fasttrain.data.preparation import PreparedData, prepare
from fasttrain.data.shards import read_meta
from fasttrain.system.distributed import World
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli
from fasttrain.training.objective import NextTokenLoss, batch_loss
from fasttrain.training.trained_model import Trained, inference_device, inference_precision, load_trained
from fasttrain.training.validation import validate


def score(trained: Trained, directory: str | Path, split: str, bits_per_nat: float, batch_size: int,
          device: torch.device) -> dict[str, float]:
    """loss, accuracy, ppl and bpb of `trained` over every batch of `split` in prepared `directory`, windows
    as the run trained on ([data] batching and padding, train.seq_len). `bits_per_nat`: the split's
    tokens / (UTF-8 bytes x ln 2)."""
    cfg, eot_id = trained.cfg, trained.tokenizer.eot_id
    objective = NextTokenLoss(trained.model)

    def loss(x: torch.Tensor, y: torch.Tensor):
        return batch_loss(objective, x, y, eot_id if cfg.data.document_mask else None)

    with TokenLoader(directory, split, batch_size, cfg.train.seq_len, sampling="sequential",
                     batching=cfg.data.batching, padding=cfg.data.padding, eot_id=eot_id,
                     vocab_size=cfg.model.vocab_size, prefetch=0, device=device, whole=True) as loader:
        metrics = validate(loss, trained.model, loader, loader.reader.batches_per_epoch,
                           inference_precision(cfg, device), World(), bits_per_nat)
    trained.model.eval()  # validate leaves the model in train mode
    return {name.removeprefix("val_"): value for name, value in metrics.items()}


def score_split(trained: Trained, split: str, batch_size: int, device: torch.device) -> dict[str, float]:
    """The metrics of the run's own prepared `split` (data.dir), as the trainer computes them."""
    directory = trained.cfg.data.dir
    meta = read_meta(directory)
    if meta is None:
        raise UsageError(f"{directory}: no prepared data (meta.json) there, so no {split} split to score")
    prepared_with = Path(directory) / "tokenizer.json"
    if prepared_with.is_file() and prepared_with.read_bytes() != trained.tokenizer_path.read_bytes():
        raise UsageError(f"{prepared_with}: differs from {trained.tokenizer_path}, the tokenizer the model trained "
                         f"with: {directory} was prepared again since, so its token ids are not the model's; "
                         "score text with --input instead")
    return score(trained, directory, split, PreparedData(directory, meta).bits_per_nat, batch_size, device)


def score_inputs(trained: Trained, inputs: Sequence[str], batch_size: int, device: torch.device,
                 text_field: str = "text") -> dict[str, float]:
    """The metrics of the text in `inputs` (anything prepare reads), tokenized by the run's tokenizer."""
    with tempfile.TemporaryDirectory(prefix="fasttrain-evaluate-") as tmp:
        # Everything goes into the train split (val_fraction 0); it is only read back here.
        meta = prepare(inputs, tmp, tokenizer_path=str(trained.tokenizer_path), val_fraction=0.0,
                       text_field=text_field, quiet=True)
        tokens, text_bytes = meta["tokens"]["train"], meta["text_bytes"]["train"]
        return score(trained, tmp, "train", tokens / (text_bytes * math.log(2)), batch_size, device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory, a weights directory (final/, export/) or a checkpoint file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", nargs="+", metavar="PATH",
                      help="text files, globs, directories, JSONL files or builtin:NAME, as prepare takes them")
    what.add_argument("--split", choices=["val"], help="the run's own prepared val split")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="rows per batch (default: the run's train.batch_size)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    device = inference_device(args.device)
    trained = load_trained(args.source, device)
    if args.split:
        metrics = score_split(trained, args.split, args.batch_size or trained.cfg.train.batch_size, device)
    else:
        metrics = score_inputs(trained, args.input, args.batch_size or trained.cfg.train.batch_size, device,
                               args.text_field)
    print(f"loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.2f}  bpb {metrics['bpb']:.4f}  "
          f"accuracy {metrics['accuracy']:.4f}  ({trained.source})")
    return 0


if __name__ == "__main__":
    run_cli(main)
