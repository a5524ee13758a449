"""The gpt-4o / o200k pre-tokenizer (tokenizer.ggml.pre "gpt-4o": gpt-oss, llama4) and
llama.cpp's end-of-generation rule for gpt-oss's harmony tokens.

llama-cpp-python is not installed here, so the reference is transformers' fast tokenizer built
with `tokenizers` over the same vocab and merges (a byte-level BPE learned on a seeded corpus)
with the pre-tokenizer regex of the o200k tokenizer.json, verbatim.  dsd follows llama.cpp's
rewrite of that regex (shard/tokenizer.py _GPT4O), which agrees with it on ASCII, digits and CJK
(the texts here) and differs on mixed-case non-ASCII words (checked separately below).
"""
from __future__ import annotations

import random

import pytest

from dsd.shard.tokenizer import Tokenizer
from tests.bpe_vocab import bpe_pair

# o200k's tokenizer.json pattern (Xenova/gpt-4o, openai/gpt-oss-*), the reference
O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"]

PARTS = ["The ", "quick", " brown", " FOX", "'s", " don't", " I'M", " we'll", " they've", " HelloWorld",
         " 12345", " 3.14159", " 2026", "1,000,000", " 你好", "世界", "日本語の", "テキスト", " 한국어",
         "def f(x):\n", "    return x**2  # square\n", "if (a && b) { c[i] = d->e; }", "\t", "  ", "\n\n",
         " /usr/bin/env", ")/\n/", " naïve", " café", " Straße", " !!!", "😀", " $HOME", "'", "'LL"]
TEXT = ("The quick brown fox's 3 cats don't sleep; I'M sure we'll see 12345 or 3.14159.\n"
        "你好，世界！日本語のテキスト。 한국어 텍스트\n"
        "def square(x):\n    return x ** 2  # it's 4 for x=2\n\n"
        "if (n >= 1000000) { printf(\"%d\\n\", n); }\n  )/\n/path/to/file.py HelloWorld ALLCAPS Mixed")


@pytest.fixture(scope="module")
def pair():
    """(dsd Tokenizer from GGUF-style metadata, transformers tokenizer, metadata) over one vocab."""
    return bpe_pair(O200K, "gpt-4o", PARTS, TEXT, SPECIAL, 7, eos_token_id="<|return|>")


def test_gpt4o_matches_transformers(pair):
    tok, hf, _ = pair
    assert tok.pre == "gpt-4o" and len(tok.tokens) > 600
    assert tok.pre_split("I'M 1234567 HelloWorld x)/\n/y") == ["I'M", " ", "123", "456", "7", " Hello", "World",
                                                                 " x", ")/\n/", "y"]
    ids = tok.encode(TEXT)
    assert ids == hf.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    rng = random.Random(11)
    for _ in range(300):
        s = "".join(rng.choice(PARTS) for _ in range(rng.randint(1, 14)))
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False), repr(s)
    # harmony special tokens are matched whole
    s = "<|start|>assistant<|channel|>final<|message|>It's 42.<|return|>"
    assert tok.encode(s) == hf.encode(s, add_special_tokens=False)


def test_gpt4o_follows_llama_cpp_on_mixed_case_non_ascii(pair):
    """llama.cpp's rewrite counts every non-ASCII letter as both cases: "abcДef" is one piece
    (tokenizer.json's Lu/Ll classes cut it before the capital Д)."""
    from tokenizers import Regex, pre_tokenizers

    tok, _, _ = pair
    ref = pre_tokenizers.Split(Regex(O200K), behavior="isolated")
    assert [p for p, _ in ref.pre_tokenize_str("abcДef")] == ["abc", "Дef"]
    assert tok.pre_split("abcДef") == ["abcДef"]
    assert tok.pre_split(" ÉcoleNormale") == [" École", "Normale"]  # ASCII case change still cuts


def test_harmony_end_is_not_eog(pair):
    """llama.cpp: with <|return|> and <|call|> end-of-generation tokens, <|end|> is not one."""
    tok, _, meta = pair
    v = {t: i for i, t in enumerate(tok.tokens)}
    assert {v["<|return|>"], v["<|call|>"]} <= tok.stop_ids
    assert v["<|end|>"] not in tok.stop_ids and v["<|endoftext|>"] in tok.stop_ids
    # even named as the end-of-turn token (llama.cpp removes it from the EOG set all the same)
    assert v["<|end|>"] not in Tokenizer.from_metadata(dict(meta, **{"tokenizer.ggml.eot_token_id": v["<|end|>"]})).stop_ids
    # without <|call|> (not harmony) <|end|> keeps ending generation
    toks = [t if t != "<|call|>" else "<|other|>" for t in meta["tokenizer.ggml.tokens"]]
    other = Tokenizer.from_metadata(dict(meta, **{"tokenizer.ggml.tokens": toks}))
    assert v["<|end|>"] in other.stop_ids and v["<|return|>"] in other.stop_ids
