"""Llama architecture (also SmolLM2, Mistral, and Mixtral when expert tensors are present).

Per layer:  h += Wo · attn(rope(Wq·norm(h)), rope(Wk·norm(h)), Wv·norm(h))
            h += FFN(norm(h)),  FFN = W_down · (silu(W_gate·x) * W_up·x)   (dense SwiGLU)
GGUF llama files store Wq/Wk rows permuted so that RoPE rotates adjacent pairs ("norm" style).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsd.shard import ops
from dsd.shard.batch import Batch
from dsd.shard.kv_cache import SequenceCache
from dsd.shard.ffn import DenseFFN  # noqa: F401  (deepseek2 and the daemon use it from here)
from dsd.shard.weights import Embedding, FusedLinear


@dataclass
class ModelArgs:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    rope_base: float
    rope_dim: int
    context_length: int
    rope_scale: float = 1.0        # linear position scaling (rope.scaling.type == "linear")
    n_experts: int = 0             # Mixtral-style MoE when > 0
    n_experts_used: int = 0

    @classmethod
    def from_dict(cls, meta: dict, arch: str | None = None, vocab_size: int | None = None) -> "ModelArgs":
        arch = arch or meta["general.architecture"]

        def g(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        d = int(g("embedding_length"))
        n_heads = int(g("attention.head_count"))
        head_dim = int(g("attention.key_length", d // n_heads))
        kv = g("attention.head_count_kv", n_heads)
        if isinstance(kv, list):  # per-layer list in some files; llama uses one value
            kv = kv[0]
        scale = 1.0
        if g("rope.scaling.type") == "linear" and g("rope.scaling.factor"):
            scale = 1.0 / float(g("rope.scaling.factor"))
        return cls(
            arch=arch,
            n_layers=int(g("block_count")),
            d_model=d,
            n_heads=n_heads,
            n_kv_heads=int(kv),
            head_dim=head_dim,
            ffn_dim=int(g("feed_forward_length", 0) or 0),
            vocab_size=int(vocab_size or g("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
            norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(g("rope.freq_base", 10000.0)),
            rope_dim=int(g("rope.dimension_count", head_dim)),
            context_length=int(g("context_length", 4096)),
            rope_scale=scale,
            n_experts=int(g("expert_count", 0) or 0),
            n_experts_used=int(g("expert_used_count", 0) or 0),
        )


def attend(q: np.ndarray, k, v, q_pos0: int, scale: float) -> np.ndarray:
    """Causal attention over a SequenceCache's views: float32 / float16 arrays (f32, f16 caches)
    through ops.attention; a bf16 / q8_0 cache's KVRows through kernels/attention.py's
    causal_attention, whose decode kernels read the stored rows directly (the prompt path
    dequantizes the keys each query chunk sees)."""
    if isinstance(k, np.ndarray):
        return ops.attention(q, k, v, q_pos0, scale)
    from dsd.shard.kernels import attention as attn_kernels

    return attn_kernels.causal_attention(q, k, v, q_pos0, scale)


class Attention:
    """Grouped-query attention with RoPE; K/V cached per sequence as [L, Hkv, Dh]."""

    def __init__(self, args: ModelArgs, w, i: int, rope: ops.RopeTable):
        p = f"blk.{i}."
        self.layer = i
        self.wq, self.wk = w.linear(p + "attn_q.weight"), w.linear(p + "attn_k.weight")
        self.wv, self.wo = w.linear(p + "attn_v.weight"), w.linear(p + "attn_output.weight")
        self.w_qkv = FusedLinear([self.wq, self.wk, self.wv])  # decode: one kernel call
        self.args, self.rope = args, rope
        self.scale = ops.default_attn_scale(args.head_dim)

    def qkv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [T, D] -> q [T, H, Dh], k [T, Hkv, Dh], v [T, Hkv, Dh] (before RoPE)."""
        a = self.args
        T = x.shape[0]
        q, k, v = self.w_qkv(x)
        return (q.reshape(T, a.n_heads, a.head_dim), k.reshape(T, a.n_kv_heads, a.head_dim),
                v.reshape(T, a.n_kv_heads, a.head_dim))

    def __call__(self, x: np.ndarray, batch: Batch) -> np.ndarray:
        a = self.args
        T = x.shape[0]
        q, k, v = self.qkv(x)
        q = self.rope.apply(q, batch.positions)
        k = self.rope.apply(k, batch.positions)
        out = np.empty((T, a.n_heads, a.head_dim), dtype=np.float32)
        for s in batch.segments:
            sl = slice(s.start, s.start + s.n)
            kv = s.cache.append(self.layer, s.pos0, heads_first=True, k=k[sl], v=v[sl])
            out[sl] = attend(q[sl], kv["k"], kv["v"], s.pos0, self.scale)
        return self.wo(out.reshape(T, a.n_heads * a.head_dim))


class Model:
    """A decoder-only transformer as a list of (attention, ffn) blocks; see module docstring."""

    def __init__(self, args: ModelArgs, weights, ffn_factory=None):
        self.args = args
        w = weights
        self.init_embeddings(w)
        freqs = None
        if w.has("rope_freqs.weight"):  # llama3-style per-frequency divisors
            base = 1.0 / (args.rope_base ** (np.arange(0, args.rope_dim, 2) / args.rope_dim))
            freqs = base / w.vector("rope_freqs.weight").astype(np.float64)
        if args.rope_scale != 1.0:
            base = freqs if freqs is not None else \
                1.0 / (args.rope_base ** (np.arange(0, args.rope_dim, 2) / args.rope_dim))
            freqs = base * args.rope_scale
        self.rope = ops.RopeTable(args.rope_dim, args.rope_base, "norm",
                                  max_pos=min(args.context_length, 4096), freqs=freqs)
        self.attn_norm, self.ffn_norm, self.attn, self.ffn = [], [], [], []
        for i in range(args.n_layers):
            p = f"blk.{i}."
            self.attn_norm.append(w.vector(p + "attn_norm.weight"))
            self.ffn_norm.append(w.vector(p + "ffn_norm.weight"))
            self.attn.append(Attention(args, w, i, self.rope))
            if ffn_factory is not None and w.has(p + "ffn_gate_inp.weight"):
                self.ffn.append(ffn_factory(args, w, i))
            else:
                self.ffn.append(DenseFFN(w.linear(p + "ffn_gate.weight"), w.linear(p + "ffn_up.weight"),
                                         w.linear(p + "ffn_down.weight")))

    def init_embeddings(self, w) -> None:
        """token_embd, output_norm and output (tied to token_embd when output.weight is absent)."""
        self.tok_embd = Embedding(w.linear("token_embd.weight"))
        self.output_norm = w.vector("output_norm.weight")
        self.output = w.linear("output.weight") if w.has("output.weight") else w.linear("token_embd.weight")

    @property
    def n_layers(self) -> int:
        return self.args.n_layers

    kv_type = "f32"   # the default cache type of new_cache (dsd generate --kv-type sets it)

    def new_cache(self, max_len: int | None = None, kv_type: str | None = None) -> SequenceCache:
        """A KV cache for one sequence: kv_type f32 | f16 | bf16 | q8_0 (shard/kv_cache.py;
        default self.kv_type)."""
        return SequenceCache(self.args.n_layers, max_len or self.args.context_length,
                             kv_type=kv_type or self.kv_type)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.tok_embd(tokens)

    def block(self, i: int, h: np.ndarray, batch: Batch) -> np.ndarray:
        eps = self.args.norm_eps
        h = h + self.attn[i](ops.rms_norm(h, self.attn_norm[i], eps), batch)
        return h + self.ffn[i](ops.rms_norm(h, self.ffn_norm[i], eps))

    def head(self, h: np.ndarray) -> np.ndarray:
        return self.output(ops.rms_norm(h, self.output_norm, self.args.norm_eps))

    def forward(self, batch: Batch) -> np.ndarray:
        """Run all layers; return float32 logits [len(logit_rows) or T, vocab]."""
        h = self.embed(batch.tokens)
        for i in range(self.n_layers):
            h = self.block(i, h, batch)
        batch.finish()
        if batch.logit_rows is not None:
            h = h[batch.logit_rows]
        return self.head(h)


def build(gguf_model, weights) -> Model:
    emb = gguf_model.tensors["token_embd.weight"]
    args = ModelArgs.from_dict(gguf_model.metadata, vocab_size=emb.shape[0])
    ffn_factory = None
    if args.n_experts:
        from dsd.shard.moe import llama_moe_ffn as ffn_factory  # Mixtral: experts in a llama body
    return Model(args, weights, ffn_factory)
