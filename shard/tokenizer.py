"""Tokenizer built from GGUF metadata on top of HuggingFace `tokenizers`.

Two vocab kinds, as llama.cpp reads them (src/llama-vocab.cpp):

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. Tokens and merges are stored in their
  byte-level alphabet form ("Ġt"). Text is first split by a chain of regexes chosen by
  ``tokenizer.ggml.pre`` (each regex splits every piece the previous one left, keeping both the
  matches and the gaps: `Split(behavior="isolated")`), then bytes are mapped to the byte-level
  alphabet and BPE-merged by merge rank.
* ``tokenizer.ggml.model == "llama"``: SentencePiece vocab (tokens + scores). Spaces become "▁",
  a "▁" is prepended when ``add_space_prefix``; pieces are merged greedily by the score of the
  merged token, characters not in the vocab fall back to <0xXX> byte tokens. We express that as
  a `tokenizers` BPE whose merges are every (left, right) split of a vocab token, ranked by the
  merged token's score (highest first).

Special tokens (token_type 2 unknown, 3 control, 4 user-defined) are matched whole in the text
before any splitting; with ``parse_special=False`` control/unknown tokens are treated as plain
text but user-defined ones are still matched (llama.cpp's rule).

Decoding does not go through `tokenizers`: each id maps to the exact bytes it stands for (a
table built once), so the streaming decoder can hold back incomplete UTF-8 sequences.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from dsd.errors import DsdError

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp LLAMA_TOKEN_TYPE_*).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# --- pre-tokenizer regexes (facts from llama.cpp's llm_tokenizer_bpe, rewritten for Oniguruma) ---
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# gpt-4o / o200k (gpt-oss's o200k_harmony, llama4): llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O regex.
# tokenizer.json's original uses [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]* [\p{Ll}\p{Lm}\p{Lo}\p{M}]+ for a
# word's capitalised head and lower tail; llama.cpp rewrites them as letters other than a-z /
# letters other than A-Z (its regex engine sees every non-ASCII letter as one class), so a
# non-ASCII letter counts as both cases and a combining mark (\p{M}) is no letter: identical for
# ASCII text and for CJK (Lo), different from transformers for mixed-case non-ASCII words
# ("abcДef" stays one piece) and for marks.  We follow llama.cpp (Oniguruma class intersection).
_UPPERISH, _LOWERISH = r"[\p{L}&&[^a-z]]", r"[\p{L}&&[^A-Z]]"
_GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPERISH + "*" + _LOWERISH + "+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?" + _UPPERISH + "+" + _LOWERISH + "*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# kimi-k2 (Kimi K2's tiktoken pattern, tokenization_kimi.py): Han runs, words of other letters,
# digits by 3, then llama3's rest.  llama.cpp implements it by hand (unicode.cpp's kimi_k2 split):
# Han = CJK Unified Ideographs and extensions A-F plus the compatibility blocks; a word is any
# run of non-Han letters (\p{L}: marks are no letters) with one optional leading non-letter /
# non-digit / non-newline character and a contraction; unlike Moonshot's Lu/Ll classes it never
# cuts at a case change ("getUserName" stays one piece).  We follow llama.cpp.
_HAN = r"\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2EBEF}\x{2F800}-\x{2FA1F}"
_KIMI_K2 = ("[" + _HAN + r"]+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^" + _HAN + "]]+" + _CONTRACTIONS + "?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
# deepseek-llm: letters of cased scripts (Latin, Greek, Cyrillic, Armenian, Georgian, ...).
_DS_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚ"
    "Ḁ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄ"
    "Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = [
    r"[\r\n]",
    r"\s?[" + _DS_LETTERS + r"]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
]
_DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"]

# name in tokenizer.ggml.pre -> (regex chain, ignore_merges, default add_bos)
_PRE: dict[str, tuple[list[str], bool, bool]] = {}
for _names, _spec in [
    (("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion"), ([_GPT2], False, False)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     ([r"\p{N}", _GPT2], False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), ([_LLAMA3], True, True)),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), ([_QWEN2], False, False)),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), ([_GPT4O], False, False)),
    (("deepseek-v3",), (_DEEPSEEK3, False, False)),
    (("kimi-k2",), ([_KIMI_K2], False, False)),
    (("deepseek-llm",), (_DEEPSEEK_LLM, False, False)),
    (("deepseek-coder",), (_DEEPSEEK_CODER, False, False)),
]:
    for _n in _names:
        _PRE[_n] = _spec

# Token texts llama.cpp treats as end-of-generation whatever the metadata says.
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
              "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
              "<end_of_utterance>", "<｜end▁of▁sentence｜>"}


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable-char map: printable Latin-1 bytes map to themselves, the other
    68 bytes to U+0100.. in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_BYTE_TO_CHAR = _byte_level_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _meta_list(meta: dict, key: str, required: bool = True) -> list | None:
    v = meta.get(key)
    if v is None:
        if required:
            raise DsdError(f"GGUF metadata has no {key!r}; the model file lacks a tokenizer "
                           "(re-convert it with llama.cpp's convert_hf_to_gguf.py)")
        return None
    return list(v)


def _meta_int(meta: dict, key: str, default: int | None) -> int | None:
    v = meta.get(key)
    return default if v is None else int(v)


class Tokenizer:
    """Text <-> token ids for one GGUF model. Build with `Tokenizer.from_metadata(meta)`."""

    def __init__(self, *, kind: str, pre: str, tokens: list[str], token_types: list[int],
                 backend: Any, token_bytes: list[bytes], bos_id: int | None, eos_id: int | None,
                 unk_id: int | None, eot_id: int | None, eom_id: int | None, add_bos: bool,
                 add_eos: bool, add_space_prefix: bool, stop_ids: set[int]):
        self.kind = kind                  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
        self.pre = pre
        self.tokens = tokens
        self.token_types = token_types
        self._backend = backend           # tokenizers.Tokenizer
        self._token_bytes = token_bytes   # id -> bytes it decodes to (special: its text)
        self._lock = threading.Lock()     # guards the encode_special_tokens toggle
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.eot_id, self.eom_id = eot_id, eom_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self.stop_ids = stop_ids
        self._special = {i for i, t in enumerate(token_types) if t in (TT_CONTROL, TT_UNKNOWN)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise DsdError("GGUF metadata has no 'tokenizer.ggml.model'; this file carries no "
                           "tokenizer (re-convert it with llama.cpp's convert_hf_to_gguf.py)")
        kind = str(kind)
        tokens = [str(t) for t in _meta_list(meta, "tokenizer.ggml.tokens")]
        # llama.cpp renames empty tokens so every id has a distinct, non-empty text
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = len(tokens)
        types = _meta_list(meta, "tokenizer.ggml.token_type", required=False)
        types = [int(t) for t in types] if types is not None else [TT_NORMAL] * n
        if len(types) != n:
            raise DsdError(f"GGUF tokenizer has {n} tokens but {len(types)} token types; the file "
                           "is corrupt, re-convert it")
        if kind == "gpt2":
            pre = str(meta.get("tokenizer.ggml.pre") or "default")
            if pre not in _PRE:
                log.warning("tokenizer: unknown pre-tokenizer %r, using gpt2's regex", pre)
            regexes, ignore_merges, def_bos = _PRE.get(pre, _PRE["gpt2"])
            merges = _meta_list(meta, "tokenizer.ggml.merges")
            backend = _build_bpe(tokens, types, [str(m) for m in merges], regexes, ignore_merges)
            token_bytes = _bpe_token_bytes(tokens, types)
            bos_d = eos_d = unk_d = None
            def_space = False
        elif kind == "llama":
            pre = "spm"
            scores = _meta_list(meta, "tokenizer.ggml.scores", required=False)
            scores = [float(s) for s in scores] if scores is not None else [0.0] * n
            bos_d, eos_d, unk_d, def_bos, def_space = 1, 2, 0, True, True
            unk_id = _meta_int(meta, "tokenizer.ggml.unknown_token_id", unk_d)
            add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", def_space))
            backend = _build_spm(tokens, types, scores, unk_id, add_space_prefix)
            token_bytes = _spm_token_bytes(tokens, types)
        else:
            raise DsdError(f"tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level "
                           "BPE and 'llama' SentencePiece)")

        bos = _meta_int(meta, "tokenizer.ggml.bos_token_id", bos_d)
        eos = _meta_int(meta, "tokenizer.ggml.eos_token_id", eos_d)
        unk = _meta_int(meta, "tokenizer.ggml.unknown_token_id", unk_d)
        eot = _meta_int(meta, "tokenizer.ggml.eot_token_id", None)
        eom = _meta_int(meta, "tokenizer.ggml.eom_token_id", None)
        ids = {"bos": bos, "eos": eos, "unk": unk, "eot": eot, "eom": eom}
        for name, v in ids.items():
            if v is not None and not 0 <= v < n:
                log.warning("tokenizer: %s token id %d outside vocab of %d; ignored", name, v, n)
                ids[name] = None
        stop = {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
        # llama.cpp also stops on the FIM repo/file-separator/pad tokens
        for key in ("tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id",
                    "tokenizer.ggml.fim_sep_token_id"):
            v = _meta_int(meta, key, None)
            if v is not None and 0 <= v < n:
                stop.add(v)
        stop |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
        # llama.cpp (llama_vocab::load, the o200k_harmony workaround): when "<|return|>" and
        # "<|call|>" end generation too, "<|end|>" does not: in gpt-oss's harmony format it
        # closes a message (an analysis channel, a tool result) and the assistant goes on
        stop_texts = {tokens[i]: i for i in stop}
        if {"<|return|>", "<|call|>", "<|end|>"} <= stop_texts.keys():
            stop = {i for i in stop if tokens[i] != "<|end|>"}
        return cls(kind=kind, pre=pre, tokens=tokens, token_types=types, backend=backend,
                   token_bytes=token_bytes, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"],
                   eot_id=ids["eot"], eom_id=ids["eom"],
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", def_bos)),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   add_space_prefix=(kind == "llama" and add_space_prefix), stop_ids=stop)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. add_bos None follows the model's add_bos_token flag; add_eos_token
        is honoured too. parse_special=False tokenizes control-token texts as plain text; a
        rendered chat prompt (chat_template.Prompt) keeps its message text plain either way."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs str, got {type(text).__name__}")
        split = getattr(text, "split_user_text", None)   # a chat_template.Prompt
        if parse_special and split is not None:
            parts = split(self.special_texts)
            if parts is not None:   # message text holds control-token text: keep it plain
                return self.encode_parts(parts, add_bos)
            text = str(text)
        with self._lock:
            self._backend.encode_special_tokens = not parse_special
            ids = self._backend.encode(text, add_special_tokens=False).ids if text else []
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @property
    def special_texts(self) -> list[str]:
        """Texts that parse_special=True turns into control/unknown tokens (longest first)."""
        if getattr(self, "_special_texts", None) is None:
            self._special_texts = sorted({self.tokens[i] for i in self._special if self.tokens[i]},
                                         key=len, reverse=True)
        return self._special_texts

    def encode_parts(self, parts: list[tuple[str, bool]], add_bos: bool | None = None) -> list[int]:
        """Token ids of the concatenated texts, each tokenized with its own parse_special flag
        (a chat prompt: the template's text with special tokens, the users' text without)."""
        ids: list[int] = []
        for text, special in parts:
            if text:
                ids += self.encode(text, add_bos=False, parse_special=special)
                if self.add_eos and self.eos_id is not None:
                    ids.pop()
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def pre_split(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer cuts `text` into before BPE (special tokens not handled);
        for checking a model's regex chain. SentencePiece vocabs have no pre-split: [text]."""
        pt = self._backend.pre_tokenizer
        if pt is None:
            return [text]
        return [bytes(_CHAR_TO_BYTE[c] for c in piece).decode("utf-8", errors="replace")
                for piece, _ in pt.pre_tokenize_str(text)]

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes one token stands for ("" for control tokens when skip_special)."""
        if skip_special and token_id in self._special:
            return b""
        if not 0 <= token_id < len(self._token_bytes):
            raise DsdError(f"token id {token_id} outside the vocab of {len(self._token_bytes)}")
        return self._token_bytes[token_id]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids`. SentencePiece vocabs drop the space added by add_space_prefix at the start
        (the leading BOS is skipped first when skip_special)."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        data = b"".join(self.token_bytes(i) for i in ids)
        if self.add_space_prefix and data.startswith(b" ") and ids and ids[0] not in self._special:
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def decoder(self, skip_special: bool = True) -> "IncrementalDecoder":
        """Streaming decoder for generated tokens (control tokens print nothing by default)."""
        return IncrementalDecoder(self, skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, pre={self.pre!r}, vocab={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, stop={sorted(self.stop_ids)})")


def _utf8_complete_prefix(buf: bytes) -> int:
    """Length of the prefix of `buf` that does not end inside an unfinished UTF-8 sequence."""
    n = len(buf)
    # look back at most 3 bytes for the lead byte of the last sequence
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0xC0 == 0x80:          # continuation byte: keep looking for the lead
            continue
        if b < 0x80:
            need = 1
        elif b & 0xE0 == 0xC0:
            need = 2
        elif b & 0xF0 == 0xE0:
            need = 3
        elif b & 0xF8 == 0xF0:
            need = 4
        else:
            return n                   # invalid lead byte: nothing to wait for
        return n - back if back < need else n
    return n                           # only continuation bytes: invalid, emit (replaced)


class IncrementalDecoder:
    """Turns a stream of token ids into text, holding back bytes of an unfinished UTF-8 character
    (byte-level BPE and <0xXX> byte tokens split emoji and CJK across tokens)."""

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self._tok = tok
        self._skip = skip_special
        self._buf = b""

    def push(self, token_id: int) -> str:
        self._buf += self._tok.token_bytes(int(token_id), self._skip)
        cut = _utf8_complete_prefix(self._buf)
        if cut == 0:
            return ""
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out.decode("utf-8", errors="replace")

    def flush(self) -> str:
        out, self._buf = self._buf, b""
        return out.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------- backend builders
def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    # llama.cpp keeps the last id for a duplicated text; do the same
    return {t: i for i, t in enumerate(tokens)}


def _added_tokens(tokens: list[str], types: list[int]) -> list:
    from tokenizers import AddedToken

    out = []
    for t, ty in zip(tokens, types):
        if ty in (TT_CONTROL, TT_UNKNOWN):
            out.append(AddedToken(t, special=True, normalized=False))
        elif ty == TT_USER_DEFINED:
            out.append(AddedToken(t, special=False, normalized=False))
    return out


def _build_bpe(tokens: list[str], types: list[int], merges: list[str], regexes: list[str],
               ignore_merges: bool):
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = _vocab_dict(tokens)
    pairs, dropped = [], 0
    for m in merges:
        # llama.cpp splits at the first space after position 0 (a merge side may be a lone space)
        pos = m.find(" ", 1)
        if pos < 0:
            dropped += 1
            continue
        a, b = m[:pos], m[pos + 1:]
        if a in vocab and b in vocab and a + b in vocab:
            pairs.append((a, b))
        else:
            dropped += 1
    if dropped:
        log.warning("tokenizer: %d of %d merges reference tokens outside the vocab; ignored",
                    dropped, len(merges))
    model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False,
                       byte_fallback=False)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.add_tokens(_added_tokens(tokens, types))
    return hf


def _bpe_token_bytes(tokens: list[str], types: list[int]) -> list[bytes]:
    out = []
    for t, ty in zip(tokens, types):
        if ty in (TT_NORMAL, TT_UNUSED, TT_BYTE):
            try:
                out.append(bytes(_CHAR_TO_BYTE[c] for c in t))
                continue
            except KeyError:
                pass   # not in the byte-level alphabet: treat the text as raw
        out.append(t.encode("utf-8"))
    return out


def _build_spm(tokens: list[str], types: list[int], scores: list[float], unk_id: int | None,
               add_space_prefix: bool):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers

    vocab = _vocab_dict(tokens)
    # Every split of a mergeable token into two vocab pieces is a merge; rank by the merged
    # token's score, highest first (llama.cpp merges the bigram whose result scores highest).
    cand = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TT_BYTE or len(t) < 2 or vocab.get(t) != i:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                cand.append((-scores[i], i, k, a, b))
    cand.sort()
    pairs = [(a, b) for _, _, _, a, b in cand]
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                       byte_fallback=has_bytes)
    hf = HFTokenizer(model)
    norm = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    hf.normalizer = normalizers.Sequence(norm)
    hf.add_tokens(_added_tokens(tokens, types))
    return hf


def _spm_token_bytes(tokens: list[str], types: list[int]) -> list[bytes]:
    out = []
    for t, ty in zip(tokens, types):
        if ty == TT_BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out.append(bytes([int(t[3:5], 16)]))
        elif ty in (TT_NORMAL, TT_UNUSED):
            out.append(t.replace("▁", " ").encode("utf-8"))
        elif ty == TT_UNKNOWN:
            out.append("▅".encode("utf-8"))  # llama.cpp prints unknown pieces as U+2585
        else:
            out.append(t.encode("utf-8"))
    return out
