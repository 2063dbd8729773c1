"""Weights on disk: safetensors files in fasttrain's layout or in Hugging Face's Llama layout.

Imports from fasttrain: config, formats.tokenizer, model.ensemble, model.llama, model.transformer, system.atomic,
system.errors.

`python -m fasttrain.export` writes them from a checkpoint; a finished run writes its final/ weights.

fasttrain layout: DIR/model.safetensors with the Transformer's parameter names (a tied output matrix stored once, as
embed.weight), config.toml and tokenizer.json; `load_exported(DIR)` rebuilds the model. Hugging Face layout (--hf):
config.json for LlamaForCausalLM, model.safetensors with Llama's names (the fused qkv and gate_up split apart),
tokenizer.json and tokenizer_config.json (a model continued from a Hugging Face one keeps its bos/eos ids and
generation_config.json), so `AutoModelForCausalLM.from_pretrained(DIR)` loads it; no weight is permuted (RoPE is
rotate-half already). An export is written into a temporary folder first, then moved into place (system/atomic.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import safetensors.torch
import tokenizers
import torch
import torch.nn.functional as F

from fasttrain.config import Config, ModelConfig, load_config, save_config
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.ensemble import Ensemble, build_model
from fasttrain.model.llama import beyond_llama, hf_llama_config, read_json_object
from fasttrain.model.transformer import Transformer, ffn_hidden_size
from fasttrain.system.atomic import folder_atomically, read_regular, write_atomically
from fasttrain.system.errors import UsageError

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_ONLY = ("config.json", "tokenizer_config.json", "generation_config.json")  # one layout's files, not the other's
_FASTTRAIN_ONLY = ("config.toml",)


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write `tensors` (names to tensors on any device) to `path` in the safetensors format, atomically."""
    data = safetensors.torch.save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, metadata)
    return write_atomically(path, lambda f: f.write(data), what="write weights")


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at `path`, on the CPU; UsageError if it is missing or not one."""
    try:
        return safetensors.torch.load(Path(path).read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # the library's SafetensorError for any malformed header or data
        raise UsageError(f"{path}: not a safetensors file ({' '.join(str(e).split())[:200]})") from None


def fasttrain_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict with a tied output matrix left out (it is embed.weight, an ensemble member's too)."""
    return {k: v for k, v in state.items() if not (cfg.tie_embeddings and k.split(".")[-2:] == ["output", "weight"])}


def hf_llama_layout(cfg: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Each parameter of the Transformer of `cfg` and the Hugging Face Llama tensors it is made of, in order, with
    their shapes (q, k, v and gate, up are fused along the rows here); a tied output matrix is embed.weight (but for
    hf_llama_tensors' folded embedding)."""
    head_dim = cfg.d_model // cfg.n_heads
    d, q, kv = cfg.d_model, cfg.n_heads * head_dim, (cfg.n_kv_heads or cfg.n_heads) * head_dim
    ffn = ffn_hidden_size(cfg)
    layout: dict[str, list[tuple[str, tuple[int, ...]]]] = {
        "embed.weight": [("model.embed_tokens.weight", (cfg.vocab_size, d))],
        "norm.weight": [("model.norm.weight", (d,))],
    }
    if not cfg.tie_embeddings:
        layout["output.weight"] = [("lm_head.weight", (cfg.vocab_size, d))]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        layout |= {
            ours + "attn_norm.weight": [(hf + "input_layernorm.weight", (d,))],
            ours + "attn.qkv.weight": [
                (attn + "q_proj.weight", (q, d)),
                (attn + "k_proj.weight", (kv, d)),
                (attn + "v_proj.weight", (kv, d)),
            ],
            ours + "attn.out.weight": [(attn + "o_proj.weight", (d, q))],
            ours + "mlp_norm.weight": [(hf + "post_attention_layernorm.weight", (d,))],
            ours + "mlp.gate_up.weight": [(mlp + "gate_proj.weight", (ffn, d)), (mlp + "up_proj.weight", (ffn, d))],
            ours + "mlp.down.weight": [(mlp + "down_proj.weight", (d, ffn))],
        }
    return layout


def hf_llama_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict under Hugging Face Llama's parameter names. model.embedding_norm is folded into the
    table: the model RMS-normalises each token's row before the first block, a function of the row alone, so the
    Llama's table holds the rows normalised (the same op, row by row: exact). A tied head then keeps the rows as
    trained, so the Llama's head is untied (llama.py's `hf_llama_tied`)."""
    out: dict[str, torch.Tensor] = {}
    for ours, parts in hf_llama_layout(cfg).items():
        out.update(zip([name for name, _ in parts], state[ours].split([shape[0] for _, shape in parts])))
    if cfg.embedding_norm:
        table = state["embed.weight"]
        out["model.embed_tokens.weight"] = F.rms_norm(table, (table.shape[-1],), eps=cfg.norm_eps)
        if cfg.tie_embeddings:
            out["lm_head.weight"] = table
    return out


def read_hf_llama_weights(directory: str | os.PathLike[str], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of the Hugging Face Llama in `directory` as a state dict of the Transformer of `cfg`
    (hf_llama_layout); UsageError naming a missing file or tensor, a wrong shape, a NaN or infinity."""
    directory = Path(directory)
    theirs: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}  # the file each tensor came from, for the errors below
    for path in _weight_files(directory):
        for name, tensor in read_safetensors(path).items():
            theirs[name], where[name] = tensor, path

    def take(*named: tuple[str, tuple[int, ...]]) -> torch.Tensor:
        for name, shape in named:
            if name not in theirs:
                raise UsageError(f"{directory}: its weights have no {name}")
            tensor = theirs[name]
            if tuple(tensor.shape) != shape:
                raise UsageError(
                    f"{where[name]}: {name} has shape {list(tensor.shape)}, but "
                    f"{directory / 'config.json'} gives {list(shape)}"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UsageError(f"{where[name]}: {name} holds NaN or infinite values; a run cannot start from it")
        return torch.cat([theirs[name] for name, _ in named])

    state = {ours: take(*parts) for ours, parts in hf_llama_layout(cfg).items()}
    if cfg.tie_embeddings:
        state["output.weight"] = state["embed.weight"]
    return state


def _weight_files(directory: Path) -> list[Path]:
    """The model's safetensors files in `directory`: model.safetensors, or the shards its index lists; UsageError for an
    index naming a file outside the folder."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        if not (directory / "model.safetensors").is_file():
            raise UsageError(f"{directory}: holds no model.safetensors or model.safetensors.index.json")
        return [directory / "model.safetensors"]
    try:
        weight_map = json.loads(read_regular(index, 64 << 20, "index"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    for name in names:
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise UsageError(f"{index}: weight_map names {json.dumps(name)}, not a file inside {directory}")
    return [directory / name for name in names]


def check_hf_tokenizer(directory: str | os.PathLike[str], data_tokenizer: Tokenizer, data_file: str) -> str | None:
    """UsageError naming both files if `data_tokenizer` (from `data_file`) is not the tokenizer.json of the Hugging Face
    model in `directory`, compared by content; without one there, a note saying so."""
    theirs = Path(directory) / "tokenizer.json"
    if not os.path.lexists(theirs):
        return (
            f"model.init_from: {directory} has no tokenizer.json to compare {data_file} with; the run "
            "assumes the data was tokenized with the model's own tokenizer"
        )
    try:
        same = tokenizers.Tokenizer.from_file(str(theirs)).to_str() == data_tokenizer.tok.to_str()
    except Exception as e:  # tokenizers raises a bare Exception on a malformed or unreadable file
        raise UsageError(f"{theirs}: not a valid tokenizer.json ({' '.join(str(e).split())[:160]})") from None
    if not same:
        raise UsageError(
            f"{data_file}: not the tokenizer of model.init_from ({theirs}), so the data's token ids "
            f"are not the ones the model learned; prepare the data with --tokenizer {directory}"
        )
    return None


def export_weights(
    model_state: dict[str, torch.Tensor],
    cfg: Config,
    out_dir: str | os.PathLike[str],
    hf: bool = False,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write `model_state` (trained with `cfg`) into `out_dir`; returns the files. `tokenizer`: the tokenizer.json the
    model trained with (default `cfg.data.dir`'s), which --hf needs. All is checked before the first write
    (`_check_out_dir`); the files are written beside `out` and moved into it together, so a failure leaves `out` as it
    was."""
    out = Path(out_dir)
    if hf and (beyond := beyond_llama(cfg.model)):
        raise UsageError(
            f"--hf: a Hugging Face Llama cannot express {', '.join(beyond)}: train with those set to export it; without "
            "--hf the weights are written in fasttrain's layout"
        )
    tokenizer_file = Path(tokenizer) if tokenizer is not None else Path(cfg.data.dir) / "tokenizer.json"
    files = {"tokenizer.json": tokenizer_file.read_bytes()} if tokenizer_file.is_file() else {}
    if hf:  # Tokenizer.load: a UsageError naming the missing file, before anything is written
        files.update(_hf_files(cfg, Tokenizer.load(tokenizer_file), dtype))
    _check_out_dir(out, {"model.safetensors", *files, *([] if hf else _FASTTRAIN_ONLY)}, hf)
    tensors = hf_llama_tensors(model_state, cfg.model) if hf else fasttrain_tensors(model_state, cfg.model)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}  # folded in the precision the model trained in
    with folder_atomically(out) as folder:  # a failure (a full disk) leaves no lone model.safetensors in `out`
        written = [write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})]
        written += [_write(folder / name, data) for name, data in files.items()]
        if not hf:
            written.append(save_config(cfg, folder))
    return [out / path.name for path in written]


def _hf_files(cfg: Config, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, bytes]:
    """config.json and tokenizer_config.json of the Hugging Face layout; a model continued from one (model.init_from)
    keeps its bos/eos ids and generation_config.json, others' are end-of-text."""
    config = hf_llama_config(cfg.model, tokenizer.eot_id, str(dtype).removeprefix("torch."))
    config.update(export_token_ids(cfg, tokenizer.eot_id))
    files = {}
    source = Path(cfg.model.init_from) if cfg.model.init_from else None
    if source is not None and (source / "config.json").is_file():
        generation = source / "generation_config.json"
        if generation.is_file():
            files[generation.name] = read_regular(generation, 1 << 20, "generation config")
    elif source is not None:
        print(
            f"note: {source / 'config.json'} (model.init_from) is not there: config.json gets the end-of-text "
            "token as bos and eos, and no generation_config.json is copied",
            file=sys.stderr,
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(tokenizer, config["bos_token_id"]),
        "eos_token": _token(tokenizer, config["eos_token_id"]),
        "model_max_length": cfg.model.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    files["config.json"] = json.dumps(config, indent=2).encode()
    files["tokenizer_config.json"] = json.dumps(tokenizer_config, indent=2).encode()
    return files


def export_token_ids(cfg: Config, eot_id: int) -> dict[str, int | list[int] | None]:
    """bos_token_id and eos_token_id of a model's export (--hf, --gguf): a model continued from a Hugging Face Llama
    (model.init_from, its config.json there) keeps that config.json's, as its users prompt and stop it; the end-of-text
    token `eot_id` otherwise, and for a key the source does not have."""
    ids: dict[str, int | list[int] | None] = {"bos_token_id": eot_id, "eos_token_id": eot_id}
    source = Path(cfg.model.init_from) / "config.json" if cfg.model.init_from else None
    if source is not None and source.is_file():
        theirs = read_json_object(source)
        ids.update({key: _token_ids(source, theirs, key) for key in ids if key in theirs})
    return ids


def _token_ids(path: Path, raw: dict, key: str) -> int | list[int] | None:
    """raw[key] of the config.json at `path`: a token id, a list of them, or null; UsageError naming the file, the key
    and the value otherwise (it is written into the export's config.json, which transformers must read)."""
    value = raw[key]
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UsageError(f"{path}: {key} = {json.dumps(value)}: not a token id, a list of them or null")
    return value


def first_token_id(ids: int | list[int] | None) -> int | None:
    """The one id a config.json's bos/eos names (a list's first: transformers stops at any of them); None for null."""
    first = ids[0] if isinstance(ids, list) and ids else ids
    return first if isinstance(first, int) and not isinstance(first, bool) else None


def _token(tokenizer: Tokenizer, ids: int | list[int] | None) -> str | None:
    """The token a config.json's bos/eos id names (`first_token_id`)."""
    first = first_token_id(ids)
    return tokenizer.tok.id_to_token(first) if first is not None else None


def _check_out_dir(out: Path, writes: set[str], hf: bool) -> None:
    """UsageError unless `out` is new or holds only files `writes` names (this layout's previous export): anything else
    (the other layout's config, another model's shards or index, pytorch_model.bin) would be read beside the new
    weights. Dot files (a killed write's) are left alone."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in writes and not p.name.startswith("."))
    other_layout = [name for name in (_FASTTRAIN_ONLY if hf else _HF_ONLY) if name in foreign]
    if other_layout:
        other = "a fasttrain-layout" if hf else "a Hugging Face"
        raise UsageError(
            f"{out}: holds {other} export ({', '.join(other_layout)}); export into another directory or remove it first"
        )
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UsageError(
            f"{out}: holds {foreign[0]}{more}, which this export would not replace and a loader would "
            "read beside the new weights; export into a new or empty directory, or remove them first"
        )


def load_exported(directory: str | os.PathLike[str]) -> Transformer | Ensemble:
    """The model that `export_weights` wrote to `directory` (fasttrain layout), on the CPU."""
    directory = Path(directory)
    cfg = load_config(directory / "config.toml")
    tensors = read_safetensors(directory / "model.safetensors")
    if cfg.model.tie_embeddings:  # each embed.weight is its model's output.weight too
        tied = {k.removesuffix("embed.weight"): v for k, v in tensors.items() if k.endswith("embed.weight")}
        tensors |= {f"{prefix}output.weight": v for prefix, v in tied.items()}
    model = build_model(cfg.model)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise UsageError(
            f"{directory / 'model.safetensors'}: does not fit config.toml ({str(e).splitlines()[0]})"
        ) from None
    return model


def _write(path: Path, data: bytes) -> Path:
    return write_atomically(path, lambda f: f.write(data), what="write")
