"""Kimi K2's pre-tokenizer (tokenizer.ggml.pre "kimi-k2").

llama-cpp-python is not installed here, so the reference is transformers' fast tokenizer built with
`tokenizers` over the same vocab and merges (a byte-level BPE learned on a seeded corpus), with
Moonshot's own pattern (tokenization_kimi.py's pat_str) verbatim.  dsd follows llama.cpp's
hand-written version of that pattern (unicode.cpp's kimi_k2 split; shard/tokenizer.py _KIMI_K2),
which agrees with Moonshot's on the texts here (CJK, kana, hangul, digits, code, contractions,
all-caps words) and differs where a word changes case inside ("getUserName") or carries a
combining mark: checked separately below, against splits worked out from llama.cpp's code.
"""
from __future__ import annotations

import random

import pytest

from tests.bpe_vocab import bpe_pair

# tokenization_kimi.py's pat_str (moonshotai/Kimi-K2-Instruct), the reference
MOONSHOT = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
SPECIAL = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]

# no part puts a capital right after a lower-case letter, so joined parts never change case inside
# a word (the one place llama.cpp and Moonshot's pattern differ, tested on its own below)
PARTS = ["The ", "quick", " brown", " FOX", "'s", " don't", " I'M", " we'll", " they've", " Hello",
         " 12345", " 3.14159", " 2026", "1,000,000", " 你好", "世界", "日本語の", "テキスト", " 한국어",
         "中文和English混合", "def f(x):\n", "    return x**2  # square\n", "if (a && b) { c[i] = d->e; }",
         "\t", "  ", "\n\n", " /usr/bin/env", ")/\n/", " naïve", " café", " Straße", " !!!", "😀", " $HOME",
         "'", " 'LL", "，", "。", "「引用」", " ¿Qué?"]
TEXT = ("The quick brown fox's 3 cats don't sleep; I'M sure we'll see 12345 or 3.14159.\n"
        "你好，世界！日本語のテキスト。 한국어 텍스트 中文和English混合\n"
        "def square(x):\n    return x ** 2  # it's 4 for x=2\n\n"
        "if (n >= 1000000) { printf(\"%d\\n\", n); }\n  )/\n/path/to/file.py ALLCAPS naïve café")


@pytest.fixture(scope="module")
def pair():
    """(dsd Tokenizer from GGUF-style metadata, transformers tokenizer) over one vocab."""
    tok, hf, _ = bpe_pair(MOONSHOT, "kimi-k2", PARTS, TEXT, SPECIAL, 3, bos_token_id="[BOS]",
                          eos_token_id="<|im_end|>")
    return tok, hf


def test_kimi_k2_matches_moonshots_pattern(pair):
    tok, hf = pair
    assert tok.pre == "kimi-k2" and len(tok.tokens) > 600
    # Han runs apart from kana / Latin, digits by 3, llama3-style punctuation and spaces
    assert tok.pre_split("日本語のテキスト 12345 中文和English混合 x)/\n") == [
        "日本語", "のテキスト", " ", "123", "45", " ", "中文和", "English", "混合", " x", ")/\n"]
    ids = tok.encode(TEXT)
    assert ids == hf.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    rng = random.Random(11)
    for _ in range(300):
        s = "".join(rng.choice(PARTS) for _ in range(rng.randint(1, 14)))
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False), repr(s)
    s = "<|im_user|>user<|im_middle|>What's 2+2? 你好<|im_end|><|im_assistant|>assistant<|im_middle|>"
    assert tok.encode(s) == hf.encode(s, add_special_tokens=False)


def test_kimi_k2_follows_llama_cpp_where_it_differs(pair):
    """llama.cpp's kimi-k2 split takes any run of non-Han letters as one word (no Lu / Ll classes)
    and, like its other splits, counts a combining mark as no letter (a mark before a letter is
    that word's optional leading character).  Expected splits worked out from its code."""
    from tokenizers import Regex, pre_tokenizers

    tok, _ = pair
    ref = pre_tokenizers.Split(Regex(MOONSHOT), behavior="isolated")
    assert [p for p, _ in ref.pre_tokenize_str("getUserName iPhone")] == ["get", "User", "Name", " i", "Phone"]
    assert tok.pre_split("getUserName iPhone") == ["getUserName", " iPhone"]
    assert tok.pre_split("a\u0301b") == ["a", "\u0301b"]
    # Han: the CJK ideograph blocks (not kana, hangul or CJK punctuation)
    assert tok.pre_split("漢字かなカナ한글，𠀀𪜀") == ["漢字", "かなカナ한글", "，", "𠀀𪜀"]
