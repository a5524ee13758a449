"""gpt-oss (GGUF arch `gpt-oss`, OpenAI's open-weight MoE; llama.cpp LLM_ARCH_OPENAI_MOE).

Per layer (the llama block shape, h + attn(norm(h)); h + ffn(norm(h))):
  attention  GQA with biases on q / k / v / o, NeoX RoPE (YaRN-scaled when rope.scaling.type is
             yarn), softmax scale 1/sqrt(head_dim), and a learned sink logit per query head that
             joins every softmax denominator (attn_sinks [H]); layers with i % 2 == 0 see only
             the last attention.sliding_window positions (128 in the released models;
             llama.cpp's set_swa_pattern(2)), the others every position
  ffn norm   blk.N.post_attention_norm (llama.cpp's attn_post_norm), kept as self.ffn_norm[i]
  ffn        routed experts only: router logits W x + b, top-k of the raw logits, softmax over
             those k (GATING_SOFTMAX_WEIGHT); each expert
             down(swiglu_oai(gate x + b_g, up x + b_u)) + b_d, with the clamped SwiGLU
             min(g, 7) * sigmoid(1.702 min(g, 7)) * (clamp(u, -7, 7) + 1)
Expert weights are MXFP4 in the released files (any dsd type works).  The routed experts run
through moe.RoutedExperts with its bias / activation options, i.e. the gathered products with
biases and activation in numpy: the fused decode kernels know neither.  In the daemon's split
placements the expert biases go with the experts (experts: the worker's expert range; rows: the
gate / up bias columns of its rows, the down bias to the one worker whose rows start at 0).

Metadata read: gpt-oss.{block_count, embedding_length, attention.head_count(_kv),
attention.key_length, attention.layer_norm_rms_epsilon, attention.sliding_window,
rope.freq_base, rope.scaling.{type,factor,original_context_length,yarn_beta_fast,yarn_beta_slow},
expert_count, expert_used_count, expert_feed_forward_length, context_length}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dsd.shard import ops
from dsd.shard.kernels import attention as attn_kernels
from dsd.shard.models.llama import Attention, Model
from dsd.shard.moe import ACT_SWIGLU_OAI, GATING_SOFTMAX_WEIGHT, moe_ffn_from_weights

ARCH = "gpt-oss"


@dataclass
class ModelArgs:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_base: float
    context_length: int
    n_experts: int
    n_experts_used: int
    expert_ffn: int
    sliding_window: int = 0        # 0: every layer attends to all positions
    swa_pattern: int = 2           # layer i slides when i % swa_pattern < swa_pattern - 1
    yarn_factor: float = 1.0       # > 1 when rope.scaling.type == yarn
    yarn_orig_ctx: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    swiglu_alpha: float = 1.702    # fixed in llama.cpp's graph (not in the GGUF)
    swiglu_limit: float = 7.0
    arch: str = ARCH

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_dict(cls, meta: dict, vocab_size: int | None = None) -> "ModelArgs":
        arch = meta.get("general.architecture", ARCH)

        def g(key, default=None):
            v = meta.get(f"{arch}.{key}", default)
            return v[0] if isinstance(v, list) and v else v

        d = int(g("embedding_length"))
        H = int(g("attention.head_count"))
        hd = int(g("attention.key_length", d // H))
        ctx = int(g("context_length", 4096))
        yarn = g("rope.scaling.type") == "yarn" and float(g("rope.scaling.factor", 1.0) or 1.0) > 1.0
        return cls(
            n_layers=int(g("block_count")), d_model=d, n_heads=H,
            n_kv_heads=int(g("attention.head_count_kv", H)), head_dim=hd,
            vocab_size=int(vocab_size or g("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
            norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(g("rope.freq_base", 150000.0)), context_length=ctx,
            n_experts=int(g("expert_count")), n_experts_used=int(g("expert_used_count")),
            expert_ffn=int(g("expert_feed_forward_length", 0) or g("feed_forward_length", 0) or 0),
            sliding_window=int(g("attention.sliding_window", 0) or 0),
            yarn_factor=float(g("rope.scaling.factor")) if yarn else 1.0,
            yarn_orig_ctx=int(g("rope.scaling.original_context_length", ctx) or ctx),
            yarn_beta_fast=float(g("rope.scaling.yarn_beta_fast", 32.0) or 32.0),
            yarn_beta_slow=float(g("rope.scaling.yarn_beta_slow", 1.0) or 1.0),
            arch=arch)

    def sliding(self, i: int) -> bool:
        """Whether layer i uses the sliding window (llama.cpp set_swa_pattern(2): even layers)."""
        n = self.swa_pattern
        return self.sliding_window > 0 and (n == 0 or i % n < n - 1)


def yarn_rope(a: ModelArgs) -> tuple[np.ndarray | None, float]:
    """-> (rope frequencies [head_dim/2] or None, cos/sin magnitude) as ggml's rope_yarn runs them
    with ext_factor 1: per pair i, frequency theta_i / factor blended towards theta_i by the ramp
    between the beta_fast / beta_slow correction dims (floored / ceiled, as
    ggml_rope_yarn_corr_dims does; transformers' "truncate": true), and cos/sin scaled by
    1 + 0.1 ln(factor)."""
    if a.yarn_factor <= 1.0:
        return None, 1.0
    d, base, f = a.head_dim, a.rope_base, a.yarn_factor
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)

    def corr_dim(n_rot: float) -> float:
        return d * math.log(a.yarn_orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(a.yarn_beta_fast)))
    high = min(d - 1.0, math.ceil(corr_dim(a.yarn_beta_slow)))
    keep = 1.0 - np.clip((np.arange(d // 2) - low) / max(0.001, high - low), 0.0, 1.0)  # 1: original
    return inv / f * (1.0 - keep) + inv * keep, 1.0 + 0.1 * math.log(f)


class _SplitRows:
    """One fused matrix [q; k; v] (blk.N.attn_qkv, convert_hf_to_gguf.py --fuse-qkv) called like a
    FusedLinear: x -> [x W_q^T, x W_k^T, x W_v^T] (column views of one product)."""

    def __init__(self, lin, sizes: list[int]):
        self.lin, self.bounds = lin, np.cumsum([0] + sizes).tolist()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        y = self.lin(x)
        return [y[:, a:b] for a, b in zip(self.bounds, self.bounds[1:])]


class SinkAttention(Attention):
    """llama's GQA plus q/k/v/o biases, per-head sinks and (on sliding layers) a window.
    q / k / v come from attn_q / attn_k / attn_v or from one fused attn_qkv (+ its bias)."""

    def __init__(self, args: ModelArgs, w, i: int, rope: ops.RopeTable):
        p = f"blk.{i}."

        def bias(name):
            return w.vector(p + name) if w.has(p + name) else None

        if w.has(p + "attn_qkv.weight"):
            self.layer, self.args, self.rope = i, args, rope
            self.scale = ops.default_attn_scale(args.head_dim)
            self.wq = self.wk = self.wv = None
            self.wo = w.linear(p + "attn_output.weight")
            sizes = [args.n_heads * args.head_dim] + [args.n_kv_heads * args.head_dim] * 2
            self.w_qkv = _SplitRows(w.linear(p + "attn_qkv.weight"), sizes)
            b = bias("attn_qkv.bias")
            self.bq, self.bk, self.bv = (None, None, None) if b is None else \
                (b[a:c] for a, c in zip(self.w_qkv.bounds, self.w_qkv.bounds[1:]))
        else:
            super().__init__(args, w, i, rope)
            self.bq, self.bk, self.bv = bias("attn_q.bias"), bias("attn_k.bias"), bias("attn_v.bias")
        self.bo = bias("attn_output.bias")
        self.sinks = w.vector(p + "attn_sinks.weight").astype(np.float32).reshape(-1)  # [H]
        self.window = args.sliding_window if args.sliding(i) else 0

    def qkv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.args
        T = x.shape[0]
        q, k, v = self.w_qkv(x)
        if self.bq is not None:
            q = q + self.bq
        if self.bk is not None:
            k = k + self.bk
        if self.bv is not None:
            v = v + self.bv
        return (q.reshape(T, a.n_heads, a.head_dim), k.reshape(T, a.n_kv_heads, a.head_dim),
                v.reshape(T, a.n_kv_heads, a.head_dim))

    def __call__(self, x: np.ndarray, batch) -> np.ndarray:
        a = self.args
        T = x.shape[0]
        q, k, v = self.qkv(x)
        q = self.rope.apply(q, batch.positions)
        k = self.rope.apply(k, batch.positions)
        out = np.empty((T, a.n_heads, a.head_dim), dtype=np.float32)
        for s in batch.segments:
            sl = slice(s.start, s.start + s.n)
            kv = s.cache.append(self.layer, s.pos0, heads_first=True, k=k[sl], v=v[sl])
            out[sl] = attn_kernels.causal_attention(q[sl], kv["k"], kv["v"], s.pos0, self.scale,
                                                    sinks=self.sinks, window=self.window)
        y = self.wo(out.reshape(T, a.n_heads * a.head_dim))
        return y if self.bo is None else y + self.bo


class GptOssModel(Model):
    def __init__(self, args: ModelArgs, weights):
        self.args = a = args
        w = weights
        self.init_embeddings(w)
        freqs, mag = yarn_rope(a)
        self.rope = ops.RopeTable(a.head_dim, a.rope_base, "neox", max_pos=min(a.context_length, 4096),
                                  freqs=freqs, mscale=mag)
        self.attn_norm, self.ffn_norm, self.attn, self.ffn = [], [], [], []
        for i in range(a.n_layers):
            p = f"blk.{i}."
            self.attn_norm.append(w.vector(p + "attn_norm.weight"))
            self.ffn_norm.append(w.vector(p + "post_attention_norm.weight"))
            self.attn.append(SinkAttention(a, w, i, self.rope))
            self.ffn.append(moe_ffn_from_weights(w, i, a.n_experts_used, gating=GATING_SOFTMAX_WEIGHT,
                                                 act=ACT_SWIGLU_OAI, alpha=a.swiglu_alpha,
                                                 limit=a.swiglu_limit))


def build(gguf_model, weights) -> GptOssModel:
    # daemon placements (experts / rows) give each worker the expert biases' share that matches
    # its expert weights (daemon/placement.py); moe.RoutedExperts checks the shapes agree
    emb = gguf_model.tensors["token_embd.weight"]
    return GptOssModel(ModelArgs.from_dict(gguf_model.metadata, vocab_size=emb.shape[0]), weights)


def gguf_spec(g, m, s) -> None:
    """gguf_check's expected tensors of a gpt-oss file (registered by dsd.shard.models)."""
    from dsd.shard import gguf_check as gc

    c = gc._common(g, m, s)
    D = c["D"]
    H, Hkv, hd = gc._heads(g, m, D, key_default=True)
    E, _ = gc._expert_counts(g, m)
    if not E:
        raise gc._fail(g.path, f"{g.architecture}.expert_count is missing or 0; every gpt-oss layer is MoE",
                       gc._REFIX)
    F = m.int("expert_feed_forward_length", lo=1)
    m.int("attention.sliding_window", 0, lo=0)
    for i in range(c["L"]):
        p = f"blk.{i}."
        s.need(p + "attn_norm.weight", D)
        s.need(p + "post_attention_norm.weight", D)
        if s.has(p + "attn_qkv.weight"):  # convert_hf_to_gguf.py --fuse-qkv
            s.need(p + "attn_qkv.weight", (H + 2 * Hkv) * hd, D)
            s.need(p + "attn_qkv.bias", (H + 2 * Hkv) * hd, optional=True)
        else:
            for n, rows in (("attn_q", H * hd), ("attn_k", Hkv * hd), ("attn_v", Hkv * hd)):
                s.need(p + n + ".weight", rows, D)
                s.need(p + n + ".bias", rows, optional=True)
        s.need(p + "attn_output.weight", D, H * hd)
        s.need(p + "attn_output.bias", D, optional=True)
        s.need(p + "attn_sinks.weight", H)
        s.need(p + "ffn_gate_inp.weight", E, D)
        s.need(p + "ffn_gate_inp.bias", E, optional=True)
        s.need(p + "ffn_gate_exps.weight", E, F, D)
        s.need(p + "ffn_up_exps.weight", E, F, D)
        s.need(p + "ffn_down_exps.weight", E, D, F)
        s.need(p + "ffn_gate_exps.bias", E, F, optional=True)
        s.need(p + "ffn_up_exps.bias", E, F, optional=True)
        s.need(p + "ffn_down_exps.bias", E, D, optional=True)
