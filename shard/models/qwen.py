"""Qwen2 / Qwen2.5 and Qwen3 dense (GGUF archs `qwen2`, `qwen3`): llama blocks with NeoX RoPE
(rotate halves x[i], x[i + d/2]; llama.cpp's converter leaves W_q/W_k unpermuted for these).

  qwen2:  q, k, v = W x + b  (attn_q/k/v.bias; llama.cpp treats them as optional), head_dim D / H
  qwen3:  no biases (optional too); q_h = rms(W_q x)_h * attn_q_norm, k_h likewise, before RoPE;
          head_dim = attention.key_length, which need not equal D / H

Embeddings are often tied (no output.weight).  Everything else is the llama Model: the same
blocks h + attn(norm(h)); h + ffn(norm(h)) with the dense SwiGLU FFN.
"""
from __future__ import annotations

import numpy as np

from dsd.errors import UnsupportedModelError
from dsd.shard import ops
from dsd.shard.models.llama import Attention, DenseFFN, Model, ModelArgs


class QwenAttention(Attention):
    """llama Attention with optional q/k/v biases and optional per-head q/k RMSNorm (before RoPE)."""

    def __init__(self, args: ModelArgs, w, i: int, rope: ops.RopeTable):
        super().__init__(args, w, i, rope)
        p = f"blk.{i}."
        self.bias = [w.vector(f"{p}attn_{n}.bias") if w.has(f"{p}attn_{n}.bias") else None for n in "qkv"]
        qn, kn = p + "attn_q_norm.weight", p + "attn_k_norm.weight"
        self.q_norm = w.vector(qn) if w.has(qn) else None   # [head_dim]
        self.k_norm = w.vector(kn) if w.has(kn) else None

    def qkv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = super().qkv(x)
        bq, bk, bv = self.bias
        if bq is not None:
            q = q + bq.reshape(q.shape[1:])
        if bk is not None:
            k = k + bk.reshape(k.shape[1:])
        if bv is not None:
            v = v + bv.reshape(v.shape[1:])
        eps = self.args.norm_eps
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm, eps)
        if self.k_norm is not None:
            k = ops.rms_norm(k, self.k_norm, eps)
        return q, k, v


def neox_rope(a) -> ops.RopeTable:
    """NeoX-style RoPE over a.rope_dim dims, with linear scaling when a.rope_scale is set."""
    freqs = None
    if a.rope_scale != 1.0:  # rope.scaling.type == "linear"
        freqs = a.rope_scale / (a.rope_base ** (np.arange(0, a.rope_dim, 2) / a.rope_dim))
    return ops.RopeTable(a.rope_dim, a.rope_base, "neox", max_pos=min(a.context_length, 4096), freqs=freqs)


class QwenModel(Model):
    def __init__(self, args: ModelArgs, weights):
        self.args = a = args
        w = weights
        self.init_embeddings(w)
        self.rope = neox_rope(a)
        self.attn_norm, self.ffn_norm, self.attn, self.ffn = [], [], [], []
        for i in range(a.n_layers):
            p = f"blk.{i}."
            self.attn_norm.append(w.vector(p + "attn_norm.weight"))
            self.ffn_norm.append(w.vector(p + "ffn_norm.weight"))
            self.attn.append(QwenAttention(a, w, i, self.rope))
            self.ffn.append(DenseFFN(w.linear(p + "ffn_gate.weight"), w.linear(p + "ffn_up.weight"),
                                     w.linear(p + "ffn_down.weight")))


def build(gguf_model, weights) -> QwenModel:
    arch = gguf_model.architecture
    scaling = gguf_model.metadata.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):  # YaRN long-context variants: not implemented here
        raise UnsupportedModelError(f"{gguf_model.path}: {arch} with rope.scaling.type {scaling!r} "
                                    "is not supported (none or linear)")
    emb = gguf_model.tensors["token_embd.weight"]
    return QwenModel(ModelArgs.from_dict(gguf_model.metadata, vocab_size=emb.shape[0]), weights)
