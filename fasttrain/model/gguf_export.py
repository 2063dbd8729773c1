"""A trained model as one GGUF file that llama.cpp loads (architecture "llama"), with its tokenizer.

Imports from fasttrain: config, formats.tokenizer, model.llama, model.weights, system.atomic, system.errors.

The contract of `write_gguf`: the tensors are the Hugging Face Llama export's (weights.hf_llama_tensors, so its
folds apply; llama.beyond_llama's options are refused) under llama.cpp's names (token_embd, blk.N.attn_q, ...,
output_norm, output; no output for tied embeddings: llama.cpp reads token_embd then; a name it has none for is
refused), the metadata llama.LLAMA_NUMBERS' (each number's gguf.GGUFWriter method). llama.cpp rotates interleaved
pairs (2i, 2i+1) of a head where fasttrain and Hugging Face rotate (i, i + head_dim / 2), so the rows of attn_q and
attn_k are permuted to match (as llama.cpp's own converter does). Matrices are fp32, fp16, bf16 or q8_0 (one that
gguf cannot quantize to q8_0, rows not whole 32-value blocks, stays fp16); 1-D tensors (norms) stay fp32. The
tokenizer goes as llama.cpp's "gpt2" byte-level BPE: the vocabulary (padded to the model's with unused tokens),
merges, the pre-tokenizer "gpt-2" (GPT-2's split regex, fasttrain's own), end-of-text as bos and eos (a model continued
from a Hugging Face Llama: its config.json's, as --hf writes them; a list's first), no bos added;
a tokenizer llama.cpp would split otherwise is refused. The `gguf` library is an extra (`pip install
'fasttrain[gguf]'`), imported only here.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttrain.config import Config, ModelConfig, check_vocab
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.llama import LLAMA_NUMBERS, beyond_llama
from fasttrain.model.weights import export_token_ids, first_token_id, hf_llama_tensors
from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import UsageError

GGUF_DTYPES = ("fp32", "fp16", "bf16", "q8_0")


def _gguf() -> Any:
    """The gguf library; UsageError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UsageError("--gguf needs the gguf library: pip install 'fasttrain[gguf]'") from None
    return gguf


def check_replaceable(path: Path) -> None:
    """UsageError unless a GGUF file may be written at `path`: nothing there, or a GGUF file (an earlier export, known
    by gguf's magic in its first bytes). Anything else there (a run's weights or config, a checkpoint, a data shard)
    was not written by an export and is never replaced."""
    if not os.path.lexists(path):
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not hang the open
    except OSError as e:
        raise UsageError(f"--out {path}: cannot read what is there ({e.strerror or e}); name a new file") from None
    with os.fdopen(fd, "rb") as f:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        magic = f.read(4) if regular else b""
    if magic != int(_gguf().GGUF_MAGIC).to_bytes(4, "little"):
        raise UsageError(
            f"--out {path}: exists and is not a GGUF file; --gguf replaces only an earlier GGUF export: name a new "
            "file or remove it first"
        )


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """`weight` (heads * head_dim, d) with each head's rows reordered from rotate-half pairs (i, i + head_dim / 2)
    to interleaved pairs (2i, 2i + 1): row 2i is row i, row 2i + 1 is row i + head_dim / 2."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def gpt2_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """The tokens, token types and merges llama.cpp's "gpt2" tokenizer takes for `tokenizer`, padded to `vocab_size`
    tokens; UsageError (naming the file) for a tokenizer it would not split and merge alike."""
    spec = json.loads(tokenizer.tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if spec["model"].get("type") != "BPE" or spec.get("normalizer") or pre.get("type") != "ByteLevel":
        raise UsageError(f"{tokenizer.source}: --gguf writes byte-level BPE tokenizers only, not this one")
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise UsageError(
            f"{tokenizer.source}: pre-tokenizer {json.dumps(pre)[:120]} is not GPT-2's split, the one llama.cpp's "
            '"gpt-2" pre-tokenizer does; --gguf cannot write it'
        )
    special = {i: t.special for i, t in tokenizer.tok.get_added_tokens_decoder().items()}
    gguf = _gguf()
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.tok.id_to_token(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        kind = "NORMAL" if i not in special else "CONTROL" if special[i] else "USER_DEFINED"
        types.append(int(gguf.TokenType[kind if token is not None else "UNUSED"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The model's state dict under llama.cpp's tensor names, in fp32, attn_q and attn_k rows interleaved."""
    names = _gguf().get_tensor_name_map(_gguf().MODEL_ARCH.LLAMA, cfg.n_layers)
    out = {}
    for name, tensor in hf_llama_tensors(state, cfg).items():
        theirs = names.get_name(name, try_suffixes=(".weight",))
        if theirs is None:  # a tensor llama.cpp's Llama would not read: the file would load without it
            raise UsageError(f"--gguf: llama.cpp's Llama has no tensor for {name}; this model cannot be written as one")
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = interleave_rope_rows(tensor, cfg.n_heads if "q_proj" in name else cfg.n_kv_heads or cfg.n_heads)
        out[theirs] = tensor.detach().float().cpu().numpy()
    return out


def write_gguf(
    state: dict[str, torch.Tensor],
    cfg: Config,
    path: str | os.PathLike[str],
    dtype: str = "fp32",
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the model `state` (trained with `cfg`) and its tokenizer (the tokenizer.json at `tokenizer`, default
    data.dir's) as the GGUF file `path` in `dtype` (GGUF_DTYPES), atomically (a failure leaves no part of a file);
    all is checked before it is written, `path` too: only a GGUF file is replaced (check_replaceable)."""
    if beyond := beyond_llama(cfg.model):
        raise UsageError(f"--gguf: llama.cpp's Llama cannot express {', '.join(beyond)}")
    gguf = _gguf()
    check_replaceable(Path(path))
    model = cfg.model
    vocabulary = Tokenizer.load(tokenizer if tokenizer is not None else Path(cfg.data.dir) / "tokenizer.json")
    check_vocab(model.vocab_size, vocabulary.vocab_size, vocabulary.source)
    tokens, types, merges = gpt2_vocabulary(vocabulary, model.vocab_size)
    writer = gguf.GGUFWriter(None, "llama")
    for number in LLAMA_NUMBERS:
        getattr(writer, number.gguf)(number.value(model))
    file_types = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(int(gguf.LlamaFileType[file_types[dtype]]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, ids in export_token_ids(cfg, vocabulary.eot_id).items():  # GGUF holds one id: a list's first
        first = first_token_id(ids)
        if first is not None:  # none where the source's is null
            getattr(writer, f"add_{key}")(first)
    writer.add_add_bos_token(False)
    quant = gguf.GGMLQuantizationType
    wanted = {"fp32": quant.F32, "fp16": quant.F16, "bf16": quant.BF16, "q8_0": quant.Q8_0}[dtype]
    for name, array in gguf_tensors(state, model).items():
        qtype = quant.F32 if array.ndim == 1 else wanted
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # rows that are not whole blocks of the type (q8_0's 32 values): fp16
            qtype = quant.F16
            data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)

    def write(f: Any) -> None:  # the writer opens the temporary file by name; fsync covers its writes too
        writer.write_header_to_file(Path(f.name))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomically(path, write, what="write the GGUF file")
