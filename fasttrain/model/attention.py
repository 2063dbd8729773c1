"""Causal self-attention: rotary position embeddings, the attention kernels (SDPA's backends, flex_attention), document
masks, and the KV cache that generation extends one token at a time.

Imports from fasttrain: config.

- Causal self-attention through `F.scaled_dot_product_attention` (flash kernels on GPU), RoPE on queries and keys, and
  grouped-query attention: `n_kv_heads` key/value heads shared by `n_heads` queries.
- Document masking: a token attends only to earlier tokens of its own document (flex_attention's block-sparse kernels on
  GPU, a boolean mask otherwise). Positions are not restarted per document: RoPE depends only on the distance between
  query and key.
- QK-norm (model.qk_norm): each head's queries and keys RMS-normalised, without weights, before RoPE.
- Value embedding (model.value_embeddings): a block given one adds the tokens' rows of a table of its own to the values,
  each key/value head's share scaled by a gate read from the block input.
- A KV cache (`KVCache`): the prompt runs once, then each new token is a forward of length 1 over the kept keys and
  values (the sampling loop: generation.py).

RoPE uses the "rotate half" layout, Hugging Face Llama's, so exported weights need no permutation.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fasttrain.config import ModelConfig

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (max_seq_len, head_dim / 2), in fp32: pair i of a head rotates at
    frequency theta^(-2i / head_dim), position p turning it by p x that."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, heads, T, head_dim) by the angles of its positions; cos/sin are (T, head_dim / 2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


def use_flex_attention(device: torch.device) -> bool:
    """Whether document masks are flex_attention BlockMasks on `device` (else explicit SDPA masks).
    Only on GPU: there it is compiled into block-sparse kernels; on CPU it would run unfused."""
    return device.type == "cuda"


def flex_attention_on(device_type: str) -> Callable[..., Any]:
    """flex_attention, compiled on GPU. Inside a compiled model it is compiled with the model; outside one
    on CPU (tests) it runs uncompiled, which materialises the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or device_type != "cuda":
        return flex_attention
    return _compiled_flex_attention()


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


# train.attention -> the F.scaled_dot_product_attention backend it pins ("auto" and "flex": none).
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "fa3": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_backend(attention: str) -> contextlib.AbstractContextManager:
    """The context that pins SDPA to `attention`'s backend (nothing for "auto" and "flex")."""
    backend = SDPA_BACKENDS.get(attention)
    return sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()


@functools.lru_cache(maxsize=8)
def causal_block_mask(length: int, device: torch.device) -> BlockMask:
    """flex_attention's BlockMask of plain causal attention over `length` positions (train.attention = "flex")."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, k: q >= k, None, None, length, length, device=device)


def document_mask(documents: torch.Tensor, flex: bool) -> torch.Tensor | BlockMask:
    """The mask where a query sees the keys at or before it in its own document (documents[b, i]: row b's token i's, (B,
    T)): a BlockMask when `flex`, else a bool tensor (B, 1, T, T) for SDPA."""
    B, T = documents.shape
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, k):
            return (q >= k) & (documents[b, q] == documents[b, k])

        return create_block_mask(same_document_causal, B, None, T, T, device=documents.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (documents[:, None, :, None] == documents[:, None, None, :]) & causal


VALUE_GATE_CHANNELS = 12  # the channels of a block's input that its value-embedding gate reads (nanochat's)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: str = "auto", value_embedding: bool = False):
        super().__init__()
        self.attention = attention  # train.attention: the SDPA backend pinned, if any
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        # One matmul for queries, keys and values: [q heads | k heads | v heads].
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.qk_norm, self.norm_eps = cfg.qk_norm, cfg.norm_eps
        # The value embedding's gate per key/value head (None: this block takes no value embedding)
        self.gate_channels = min(VALUE_GATE_CHANNELS, cfg.d_model)
        self.value_gate = nn.Linear(self.gate_channels, self.n_kv_heads, bias=False) if value_embedding else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None = None,
        cache: LayerCache | None = None,
        value_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask`: None (causal), a `document_mask`, or with a `cache` a bool (T, cached + T). `value_embedding` (B, T,
        n_kv_heads x head_dim): added to the values through 3 sigmoid(value_gate(x[..., :12])) per head."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = (
                F.rms_norm(q, (self.head_dim,), eps=self.norm_eps),
                F.rms_norm(k, (self.head_dim,), eps=self.norm_eps),
            )
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.value_gate is not None and value_embedding is not None:
            gate = 3 * torch.sigmoid(self.value_gate(x[..., : self.gate_channels]))  # (B, T, n_kv_heads)
            added = gate.unsqueeze(-1) * value_embedding.view(B, T, self.n_kv_heads, self.head_dim)
            v = v + added.to(v.dtype)  # the table is fp32 under autocast; the values keep autocast's dtype
        v = v.transpose(1, 2)
        if cache is not None:  # generation: the queries also see every earlier position's keys and values
            k, v = cache.store(k, v)
        gqa = self.n_kv_heads != self.n_heads
        if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask
            # Compiled flex_attention has given wrong results for a strided v (a view into qkv) beside
            # contiguous q and k (torch 2.13, inductor on CPU): hand it three contiguous tensors.
            y = flex_attention_on(q.device.type)(
                q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask, enable_gqa=gqa
            )
        else:
            with sdpa_backend(self.attention):
                y = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=mask is None,
                    dropout_p=self.dropout if self.training else 0.0,
                    enable_gqa=gqa,
                )
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class KVCache:
    """Every layer's keys and values for the first `length` positions being generated: (B, kv_heads, max_seq_len,
    head_dim), allocated by the first `store`; a forward appends and advances `length`."""

    def __init__(self, cfg: ModelConfig):
        self.max_len = cfg.max_seq_len
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.length = 0
        self.last_embedding: torch.Tensor | None = None  # (B, 1, d_model): the smear's previous token (model.smear)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put `layer`'s new keys and values k, v (B, kv_heads, T, head_dim) at positions length..length + T;
        returns that layer's keys and values of every position so far, (B, kv_heads, length + T, head_dim)."""
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:  # both, at once
            B, heads, _, head_dim = k.shape
            keys = self.keys[layer] = k.new_empty(B, heads, self.max_len, head_dim)
            values = self.values[layer] = v.new_empty(B, heads, self.max_len, head_dim)
        end = self.length + k.shape[2]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


class LayerCache(NamedTuple):
    """One layer's view of a KVCache, as Attention takes it."""

    cache: KVCache
    layer: int

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.store(self.layer, k, v)
