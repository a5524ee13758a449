"""DeepSeek V2 / V2-Lite / V3 / R1 (GGUF arch `deepseek2`): multi-head latent attention + DeepSeekMoE.

Attention (MLA, arXiv 2405.04434), per token x [D], heads H, dims nope + rope = dk, v:
    q        = W_q x                       or W_qb rms(W_qa x)          -> [H, nope + rope]
    c, k_pe  = W_kva x  split [kv_lora | rope];  c = rms(c)  (the latent), k_pe shared by heads
    k_h      = [W_uk,h c ; rope(k_pe)],  v_h = W_uv,h c
We never expand K/V: score_h = q_nope,h . W_uk,h c + rope(q_pe,h) . rope(k_pe)
                             = (W_uk,h^T q_nope,h) . c + ...          ("absorbed" form)
so attention is MQA over the cached rows [c ; rope(k_pe)] (kv_lora + rope floats per token) and
the per-head output W_uv,h (sum_j p_j c_j) is applied after the softmax.
GGUF layouts: attn_k_b [H, kv_lora, nope] = W_uk,h^T and attn_v_b [H, v, kv_lora] = W_uv,h
(current converters), or fused attn_kv_b [H*(nope+v), kv_lora] (older files).
RoPE: adjacent pairs (llama.cpp ROPE_TYPE_NORM; the GGUF rope dims are in checkpoint order),
YaRN frequencies when rope.scaling.type == yarn; the attention scale is
(1 + yarn_log_multiplier * ln factor)^2 / sqrt(dk)  (the GGUF key holds 0.1 * mscale_all_dim).
FFN: the first leading_dense_block_count layers are dense SwiGLU; the rest are routed experts
plus expert_shared_count shared experts (see dsd.shard.moe for the routing semantics).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dsd.errors import UnsupportedModelError
from dsd.shard import ops
from dsd.shard.batch import Batch
from dsd.shard.models.llama import DenseFFN, Model, ModelArgs, attend
from dsd.shard.moe import moe_ffn_from_weights
from dsd.shard.weights import ExpertStack, FusedLinear


@dataclass
class DeepSeek2Args(ModelArgs):
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    n_shared: int = 0
    dense_lead: int = 0
    expert_ffn: int = 0
    gating: int = 1
    weights_norm: bool = False
    weights_scale: float = 0.0
    n_groups: int = 1
    n_groups_used: int = 0
    yarn_factor: float = 1.0        # > 1 when rope.scaling.type == yarn
    yarn_orig_ctx: int = 4096
    yarn_log_mul: float = 0.0       # raw GGUF value (0.1 * mscale_all_dim)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    @classmethod
    def from_dict(cls, meta: dict, arch: str | None = None, vocab_size: int | None = None) -> "DeepSeek2Args":
        arch = arch or meta["general.architecture"]
        base = ModelArgs.from_dict(meta, arch, vocab_size)

        def g(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        rope = int(g("rope.dimension_count", 64))
        dk = int(g("attention.key_length_mla", g("attention.key_length", 192)))
        dv = int(g("attention.value_length_mla", g("attention.value_length", 128)))
        kv_lora = g("attention.kv_lora_rank")
        if kv_lora is None:
            raise UnsupportedModelError(f"{arch}: metadata lacks {arch}.attention.kv_lora_rank; "
                                        "re-convert the model with a current llama.cpp")
        yarn = g("rope.scaling.type") == "yarn" and float(g("rope.scaling.factor", 1.0) or 1.0) > 1.0
        return cls(**{**asdict(base), "rope_dim": rope, "rope_scale": 1.0},
                   q_lora_rank=int(g("attention.q_lora_rank", 0) or 0), kv_lora_rank=int(kv_lora),
                   qk_nope=dk - rope, qk_rope=rope, v_head=dv,
                   n_shared=int(g("expert_shared_count", 0) or 0),
                   dense_lead=int(g("leading_dense_block_count", 0) or 0),
                   expert_ffn=int(g("expert_feed_forward_length", 0) or 0),
                   gating=int(g("expert_gating_func", 1) or 1),
                   weights_norm=bool(g("expert_weights_norm", False)),
                   weights_scale=float(g("expert_weights_scale", 0.0) or 0.0),
                   n_groups=int(g("expert_group_count", 1) or 1),
                   n_groups_used=int(g("expert_group_used_count", 0) or 0),
                   yarn_factor=float(g("rope.scaling.factor")) if yarn else 1.0,
                   yarn_orig_ctx=int(g("rope.scaling.original_context_length", base.context_length)),
                   yarn_log_mul=float(g("rope.scaling.yarn_log_multiplier", 0.0) or 0.0),
                   yarn_beta_fast=float(g("rope.scaling.yarn_beta_fast", 32.0) or 32.0),
                   yarn_beta_slow=float(g("rope.scaling.yarn_beta_slow", 1.0) or 1.0))


def yarn_rope(a: DeepSeek2Args) -> tuple[np.ndarray | None, float, float]:
    """-> (rope frequencies [rope/2] or None, cos/sin magnitude, attention-scale multiplier).

    Frequencies blend interpolated (f/factor) and original ones over the dims between the
    beta_fast/beta_slow correction bounds (YaRN; ggml's rope_yarn with ext_factor 1).  llama.cpp
    keeps cos/sin at unit magnitude when yarn_log_multiplier is set (mscale == mscale_all_dim,
    as in every DeepSeek config) and folds mscale^2 into the softmax scale instead.
    """
    if a.yarn_factor <= 1.0:
        return None, 1.0, 1.0
    d, base, f = a.qk_rope, a.rope_base, a.yarn_factor
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)

    def corr_dim(n_rot: float) -> float:
        return d * math.log(a.yarn_orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(a.yarn_beta_fast)))
    high = min(d - 1.0, math.ceil(corr_dim(a.yarn_beta_slow)))
    mix = 1.0 - np.clip((np.arange(d // 2) - low) / max(0.001, high - low), 0.0, 1.0)  # 1 = original
    freqs = inv / f * (1.0 - mix) + inv * mix
    log_mul = a.yarn_log_mul / 0.1  # = mscale_all_dim
    mag = 1.0 if log_mul != 0.0 else 1.0 + 0.1 * math.log(f)
    mscale = mag * (1.0 + 0.1 * log_mul * math.log(f))
    return freqs, mag, mscale * mscale


class MLAttention:
    """MLA with a latent KV cache: per layer one array 'mla' [L, kv_lora + rope], stored in the
    cache's kv_type (q8_0: blocks of 32 along the latent; needs kv_lora and rope % 32 == 0).

    Two parts, so heads can be split between processes: prelude(x) -> (q_in, latent row) needs
    the whole-layer weights (kv_a, its norm, q_a), heads(q_in, lat) the per-head ones (q / q_b
    rows, k_b, v_b, and attn_output's columns).  self.H is the number of heads whose weights
    this object holds (all of them, unless a worker's weight source holds a head range), and
    heads() returns those heads' share of the output projection."""

    def __init__(self, a: DeepSeek2Args, w, i: int, rope: ops.RopeTable, scale: float):
        p = f"blk.{i}."
        self.layer, self.a, self.rope, self.scale = i, a, rope, scale
        nope, dv, kvl = a.qk_nope, a.v_head, a.kv_lora_rank
        if w.has(p + "attn_q.weight"):
            self.wq, self.wq_a = w.linear(p + "attn_q.weight"), None
            q_rows = self.wq.rows
        else:
            self.wq = None
            self.wq_a, self.q_a_norm = w.linear(p + "attn_q_a.weight"), w.vector(p + "attn_q_a_norm.weight")
            self.wq_b = w.linear(p + "attn_q_b.weight")
            q_rows = self.wq_b.rows
        self.H = H = q_rows // (nope + a.qk_rope)
        self.wkv_a = w.linear(p + "attn_kv_a_mqa.weight")       # [kv_lora + rope, D]
        self.kv_norm = w.vector(p + "attn_kv_a_norm.weight")     # [kv_lora]
        if self.wq_a is not None:  # both multiply x: one kernel call in decode
            self.w_qa_kva = FusedLinear([self.wq_a, self.wkv_a])
        self.wo = w.linear(p + "attn_output.weight")             # [D, H*v]
        self.k_b_f32 = self.k_b = None
        if w.has(p + "attn_k_b.weight"):
            self.k_b = w.experts(p + "attn_k_b.weight")         # [H, kv_lora, nope]: W_uk,h^T per head
            self.v_b = w.experts(p + "attn_v_b.weight")         # [H, v, kv_lora]:    W_uv,h per head
        elif w.has(p + "attn_kv_b.weight"):
            kvb = w.linear(p + "attn_kv_b.weight")               # [H*(nope+v), kv_lora]
            # absorbing q needs x @ W_uk,h (not W.T): keep the small K half as float32 [H, nope, kv_lora]
            self.k_b_f32 = np.ascontiguousarray(kvb.dequantize().reshape(H, nope + dv, kvl)[:, :nope])
            self.v_b = ExpertStack(kvb.raw.reshape(H, nope + dv, -1)[:, nope:], kvb.ggml_type, kvl,
                                   p + "attn_kv_b.weight[v]")    # [H, v, kv_lora] view, no copy
        else:
            raise UnsupportedModelError(f"layer {i}: neither attn_k_b/attn_v_b nor attn_kv_b is present")

    def __call__(self, x: np.ndarray, batch: Batch) -> np.ndarray:
        return self.heads(*self.prelude(x, batch), batch)

    def prelude(self, x: np.ndarray, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """x [T, D] -> (q_in: x, or rms(W_qa x) [T, q_lora]; lat [T, kv_lora + rope]: the cached
        row [rms(c) ; rope(k_pe)])."""
        a = self.a
        T, kvl = x.shape[0], a.kv_lora_rank
        if self.wq is not None:
            q_in, ckv = x, self.wkv_a(x)                        # ckv [T, kv_lora + rope]
        else:
            qa, ckv = self.w_qa_kva(x)                          # [T, q_lora], [T, kv_lora + rope]
            q_in = ops.rms_norm(qa, self.q_a_norm, a.norm_eps)
        lat = np.empty((T, kvl + a.qk_rope), dtype=np.float32)
        lat[:, :kvl] = ops.rms_norm(ckv[:, :kvl], self.kv_norm, a.norm_eps)
        lat[:, kvl:] = self.rope.apply(ckv[:, None, kvl:], batch.positions)[:, 0]
        return q_in, lat

    def heads(self, q_in: np.ndarray, lat: np.ndarray, batch: Batch) -> np.ndarray:
        """Attention of this object's self.H heads over the cache (lat appended) -> [T, D]."""
        a = self.a
        T, H, nope, kvl = q_in.shape[0], self.H, a.qk_nope, a.kv_lora_rank
        q = (self.wq if self.wq is not None else self.wq_b)(q_in).reshape(T, H, nope + a.qk_rope)
        qf = np.empty((T, H, kvl + a.qk_rope), dtype=np.float32)  # [W_uk^T q_nope ; rope(q_pe)]
        qf[:, :, kvl:] = self.rope.apply(np.ascontiguousarray(q[:, :, nope:]), batch.positions)
        if self.k_b_f32 is not None:
            q_nope = np.ascontiguousarray(q[:, :, :nope].transpose(1, 0, 2))  # [H, T, nope]
            qf[:, :, :kvl] = np.matmul(q_nope, self.k_b_f32).transpose(1, 0, 2)
        else:
            qf[:, :, :kvl] = self.k_b.per_matrix(q[:, :, :nope])
        o_lat = np.empty((T, H, kvl), dtype=np.float32)
        for s in batch.segments:
            sl = slice(s.start, s.start + s.n)
            kv = s.cache.append(self.layer, s.pos0, mla=lat[sl])["mla"]  # [L, kv_lora + rope]
            # (an f32 / f16 array or, bf16 / q8_0, a KVRows view: V = the first kv_lora columns)
            o_lat[sl] = attend(qf[sl], kv[None], kv[None, :, :kvl], s.pos0, self.scale)
        o = self.v_b.per_matrix(o_lat)                     # [T, H, v]
        return self.wo(o.reshape(T, H * a.v_head))


def deepseek_ffn(a, w, i: int):
    """Layer i's FFN in the DeepSeekMoE layout (also GLM-4.5's): the first a.dense_lead layers
    dense, the others routed experts (gating, renorm, scale, groups from a) plus shared experts."""
    p = f"blk.{i}."
    if i < a.dense_lead or not w.has(p + "ffn_gate_inp.weight"):
        return DenseFFN(w.linear(p + "ffn_gate.weight"), w.linear(p + "ffn_up.weight"),
                        w.linear(p + "ffn_down.weight"))
    return moe_ffn_from_weights(w, i, a.n_experts_used, gating=a.gating, norm=a.weights_norm,
                                scale=a.weights_scale, n_groups=a.n_groups,
                                n_groups_used=a.n_groups_used, shared=True)


class DeepSeek2Model(Model):
    """llama.Model's embed/block/head/forward over MLA attention and DeepSeekMoE FFNs."""

    def __init__(self, args: DeepSeek2Args, weights):
        self.args = a = args
        w = weights
        self.init_embeddings(w)
        freqs, mag, scale_mul = yarn_rope(a)
        self.rope = ops.RopeTable(a.qk_rope, a.rope_base, "norm", max_pos=min(a.context_length, 4096),
                                  freqs=freqs, mscale=mag)
        scale = scale_mul / math.sqrt(a.qk_nope + a.qk_rope)
        self.attn_norm, self.ffn_norm, self.attn, self.ffn = [], [], [], []
        for i in range(a.n_layers):
            p = f"blk.{i}."
            self.attn_norm.append(w.vector(p + "attn_norm.weight"))
            self.ffn_norm.append(w.vector(p + "ffn_norm.weight"))
            self.attn.append(MLAttention(a, w, i, self.rope, scale))
            self.ffn.append(deepseek_ffn(a, w, i))


def build(gguf_model, weights) -> DeepSeek2Model:
    emb = gguf_model.tensors["token_embd.weight"]
    args = DeepSeek2Args.from_dict(gguf_model.metadata, vocab_size=emb.shape[0])
    return DeepSeek2Model(args, weights)
