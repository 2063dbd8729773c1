"""A decoder-only, LLaMA-style transformer language model.

Imports from fasttrain: config, model.attention, model.fp8.

    tokens -> embedding -> n_layers x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> output -> logits

- Pre-norm residual blocks with RMSNorm, no biases. Each residual add is done by the norm after it: `norm(delta,
  stream)` returns the normalised new stream and the stream, so on GPU one kernel (kernels.RMSNorm, `norm_kernel=True`)
  does both; the state_dict is the same.
- Attention (RoPE, grouped-query heads, document masks, QK-norm) and its KV cache: attention.py.
- SwiGLU MLP down(silu(gate(x)) * up(x)) at 8/3 x d_model rounded up to `multiple_of` (a 4x GELU MLP's parameters), or
  (model.mlp = "relu2") down(relu(up(x))^2) at 4 x d_model.
- Options: RMS normalisation of the embedding (model.embedding_norm); tied embedding and output weights; value
  embeddings (model.value_embeddings: alternate blocks, the last included, add a table of their own to attention's
  values); per-block scalars (model.residual_scalars: block i reads stream_scales[i] x stream + embedding_scales[i] x
  x0); smear (model.smear: each position adds a gated share of the previous token's embedding); backout (model.backout:
  the stream after the middle block, scaled, taken off the last one's); a soft-cap of the logits (model.logit_softcap:
  cap x tanh(logits / cap)).
- Activation checkpointing per block (`checkpointing`): "full" keeps only a block's inputs and reruns it in backward;
  "selective" keeps its matmuls' and attention's outputs and recomputes only the cheap elementwise work between them.
- Init: N(0, 0.02), the projections into the residual stream scaled by 1/sqrt(2 n_layers) so its variance does not grow
  with depth (GPT-2), or at zero (model.zero_init_projections). The loss on random tokens starts near ln(vocab_size).
"""

from __future__ import annotations

import functools
import math
from dataclasses import astuple, replace
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from fasttrain.config import ModelConfig
from fasttrain.model.attention import (
    Attention,
    KVCache,
    LayerCache,
    causal_block_mask,
    document_mask,
    rope_tables,
    use_flex_attention,
)
from fasttrain.model.fp8 import use_float8

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

INIT_STD = 0.02
SMEAR_GATE_CHANNELS = 24  # the channels of a position's embedding its smear gate reads (nanochat's)


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """MLP hidden width: `cfg.ffn_hidden`, or 8/3 x d_model (SwiGLU) or 4 x d_model (ReLU²) rounded up to a
    multiple of `multiple_of`: either way about 8 d_model² parameters."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    width = 4 * cfg.d_model if cfg.mlp == "relu2" else 8 * cfg.d_model / 3
    return cfg.multiple_of * math.ceil(width / cfg.multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)  # gate and up in one matmul
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ReLU2(nn.Module):
    """down(relu(up(x))²): no gate, so a 4 x d_model hidden width holds SwiGLU's parameters in two matmuls."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


class ResidualRMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm with kernels.RMSNorm's forward: `norm(x)`, or `norm(x, residual)` ->
    (norm(x + residual), x + residual). The plain-PyTorch twin of the fused kernel."""

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...
    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return super().forward(x)
        h = x + residual
        return super().forward(h), h


def rms_norm_module(cfg: ModelConfig, kernel: bool) -> nn.Module:
    """An RMSNorm over d_model: the fused Triton kernel's module, or the PyTorch one."""
    if not kernel:
        return ResidualRMSNorm(cfg.d_model, eps=cfg.norm_eps)
    from fasttrain_kernels.rms_norm import RMSNorm  # only when asked for

    return RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def value_embedding_layers(cfg: ModelConfig) -> list[int]:
    """The blocks that take a value embedding: every other one, counted back from the last (none without
    model.value_embeddings)."""
    return [i for i in range(cfg.n_layers) if i % 2 == (cfg.n_layers - 1) % 2] if cfg.value_embeddings else []


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, norm_kernel: bool = False, attention: str = "auto", value_embedding: bool = False
    ):
        super().__init__()
        self.attn_norm = rms_norm_module(cfg, norm_kernel)
        self.attn = Attention(cfg, attention, value_embedding)
        self.mlp_norm = rms_norm_module(cfg, norm_kernel)
        self.mlp = ReLU2(cfg) if cfg.mlp == "relu2" else SwiGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        delta: torch.Tensor | None,
        stream: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None = None,
        cache: LayerCache | None = None,
        value_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is `stream + delta` (`stream` alone first); returns this block's (delta, stream), its
        last add left to the next norm. `value_embedding`: this block's table's rows, if any."""
        if delta is None:
            y = self.attn_norm(stream)
        else:
            y, stream = self.attn_norm(delta, stream)
        y, stream = self.mlp_norm(self.dropout(self.attn(y, cos, sin, mask, cache, value_embedding)), stream)
        return self.dropout(self.mlp(y)), stream


# The ops whose outputs "selective" activation checkpointing keeps: the matmuls and attention, which
# are most of a block's compute; everything else in the block is recomputed in backward.
_KEPT_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def run_block(block: nn.Module, checkpointing: str, *args: Any) -> Any:
    """`block(*args)`, its activations recomputed in backward as `checkpointing` says ("none", "full", "selective");
    dropout draws the same masks again (the checkpoint restores the RNG state)."""
    if checkpointing == "none" or not torch.is_grad_enabled():
        return block(*args)
    if checkpointing == "full":
        return checkpoint(block, *args, use_reentrant=False)
    return checkpoint(block, *args, use_reentrant=False, context_fn=_selective_contexts)


def num_params(cfg: ModelConfig) -> int:
    """Trainable parameters of `Transformer(cfg)` (a tied matrix counted once), counted on the model's own
    modules built on the meta device (shapes, no memory); see `_counted`."""
    return _at_depth(cfg)[0]


def matmul_params(cfg: ModelConfig) -> int:
    """The parameters of `Transformer(cfg)` a token's compute runs through: all but the lookup tables (a row read each).
    What `flops_per_token` counts and the sizing weighs tokens against (as nanochat)."""
    total, lookups = _at_depth(cfg)
    return total - lookups


def _at_depth(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, those in lookup tables) of `Transformer(cfg)`, from `_counted`'s coefficients."""
    n = cfg.n_layers
    return tuple(a + b * n + c * ((n + 1) // 2) for a, b, c in _counted(astuple(replace(cfg, n_layers=1))))  # type: ignore[return-value]


@functools.cache
def _counted(one_layer: tuple) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(a, b, c) of a + b n + c ceil(n / 2), at depth n, for all parameters and for lookup tables, of the model of
    `one_layer`'s other fields: solved from meta models of depth 1 to 3, cached."""
    counts = []
    for depth in (1, 2, 3):
        with torch.device("meta"):
            model = Transformer(replace(ModelConfig(*one_layer), n_layers=depth))
        tables = (m.weight for m in model.modules() if isinstance(m, nn.Embedding))
        counts.append((model.num_params(), sum(w.numel() for w in tables if w is not model.output.weight)))
    coefficients = []
    for t1, t2, t3 in zip(*counts):
        b = t2 - t1  # depth 1 -> 2 adds a block, no other-block piece; 2 -> 3 adds both
        c = t3 - t2 - b
        coefficients.append((t1 - b - c, b, c))
    return coefficients[0], coefficients[1]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of `Transformer(cfg)`, PaLM's estimate 6N + 12 L H Q T: N the
    parameters in matmuls (`matmul_params`), the second term attention's over a context of `seq_len`; an ensemble's
    (model.members, model/ensemble.py), the members' sum."""
    n = matmul_params(cfg)
    return (6 * n + 12 * cfg.n_layers * cfg.n_heads * (cfg.d_model // cfg.n_heads) * seq_len) * max(cfg.members, 1)


class Transformer(nn.Module):
    """The language model: `forward(tokens (B, T)) -> logits (B, T, vocab_size)`; its training loss is
    objective.NextTokenLoss. None of these change the results (up to rounding) or the weights: `norm_kernel` runs the
    RMSNorms through kernels.RMSNorm; `checkpointing` is "none", "full" or "selective" (`run_block`); `attention` the
    kernel (train.attention); `fp8` which matmuls run in float8 (train.fp8)."""

    rope_cos: torch.Tensor  # buffers (register_buffer in __init__), declared for the type checker
    rope_sin: torch.Tensor

    def __init__(
        self,
        cfg: ModelConfig,
        norm_kernel: bool = False,
        checkpointing: str = "none",
        attention: str = "auto",
        fp8: str = "none",
    ):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.checkpointing = checkpointing
        self.attention = attention
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        valued = value_embedding_layers(cfg)
        self.blocks = nn.ModuleList(Block(cfg, norm_kernel, attention, i in valued) for i in range(cfg.n_layers))
        kv_width = (cfg.n_kv_heads or cfg.n_heads) * (cfg.d_model // cfg.n_heads)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(cfg.vocab_size, kv_width) for i in valued})
        if cfg.residual_scalars:  # their values are set by reset_parameters, as the scalars' below
            self.stream_scales = nn.Parameter(torch.ones(cfg.n_layers))
            self.embedding_scales = nn.Parameter(torch.zeros(cfg.n_layers))
        if cfg.smear:
            self.smear_gate = nn.Linear(min(SMEAR_GATE_CHANNELS, cfg.d_model), 1, bias=False)
            self.smear_scale = nn.Parameter(torch.zeros(1))
        if cfg.backout:
            self.backout_scale = nn.Parameter(torch.zeros(1))
        self.norm = rms_norm_module(cfg, norm_kernel)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        # Not saved in checkpoints: recomputed from the config, and kept in fp32 whatever the model's dtype.
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        use_float8(self, fp8)

    def reset_parameters(self) -> None:
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name in ("stream_scales", "embedding_scales"):  # nanochat's: early blocks lean more on both
                start, end = (1.15, 1.05) if name == "stream_scales" else (0.2, 0.05)
                with torch.no_grad():
                    p.copy_(torch.linspace(start, end, p.numel()))  # one block: just `start`
            elif name in ("smear_scale", "backout_scale"):  # the smear starts off, the backout at 0.2
                nn.init.constant_(p, 0.2 if name == "backout_scale" else 0.0)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                projection = name.endswith(("attn.out.weight", "mlp.down.weight"))
                if projection and self.cfg.zero_init_projections:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=residual_std if projection else INIT_STD)

    def hidden(
        self, tokens: torch.Tensor, documents: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """The final normalised hidden states (B, T, d_model). `documents` (B, T): each token's document id, for
        document masking (None: causal). `cache`: keys and values before `tokens`, extended."""
        T = tokens.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        mask = None
        if documents is not None:  # flex_attention has no attention dropout
            flex = use_flex_attention(tokens.device) and not (self.training and self.cfg.dropout)
            mask = document_mask(documents, flex)
        elif start:  # SDPA's is_causal aligns the queries with the first keys: new tokens after a cache need a mask
            mask = torch.ones(T, start + T, dtype=torch.bool, device=tokens.device).tril(start)
        elif self.attention == "flex":
            mask = causal_block_mask(T, tokens.device)
        delta, stream = None, self.embed(tokens)
        if self.cfg.embedding_norm:
            stream = F.rms_norm(stream, (self.cfg.d_model,), eps=self.cfg.norm_eps)
        if self.cfg.smear:
            stream = self.smeared(stream, cache)
        x0, middle = stream, None
        for i, block in enumerate(self.blocks):
            if self.cfg.residual_scalars:  # the add the next norm would do, done here to scale the stream first
                stream = stream if delta is None else stream + delta
                stream, delta = self.stream_scales[i] * stream + self.embedding_scales[i] * x0, None
            table = self.value_embeds[str(i)] if str(i) in self.value_embeds else None
            delta, stream = run_block(
                block,
                self.checkpointing,
                delta,
                stream,
                cos,
                sin,
                mask,
                None if cache is None else LayerCache(cache, i),
                None if table is None else table(tokens),
            )
            if self.cfg.backout and i == len(self.blocks) // 2:
                middle = stream if delta is None else stream + delta
        if middle is not None:
            stream = stream - self.backout_scale * middle
        if cache is not None:
            cache.length += T
        return self.norm(delta, stream)[0]

    def smeared(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """x (B, T, d_model) plus smear_scale x sigmoid(smear_gate(x[t][:24])) x x[t-1] at each t; the first position
        has nothing before it but, after a cache, the cache's last embedding."""
        before = x.new_zeros(x.shape[0], 1, x.shape[2]) if cache is None or not cache.length else cache.last_embedding
        if cache is not None:
            cache.last_embedding = x[:, -1:]
        assert before is not None
        previous = torch.cat([before, x[:, :-1]], dim=1)
        gate = torch.sigmoid(self.smear_gate(x[..., : self.smear_gate.in_features]))
        return x + self.smear_scale * gate * previous

    def forward(
        self, tokens: torch.Tensor, documents: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) of `tokens` (B, T). `documents` (B, T) masks attention to each
        token's own document (see `document_mask`). `cache`: see `hidden`."""
        return self.logits(self.hidden(tokens, documents, cache))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output projection of `hidden` (..., d_model), soft-capped where model.logit_softcap says."""
        logits = self.output(hidden)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def new_cache(self) -> KVCache:
        """An empty KV cache for `hidden` to fill (generation)."""
        return KVCache(self.cfg)

    def num_params(self) -> int:
        """Trainable parameters, a tied matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of this model: see the module's `flops_per_token`."""
        return flops_per_token(self.cfg, seq_len)
