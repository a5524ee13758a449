"""A small byte-level BPE vocab learned with `tokenizers` on a seeded corpus, under a given
pre-tokenizer regex: the reference tokenizer (transformers) and the GGUF-style metadata dsd
reads, for testing a tokenizer.ggml.pre type against a model maker's own pattern."""
from __future__ import annotations

import json
import random


def bpe_pair(pattern: str, pre: str, parts: list[str], text: str, special: list[str], seed: int,
             **meta_ids) -> tuple:
    """-> (dsd Tokenizer, transformers PreTrainedTokenizerFast, metadata) over one vocab of
    ~1200 tokens learned from 300 random joins of `parts` plus `text`, split by `pattern`.
    meta_ids: tokenizer.ggml.<name> = the id of that token text (e.g. eos_token_id="<|end|>")."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dsd.shard.tokenizer import _BYTE_TO_CHAR, Tokenizer

    rng = random.Random(seed)
    corpus = ["".join(rng.choice(parts) for _ in range(60)) for _ in range(300)] + [text] * 5
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    alphabet = [_BYTE_TO_CHAR[b] for b in range(256)]
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1200, initial_alphabet=alphabet,
                                                       show_progress=False))
    hf.add_special_tokens(special)
    vocab = hf.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = json.loads(hf.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": False,
            **{f"tokenizer.ggml.{k}": vocab[v] for k, v in meta_ids.items()}}
    return Tokenizer.from_metadata(meta), PreTrainedTokenizerFast(tokenizer_object=hf), meta
