"""Qwen3-MoE (GGUF arch `qwen3moe`): llama-style GQA with per-head q/k RMSNorm, NeoX RoPE, and
routed experts (softmax over all experts, top-k, weights renormalised when expert_weights_norm,
which llama.cpp assumes for this arch).  No shared experts; every layer is MoE.

Per layer:  q_h = rms(W_q x)_h * attn_q_norm, k_h likewise (head_dim = attention.key_length,
which need not equal D / H), RoPE rotates halves (x[i], x[i + d/2]), attention as llama.
"""
from __future__ import annotations

import numpy as np

from dsd.shard import ops
from dsd.shard.models.llama import Attention, Model, ModelArgs
from dsd.shard.moe import GATING_SOFTMAX, moe_ffn_from_weights


class QKNormAttention(Attention):
    """llama Attention plus RMSNorm of each query/key head before RoPE."""

    def __init__(self, args: ModelArgs, w, i: int, rope: ops.RopeTable):
        super().__init__(args, w, i, rope)
        self.q_norm = w.vector(f"blk.{i}.attn_q_norm.weight")  # [head_dim]
        self.k_norm = w.vector(f"blk.{i}.attn_k_norm.weight")

    def qkv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = super().qkv(x)
        eps = self.args.norm_eps
        return ops.rms_norm(q, self.q_norm, eps), ops.rms_norm(k, self.k_norm, eps), v


class Qwen3MoeModel(Model):
    def __init__(self, args: ModelArgs, weights, norm_topk: bool = True):
        self.args = a = args
        w = weights
        self.init_embeddings(w)
        self.rope = ops.RopeTable(a.rope_dim, a.rope_base, "neox", max_pos=min(a.context_length, 4096))
        self.attn_norm, self.ffn_norm, self.attn, self.ffn = [], [], [], []
        for i in range(a.n_layers):
            p = f"blk.{i}."
            self.attn_norm.append(w.vector(p + "attn_norm.weight"))
            self.ffn_norm.append(w.vector(p + "ffn_norm.weight"))
            self.attn.append(QKNormAttention(a, w, i, self.rope))
            self.ffn.append(moe_ffn_from_weights(w, i, a.n_experts_used, gating=GATING_SOFTMAX, norm=norm_topk))


def build(gguf_model, weights) -> Qwen3MoeModel:
    meta = gguf_model.metadata
    emb = gguf_model.tensors["token_embd.weight"]
    args = ModelArgs.from_dict(meta, vocab_size=emb.shape[0])
    return Qwen3MoeModel(args, weights, norm_topk=bool(meta.get("qwen3moe.expert_weights_norm", True)))
