"""Float64 llama forward pass (Touvron et al. 2023; llama.cpp GGUF conventions).

GGUF llama checkpoints store W_q/W_k with rows permuted so that rotary embedding acts on
adjacent pairs (x[2i], x[2i+1]) with angle pos * base^(-2i/d_rot).
"""
from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def load_tensors(path: str) -> tuple[dict, dict]:
    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:
            pass
    ts = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        ts[t.name] = a.reshape([int(d) for d in reversed(t.shape)])
    return meta, ts


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_pairs(x, pos, base, n_rot):
    # x [T, H, Dh]; rotate adjacent pairs of the first n_rot dims
    out = x.copy()
    inv = base ** (-np.arange(0, n_rot, 2) / n_rot)
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = a * c - b * s
    out[..., 1:n_rot:2] = a * s + b * c
    return out


def llama_logits(path: str, tokens: list[int]) -> np.ndarray:
    meta, W = load_tensors(path)
    arch = meta["general.architecture"]
    m = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    n_layer, H = int(m("block_count")), int(m("attention.head_count"))
    Hkv, eps = int(m("attention.head_count_kv", H)), float(m("attention.layer_norm_rms_epsilon"))
    base = float(m("rope.freq_base", 10000.0))
    E = W["token_embd.weight"]
    D = E.shape[1]
    Dh = D // H
    n_rot = int(m("rope.dimension_count", Dh))
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = E[np.array(tokens)]
    mask = np.tril(np.ones((T, T), dtype=bool))
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rmsnorm(x, W[p + "attn_norm.weight"], eps)
        q = (h @ W[p + "attn_q.weight"].T).reshape(T, H, Dh)
        k = (h @ W[p + "attn_k.weight"].T).reshape(T, Hkv, Dh)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, Hkv, Dh)
        q, k = rope_pairs(q, pos, base, n_rot), rope_pairs(k, pos, base, n_rot)
        att = np.empty((T, H, Dh))
        for hh in range(H):
            kv = hh // (H // Hkv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(Dh)
            s = np.where(mask, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            att[:, hh] = s @ v[:, kv]
        x = x + att.reshape(T, H * Dh) @ W[p + "attn_output.weight"].T
        h = rmsnorm(x, W[p + "ffn_norm.weight"], eps)
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    x = rmsnorm(x, W["output_norm.weight"], eps)
    out = W.get("output.weight", E)
    return x @ out.T
