"""Float64 reference forward passes for MoE models, written from the published descriptions:

- Mixtral (Jiang et al. 2024): llama body, FFN = sum over top-k of softmax(top-k router logits)
  * SwiGLU expert. GGUF stores W_q/W_k permuted for adjacent-pair RoPE.
- Qwen3-MoE (Qwen3 technical report / HF modeling_qwen3_moe): per-head RMSNorm of q and k before
  NeoX-style (half-split) RoPE, softmax router, top-k, weights renormalised (norm_topk_prob).
- DeepSeek-V2 / V3 (arXiv 2405.04434, 2412.19437): multi-head latent attention computed the
  *naive* way (decompress the latent into per-head K and V, MHA), RoPE on a decoupled 64-dim
  part (adjacent pairs in the GGUF layout), YaRN; DeepSeekMoE with shared experts,
  V3 sigmoid scores + selection bias + group-limited routing (top-2-sum group score).

Weights come from gguf-py's dequantize (not dsd's kernels); no dsd code is used.
"""
from __future__ import annotations

import math

import numpy as np

from tests.reference.llama_ref import load_tensors, rmsnorm


def rope(x, pos, freqs, style, mag=1.0):
    """x [T, H, d] rotated over all d dims; freqs [d/2]; style 'pairs' or 'halves'."""
    ang = pos[:, None] * freqs[None, :]
    c, s = (np.cos(ang) * mag)[:, None, :], (np.sin(ang) * mag)[:, None, :]
    out = x.copy()
    d = x.shape[-1]
    if style == "pairs":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., : d // 2], x[..., d // 2:]
        out[..., : d // 2], out[..., d // 2:] = a * c - b * s, a * s + b * c
    return out


def mha(q, k, v, scale):
    """q [T, H, dk], k [T, H, dk], v [T, H, dv], causal -> [T, H*dv]."""
    T, H, _ = q.shape
    s = np.einsum("ihd,jhd->hij", q, k) * scale
    s = np.where(np.tril(np.ones((T, T), dtype=bool))[None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", s, v).reshape(T, -1)


def swiglu(x, g, u, d):
    a = x @ g.T
    return (a / (1 + np.exp(-a)) * (x @ u.T)) @ d.T


def route(h, W, p, k, *, sigmoid=False, bias=None, norm=False, scale=0.0, groups=1, groups_used=0):
    """-> list over tokens of [(expert, weight)]."""
    logits = h @ W[p + "ffn_gate_inp.weight"].T
    if sigmoid:
        probs = 1 / (1 + np.exp(-logits))
    else:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    sel = probs + (bias if bias is not None else 0)
    out = []
    E = probs.shape[1]
    for t in range(len(h)):
        st = sel[t].copy()
        if groups > 1 and groups_used < groups:
            g = st.reshape(groups, E // groups)
            # V3 (sigmoid): sum of the top-2 scores per group; V2 (softmax): max per group
            gs = np.sort(g, axis=1)[:, -2:].sum(1) if sigmoid else g.max(1)
            keep = np.argsort(-gs, kind="stable")[:groups_used]
            allowed = np.zeros(groups, bool)
            allowed[keep] = True
            st = np.where(np.repeat(allowed, E // groups), st, -np.inf)
        ids = np.argsort(-st, kind="stable")[:k]
        w = probs[t, ids]
        if norm:
            w = w / w.sum()
        if scale:
            w = w * scale
        out.append(list(zip(ids.tolist(), w.tolist())))
    return out


def moe(h, W, p, routes):
    out = np.zeros_like(h)
    for t, chosen in enumerate(routes):
        for e, wt in chosen:
            out[t] += wt * swiglu(h[t:t + 1], W[p + "ffn_gate_exps.weight"][e],
                                  W[p + "ffn_up_exps.weight"][e], W[p + "ffn_down_exps.weight"][e])[0]
    return out


def _meta(path):
    meta, W = load_tensors(path)
    arch = meta["general.architecture"]
    return meta, W, arch, (lambda key, d=None: meta.get(f"{arch}.{key}", d))


def _unpermute(w, n_head):
    """Undo llama.cpp's q/k permutation (adjacent pairs -> halves) for a [rows, cols] matrix."""
    r = w.shape[0]
    return w.reshape(n_head, r // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def gqa_moe_logits(path, tokens):
    """Mixtral (llama arch) and Qwen3-MoE."""
    meta, W, arch, m = _meta(path)
    n_layer, H = int(m("block_count")), int(m("attention.head_count"))
    Hkv, eps = int(m("attention.head_count_kv", H)), float(m("attention.layer_norm_rms_epsilon"))
    base = float(m("rope.freq_base", 10000.0))
    k = int(m("expert_used_count"))
    E = W["token_embd.weight"]
    D = E.shape[1]
    Dh = int(m("attention.key_length", D // H))
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    freqs = base ** (-np.arange(0, Dh, 2) / Dh)
    x = E[np.array(tokens)]
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rmsnorm(x, W[p + "attn_norm.weight"], eps)
        wq, wk = W[p + "attn_q.weight"], W[p + "attn_k.weight"]
        if arch == "llama":  # back to the published (HF) layout, then half-split rope
            wq, wk = _unpermute(wq, H), _unpermute(wk, Hkv)
        q = (h @ wq.T).reshape(T, H, Dh)
        kk = (h @ wk.T).reshape(T, Hkv, Dh)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, Hkv, Dh)
        if arch == "qwen3moe":
            q = rmsnorm(q, W[p + "attn_q_norm.weight"], eps)
            kk = rmsnorm(kk, W[p + "attn_k_norm.weight"], eps)
        q, kk = rope(q, pos, freqs, "halves"), rope(kk, pos, freqs, "halves")
        rep = H // Hkv
        a = mha(q, np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1), 1 / math.sqrt(Dh))
        x = x + a @ W[p + "attn_output.weight"].T
        h = rmsnorm(x, W[p + "ffn_norm.weight"], eps)
        norm = True if arch == "llama" else bool(m("expert_weights_norm", True))
        x = x + moe(h, W, p, route(h, W, p, k, norm=norm))
    x = rmsnorm(x, W["output_norm.weight"], eps)
    return x @ W["output.weight"].T


def yarn_freqs(d, base, factor, orig_ctx, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023) per-frequency blend of interpolated and extrapolated angles."""
    inv = base ** (-np.arange(0, d, 2) / d)

    def corr_dim(n_rot):
        return d * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(d - 1.0, math.ceil(corr_dim(beta_slow)))
    ramp = np.clip((np.arange(d // 2) - low) / max(high - low, 0.001), 0, 1)
    extrap = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    return inv / factor * (1 - extrap) + inv * extrap


def deepseek2_logits(path, tokens):
    meta, W, arch, m = _meta(path)
    n_layer, H = int(m("block_count")), int(m("attention.head_count"))
    eps = float(m("attention.layer_norm_rms_epsilon"))
    base = float(m("rope.freq_base", 10000.0))
    rdim = int(m("rope.dimension_count"))
    kv_lora = int(m("attention.kv_lora_rank"))
    dk = int(m("attention.key_length_mla", m("attention.key_length")))
    dv = int(m("attention.value_length_mla", m("attention.value_length")))
    nope = dk - rdim
    k = int(m("expert_used_count"))
    dense = int(m("leading_dense_block_count", 0))
    gating = int(m("expert_gating_func", 1) or 1)
    E = W["token_embd.weight"]
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    freqs = base ** (-np.arange(0, rdim, 2) / rdim)
    scale = 1 / math.sqrt(dk)
    if m("rope.scaling.type") == "yarn" and float(m("rope.scaling.factor", 1)) > 1:
        f = float(m("rope.scaling.factor"))
        freqs = yarn_freqs(rdim, base, f, int(m("rope.scaling.original_context_length")))
        # DeepSeek: softmax scale *= (0.1 * mscale_all_dim * ln f + 1)^2; the GGUF key holds
        # 0.1 * mscale_all_dim. cos/sin keep unit magnitude when mscale == mscale_all_dim.
        ms = 1 + float(m("rope.scaling.yarn_log_multiplier", 0)) * math.log(f)
        scale *= ms * ms
    x = E[np.array(tokens)]
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rmsnorm(x, W[p + "attn_norm.weight"], eps)
        if p + "attn_q.weight" in W:
            q = h @ W[p + "attn_q.weight"].T
        else:
            q = rmsnorm(h @ W[p + "attn_q_a.weight"].T, W[p + "attn_q_a_norm.weight"], eps) @ W[p + "attn_q_b.weight"].T
        q = q.reshape(T, H, dk)
        ckv = h @ W[p + "attn_kv_a_mqa.weight"].T
        c = rmsnorm(ckv[:, :kv_lora], W[p + "attn_kv_a_norm.weight"], eps)
        k_pe = rope(ckv[:, None, kv_lora:], pos, freqs, "pairs")      # [T, 1, r] shared by heads
        q_pe = rope(q[..., nope:], pos, freqs, "pairs")
        if p + "attn_kv_b.weight" in W:
            kvb = W[p + "attn_kv_b.weight"].reshape(H, nope + dv, kv_lora)
            wuk, wuv = kvb[:, :nope], kvb[:, nope:]
        else:
            wuk, wuv = W[p + "attn_k_b.weight"].transpose(0, 2, 1), W[p + "attn_v_b.weight"]
        k_nope = np.einsum("hnc,tc->thn", wuk, c)
        v = np.einsum("hvc,tc->thv", wuv, c)
        qf = np.concatenate([q[..., :nope], q_pe], -1)
        kf = np.concatenate([k_nope, np.repeat(k_pe, H, axis=1)], -1)
        x = x + mha(qf, kf, v, scale) @ W[p + "attn_output.weight"].T
        h = rmsnorm(x, W[p + "ffn_norm.weight"], eps)
        if i < dense:
            x = x + swiglu(h, W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"], W[p + "ffn_down.weight"])
            continue
        routes = route(h, W, p, k, sigmoid=gating == 2, bias=W.get(p + "exp_probs_b.bias"),
                       norm=bool(m("expert_weights_norm", False)), scale=float(m("expert_weights_scale", 0)),
                       groups=int(m("expert_group_count", 1)), groups_used=int(m("expert_group_used_count", 0)))
        y = moe(h, W, p, routes)
        if p + "ffn_gate_shexp.weight" in W:
            y += swiglu(h, W[p + "ffn_gate_shexp.weight"], W[p + "ffn_up_shexp.weight"], W[p + "ffn_down_shexp.weight"])
        x = x + y
    x = rmsnorm(x, W["output_norm.weight"], eps)
    return x @ W["output.weight"].T
