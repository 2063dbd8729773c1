"""What a Llama holds, written once: the numbers of its shape (LLAMA_NUMBERS) and the settings every Llama has
(LLAMA_SETTINGS), each as fasttrain's [model], a Hugging Face config.json and a GGUF file name it.

Imports from fasttrain: config, model.transformer, system.atomic, system.errors.

The tables drive the config.json of an --hf export (`hf_llama_config`), the GGUF file's metadata (gguf_export.py
calls each number's gguf.GGUFWriter method), what a model.init_from reads from a config.json
(`hf_llama_model_config`, every value type-checked where it is read) and the two refusals, in one style
(`key = value (why)`, `refusal`): the [model] settings an export cannot write (`beyond_llama`) and the config.json
values fasttrain's transformer cannot reproduce.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from fasttrain.config import ModelConfig
from fasttrain.model.transformer import ffn_hidden_size
from fasttrain.system.atomic import read_regular
from fasttrain.system.errors import UsageError


@dataclass(frozen=True)
class LlamaNumber:
    """A number of a Llama's shape or numerics: its config.json key (`hf`), the gguf.GGUFWriter method that records it
    in a GGUF file, what a ModelConfig gives it, and the [model] key an import sets from it. A number with no such key
    is `derived` from the others (in words): an import only checks it."""

    hf: str
    gguf: str
    value: Callable[[ModelConfig], int | float]
    ours: str = ""
    derived: str = ""
    integer: bool = True
    absent: float | None = None  # an import's value where config.json has no such key (None: the key is required)
    implied: bool = False  # null or absent in config.json: what the numbers read before it give it (`value`)
    within: str = ""  # the config.json object that transformers 5 may keep it in instead


LLAMA_NUMBERS = (
    LlamaNumber("vocab_size", "add_vocab_size", lambda m: m.vocab_size, "vocab_size"),
    LlamaNumber("hidden_size", "add_embedding_length", lambda m: m.d_model, "d_model"),
    LlamaNumber("intermediate_size", "add_feed_forward_length", ffn_hidden_size, "ffn_hidden"),
    LlamaNumber("num_hidden_layers", "add_block_count", lambda m: m.n_layers, "n_layers"),
    LlamaNumber("num_attention_heads", "add_head_count", lambda m: m.n_heads, "n_heads"),
    # null or absent, as transformers reads it: a key and value head for each query head
    LlamaNumber(
        "num_key_value_heads", "add_head_count_kv", lambda m: m.n_kv_heads or m.n_heads, "n_kv_heads", implied=True
    ),
    LlamaNumber(
        "head_dim",
        "add_rope_dimension_count",
        lambda m: m.d_model // m.n_heads,
        derived="hidden_size / num_attention_heads",
        implied=True,
    ),
    LlamaNumber("max_position_embeddings", "add_context_length", lambda m: m.max_seq_len, "max_seq_len"),
    LlamaNumber("rms_norm_eps", "add_layer_norm_rms_eps", lambda m: m.norm_eps, "norm_eps", integer=False),
    LlamaNumber(  # absent: transformers' default base; null is not absent (transformers would fail on it)
        "rope_theta",
        "add_rope_freq_base",
        lambda m: m.rope_theta,
        "rope_theta",
        integer=False,
        absent=10000.0,
        within="rope_parameters",
    ),
)


@dataclass(frozen=True)
class LlamaSetting:
    """A setting every Llama has: the [model] key `ours` at `llama`, which an import sets (unless `kept`) and an export
    refuses any other value of (but one that `folds` into the weights), said with `note`; or config.json's `hf` at
    `hf_value`, which an --hf export writes and an import refuses any other value of, `why` in words (absent is
    `hf_value`, transformers' default, unless `required`)."""

    ours: str = ""
    llama: object = None
    note: str = ""
    folds: bool = False
    kept: bool = False
    same: tuple[object, ...] = ()  # other [model] values that build the same model
    hf: str = ""
    hf_value: object = None
    why: str = ""
    required: bool = False


LLAMA_SETTINGS = (
    LlamaSetting(hf="model_type", hf_value="llama", why='not "llama"', required=True),
    LlamaSetting(ours="mlp", llama="swiglu", hf="hidden_act", hf_value="silu", why="the MLP here is SwiGLU, with silu"),
    LlamaSetting(hf="attention_bias", hf_value=False, why="the linear layers here have no bias"),
    LlamaSetting(hf="mlp_bias", hf_value=False, why="the linear layers here have no bias"),
    LlamaSetting(ours="logit_softcap", llama=0.0),
    # rules.py refuses an ensemble with model.init_from: an import leaves model.members to it
    LlamaSetting(ours="members", llama=1, note=", an ensemble", kept=True, same=(0,)),  # 0: one model (build_model)
    LlamaSetting(ours="qk_norm", llama=False),
    LlamaSetting(ours="embedding_norm", llama=False, folds=True),  # into the table (weights.hf_llama_tensors)
    LlamaSetting(ours="value_embeddings", llama=False),
    LlamaSetting(ours="residual_scalars", llama=False),
    LlamaSetting(ours="smear", llama=False),
    LlamaSetting(ours="backout", llama=False),
)


def refusal(key: str, value: object, why: str, note: str = "") -> str:
    """One refused value, as every refusal here says it: `key = value (why)`, `note` after the value."""
    return f"{key} = {_shown(value)}{note} ({why})"


def _refused(path: Path, *refusals: str) -> UsageError:
    """The error of a config.json at `path` that model.init_from cannot take, for its `refusals`."""
    return UsageError(
        f"{path}: {', '.join(refusals)}: model.init_from takes the Llama-family models fasttrain's transformer reproduces"
    )


def _shown(value: object) -> str:
    """A value as a refusal shows it: as JSON writes it, a finite float as short as it reads (15, 1e-06)."""
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else json.dumps(value)


def beyond_llama(cfg: ModelConfig) -> list[str]:
    """The [model] settings of `cfg` that a Hugging Face Llama has no way to express (LLAMA_SETTINGS), each a `refusal`
    that says what a model trained to be exported sets instead."""
    return [
        refusal(f"model.{s.ours}", getattr(cfg, s.ours), f"set model.{s.ours} = {_shown(s.llama)}", s.note)
        for s in LLAMA_SETTINGS
        if s.ours and not s.folds and getattr(cfg, s.ours) not in (s.llama, *s.same)
    ]


def hf_llama_tied(cfg: ModelConfig) -> bool:
    """Whether the Llama export of `cfg` ties its head to its table: as trained, unless the table holds the folded
    embedding norm."""
    return cfg.tie_embeddings and not cfg.embedding_norm


def hf_llama_config(cfg: ModelConfig, eot_id: int, dtype_name: str) -> dict:
    """config.json for LlamaForCausalLM with the same shape and numerics as `cfg`, its weights in `dtype_name`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        **{s.hf: s.hf_value for s in LLAMA_SETTINGS if s.hf},
        **{n.hf: n.value(cfg) for n in LLAMA_NUMBERS},
        "rope_scaling": None,
        "tie_word_embeddings": hf_llama_tied(cfg),
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype_name,
    }


def hf_llama_model_config(directory: str | os.PathLike[str], base: ModelConfig) -> ModelConfig:
    """`base` with the shape and numerics of the Hugging Face Llama in `directory` (its config.json) and the settings
    every Llama has; UsageError naming the file, and each key and value the transformer cannot reproduce (the
    settings, RoPE scaling), or the first number that is not one of the right type."""
    path = Path(directory) / "config.json"
    if not path.exists() and any((Path(directory) / name).exists() for name in ("config.toml", "checkpoints")):
        raise UsageError(
            f"model.init_from = {directory}: a fasttrain run or weights folder, where it takes a Hugging Face Llama "
            f"folder; make one with `fasttrain export {directory} --hf --out DIR` and start from DIR"
        )
    raw = read_json_object(path)
    refused = [
        refusal(s.hf, raw.get(s.hf), s.why)
        for s in LLAMA_SETTINGS
        if s.hf and (raw.get(s.hf, None if s.required else s.hf_value) != s.hf_value)
    ]
    for key in ("rope_scaling", "rope_parameters"):  # transformers 5 keeps rope_theta in rope_parameters
        rope = raw.get(key)
        if rope is not None and (
            not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default"
        ):
            refused.append(refusal(key, rope, "only plain RoPE, rope_type default, is reproduced"))
    if refused:
        raise _refused(path, *refused)
    sets: dict[str, Any] = {s.ours: s.llama for s in LLAMA_SETTINGS if s.ours and not s.kept}
    for number in LLAMA_NUMBERS:
        value = _read_number(path, raw, number, replace(base, **sets))
        if number.ours:
            sets[number.ours] = value
    return replace(base, **sets, tie_embeddings=_flag(path, raw, "tie_word_embeddings"))


def _read_number(path: Path, raw: dict, number: LlamaNumber, model: ModelConfig) -> int | float:
    """`number` read from the config.json `raw` at `path`, `model` holding the numbers read before it; UsageError naming
    the file, the key and the value where it is not a finite number above 0, with `integer` a whole one (64.0 is 64;
    64.9 is refused, never cut to 64), or for a derived number not what the others give."""
    nested = raw.get(number.within) if number.within else None
    where, key = (
        (nested, f"{number.within}.{number.hf}")
        if isinstance(nested, dict) and number.hf in nested
        else (raw, number.hf)
    )
    value: Any = where.get(number.hf)
    if number.hf not in where and number.absent is not None:
        value = number.absent
    elif value is None and number.implied:  # what the others give it: the number itself unset (0) in `model`
        unset: dict[str, Any] = {number.ours: 0} if number.ours else {}
        value = number.value(replace(model, **unset))
    elif not _positive(value, number.integer):
        why = "missing" if number.hf not in where else f"not a positive {'integer' if number.integer else 'number'}"
        raise _refused(path, refusal(key, value, why))
    if not number.ours and value != number.value(model):
        raise _refused(path, refusal(key, value, f"must be {number.derived} = {number.value(model)} here"))
    return int(value) if number.integer else float(value)


def _positive(value: object, integer: bool) -> bool:
    """Whether a config.json `value` is a finite number above 0 (with `integer`, a whole one): not a bool, a string,
    a list or null."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return False
    return not integer or value == int(value)


def _flag(path: Path, raw: dict, key: str) -> bool:
    """raw[key] of the config.json at `path`, true or false (missing or null: false); UsageError naming the file, the
    key and the value otherwise ("false", a string, is not false)."""
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise _refused(path, refusal(key, value, "not true or false"))
    return bool(value)


def read_json_object(path: Path) -> dict:
    """The JSON object in the config.json at `path` (at most 1 MiB); UsageError naming it if it is not one."""
    try:
        raw = json.loads(read_regular(path, 1 << 20, "config.json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a JSON object")
    return raw
