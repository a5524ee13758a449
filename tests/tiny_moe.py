"""Write tiny random-weight MoE GGUF files for tests: Mixtral (llama arch), Qwen3-MoE, DeepSeek2.

Tensors use llama.cpp's GGUF names and layouts (numpy order, outermost first):
  ffn_gate_inp [E, D] (kept F32 like llama.cpp), ffn_{gate,up}_exps [E, F, D], ffn_down_exps [E, D, F]
  DeepSeek2 MLA: attn_q [H*(nope+rope), D] or attn_q_a [q_lora, D] + attn_q_b [H*(nope+rope), q_lora];
  attn_kv_a_mqa [kv_lora+rope, D]; attn_k_b [H, kv_lora, nope] + attn_v_b [H, v, kv_lora]
  (split layout) or attn_kv_b [H*(nope+v), kv_lora] (fused, older converters).
1-D tensors (norms, exp_probs_b) stay F32; matrices use `qtype`.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from tests.tiny_llama import add_weight


def _tokenizer(w: GGUFWriter, vocab: int) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    # "t", "0", "t0" + filler: one valid merge so tokenizer loaders accept the file
    toks = ["t", "0", "t0"] + [f"t{i}" for i in range(1, vocab - 2)]
    w.add_token_list(toks)
    w.add_token_types([1] * vocab)
    w.add_token_merges(["t 0"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


class _Rand:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def mat(self, *shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    def norm(self, n):
        return (1 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)


def _finish(w: GGUFWriter, path) -> str:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _experts(w, r, p, E, F, D, qtype, gate_scale=3.0):
    add_weight(w, p + "ffn_gate_inp.weight", r.mat(E, D, scale=gate_scale), Q.F32)
    add_weight(w, p + "ffn_gate_exps.weight", r.mat(E, F, D, scale=1.5), qtype)
    add_weight(w, p + "ffn_up_exps.weight", r.mat(E, F, D, scale=1.5), qtype)
    add_weight(w, p + "ffn_down_exps.weight", r.mat(E, D, F), qtype)


def _common(w, r, D, vocab, qtype, n_layers, ctx):
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(D)
    w.add_vocab_size(vocab)
    _tokenizer(w, vocab)
    add_weight(w, "token_embd.weight", r.mat(vocab, D, scale=8.0), qtype)
    add_weight(w, "output_norm.weight", r.norm(D), Q.F32)
    add_weight(w, "output.weight", r.mat(vocab, D, scale=2.0), qtype)


def write_tiny_mixtral(path, *, n_layers=2, D=64, H=4, Hkv=2, F=32, E=8, k=2, vocab=96,
                       qtype=Q.F32, seed=0, ctx=256) -> str:
    r = _Rand(seed)
    w = GGUFWriter(str(path), "llama")
    _common(w, r, D, vocab, qtype, n_layers, ctx)
    Dh = D // H
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(Dh)
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    for i in range(n_layers):
        p = f"blk.{i}."
        add_weight(w, p + "attn_norm.weight", r.norm(D), Q.F32)
        add_weight(w, p + "attn_q.weight", r.mat(H * Dh, D, scale=2.0), qtype)
        add_weight(w, p + "attn_k.weight", r.mat(Hkv * Dh, D, scale=2.0), qtype)
        add_weight(w, p + "attn_v.weight", r.mat(Hkv * Dh, D), qtype)
        add_weight(w, p + "attn_output.weight", r.mat(D, H * Dh), qtype)
        add_weight(w, p + "ffn_norm.weight", r.norm(D), Q.F32)
        _experts(w, r, p, E, F, D, qtype)
    return _finish(w, path)


def write_tiny_qwen3moe(path, *, n_layers=2, D=64, H=4, Hkv=2, Dh=32, F=32, E=8, k=2, vocab=96,
                        qtype=Q.F32, seed=0, ctx=256, norm_topk=True) -> str:
    r = _Rand(seed)
    w = GGUFWriter(str(path), "qwen3moe")
    _common(w, r, D, vocab, qtype, n_layers, ctx)
    w.add_feed_forward_length(4 * D)
    w.add_expert_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(Dh)
    w.add_value_length(Dh)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    w.add_bool("qwen3moe.expert_weights_norm", norm_topk)
    for i in range(n_layers):
        p = f"blk.{i}."
        add_weight(w, p + "attn_norm.weight", r.norm(D), Q.F32)
        add_weight(w, p + "attn_q.weight", r.mat(H * Dh, D, scale=2.0), qtype)
        add_weight(w, p + "attn_k.weight", r.mat(Hkv * Dh, D, scale=2.0), qtype)
        add_weight(w, p + "attn_v.weight", r.mat(Hkv * Dh, D), qtype)
        add_weight(w, p + "attn_q_norm.weight", r.norm(Dh), Q.F32)
        add_weight(w, p + "attn_k_norm.weight", r.norm(Dh), Q.F32)
        add_weight(w, p + "attn_output.weight", r.mat(D, H * Dh), qtype)
        add_weight(w, p + "ffn_norm.weight", r.norm(D), Q.F32)
        _experts(w, r, p, E, F, D, qtype)
    return _finish(w, path)


def write_tiny_deepseek2(path, *, n_layers=3, D=64, H=4, q_lora=0, kv_lora=32, nope=32, rope=16,
                         vdim=32, F=32, ffn=128, E=16, k=4, n_shared=1, dense_lead=1, vocab=96,
                         qtype=Q.F32, seed=0, ctx=256, gating=2, norm=True, scale=2.5,
                         groups=4, groups_used=2, bias=True, fused_kv_b=False,
                         yarn: dict | None = None) -> str:
    """gating 2 + bias + groups = DeepSeek V3/R1 routing; gating 1, no bias, 1 group = V2.
    yarn: {"factor", "original_context_length", "yarn_log_multiplier"} (GGUF values)."""
    r = _Rand(seed)
    a = "deepseek2"
    w = GGUFWriter(str(path), a)
    _common(w, r, D, vocab, qtype, n_layers, ctx)
    w.add_feed_forward_length(ffn)
    w.add_expert_feed_forward_length(F)
    w.add_head_count(H)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(rope)
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    w.add_expert_shared_count(n_shared)
    w.add_leading_dense_block_count(dense_lead)
    w.add_uint32(f"{a}.attention.q_lora_rank", q_lora)
    w.add_uint32(f"{a}.attention.kv_lora_rank", kv_lora)
    if fused_kv_b:  # older converters: MHA head sizes
        w.add_head_count_kv(H)
        w.add_key_length(nope + rope)
        w.add_value_length(vdim)
    else:  # current converters: MQA view of the latent plus the *_mla head sizes
        w.add_head_count_kv(1)
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_uint32(f"{a}.attention.key_length_mla", nope + rope)
        w.add_uint32(f"{a}.attention.value_length_mla", vdim)
    w.add_float32(f"{a}.expert_weights_scale", scale)
    w.add_bool(f"{a}.expert_weights_norm", norm)
    w.add_uint32(f"{a}.expert_gating_func", gating)
    if groups > 1:
        w.add_uint32(f"{a}.expert_group_count", groups)
        w.add_uint32(f"{a}.expert_group_used_count", groups_used)
    if yarn:
        w.add_string(f"{a}.rope.scaling.type", "yarn")
        w.add_float32(f"{a}.rope.scaling.factor", float(yarn["factor"]))
        w.add_uint32(f"{a}.rope.scaling.original_context_length", int(yarn["original_context_length"]))
        w.add_float32(f"{a}.rope.scaling.yarn_log_multiplier", float(yarn["yarn_log_multiplier"]))
    for i in range(n_layers):
        p = f"blk.{i}."
        add_weight(w, p + "attn_norm.weight", r.norm(D), Q.F32)
        if q_lora:
            add_weight(w, p + "attn_q_a.weight", r.mat(q_lora, D, scale=2.0), qtype)
            add_weight(w, p + "attn_q_a_norm.weight", r.norm(q_lora), Q.F32)
            add_weight(w, p + "attn_q_b.weight", r.mat(H * (nope + rope), q_lora, scale=2.0), qtype)
        else:
            add_weight(w, p + "attn_q.weight", r.mat(H * (nope + rope), D, scale=2.0), qtype)
        add_weight(w, p + "attn_kv_a_mqa.weight", r.mat(kv_lora + rope, D, scale=2.0), qtype)
        add_weight(w, p + "attn_kv_a_norm.weight", r.norm(kv_lora), Q.F32)
        kv_b = r.mat(H * (nope + vdim), kv_lora, scale=1.5)
        if fused_kv_b:
            add_weight(w, p + "attn_kv_b.weight", kv_b, qtype)
        else:  # the converter's split: k_b = kv_b[h, :nope, :]^T, v_b = kv_b[h, nope:, :]
            kvh = kv_b.reshape(H, nope + vdim, kv_lora)
            add_weight(w, p + "attn_k_b.weight", np.ascontiguousarray(kvh[:, :nope].transpose(0, 2, 1)), qtype)
            add_weight(w, p + "attn_v_b.weight", np.ascontiguousarray(kvh[:, nope:]), qtype)
        add_weight(w, p + "attn_output.weight", r.mat(D, H * vdim), qtype)
        add_weight(w, p + "ffn_norm.weight", r.norm(D), Q.F32)
        if i < dense_lead:
            add_weight(w, p + "ffn_gate.weight", r.mat(ffn, D, scale=1.5), qtype)
            add_weight(w, p + "ffn_up.weight", r.mat(ffn, D, scale=1.5), qtype)
            add_weight(w, p + "ffn_down.weight", r.mat(D, ffn), qtype)
            continue
        _experts(w, r, p, E, F, D, qtype)
        if bias:
            add_weight(w, p + "exp_probs_b.bias", (0.1 * r.rng.standard_normal(E)).astype(np.float32), Q.F32)
        if n_shared:
            add_weight(w, p + "ffn_gate_shexp.weight", r.mat(n_shared * F, D, scale=1.5), qtype)
            add_weight(w, p + "ffn_up_shexp.weight", r.mat(n_shared * F, D, scale=1.5), qtype)
            add_weight(w, p + "ffn_down_shexp.weight", r.mat(D, n_shared * F), qtype)
    return _finish(w, path)
