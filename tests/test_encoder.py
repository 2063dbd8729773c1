"""tiktoken gives the `tokenizers` library's ids exactly, or is not used; shards are the same either way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

import fasttrain.preparation.pipeline as pipeline
import fasttrain.preparation.preparation as preparation
from fasttrain.formats.tokenizer import EOT, Tokenizer
from fasttrain.preparation.encoder import PROBES, Inexpressible, choose_encoder, fast_encoder, slow_encoder

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Text that tells BPE implementations apart: every script, emoji sequences, runs of spaces and digits,
# contractions, replaced invalid UTF-8, the end-of-text token's spelling inside a document, and nothing.
ADVERSARIAL = [
    *PROBES,
    b"bad \xff\xfe bytes \xc3 then \xef\xbf\xbd".decode("utf-8", "replace"),
    "x" * 3000 + " " * 500 + "0" * 777 + "\n" * 300,
    "Ǆ ǅ ǆ ﬁ ﬀ Å Å ℌ ㈱ ﹏ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 ᚠᛇᚻ ⠁⠃ ꙮ ߷ ᎠᏍᏗ ⵣ ᠮᠣᠩ",
    "I'd've y'all'd'n't SHE'LL 'tis o'clock ''' '' '",
    "<|endoftext|>",
    "<|endoftext|",
    "|endoftext|>",
    "x<|endoftext|>y<|endoftext|>",
    "\r\n\r\n  \r \u00a0\u3000\u2009 tabs\t\t\tend",
    'def f(a, b):\n\t"""Doc."""\n    return {k: v for k, v in zip(a, b)}  # ünïcode 𝛑\n',
]


@pytest.fixture(scope="module")
def learned() -> Tokenizer:
    from pydoc_data.topics import topics

    return Tokenizer.train([*topics.values()][:40], vocab_size=1500)


def variant(tok: Tokenizer, change) -> Tokenizer:
    spec = json.loads(tok.tok.to_str())
    change(spec)
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), source="variant")


def llama3_like(spec: dict) -> None:
    """Llama 3's layout: a Split on its regex, then a ByteLevel without one, whole words as tokens."""
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    spec["model"]["ignore_merges"] = True


def shuffled_ids(spec: dict) -> None:
    """Ids in no relation to the merges' order: ranks must be derived from the merges, not the ids."""
    vocab = spec["model"]["vocab"]
    order = np.random.default_rng(0).permutation(len(vocab))
    spec["model"]["vocab"] = {token: int(order[i]) for token, i in vocab.items()}
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]


def gpt2_like(spec: dict) -> None:
    """GPT-2's layout: ids in merge order after the bytes, the end-of-text token last, a ByteLevel post-processor."""
    vocab = spec["model"]["vocab"]
    ordered = sorted((t for t in vocab if t != EOT), key=vocab.get)
    spec["model"]["vocab"] = {t: i for i, t in enumerate([*ordered, EOT])}
    spec["added_tokens"][0]["id"] = len(ordered)
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}


@pytest.mark.parametrize("change", [None, llama3_like, shuffled_ids, gpt2_like])
def test_tiktoken_gives_the_tokenizers_ids_on_adversarial_text(learned, change):
    tok = variant(learned, change) if change else learned
    fast, slow = fast_encoder(tok.tok), slow_encoder(tok)
    for text, a, b in zip(ADVERSARIAL, fast(ADVERSARIAL), slow(ADVERSARIAL)):
        assert a.tolist() == b.tolist(), text[:40]
    # The end-of-text token's spelling inside a document is the end-of-text token, as `tokenizers` has it.
    assert tok.eot_id in fast(["a<|endoftext|>b"])[0].tolist()
    assert choose_encoder(tok, ADVERSARIAL)[1] == "tiktoken"


def test_a_larger_vocabulary_agrees_on_the_stdlib(tmp_path):
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    texts = [f.read_text(errors="replace") for f in files]
    tok = Tokenizer.train(texts[::2], vocab_size=4096)
    fast, slow = fast_encoder(tok.tok), slow_encoder(tok)
    assert all(np.array_equal(a, b) for a, b in zip(fast(texts[1::2]), slow(texts[1::2])))


def _tokenizer(make) -> Tokenizer:
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, EOT: 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    make(tok)
    return Tokenizer(tok, source="t.json")


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda t: None, "a WordLevel model, not a BPE"),
        ("normalizer", "a NFC normalizer"),
        ("metaspace", "pre-tokenizer Metaspace is not a byte-level split"),
        ("prefix space", "is not a byte-level split tiktoken can express"),
    ],
)
def test_what_tiktoken_cannot_express_falls_back_in_one_line(learned, make, why):
    if make == "normalizer":
        tok = Tokenizer.train(["some text " * 20], 300)
        tok.tok.normalizer = normalizers.NFC()
    elif make == "metaspace":
        tok = Tokenizer.train(["some text " * 20], 300)
        tok.tok.pre_tokenizer = pre_tokenizers.Metaspace()
    elif make == "prefix space":
        tok = Tokenizer.train(["some text " * 20], 300)
        tok.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        tok = _tokenizer(make)
    with pytest.raises(Inexpressible, match=why):
        fast_encoder(tok.tok)
    encode, name, note = choose_encoder(tok, ["a a"])
    assert name == "tokenizers" and why in note and "\n" not in note


def unreachable_token(spec: dict) -> None:
    """Merges a+b, b+c, then a+bc: tokenizers' merges make [ab, c] of "abc", tiktoken the token abc whole."""
    vocab = spec["model"]["vocab"]
    a, b, c = "\u00a1", "\u00a2", "\u00a3"  # bytes 0xa1-0xa3 in the byte-level alphabet
    assert not {a + b, b + c, a + b + c} & set(vocab)
    for token in (a + b, b + c, a + b + c):
        vocab[token] = len(vocab) + len(spec["added_tokens"])
    spec["model"]["merges"][:0] = [[a, b], [b, c], [a, b + c]]


def test_a_token_its_own_merges_do_not_make_falls_back(learned):
    tok = variant(learned, unreachable_token)
    with pytest.raises(Inexpressible, match="is not what its own merges make of it"):
        fast_encoder(tok.tok)
    assert choose_encoder(tok, ["\u00a1\u00a2\u00a3"])[1] == "tokenizers"


def test_a_sample_that_disagrees_falls_back(learned, monkeypatch):
    import fasttrain.preparation.encoder as encoder

    real = encoder.fast_encoder
    monkeypatch.setattr(encoder, "fast_encoder", lambda tok: lambda texts: [a[::-1] for a in real(tok)(texts)])
    _, name, note = choose_encoder(learned, ["some text, reversed"])
    assert name == "tokenizers" and note.startswith("encoder: tokenizers (tiktoken gave other ids")


def test_shards_are_the_same_whichever_encoder_runs(tmp_path, monkeypatch):
    docs = [*ADVERSARIAL, *(f"document {i}: " + "ünïcode words, digits 12345 " * (i % 13) for i in range(60))]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    fast = prepare_into(tmp_path / "fast", tmp_path / "docs.jsonl")
    import fasttrain.preparation.encoder as encoder

    monkeypatch.setattr(pipeline, "choose_encoder", lambda tok, sample: (encoder.slow_encoder(tok), "tokenizers", None))
    slow = prepare_into(tmp_path / "slow", tmp_path / "docs.jsonl")
    assert (fast["encoder"], slow["encoder"]) == ("tiktoken", "tokenizers")
    names = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "slow").iterdir())
    for name in names:
        if name != "meta.json":
            assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name


def prepare_into(out, path, **options) -> dict:
    return preparation.prepare(
        [str(path)], out, vocab_size=700, val_fraction=0.2, quiet=True, batch_chars=2000, **options
    )
