"""Generate text from a trained model, streamed to the terminal as it is sampled.

    python -m fasttrain.sample RUN_DIR|WEIGHTS_DIR|CHECKPOINT [--prompt TEXT | --prompt-file FILE]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--num-samples N] [--seed S] [--device D]

A run directory means its final/ weights, else its latest checkpoint (see fasttrain/training/trained_model.py).
`--prompt -` reads the prompt from stdin; without a prompt the run's train.sample_prompt
is used. Generation uses the model's KV cache (fasttrain.model.generation.stream); past the
model's context it keeps the last half of the context and goes on.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from fasttrain.model.generation import generate_text
from fasttrain.system.device import autocast, use_device
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli
from fasttrain.training.trained_model import inference_precision, load_trained


def read_prompt(prompt: str | None, prompt_file: str | None) -> str | None:
    """The prompt text: `prompt` ("-": stdin), or `prompt_file`'s contents; None when neither is given."""
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise UsageError(f"--prompt-file {prompt_file}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"--prompt-file {prompt_file}: is a directory") from None
        except OSError as e:
            raise UsageError(f"--prompt-file {prompt_file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {prompt_file}: not UTF-8 text") from None
        if not prompt:
            raise UsageError(f"--prompt-file {prompt_file}: is empty")
    elif prompt == "-":
        prompt = sys.stdin.read()
        if not prompt:
            raise UsageError("--prompt -: stdin was empty")
    elif prompt == "":
        raise UsageError("--prompt: is empty")
    return prompt


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float | None,
                   num_samples: int) -> None:
    """UsageError naming the flag whose value is out of range."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature: must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k: must be >= 0 (0: no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p: must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise UsageError(f"--num-samples: must be >= 1, got {num_samples}")


def show(text: str) -> None:
    """Print `text` now, without a newline: the sample appears as it is generated."""
    print(text, end="", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory, a weights directory (final/, export/) or a checkpoint file")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text to continue; - reads stdin (default: the run's train.sample_prompt)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (UTF-8)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, metavar="K",
                        help="sample from the K likeliest, 0: all (default 50)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: keep probability P")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples to draw (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="make the samples repeatable")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    args = parser.parse_args(argv)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_samples)
    text = read_prompt(args.prompt, args.prompt_file)
    device = use_device(args.device)
    trained = load_trained(args.source, device)
    text = trained.cfg.train.sample_prompt if text is None else text
    if not trained.tokenizer.encode(text):
        raise UsageError("the prompt encodes to no tokens")
    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
    with autocast(inference_precision(trained.cfg, device), device):
        for i in range(args.num_samples):
            if i:
                print("\n---")
            show(text)
            generate_text(trained.model, trained.tokenizer, text, args.max_new_tokens, args.temperature,
                          args.top_k or None, args.top_p, generator=generator, on_text=show)
    print()
    return 0


if __name__ == "__main__":
    run_cli(main)
