"""Weights on disk: safetensors files in fasttrain's layout or in Hugging Face's Llama layout.

`python -m fasttrain.export` writes them from a checkpoint; a finished run writes its final/ weights.

fasttrain layout: DIR/model.safetensors with the Transformer's parameter names (a
tied output matrix stored once, as embed.weight), config.toml and tokenizer.json.
`load_exported(DIR)` rebuilds the model; plain torch code can read the file with
`read_safetensors` or the `safetensors` package.

Hugging Face layout (--hf): config.json for LlamaForCausalLM, model.safetensors with
Llama's parameter names (the fused qkv and gate_up matrices split apart),
tokenizer.json and tokenizer_config.json, so `transformers` loads DIR with
`AutoModelForCausalLM.from_pretrained(DIR)`. No weight is permuted: fasttrain's RoPE
already uses Llama's rotate-half layout.

The safetensors format is small enough to write here rather than depend on a
package: an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the tensors' raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from fasttrain.config import Config, ModelConfig, load_config, save_config
from fasttrain.data.tokenizer import Tokenizer
from fasttrain.model.transformer import Transformer, ffn_hidden_size
from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import UsageError

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_ONLY = ("config.json", "tokenizer_config.json")  # the files one layout writes and the other does not
_FASTTRAIN_ONLY = ("config.toml",)


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (names to tensors on any device) to `path` in the safetensors format, atomically."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + raw.nbytes]}
        blobs.append(raw)
        offset += raw.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad so the tensor bytes start 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw.data)

    return write_atomically(path, write, what="write weights")


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at `path`, on the CPU."""
    try:
        data = Path(path).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        body = memoryview(data)[8 + length:]
        tensors = {}
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                flat = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8)
                tensors[name] = flat.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        raise UsageError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    return tensors


def fasttrain_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict with a tied output matrix left out (it is embed.weight)."""
    return {k: v for k, v in state.items() if not (cfg.tie_embeddings and k == "output.weight")}


def hf_llama_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict under Hugging Face Llama's parameter names."""
    head_dim = cfg.d_model // cfg.n_heads
    q, kv = cfg.n_heads * head_dim, (cfg.n_kv_heads or cfg.n_heads) * head_dim
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = state[ours + "attn.qkv.weight"].split([q, kv, kv])
        gate, up = state[ours + "mlp.gate_up.weight"].chunk(2)
        out.update({
            theirs + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            theirs + "self_attn.q_proj.weight": wq,
            theirs + "self_attn.k_proj.weight": wk,
            theirs + "self_attn.v_proj.weight": wv,
            theirs + "self_attn.o_proj.weight": state[ours + "attn.out.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
        })
    return out


def hf_llama_config(cfg: ModelConfig, eot_id: int, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM with the same shape and numerics as `cfg`."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads, "head_dim": cfg.d_model // cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_weights(model_state: dict[str, torch.Tensor], cfg: Config, out_dir: str | os.PathLike[str],
                   hf: bool = False, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write `model_state` (a Transformer's state dict, trained with `cfg`) into `out_dir`; returns the files.

    The tokenizer is copied from `cfg.data.dir` when it is still there (the Hugging Face layout needs it).
    Everything is checked before the first file is written: a directory holding the other layout's
    export is refused (its config would be left beside these weights), as is --hf without the tokenizer.
    """
    out = Path(out_dir)
    stale = [name for name in (_HF_ONLY if not hf else _FASTTRAIN_ONLY) if (out / name).exists()]
    if stale:
        other = "a Hugging Face" if not hf else "a fasttrain-layout"
        raise UsageError(f"{out}: holds {other} export ({', '.join(stale)}); export into another directory "
                         "or remove it first")
    tokenizer_file = Path(cfg.data.dir) / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_file) if hf else None  # UsageError naming it, before anything is written
    state = {k: v.to(dtype) for k, v in model_state.items()}
    tensors = hf_llama_tensors(state, cfg.model) if hf else fasttrain_tensors(state, cfg.model)
    written = [write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})]
    if tokenizer_file.is_file():
        written.append(_write(out / "tokenizer.json", tokenizer_file.read_bytes()))
    if tokenizer is not None:
        eot = tokenizer.tok.id_to_token(tokenizer.eot_id)
        config = hf_llama_config(cfg.model, tokenizer.eot_id, dtype)
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
                            "model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False}
        written.append(_write(out / "config.json", json.dumps(config, indent=2).encode()))
        written.append(_write(out / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2).encode()))
    else:
        written.append(save_config(cfg, out))
    return written


def load_exported(directory: str | os.PathLike[str]) -> Transformer:
    """The Transformer that `export_weights` wrote to `directory` (fasttrain layout), on the CPU."""
    directory = Path(directory)
    cfg = load_config(directory / "config.toml")
    tensors = read_safetensors(directory / "model.safetensors")
    if cfg.model.tie_embeddings and "embed.weight" in tensors:
        tensors["output.weight"] = tensors["embed.weight"]
    model = Transformer(cfg.model)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise UsageError(f"{directory / 'model.safetensors'}: does not fit config.toml ({str(e).splitlines()[0]})") from None
    return model


def _write(path: Path, data: bytes) -> Path:
    return write_atomically(path, lambda f: f.write(data), what="write")
