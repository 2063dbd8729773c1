"""Generation: tokens sampled one at a time (`stream`, `generate`), through the model's KV cache, with
top-k / top-p filtering; and `generate_text` (text in, streamed text out), which the trainer's samples
and `python -m fasttrain.sample` use.

Imports from fasttrain: model.ensemble, model.transformer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F

from fasttrain.model.ensemble import Ensemble
from fasttrain.model.transformer import Transformer

GREEDY_BELOW = 1e-6  # a temperature below this samples greedily: dividing logits by it would overflow fp32
DECODE_CONTEXT = 8  # tokens decoded before a new piece, so the piece reads as it will in the whole text


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """`logits` (B, V) with every token outside the top k, and outside the top-p nucleus, set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the ones before it already reach top_p; the likeliest always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[..., 0] = False  # a top_p below float32's least (1e-46) is 0 there, and 0 >= 0 dropped it
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, -math.inf)
    return logits


@torch.no_grad()
def stream(
    model: Transformer | Ensemble,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` tokens (B, 1) that `model` samples one after another to extend `tokens` (B, T).

    temperature 0 (or below GREEDY_BELOW) is greedy decoding; top_k keeps the k likeliest tokens, top_p the smallest set
    whose probability reaches p. With `use_cache` the context runs once into a KVCache and each new token is a forward
    of length 1; at max_seq_len the cache starts over from the last max_seq_len / 2 tokens, recomputed (positions are
    baked into the cached keys). Without it the last max_seq_len tokens are re-run for every token, slower. Within the
    context both give the same logits, up to rounding.
    """
    window = model.cfg.max_seq_len
    cache: Any = model.new_cache() if use_cache else None  # a KVCache, or an ensemble's of its members'
    context = tokens[:, -window:]
    for _ in range(max_new_tokens):
        if cache is not None and cache.length == window:  # full: start over from the later half
            cache.length = 0
            context = tokens[:, -(window // 2) :]
        logits = model.logits(model.hidden(context, cache=cache)[:, -1]).float()  # the last position's only
        if temperature < GREEDY_BELOW:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat((tokens, nxt), dim=1)
        context = nxt if cache is not None else tokens[:, -window:]
        yield nxt


def generate(model: Transformer | Ensemble, tokens: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
    """`tokens` (B, T) extended by `max_new_tokens` sampled tokens: (B, T + max_new_tokens).
    `sampling`: the keyword arguments of `stream`."""
    return torch.cat((tokens, *stream(model, tokens, max_new_tokens, **sampling)), dim=1)


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def generate_text(
    model: Transformer | Ensemble,
    tokenizer: TextCodec,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    on_text: Callable[[str], object] | None = None,
    use_cache: bool = True,
) -> str:
    """The prompt and `max_new_tokens` sampled tokens as text, repeatable by `seed` (or a `generator`); `on_text(piece)`
    gets the decoded text as generated (a split UTF-8 character waits for its rest)."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt must encode to at least one token")
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    out = list(prompt_ids)
    shown = len(out)  # out[:shown] is text already handed to on_text
    was_training = model.training
    model.eval()
    try:
        for nxt in stream(
            model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            use_cache=use_cache,
        ):
            out.append(int(nxt.item()))
            if on_text is not None:
                piece = _decode_piece(tokenizer, out, shown)
                # Byte-level BPE: a character may span up to 4 tokens; past that the bytes are truly invalid.
                if not piece.endswith("\ufffd") or len(out) - shown >= 4:
                    on_text(piece)
                    shown = len(out)
    finally:
        model.train(was_training)
    if on_text is not None and shown < len(out):  # what the last tokens held back
        on_text(_decode_piece(tokenizer, out, shown))
    return tokenizer.decode(out)


def _decode_piece(tokenizer: TextCodec, ids: Sequence[int], start: int) -> str:
    """The text that ids[start:] add after ids[:start]. Only DECODE_CONTEXT tokens before `start` are
    decoded with them (a decoder may treat a first token specially), so streaming costs O(1) per token."""
    before = list(ids[max(0, start - DECODE_CONTEXT) : start])
    return tokenizer.decode(before + list(ids[start:]))[len(tokenizer.decode(before)) :]
