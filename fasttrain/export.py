"""Export trained weights as safetensors, in fasttrain's layout or in Hugging Face's Llama layout.

Imports from fasttrain: evaluation.trained_model, model.weights, system.errors.

    python -m fasttrain.export RUN_DIR|WEIGHTS_DIR|CHECKPOINT [--out DIR] [--hf] [--dtype fp32|bf16|fp16]

The layouts and the file format are fasttrain/model/weights.py's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from fasttrain.evaluation.trained_model import load_model, run_directory, tokenizer_file
from fasttrain.model.weights import DTYPE_NAMES, export_weights
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli


def export(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    hf: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Export the weights `source` names (anything sample and evaluate take) into `out_dir` (default RUN/export or
    export-hf), with the tokenizer the model trained with (trained_model.tokenizer_file)."""
    if out_dir is not None and not os.fspath(out_dir):
        raise UsageError("--out: is empty; name the directory to export into")
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir}: is a file, not a directory; cannot write an export into it")
    model, cfg, found = load_model(source)
    if out_dir is None:
        out_dir = run_directory(found) / ("export-hf" if hf else "export")
    return export_weights(model.state_dict(), cfg, out_dir, hf=hf, dtype=dtype, tokenizer=tokenizer_file(found, cfg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory, a weights directory (final/, export/) or a checkpoint file")
    parser.add_argument("--out", help="output directory (default: export/ or export-hf/ in the run directory)")
    parser.add_argument("--hf", action="store_true", help="Hugging Face Llama layout (config.json + safetensors)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32", help="weight dtype (default fp32)")
    args = parser.parse_args(argv)
    for path in export(args.source, args.out, hf=args.hf, dtype=DTYPE_NAMES[args.dtype]):
        print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
