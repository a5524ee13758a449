"""Write tiny random-weight llama GGUF files for tests (via gguf-py's GGUFWriter)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize


def add_weight(w: GGUFWriter, name: str, a: np.ndarray, qtype: GGMLQuantizationType) -> None:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32 or a.ndim == 1:
        w.add_tensor(name, a)
    else:
        q = quantize(a, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)


def write_tiny_llama(path, *, n_layers=2, d=64, n_heads=4, n_kv=2, ffn=128, vocab=96,
                     qtype=GGMLQuantizationType.F32, tied=False, seed=0, ctx=256,
                     rope_base=10000.0) -> str:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // n_heads)
    w.add_vocab_size(vocab)
    # a small byte-level BPE vocabulary: printable ASCII, one merge, then filler tokens
    tokens = [chr(c) for c in range(33, 127)] + ["ab"]
    tokens += [f"<x{i}>" for i in range(vocab - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens[:vocab])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def r(*shape, scale=0.5):
        return rng.standard_normal(shape).astype(np.float32) * scale / np.sqrt(shape[-1])

    add_weight(w, "token_embd.weight", rng.standard_normal((vocab, d)).astype(np.float32), qtype)
    add_weight(w, "output_norm.weight", 1 + 0.1 * rng.standard_normal(d).astype(np.float32), qtype)
    if not tied:
        add_weight(w, "output.weight", r(vocab, d, scale=2.0), qtype)
    hd = d // n_heads
    for i in range(n_layers):
        p = f"blk.{i}."
        add_weight(w, p + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(d).astype(np.float32), qtype)
        add_weight(w, p + "attn_q.weight", r(n_heads * hd, d, scale=2.0), qtype)
        add_weight(w, p + "attn_k.weight", r(n_kv * hd, d, scale=2.0), qtype)
        add_weight(w, p + "attn_v.weight", r(n_kv * hd, d), qtype)
        add_weight(w, p + "attn_output.weight", r(d, n_heads * hd), qtype)
        add_weight(w, p + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(d).astype(np.float32), qtype)
        add_weight(w, p + "ffn_gate.weight", r(ffn, d), qtype)
        add_weight(w, p + "ffn_up.weight", r(ffn, d), qtype)
        add_weight(w, p + "ffn_down.weight", r(d, ffn), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
