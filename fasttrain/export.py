"""Export trained weights as safetensors, in fasttrain's layout or in Hugging Face's Llama layout, or as GGUF.

Imports from fasttrain: evaluation.trained_model, model.gguf_export, model.weights, system.errors.

    python -m fasttrain.export RUN_DIR|WEIGHTS_DIR|CHECKPOINT [--out DIR] [--hf] [--dtype fp32|bf16|fp16]
    python -m fasttrain.export RUN_DIR|WEIGHTS_DIR|CHECKPOINT --gguf [--out FILE|DIR] [--dtype fp32|bf16|fp16|q8_0]

The layouts and the file format are fasttrain/model/weights.py's; the GGUF file (for llama.cpp) model/gguf_export.py's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from fasttrain.evaluation.trained_model import load_trained, run_directory
from fasttrain.model.gguf_export import GGUF_DTYPES, write_gguf
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
    trained = load_trained(source)  # its tokenizer read and checked against the model, as sample and evaluate do
    if out_dir is None:
        out_dir = run_directory(trained.source) / ("export-hf" if hf else "export")
    state = trained.model.state_dict()
    return export_weights(state, trained.cfg, out_dir, hf=hf, dtype=dtype, tokenizer=trained.tokenizer_path)


def export_gguf(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, dtype: str = "fp32") -> Path:
    """Write the weights `source` names as a GGUF file: `out`, DIR/model.gguf for a directory `out`, default
    RUN/export.gguf; with the tokenizer the model trained with."""
    if out is not None and not os.fspath(out):
        raise UsageError("--out: is empty; name the GGUF file to write")
    trained = load_trained(source)
    path = Path(out) if out is not None else run_directory(trained.source) / "export.gguf"
    path = path / "model.gguf" if path.is_dir() else path
    return write_gguf(trained.model.state_dict(), trained.cfg, path, dtype, trained.tokenizer_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory, a weights directory (final/, export/) or a checkpoint file")
    parser.add_argument(
        "--out",
        help="output directory (default: export/ or export-hf/ in the run directory); with --gguf a file or a "
        "directory, and an existing file is replaced only if it is a GGUF file",
    )
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--hf", action="store_true", help="Hugging Face Llama layout (config.json + safetensors)")
    layout.add_argument("--gguf", action="store_true", help="one GGUF file for llama.cpp (default RUN/export.gguf)")
    parser.add_argument("--dtype", choices=GGUF_DTYPES, default="fp32", help="weight dtype (default fp32; q8_0: GGUF)")
    args = parser.parse_args(argv)
    if args.gguf:
        print(export_gguf(args.source, args.out, args.dtype))
        return 0
    if args.dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {args.dtype}: only with --gguf; safetensors take {', '.join(sorted(DTYPE_NAMES))}")
    for path in export(args.source, args.out, hf=args.hf, dtype=DTYPE_NAMES[args.dtype]):
        print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
