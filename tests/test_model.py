"""The transformer: shapes, causality, RoPE, GQA, init, generation."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from fasttrain.config import ModelConfig, load_config
from fasttrain.data.documents import IGNORE_INDEX
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.model.attention import KVCache, apply_rope, rope_tables
from fasttrain.model.generation import filter_logits, generate, generate_text
from fasttrain.model.transformer import Transformer, ffn_hidden_size, matmul_params, num_params
from fasttrain.optimization.objective import NextTokenLoss
from tests.kernel_checks import assert_fp32_sums_close


def tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)
    return ModelConfig(**{**fields, **overrides})


def test_forward_shape_and_dtype():
    model = Transformer(tiny())
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32


def test_initial_loss_is_close_to_uniform():
    """At init every token is about equally likely: the loss on random tokens is about ln(V)."""
    vocab = 512
    model = Transformer(ModelConfig(vocab_size=vocab, max_seq_len=64, d_model=64, n_layers=4, n_heads=4))
    tokens = torch.randint(0, vocab, (8, 65))
    with torch.no_grad():
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(vocab)) < 0.3


def test_attention_is_causal():
    model = Transformer(tiny()).eval()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])  # earlier positions cannot see position 9
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_rope_depends_only_on_relative_position():
    head_dim = 16
    cos, sin = rope_tables(head_dim, 64, theta=10000.0)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def at(x, pos):
        return apply_rope(x.view(1, 1, 1, head_dim), cos[pos : pos + 1].double(), sin[pos : pos + 1].double()).flatten()

    # The tables are fp32, so a score is exact to about fp32's epsilon times |q| |k|, not relative to the
    # score itself: one near zero failed a relative tolerance for about 1 in 200 draws.
    atol = 1e-6 * (q.norm() * k.norm()).item()
    torch.testing.assert_close(at(q, 5).norm(), q.norm())  # a rotation keeps lengths
    score = lambda i, j: torch.dot(at(q, i), at(k, j))  # noqa: E731
    torch.testing.assert_close(score(7, 3), score(40, 36), rtol=0, atol=atol)
    # ... and the distance matters (over 16 distances: one pair alone may score alike by chance)
    assert torch.stack([score(40, 40 - d) for d in range(16)]).std() > 100 * atol


def test_rope_theta_changes_the_angles():
    cos_a, _ = rope_tables(8, 16, theta=10000.0)
    cos_b, _ = rope_tables(8, 16, theta=500000.0)
    assert torch.equal(cos_a[:, 0], cos_b[:, 0])  # pair 0 always turns at frequency 1
    assert not torch.allclose(cos_a[:, 1:], cos_b[:, 1:])


def test_grouped_query_attention():
    full, grouped = Transformer(tiny()), Transformer(tiny(n_kv_heads=2))
    head_dim = 32 // 4
    assert full.blocks[0].attn.qkv.weight.shape == (3 * 32, 32)
    assert grouped.blocks[0].attn.qkv.weight.shape == (32 + 2 * 2 * head_dim, 32)
    assert grouped(torch.randint(0, 97, (2, 8))).shape == (2, 8, 97)


def test_gqa_equals_attention_with_repeated_key_value_heads():
    """A grouped model is a full model whose key/value heads come in identical copies."""
    grouped = Transformer(tiny(n_kv_heads=2, n_layers=1)).eval()
    full = Transformer(tiny(n_layers=1)).eval()
    full.load_state_dict({k: v for k, v in grouped.state_dict().items() if "qkv" not in k}, strict=False)
    d, hd = 32, 8
    q, k, v = grouped.blocks[0].attn.qkv.weight.detach().split([d, 2 * hd, 2 * hd])
    repeat = lambda w: w.view(2, hd, d).repeat_interleave(2, dim=0).reshape(d, d)  # noqa: E731
    with torch.no_grad():
        full.blocks[0].attn.qkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(full(tokens), grouped(tokens))


def test_swiglu_hidden_size():
    assert ffn_hidden_size(ModelConfig(d_model=256, multiple_of=64)) == 704  # 682.7 rounded up to 64s
    assert ffn_hidden_size(ModelConfig(d_model=768, multiple_of=256)) == 2048
    assert ffn_hidden_size(ModelConfig(d_model=256, ffn_hidden=100)) == 100
    model = Transformer(tiny(multiple_of=16))
    assert model.blocks[0].mlp.down.weight.shape == (32, ffn_hidden_size(tiny(multiple_of=16))) == (32, 96)


def test_relu2_mlp_is_down_of_relu_up_squared_at_four_times_the_width():
    cfg = tiny(mlp="relu2", multiple_of=16)
    assert ffn_hidden_size(cfg) == 128 and ffn_hidden_size(tiny(mlp="relu2", ffn_hidden=40)) == 40
    mlp = Transformer(cfg).blocks[0].mlp
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    mlp = mlp.double()
    expected = x @ mlp.up.weight.T
    expected = (expected.clamp(min=0) ** 2) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)
    swiglu = Transformer(tiny(multiple_of=16))  # 96 wide: three 32 x 96 matrices a layer, against two 32 x 128
    assert Transformer(cfg).num_params() - swiglu.num_params() == 2 * (2 * 32 * 128 - 3 * 32 * 96)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """With model.qk_norm each head's queries and keys are RMS-normalised, so scaling their projection changes
    nothing; without it, the same scaling sharpens the attention and changes the logits."""
    tokens = torch.randint(0, 97, (2, 16))
    for qk_norm in (True, False):
        torch.manual_seed(0)
        # fp64 and an eps far under the squares' mean, so that what is left is the normalisation itself
        model = Transformer(tiny(qk_norm=qk_norm, norm_eps=1e-30)).double().eval()
        with torch.no_grad():
            before = model(tokens)
            for block in model.blocks:
                block.attn.qkv.weight[: 2 * 32] *= 7.0  # the q and k rows of [q | k | v]
            after = model(tokens)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-12, rtol=1e-12)
        else:
            assert (after - before).abs().max() > 1e-2


def test_embedding_norm_gives_the_first_block_unit_rms_rows_and_zero_init_makes_blocks_identities():
    """model.embedding_norm: the stream the blocks start from is the embedding's rows at RMS 1, whatever the
    embedding's scale. model.zero_init_projections: at init the blocks add nothing, so the logits are the
    final norm of the embedding (normalised or not) times the head; the other weights are drawn as usual."""
    tokens = torch.randint(0, 97, (2, 16))
    for embedding_norm in (True, False):
        torch.manual_seed(0)
        model = Transformer(tiny(embedding_norm=embedding_norm, zero_init_projections=True, norm_eps=1e-30))
        model = model.double().eval()
        for block in model.blocks:
            assert not block.attn.out.weight.any() and not block.mlp.down.weight.any()
            assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        with torch.no_grad():
            model.embed.weight *= 5.0
            stream = model.embed(tokens)
            if embedding_norm:
                stream = stream / stream.pow(2).mean(-1, keepdim=True).add(model.cfg.norm_eps).sqrt()
            final = model.norm.weight * stream / stream.pow(2).mean(-1, keepdim=True).add(model.cfg.norm_eps).sqrt()
            torch.testing.assert_close(model(tokens), model.output(final))
            first = []
            model.blocks[0].attn_norm.register_forward_hook(lambda m, args, out: first.append(args[0]))
            model(tokens)
        rms = first[0].pow(2).mean(-1).sqrt()
        if embedding_norm:
            torch.testing.assert_close(rms, torch.ones_like(rms))
        else:
            assert rms.mean() > 0.05  # 5 x N(0, 0.02) rows: RMS about 0.1
    assert Transformer(tiny()).blocks[0].attn.out.weight.any()  # the default init draws them


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.mlp=relu2"],
        ["model.qk_norm=true"],
        ["model.embedding_norm=true", "model.zero_init_projections=true"],
        ["model.logit_softcap=15"],
        ["model.value_embeddings=true", "model.n_kv_heads=2"],
        ["model.residual_scalars=true", "model.embedding_norm=true"],
        ["model.smear=true", "model.backout=true"],
    ],
)
def test_relu2_and_qk_norm_train_cache_and_checkpoint(overrides):
    """Each option's model learns a repeated batch, its KV cache gives the full forward's logits, and
    activation checkpointing changes none of its gradients."""
    cfg = load_config(
        "configs/base.toml",
        ["model.vocab_size=97", "model.n_layers=4", "model.d_model=192", "model.n_heads=4", *overrides],
    ).model  # base.toml's shape is chosen for a run's data and budget: the fixed shape it had before
    tokens, targets = torch.randint(0, 97, (2, 4, 16))
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        sums = NextTokenLoss(model)(tokens, targets)
        (sums.loss / sums.counted).backward()
        losses.append((sums.loss / sums.counted).item())
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    cache = KVCache(model.cfg)
    steps = [model(tokens[:, :9], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(tokens), atol=1e-5, rtol=1e-5)
    model.train()
    grads = []
    for mode in ("none", "selective"):
        model.checkpointing = mode
        model.zero_grad()
        NextTokenLoss(model)(tokens, targets).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.tie_embeddings=false", "model.n_kv_heads=4", "model.ffn_hidden=1000"],
        ["model.mlp=relu2", "model.qk_norm=true"],
        ["model.embedding_norm=true", "model.zero_init_projections=true"],
        ["model.value_embeddings=true", "model.residual_scalars=true", "model.tie_embeddings=false"],
        ["model.value_embeddings=true", "model.n_layers=7", "model.n_kv_heads=4", "model.smear=true"],
    ],
)
def test_preflight_counts_the_parameters_the_model_has(overrides):
    """preflight's arithmetic agrees with the real model (built on the meta device: shapes, no memory)."""
    cfg = load_config("configs/gpt2-small.toml", overrides)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert num_params(cfg.model) == model.num_params()
    tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    tables.pop(id(model.output.weight), None)  # a tied head is a matmul
    assert matmul_params(cfg.model) == model.num_params() - sum(tables.values())
    if cfg.model.value_embeddings:  # every other block from the last: 6 of 12, 4 of 7
        assert (
            len(model.value_embeds) == (cfg.model.n_layers + 1) // 2
            and str(cfg.model.n_layers - 1) in model.value_embeds
        )
    if not overrides:
        assert num_params(cfg.model) == 123_587_328


def test_weight_tying():
    tied, untied = Transformer(tiny()), Transformer(tiny(tie_embeddings=False))
    assert tied.output.weight is tied.embed.weight
    assert untied.output.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert "output.weight" in tied.state_dict()  # both names saved, loading restores the tie


def test_scaled_init_of_residual_projections():
    cfg = ModelConfig(vocab_size=1000, d_model=256, n_layers=8, n_heads=4)
    model = Transformer(cfg)
    residual = torch.cat([torch.cat([b.attn.out.weight.flatten(), b.mlp.down.weight.flatten()]) for b in model.blocks])
    other = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(256))


@pytest.mark.compile
def test_norm_kernel_model_matches_and_shares_weights():
    """norm_kernel=True (kernels.RMSNorm fusing each residual add) loads the plain model's weights and
    computes the same, also compiled: through the Triton interpreter in CI, the PyTorch path without it."""
    plain = Transformer(tiny())
    for name, p in plain.named_parameters():
        if name.endswith("norm.weight"):  # not all ones, so a swapped or unused norm weight shows
            torch.nn.init.normal_(p, 1.0, 0.2)
    fused = Transformer(tiny(), norm_kernel=True)
    fused.load_state_dict(plain.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, 97, (2, 12))

    def loss_and_grads(model, forward):
        model.zero_grad()
        forward(tokens).square().mean().backward()
        return [forward(tokens).detach()] + [p.grad for p in model.parameters()]

    expected = loss_and_grads(plain, plain)
    for forward in (fused, torch.compile(fused, fullgraph=True, backend="aot_eager")):
        for a, b in zip(loss_and_grads(fused, forward), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_next_token_loss_sums_the_loss_and_hits_fused_or_not():
    plain = Transformer(tiny())
    tokens, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    targets[0, :3] = IGNORE_INDEX  # padding counts for nothing
    logits = plain(tokens).detach()
    valid = targets != IGNORE_INDEX
    targets[1, :4] = logits[1, :4].argmax(-1)  # a few sure hits
    at_target = logits.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    hits = float(((at_target >= logits.amax(-1)) & valid).sum())
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    for objective in (NextTokenLoss(plain), NextTokenLoss(plain, fused=True)):
        loss, correct, counted = objective(tokens, targets)
        torch.testing.assert_close(loss, expected)
        assert [correct.item(), counted.item()] == [hits, 21.0] and hits >= 4  # 24 targets, 3 ignored
        (grad,) = torch.autograd.grad(objective(tokens, targets).loss, plain.embed.weight)
        live = F.cross_entropy(
            plain(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        (expected_grad,) = torch.autograd.grad(live, plain.embed.weight)
        assert_fp32_sums_close(grad, expected_grad, "embedding gradient", rtol=1e-4)


def test_next_token_loss_grad_scale_changes_no_gradient_fused_or_not(monkeypatch):
    """grad_scale announces what the loss is multiplied by before the backward: the fused loss folds it into
    the gradients it computes (so its backward scales them by exactly 1), the unfused one ignores it; the
    gradients of loss * s are the same either way."""
    lce = importlib.import_module("fasttrain_kernels.linear_cross_entropy")
    factors = []
    scale_rows = lce._scale_rows_op
    monkeypatch.setattr(lce, "_scale_rows_op", lambda x, w: factors.append(w.item()) or scale_rows(x, w))
    model = Transformer(tiny())
    tokens, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    targets[0, :3] = IGNORE_INDEX
    s = torch.tensor(3 / 7)
    for objective in (NextTokenLoss(model), NextTokenLoss(model, fused=True)):
        told, untold = (
            torch.autograd.grad(objective(tokens, targets, grad_scale=g).loss * s, list(model.parameters()))
            for g in (s, None)
        )
        for a, b in zip(told, untold, strict=True):
            assert_fp32_sums_close(a, b, "gradient", rtol=1e-4)
    assert factors == [1.0, 1.0, s.item(), s.item()]  # the fused loss's hidden states and output weight


def test_norm_kernel_model_under_autocast():
    """bf16 autocast: the kernel's norms write bf16 (what the matmuls after them read anyway)."""
    plain = Transformer(tiny())
    fused = Transformer(tiny(), norm_kernel=True)
    fused.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 97, (2, 12))
    losses = []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_dropout_only_in_training():
    model = Transformer(tiny(dropout=0.5))
    tokens = torch.randint(0, 97, (2, 8))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_changes_no_loss_or_gradient(checkpointing, dropout):
    """Recomputed blocks give the same loss and gradients as stored ones, dropout included (the
    checkpoint replays the RNG state), and with a document mask's explicit attention mask."""
    cfg = tiny(dropout=dropout)
    tokens, targets = torch.randint(0, 97, (2, 2, 16))
    documents = (torch.arange(16) >= 5).long().expand(2, 16)
    results = []
    for mode in ["none", checkpointing]:
        torch.manual_seed(0)
        model = Transformer(cfg, checkpointing=mode)
        model.train()
        loss = sum(NextTokenLoss(model)(tokens, targets, docs).loss for docs in (None, documents))
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=0, atol=0)


def test_flops_per_token_is_palm_formula():
    cfg = tiny(tie_embeddings=False)
    model = Transformer(cfg)
    non_embedding = model.num_params() - 97 * 32
    assert model.flops_per_token(16) == 6 * non_embedding + 12 * 2 * 4 * 8 * 16


def test_context_limit():
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        Transformer(tiny())(torch.zeros(1, 33, dtype=torch.long))


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)).tolist() == [[False, False, True, True]]
    # The nucleus of p = 0.7 needs the first two tokens (0.5 + 0.3 >= 0.7); the likeliest always stays.
    assert torch.isinf(filter_logits(logits, None, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, top_p=0.1)).tolist() == [[False, True, True, True]]
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary must not matter
    assert torch.isinf(filter_logits(shuffled, None, top_p=0.7)).tolist() == [[True, False, True, False]]
    # A nucleus below float32's least number (1e-50 is 0 there) still keeps the likeliest: 0 >= 0 dropped every token
    assert torch.isinf(filter_logits(shuffled, None, top_p=1e-50)).tolist() == [[True, False, True, True]]


def test_generate():
    model = Transformer(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 5))
    greedy = generate(model, prompt, 40, temperature=0)  # longer than the context: it crops
    assert greedy.shape == (2, 45) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(generate(model, prompt, 10, top_k=1), greedy[:, :15])  # top-1 sampling is greedy
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(generate(model, prompt, 10, generator=g()), generate(model, prompt, 10, generator=g()))


@pytest.mark.parametrize("n_kv_heads", [0, 2])
def test_cached_logits_match_the_full_forward(n_kv_heads):
    model = Transformer(tiny(n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, 97, (2, 20))
    full = model(tokens)
    cache = KVCache(model.cfg)
    prefill = model(tokens[:, :12], cache=cache)  # the prompt at once, then one token per forward
    steps = [model(tokens[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_generation_is_uncached_generation():
    model = Transformer(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 5))
    # Within the context (32) greedy decoding picks the same tokens; past it the two crop differently.
    greedy = generate(model, prompt, 50, temperature=0)  # past the context (32): the cache starts over
    assert greedy.shape == (2, 55)
    assert torch.equal(greedy[:, :32], generate(model, prompt, 27, temperature=0, use_cache=False))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(
        generate(model, prompt, 10, top_p=0.9, generator=g()),
        generate(model, prompt, 10, top_p=0.9, generator=g(), use_cache=False),
    )


def test_generate_text_streams(pydoc_data):
    tokenizer = Tokenizer.load(pydoc_data / "tokenizer.json")
    model = Transformer(tiny(vocab_size=tokenizer.vocab_size))
    pieces = []
    text = generate_text(model, tokenizer, "The ", max_new_tokens=12, seed=2, on_text=pieces.append)
    assert text == "The " + "".join(pieces) and len(pieces) > 1


def test_generate_text(pydoc_data):
    tokenizer = Tokenizer.load(pydoc_data / "tokenizer.json")
    model = Transformer(tiny(vocab_size=tokenizer.vocab_size))
    text = generate_text(model, tokenizer, "The module", max_new_tokens=8, seed=1)
    assert text.startswith("The module") and len(tokenizer.encode(text)) >= 8
    assert text == generate_text(model, tokenizer, "The module", max_new_tokens=8, seed=1)
    assert model.training  # left as it was found


@pytest.mark.parametrize("name, millions", [("gpt2-small", 124), ("gpt-350m", 360)])
def test_gpu_configs_load_and_have_their_advertised_size(name, millions):
    from pathlib import Path

    from fasttrain.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = Transformer(cfg.model)
    assert model.num_params() / 1e6 == pytest.approx(millions, rel=0.02)


def test_pads_never_change_the_loss():
    """A right-padded batch of documents (pad targets ignored) has the loss and gradients of the documents
    run one by one without padding, averaged per target token, whatever the pad tokens are."""
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_heads=2)).double()
    lengths = [3, 17, 9, 2]  # tokens per document (inputs + the last target)
    docs = [torch.randint(0, 97, (n,)) for n in lengths]

    def padded_loss(pad: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = torch.full((4, 20), pad)
        y = torch.full((4, 20), IGNORE_INDEX)
        for i, d in enumerate(docs):
            x[i, : len(d) - 1], y[i, : len(d) - 1] = d[:-1], d[1:]
        model.zero_grad()
        sums = NextTokenLoss(model)(x, y)
        loss = sums.loss / sums.counted
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    summed = sum(F.cross_entropy(model(d[None, :-1])[0], d[1:], reduction="sum") for d in docs)
    (summed / (sum(lengths) - len(docs))).backward()
    one_by_one = [p.grad.clone() for p in model.parameters()]
    for pad in (0, 96):
        loss, grads = padded_loss(pad)
        torch.testing.assert_close(loss, summed.detach() / (sum(lengths) - len(docs)), rtol=1e-12, atol=0)
        for a, b in zip(grads, one_by_one, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("flex", [False, True], ids=["sdpa-mask", "flex_attention"])
def test_document_mask_keeps_documents_apart(monkeypatch, flex):
    """With document ids, changing one document changes none of the others' logits (earlier or later
    ones), and each document's logits are those of the document alone (RoPE is relative)."""
    import fasttrain.model.transformer as model_module

    monkeypatch.setattr(model_module, "use_flex_attention", lambda device: flex)
    torch.manual_seed(1)
    model = Transformer(tiny(n_kv_heads=2)).double().eval()
    bounds = [0, 7, 19, 32]  # three documents in one row of 32
    tokens = torch.randint(0, 97, (2, 32))
    documents = torch.zeros(2, 32, dtype=torch.long)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        documents[:, a:b] = i
    changed = tokens.clone()
    changed[:, 8:19] = (changed[:, 8:19] + 5) % 97  # the middle document
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        a, b = model(tokens, documents=documents), model(changed, documents=documents)
        alone = [model(tokens[:, s:e]) for s, e in zip(bounds, bounds[1:])]
        unmasked = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    torch.testing.assert_close(a[:, 19:], b[:, 19:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[:, 8:19], b[:, 8:19])
    assert not torch.allclose(unmasked[:, 19:], b[:, 19:])  # without the mask the last one would see it
    for (s, e), logits in zip(zip(bounds, bounds[1:]), alone):  # up to the fp32 RoPE tables' rounding
        torch.testing.assert_close(a[:, s:e], logits, rtol=1e-6, atol=1e-6)


@pytest.mark.compile
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_compiled_flex_document_mask_matches_eager(monkeypatch):
    """The GPU path (flex_attention inside the compiled model), compiled on CPU: the same logits as the
    explicit mask. Compiled flex_attention once got a strided v wrong, so this guards the layout it is given."""
    import fasttrain.model.transformer as model_module

    torch.manual_seed(2)
    model = Transformer(tiny(n_layers=1, n_kv_heads=2)).eval()
    tokens = torch.randint(0, 97, (2, 32))
    documents = (torch.rand(2, 32) < 0.2).cumsum(1)
    with torch.no_grad():  # flex_attention has no backward on CPU
        expected = model(tokens, documents=documents)
        monkeypatch.setattr(model_module, "use_flex_attention", lambda device: True)
        got = torch.compile(model)(tokens, documents=documents)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
