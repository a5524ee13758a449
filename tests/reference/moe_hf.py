"""transformers (torch, float64) logits for tiny MoE GGUF files: Mixtral, Qwen3-MoE, DeepSeek V2/V3.

The GGUF tensors (dequantized by gguf-py) are mapped back to Hugging Face names and layouts:
llama-arch q/k rows are un-permuted, stacked experts become HF's fused gate_up_proj [E, 2F, D]
(gate rows first) and down_proj [E, D, F], DeepSeek's split attn_k_b/attn_v_b are re-joined into
kv_b_proj [H*(nope+v), kv_lora], exp_probs_b becomes e_score_correction_bias.
"""
from __future__ import annotations

import numpy as np

from tests.reference.llama_ref import load_tensors
from tests.reference.moe_ref import _unpermute


def _sd_common(W, n_layers):
    sd = {"model.embed_tokens.weight": W["token_embd.weight"], "model.norm.weight": W["output_norm.weight"],
          "lm_head.weight": W["output.weight"]}
    for i in range(n_layers):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        sd[q + "input_layernorm.weight"] = W[p + "attn_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = W[p + "ffn_norm.weight"]
        sd[q + "self_attn.o_proj.weight"] = W[p + "attn_output.weight"]
    return sd


def _sd_experts(sd, W, p, q):
    sd[q + "mlp.gate.weight"] = W[p + "ffn_gate_inp.weight"]
    sd[q + "mlp.experts.gate_up_proj"] = np.concatenate(
        [W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"]], axis=1)
    sd[q + "mlp.experts.down_proj"] = W[p + "ffn_down_exps.weight"]


def _run(model_cls, cfg, sd, tokens):
    import torch

    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = model_cls(cfg).double().eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=False).logits[0]
    return out.numpy()


def hf_logits(path: str, tokens: list[int]) -> np.ndarray:
    import transformers as tf

    meta, W = load_tensors(path)
    arch = meta["general.architecture"]
    m = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    L, H = int(m("block_count")), int(m("attention.head_count"))
    V, D = W["token_embd.weight"].shape
    eps = float(m("attention.layer_norm_rms_epsilon"))
    rope = {"rope_type": "default", "rope_theta": float(m("rope.freq_base", 10000.0))}
    sd = _sd_common(W, L)
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                  rms_norm_eps=eps, rope_parameters=rope, tie_word_embeddings=False,
                  max_position_embeddings=int(m("context_length")))
    if arch in ("llama", "qwen3moe"):
        Hkv = int(m("attention.head_count_kv"))
        E, k = int(m("expert_count")), int(m("expert_used_count"))
        for i in range(L):
            p, q = f"blk.{i}.", f"model.layers.{i}."
            wq, wk = W[p + "attn_q.weight"], W[p + "attn_k.weight"]
            if arch == "llama":
                wq, wk = _unpermute(wq, H), _unpermute(wk, Hkv)
            else:
                sd[q + "self_attn.q_norm.weight"] = W[p + "attn_q_norm.weight"]
                sd[q + "self_attn.k_norm.weight"] = W[p + "attn_k_norm.weight"]
            sd[q + "self_attn.q_proj.weight"], sd[q + "self_attn.k_proj.weight"] = wq, wk
            sd[q + "self_attn.v_proj.weight"] = W[p + "attn_v.weight"]
            _sd_experts(sd, W, p, q)
        F = W["blk.0.ffn_gate_exps.weight"].shape[1]
        if arch == "llama":
            cfg = tf.MixtralConfig(intermediate_size=F, num_key_value_heads=Hkv, num_local_experts=E,
                                   num_experts_per_tok=k, **common)
            return _run(tf.MixtralForCausalLM, cfg, sd, tokens)
        cfg = tf.Qwen3MoeConfig(intermediate_size=4 * D, moe_intermediate_size=F, num_key_value_heads=Hkv,
                                head_dim=int(m("attention.key_length")), num_experts=E, num_experts_per_tok=k,
                                norm_topk_prob=bool(m("expert_weights_norm", True)), **common)
        return _run(tf.Qwen3MoeForCausalLM, cfg, sd, tokens)

    assert arch == "deepseek2"
    rdim, kv_lora = int(m("rope.dimension_count")), int(m("attention.kv_lora_rank"))
    q_lora = int(m("attention.q_lora_rank", 0))
    dk = int(m("attention.key_length_mla", m("attention.key_length")))
    dv = int(m("attention.value_length_mla", m("attention.value_length")))
    nope = dk - rdim
    dense = int(m("leading_dense_block_count", 0))
    gating = int(m("expert_gating_func", 1) or 1)
    for i in range(L):
        p, q = f"blk.{i}.", f"model.layers.{i}.self_attn."
        if q_lora:
            sd[q + "q_a_proj.weight"] = W[p + "attn_q_a.weight"]
            sd[q + "q_a_layernorm.weight"] = W[p + "attn_q_a_norm.weight"]
            sd[q + "q_b_proj.weight"] = W[p + "attn_q_b.weight"]
        else:
            sd[q + "q_proj.weight"] = W[p + "attn_q.weight"]
        sd[q + "kv_a_proj_with_mqa.weight"] = W[p + "attn_kv_a_mqa.weight"]
        sd[q + "kv_a_layernorm.weight"] = W[p + "attn_kv_a_norm.weight"]
        if p + "attn_kv_b.weight" in W:
            sd[q + "kv_b_proj.weight"] = W[p + "attn_kv_b.weight"]
        else:
            kb = W[p + "attn_k_b.weight"].transpose(0, 2, 1)  # [H, nope, kv_lora]
            sd[q + "kv_b_proj.weight"] = np.concatenate([kb, W[p + "attn_v_b.weight"]], axis=1).reshape(-1, kv_lora)
        ml = f"model.layers.{i}.mlp."
        if i < dense:
            for n in ("gate", "up", "down"):
                sd[ml + f"{n}_proj.weight"] = W[p + f"ffn_{n}.weight"]
            continue
        _sd_experts(sd, W, p, f"model.layers.{i}.")
        if p + "exp_probs_b.bias" in W:
            sd[ml + "gate.e_score_correction_bias"] = W[p + "exp_probs_b.bias"]
        for n in ("gate", "up", "down"):
            sd[ml + f"shared_experts.{n}_proj.weight"] = W[p + f"ffn_{n}_shexp.weight"]
    if m("rope.scaling.type") == "yarn":
        ms_all = float(m("rope.scaling.yarn_log_multiplier")) / 0.1
        common["rope_parameters"] = dict(rope, rope_type="yarn", factor=float(m("rope.scaling.factor")),
                                         original_max_position_embeddings=int(m("rope.scaling.original_context_length")),
                                         mscale=ms_all, mscale_all_dim=ms_all, beta_fast=32.0, beta_slow=1.0)
    kw = dict(intermediate_size=W["blk.0.ffn_gate.weight"].shape[0] if dense else 4 * D,
              moe_intermediate_size=W[f"blk.{L - 1}.ffn_gate_exps.weight"].shape[1],
              num_key_value_heads=H, n_routed_experts=int(m("expert_count")),
              num_experts_per_tok=int(m("expert_used_count")), n_shared_experts=int(m("expert_shared_count")),
              first_k_dense_replace=dense, kv_lora_rank=kv_lora, q_lora_rank=q_lora or None,
              qk_rope_head_dim=rdim, qk_nope_head_dim=nope, v_head_dim=dv,
              routed_scaling_factor=float(m("expert_weights_scale", 1.0)) or 1.0,
              norm_topk_prob=bool(m("expert_weights_norm", False)), **common)
    if gating == 2:  # V3/R1: sigmoid + bias + group-limited top-k
        cfg = tf.DeepseekV3Config(n_group=int(m("expert_group_count", 1)),
                                  topk_group=int(m("expert_group_used_count", 1)), rope_interleave=True, **kw)
        return _run(tf.DeepseekV3ForCausalLM, cfg, sd, tokens)
    groups = int(m("expert_group_count", 1))
    cfg = tf.DeepseekV2Config(topk_method="group_limited_greedy" if groups > 1 else "greedy", n_group=groups,
                              topk_group=int(m("expert_group_used_count", 1)) if groups > 1 else 1, **kw)
    return _run(tf.DeepseekV2ForCausalLM, cfg, sd, tokens)
