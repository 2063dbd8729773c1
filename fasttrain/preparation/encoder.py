"""Encoding at tiktoken's speed: a byte-level BPE tokenizer.json re-expressed as a tiktoken Encoding.

Imports from fasttrain: formats.tokenizer.

`tokenizers` encodes about 7 MB/s of Python source per core here, tiktoken with the same vocabulary, merges and split
pattern about 20. `fast_encoder` builds that Encoding when the two can agree, and `choose_encoder` proves they do on a
sample before prepare uses it; otherwise `tokenizers` encodes, said in one line. Shards are the same whichever wrote
them.

Why the two agree, and when they would not:
- Split: tiktoken drops what falls between its regex's matches, so only patterns matching every character are
  expressible: ByteLevel with its regex (GPT-2's), or an isolated Split on a regex before a ByteLevel without one (Llama
  3's); no normalizer, prefix space or Metaspace.
- Merges: `tokenizers` applies the merge of lowest index, tiktoken the pair whose joined bytes rank lowest, so ranks
  come from the merges' order (bytes first), mapped back to ids afterwards.
- Whole pieces: tiktoken emits a piece in the vocabulary as one token; `tokenizers` only with `ignore_merges`, so
  without it every merged token must come out of its own merges as itself (checked).
- Special tokens: both cut added tokens out of any text before splitting, provided none strips whitespace or is a prefix
  of another (tiktoken takes the first match, `tokenizers` the longest). A token joined by another merge than the
  recorded one could still differ inside a longer piece; no tokenizer tested does, and the sample check is the guard.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
import tokenizers

from fasttrain.formats.tokenizer import Tokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text each sample check encodes besides the corpus's own: what tends to tell two BPE implementations apart.
PROBES = (
    "",
    " ",
    "  \n\n\t  x",
    "don't I'll we've they're it's I'M 'S",
    "1234567890 3.14159 1e-9 ١٢٣ ٤٥",
    "héllo wörld — ünïcödé ñ ß ø",
    "Привет мир, Ελληνικά, עברית, العربية, हिन्दी, ไทย, 한국어, 日本語の文章, 汉字",
    "emoji 😀🚀👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇫🇷",
    "\ufffd\ufffd replaced \ufffd",
    "\x00\x01\x7f control \u200b\u2028",
    " " * 40 + "\n" * 9 + "\t" * 5 + "9" * 50,
    "def f(x):\n    return x  # <|endoftext|> inside\n",
    "a<|endoftext|>b <|endoftext|><|endoftext|>",
    "<|end_of_text|></s><eos>",
)

Encode = Callable[[Sequence[str]], list[np.ndarray]]  # a batch of texts to their ids, one array each


class Inexpressible(Exception):
    """The tokenizer is not one tiktoken encodes identically; the message says why."""


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE's printable stand-in character for each byte (GPT-2's), mapped back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pattern(pre: dict | None) -> str:
    """The one regex tiktoken splits with, for the tokenizer.json pre_tokenizer `pre`."""

    def byte_level(p: dict, with_regex: bool) -> None:
        if p.get("type") != "ByteLevel" or p.get("add_prefix_space") or p.get("use_regex", True) != with_regex:
            raise Inexpressible(f"pre-tokenizer {json.dumps(p)[:80]} is not a byte-level split tiktoken can express")

    if pre is None:
        raise Inexpressible("no pre-tokenizer (not byte-level)")
    if pre.get("type") == "ByteLevel":
        byte_level(pre, True)
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel":
        byte_level(steps[0], True)
        return GPT2_PATTERN
    if len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {}):
        split = steps[0]
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise Inexpressible(f"a Split that is {split.get('behavior')}{', inverted' if split.get('invert') else ''}")
        byte_level(steps[1], False)
        return split["pattern"]["Regex"]
    raise Inexpressible(f"pre-tokenizer {pre.get('type')} is not a byte-level split tiktoken can express")


def splits_at_line_ends(tok: tokenizers.Tokenizer) -> bool:
    """Whether `tok` encodes two texts cut where corpus._line_cut cuts as it encodes them whole: a byte-level split
    (GPT-2's, or Llama 3's regex before a ByteLevel) with no normalizer. A normalizer or pre-tokenizer that marks the
    start of every text (Llama 2's prepended "▁", Metaspace, add_prefix_space) would put a space at each cut."""
    spec = json.loads(tok.to_str())
    try:
        _pattern(spec.get("pre_tokenizer"))
    except Inexpressible:
        return False
    return not spec.get("normalizer")


def fast_encoder(tok: tokenizers.Tokenizer) -> Encode:
    """tiktoken encoding `tok`'s way; raises Inexpressible (saying why) for a tokenizer it cannot express."""
    import tiktoken

    spec = json.loads(tok.to_str())
    _check_plain_bpe(spec)
    pattern = _pattern(spec.get("pre_tokenizer"))
    added = spec.get("added_tokens") or []
    ranks, ranked = _mergeable_ranks(tok, spec["model"], added)
    specials = _special_ranks(added, ranked)
    try:
        encoding = tiktoken.Encoding("fasttrain", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # a pattern tiktoken's regex engine refuses: a bare ValueError from Rust
        raise Inexpressible(f"tiktoken refuses it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    ids = np.asarray(ranked, dtype=np.uint32)
    identity = bool((ids == np.arange(ids.size)).all())
    allowed = frozenset(specials)

    def encode(texts: Sequence[str]) -> list[np.ndarray]:
        out = [encoding.encode_to_numpy(t, allowed_special=allowed, disallowed_special=()) for t in texts]
        return out if identity else [ids[o] for o in out]

    return encode


def _check_plain_bpe(spec: dict) -> None:
    """Inexpressible unless tokenizer.json's `spec` is a plain BPE: no normalizer, truncation or padding, dropout,
    affixes to words or byte fallback."""
    model = spec["model"]
    if model.get("type") != "BPE":
        raise Inexpressible(f"a {model.get('type')} model, not a BPE")
    if spec.get("normalizer"):
        raise Inexpressible(f"a {spec['normalizer'].get('type')} normalizer")
    if spec.get("truncation") or spec.get("padding"):
        raise Inexpressible("truncation or padding set")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise Inexpressible(f"BPE {key} = {model[key]!r}")
    if model.get("byte_fallback"):
        raise Inexpressible("a byte-fallback BPE (SentencePiece-style)")


def _as_bytes(token: str, alphabet: dict[str, int]) -> bytes:
    """The bytes a byte-level token stands for (`alphabet`: each of its characters' byte); Inexpressible if one
    is not in it."""
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        raise Inexpressible(f"token {token!r} is not in the byte-level alphabet") from None


def _mergeable_ranks(tok: tokenizers.Tokenizer, model: dict, added: list[dict]) -> tuple[dict[bytes, int], list[int]]:
    """tiktoken's ranks for the BPE `model` of `tok` (`added`: its added tokens) and the id of each rank, in merge
    order: the 256 bytes, then each merge's result (with `ignore_merges`, then every other token of the
    vocabulary). Inexpressible where the two libraries would not agree (the module docstring)."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = model["vocab"]
    missing = [c for c in alphabet if c not in vocab]
    if missing:
        raise Inexpressible(f"{len(missing)} of the 256 bytes have no token")
    ranks: dict[bytes, int] = {}
    ranked: list[int] = []  # maps a rank back to its id
    for c in sorted(alphabet, key=alphabet.__getitem__):
        ranks[bytes([alphabet[c]])] = len(ranked)
        ranked.append(vocab[c])
    merged: list[str] = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = left + right
        if token not in vocab:
            raise Inexpressible(f"merge {left!r} + {right!r} makes no token of the vocabulary")
        encoded = _as_bytes(token, alphabet)
        if encoded in ranks:
            raise Inexpressible(f"token {token!r} is made by two merges")
        ranks[encoded] = len(ranked)
        ranked.append(vocab[token])
        merged.append(token)
    if model.get("ignore_merges"):  # a whole piece in the vocabulary is one token, however it was made
        contents = {a["content"] for a in added}
        for token, i in vocab.items():
            if token not in contents and _as_bytes(token, alphabet) not in ranks:
                ranks[_as_bytes(token, alphabet)] = len(ranked)
                ranked.append(i)
    else:  # tiktoken takes a whole piece that is a token as that token: tokenizers' merges must make it too
        for token in merged:
            made = tok.model.tokenize(token)
            if len(made) != 1:
                raise Inexpressible(f"token {token!r} is not what its own merges make of it")
    return ranks, ranked


def _special_ranks(added: list[dict], ranked: list[int]) -> dict[str, int]:
    """tiktoken's special tokens for tokenizer.json's `added` tokens, ranked after `ranked`'s, to which each one's
    id is appended; Inexpressible for one that strips whitespace, matches single words only, or begins another."""
    specials: dict[str, int] = {}
    for a in added:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise Inexpressible(f"added token {a['content']!r} strips whitespace or matches single words only")
        specials[a["content"]] = len(ranked)
        ranked.append(a["id"])
    if any(a != b and b.startswith(a) for a in specials for b in specials):
        raise Inexpressible("one added token is a prefix of another")
    return specials


def slow_encoder(tokenizer: Tokenizer) -> Encode:
    """The `tokenizers` library's own encoding (it runs its batch on its own threads)."""

    def encode(texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.uint32) for ids in tokenizer.encode_batch(texts)]

    return encode


def choose_encoder(tokenizer: Tokenizer, sample: Sequence[str]) -> tuple[Encode, str, str | None]:
    """(encode, its name, a note or None): tiktoken where it gives the tokenizer's ids on `sample` and PROBES, else
    `tokenizers`, the note saying why; a batch tiktoken cannot encode goes to `tokenizers`."""
    slow = slow_encoder(tokenizer)
    try:
        fast = fast_encoder(tokenizer.tok)
    except Inexpressible as e:
        return slow, "tokenizers", f"encoder: tokenizers (tiktoken cannot express {tokenizer.source}: {e})"
    texts = [*PROBES, *sample]
    try:
        same = all(np.array_equal(a, b) for a, b in zip(fast(texts), slow(texts), strict=True))
    except Exception as e:  # text one of them cannot encode: prepare's own encoding reports it
        return slow, "tokenizers", f"encoder: tokenizers (the sample check failed: {str(e).splitlines()[0][:80]})"
    if not same:
        return slow, "tokenizers", f"encoder: tokenizers (tiktoken gave other ids than {tokenizer.source} on a sample)"

    def encode(texts: Sequence[str]) -> list[np.ndarray]:
        try:
            return fast(texts)
        except Exception:
            return slow(texts)

    return encode, "tiktoken", None
