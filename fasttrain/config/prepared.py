"""A Config completed with what preparing its data found (the data directory, the tokenizer's vocabulary,
the settings the data was prepared with), and the one check of model.vocab_size against a tokenizer.

Imports from fasttrain: config.sections, system.errors.
"""

from __future__ import annotations

import os
from dataclasses import replace

from fasttrain.config.sections import Config
from fasttrain.system.errors import UsageError


def resolve(cfg: Config, data_dir: str, tokenizer_vocab: int, request: dict | None = None) -> Config:
    """A copy of `cfg` with what preparing its data found (cache.ensure_prepared): data directory, model.vocab_size when
    0, `request`'s settings, paths absolute. UsageError if the vocabulary is smaller than the tokenizer's."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    check_vocab(vocab, tokenizer_vocab, f"{data_dir}/tokenizer.json")
    if cfg.data.sources:  # a mixture names its prepared folders already: recorded absolute, as data.dir is
        sources = [replace(s, dir=_absolute(s.dir)) for s in cfg.data.sources]
        return replace(cfg, data=replace(cfg.data, sources=sources), model=replace(cfg.model, vocab_size=vocab))
    data = replace(cfg.data, dir=data_dir)
    if request:
        data = replace(
            data,
            inputs=list(request["inputs"]),
            tokenizer=request.get("tokenizer") or "",
            vocab_size=request.get("vocab_size") or 0,
            val_fraction=request["val_fraction"],
            text_field=request.get("text_field", "text"),
        )
    data = replace(
        data, dir=_absolute(data.dir), inputs=[_absolute(i) for i in data.inputs], tokenizer=_absolute(data.tokenizer)
    )
    return replace(cfg, data=data, model=replace(cfg.model, vocab_size=vocab))


def _absolute(spec: str) -> str:
    """A path (or glob) of [data] as an absolute one, so tools run from another directory find it too; an
    embedded corpus (builtin:NAME) and "" (unset) stay as they are."""
    return spec if not spec or spec.startswith("builtin:") else os.path.abspath(spec)


def check_vocab(model_vocab: int, tokenizer_vocab: int, tokenizer: str) -> None:
    """The one check of model.vocab_size, wherever a model meets its tokenizer (a run's resolve, a trained
    model loaded back): UsageError if the model cannot embed every token of `tokenizer`."""
    if model_vocab < tokenizer_vocab:
        raise UsageError(
            f"model.vocab_size = {model_vocab} is smaller than the {tokenizer_vocab} tokens of {tokenizer}; "
            "0 takes the size from the tokenizer"
        )
