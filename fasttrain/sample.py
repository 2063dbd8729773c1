"""Generate text from a trained model, streamed to the terminal as it is sampled.

Imports from fasttrain: compute.device, config, evaluation.trained_model, formats.tokenizer, model.generation,
model.transformer, system.atomic, system.errors.

    python -m fasttrain.sample RUN_DIR|WEIGHTS_DIR|CHECKPOINT [--prompt TEXT | --prompt-file FILE]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--num-samples N] [--seed S] [--device D]

A run directory means its final/ weights, else its latest checkpoint (see fasttrain/evaluation/trained_model.py).
`--prompt -` reads the prompt from stdin; without a prompt the run's train.sample_prompt
is used. Generation uses the model's KV cache (fasttrain.model.generation.stream); past the
model's context it keeps the last half of the context and goes on. A prompt's trailing space joins the first token
sampled, as a byte-level BPE's words carry their space (`healed`): "The " goes on "The method", not "The  method".
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence, cast

import torch
from torch import nn

from fasttrain.compute.device import autocast
from fasttrain.config import MAX_PROMPT_CHARS, MAX_SEED
from fasttrain.evaluation.trained_model import inference_device, inference_precision, load_trained
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.generation import GREEDY_BELOW, generate_text
from fasttrain.model.transformer import Transformer
from fasttrain.system.atomic import read_regular
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli


def read_prompt(prompt: str | None, prompt_file: str | None) -> str | None:
    """The prompt text: `prompt` ("-": stdin), or `prompt_file`'s contents; None when neither is given.
    UsageError if it is empty, not UTF-8, or longer than MAX_PROMPT_CHARS."""
    if prompt_file is not None:
        where = f"--prompt-file {prompt_file}"
        prompt = _utf8(read_regular(prompt_file, 4 * MAX_PROMPT_CHARS, "prompt"), where)
    elif prompt == "-":
        where = "--prompt -: stdin"
        prompt = _utf8(sys.stdin.buffer.read(4 * MAX_PROMPT_CHARS + 1), where)
    elif prompt is not None:
        where = "--prompt"
        try:  # bytes that are not UTF-8 arrive in argv as lone surrogates, which no tokenizer can take
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError("--prompt: not UTF-8 text") from None
    else:
        return None
    if not prompt:
        raise UsageError(f"{where}: is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UsageError(
            f"{where}: {len(prompt):,} characters, more than the {MAX_PROMPT_CHARS:,} a prompt may have "
            "(the model reads at most its context of it)"
        )
    return prompt


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float | None, num_samples: int, seed: int | None
) -> None:
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
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed: must be in [0, {MAX_SEED}] (as train.seed), got {seed}")
    if 0 < temperature < GREEDY_BELOW:
        print(
            f"note: --temperature {temperature:g} is below {GREEDY_BELOW:g}: sampling greedily, as with 0",
            file=sys.stderr,
        )


class FirstTokenFrom(nn.Module):
    """`model` for generation whose first logits allow only the ids `allowed` (a prompt healed of its trailing space:
    the first token brings it back); every later call is the model's own."""

    def __init__(self, model: nn.Module, allowed: Sequence[int]):
        super().__init__()
        self.model, self.cfg, self.first = model, cast(Any, model).cfg, True
        self.train(model.training)  # generation puts back the mode it found: the model's own
        self.bias = torch.full((self.cfg.vocab_size,), -math.inf)
        self.bias[list(allowed)] = 0.0

    def new_cache(self) -> Any:
        return cast(Any, self.model).new_cache()

    def hidden(self, tokens: torch.Tensor, documents: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        return cast(Any, self.model).hidden(tokens, documents, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cast(Any, self.model).logits(hidden)
        if not self.first:
            return logits
        self.first = False
        return logits + self.bias.to(logits.device)


def healed(tokenizer: Tokenizer, prompt: str) -> tuple[str, list[int]]:
    """A prompt ending in a space as the text before that space and the ids that may come first: a space, then a
    character that is not whitespace. A byte-level BPE's words start with their space, so a prompt's trailing space is
    a token of its own that training text has before almost no word, and the model's next word brought a space of its
    own ("The " sampled "The  oi"); so the space joins the next token, as it would in text. Any other prompt, or a
    tokenizer with no such tokens, as it is, every id allowed ([])."""
    if not prompt.endswith(" ") or not tokenizer.encode(prompt[:-1]):
        return prompt, []
    texts = tokenizer.tok.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    allowed = [i for i, t in enumerate(texts) if t[:1] == " " and t[1:2].strip() and "\ufffd" not in t]
    return (prompt[:-1], allowed) if allowed else (prompt, [])


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
    parser.add_argument(
        "--top-k", type=int, default=50, metavar="K", help="sample from the K likeliest, 0: all (default 50)"
    )
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: keep probability P")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples to draw (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="make the samples repeatable")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    args = parser.parse_args(argv)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_samples, args.seed)
    text = read_prompt(args.prompt, args.prompt_file)
    device = inference_device(args.device)
    trained = load_trained(args.source, device)
    text = trained.cfg.train.sample_prompt if text is None else text
    if not trained.tokenizer.encode(text):
        raise UsageError("the prompt encodes to no tokens")
    text, allowed = healed(trained.tokenizer, text)
    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
    with autocast(inference_precision(trained.cfg, device), device):
        for i in range(args.num_samples):
            if i:
                print("\n---")
            show(text)
            model = FirstTokenFrom(trained.model, allowed) if allowed else trained.model
            generate_text(
                cast(Transformer, model),  # the calls generation makes: hidden, logits, new_cache, cfg
                trained.tokenizer,
                text,
                args.max_new_tokens,
                args.temperature,
                args.top_k or None,
                args.top_p,
                generator=generator,
                on_text=show,
            )
    print()
    return 0


if __name__ == "__main__":
    run_cli(main)
