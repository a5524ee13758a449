"""gpt-oss (shard/models/gpt_oss.py) against transformers' GptOssForCausalLM (torch, float64), and
its pieces: attention sinks + sliding window (kernels/attention.py), the softmax-of-top-k router,
the clamped SwiGLU and the expert biases (moe.py) against numpy float64 references.

The tiny GGUF is written here with gguf-py's writer (llama.cpp's names and layouts: gate / up
experts split, [E, F, D]; expert biases [E, F] / [E, D]; attn_sinks.weight [H]); transformers
gets the same (dequantized) weights mapped back to its names (gate_up_proj interleaved
[E, D, 2F], down_proj [E, F, D]).  HF's YaRN runs with truncate=True, the correction range
llama.cpp uses (ggml_rope_yarn_corr_dims floors / ceils it; the released config says false).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.kernels import attention as ak
from dsd.shard.kernels import attention_sinks as aks
from dsd.shard.kernels import exact_activations
from dsd.shard.models import build_model
from tests.reference.llama_ref import load_tensors
from tests.tiny_llama import add_weight

TOKENS = [3, 17, 42, 5, 88, 1, 60, 33, 9, 71, 12, 50, 7, 64, 21, 90]
ARCH = "gpt-oss"


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- the tiny model --------------------------------------------------------------------------------

def write_tiny_gpt_oss(path, *, n_layers=4, D=64, H=4, Hkv=2, Dh=16, F=32, E=8, k=2, vocab=96,
                       window=4, qtype=Q.F32, exp_qtype=None, seed=0, ctx=256, yarn=(4.0, 64)) -> str:
    """yarn: (factor, original_context_length) or None.  exp_qtype: the expert matrices' type
    (default qtype; MXFP4 as in the released files)."""
    rng = np.random.default_rng(seed)

    def mat(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    def vec(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    exp_qtype = qtype if exp_qtype is None else exp_qtype
    w = GGUFWriter(str(path), ARCH)
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_expert_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(Dh)
    w.add_value_length(Dh)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    w.add_sliding_window(window)
    if yarn:
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn[0])
        w.add_rope_scaling_orig_ctx_len(yarn[1])
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(["t", "0", "t0"] + [f"t{i}" for i in range(1, vocab - 2)])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["t 0"])
    add_weight(w, "token_embd.weight", mat(vocab, D, scale=8.0), qtype)
    add_weight(w, "output_norm.weight", 1 + vec(D, scale=0.1), Q.F32)
    add_weight(w, "output.weight", mat(vocab, D, scale=2.0), qtype)
    for i in range(n_layers):
        p = f"blk.{i}."
        add_weight(w, p + "attn_norm.weight", 1 + vec(D, scale=0.1), Q.F32)
        for n, rows, sc in (("attn_q", H * Dh, 2.0), ("attn_k", Hkv * Dh, 2.0), ("attn_v", Hkv * Dh, 1.0)):
            add_weight(w, p + n + ".weight", mat(rows, D, scale=sc), qtype)
            add_weight(w, p + n + ".bias", vec(rows), Q.F32)
        add_weight(w, p + "attn_output.weight", mat(D, H * Dh), qtype)
        add_weight(w, p + "attn_output.bias", vec(D, scale=0.1), Q.F32)
        add_weight(w, p + "attn_sinks.weight", vec(H, scale=1.5), Q.F32)
        add_weight(w, p + "post_attention_norm.weight", 1 + vec(D, scale=0.1), Q.F32)
        add_weight(w, p + "ffn_gate_inp.weight", mat(E, D, scale=3.0), Q.F32)
        add_weight(w, p + "ffn_gate_inp.bias", vec(E, scale=0.5), Q.F32)
        # gate / up large enough that the clamps at +-7 take effect on some entries
        add_weight(w, p + "ffn_gate_exps.weight", mat(E, F, D, scale=6.0), exp_qtype)
        add_weight(w, p + "ffn_up_exps.weight", mat(E, F, D, scale=6.0), exp_qtype)
        add_weight(w, p + "ffn_down_exps.weight", mat(E, D, F), exp_qtype)
        add_weight(w, p + "ffn_gate_exps.bias", vec(E, F), Q.F32)
        add_weight(w, p + "ffn_up_exps.bias", vec(E, F), Q.F32)
        add_weight(w, p + "ffn_down_exps.bias", vec(E, D, scale=0.1), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def hf_gpt_oss_logits(path: str, tokens: list[int]) -> np.ndarray:
    """transformers' GptOssForCausalLM (eager attention and experts, float64) on the file's
    dequantized weights."""
    import torch
    import transformers as tf

    meta, W = load_tensors(path)
    m = lambda key, d=None: meta.get(f"{ARCH}.{key}", d)  # noqa: E731
    L, H, Hkv = int(m("block_count")), int(m("attention.head_count")), int(m("attention.head_count_kv"))
    V, D = W["token_embd.weight"].shape
    E, F = W["blk.0.ffn_gate_exps.weight"].shape[:2]
    rope = {"rope_type": "default", "rope_theta": float(m("rope.freq_base"))}
    if m("rope.scaling.type") == "yarn":
        rope = dict(rope, rope_type="yarn", factor=float(m("rope.scaling.factor")), beta_fast=32.0, beta_slow=1.0,
                    original_max_position_embeddings=int(m("rope.scaling.original_context_length")),
                    truncate=True)
    cfg = tf.GptOssConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                          num_attention_heads=H, num_key_value_heads=Hkv, head_dim=int(m("attention.key_length")),
                          num_local_experts=E, num_experts_per_tok=int(m("expert_used_count")),
                          sliding_window=int(m("attention.sliding_window")),
                          layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)],
                          rms_norm_eps=float(m("attention.layer_norm_rms_epsilon")), rope_parameters=rope,
                          max_position_embeddings=int(m("context_length")), tie_word_embeddings=False,
                          attention_bias=True)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    sd = {"model.embed_tokens.weight": W["token_embd.weight"], "model.norm.weight": W["output_norm.weight"],
          "lm_head.weight": W["output.weight"]}
    for i in range(L):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        sd[q + "input_layernorm.weight"] = W[p + "attn_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = W[p + "post_attention_norm.weight"]
        for n, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            sd[q + f"self_attn.{hf}.weight"] = W[p + n + ".weight"]
            sd[q + f"self_attn.{hf}.bias"] = W[p + n + ".bias"]
        sd[q + "self_attn.sinks"] = W[p + "attn_sinks.weight"]
        sd[q + "mlp.router.weight"] = W[p + "ffn_gate_inp.weight"]
        sd[q + "mlp.router.bias"] = W[p + "ffn_gate_inp.bias"]
        gu = np.empty((E, D, 2 * F))                     # HF interleaves gate (even) and up (odd)
        gu[..., 0::2] = W[p + "ffn_gate_exps.weight"].transpose(0, 2, 1)
        gu[..., 1::2] = W[p + "ffn_up_exps.weight"].transpose(0, 2, 1)
        gub = np.empty((E, 2 * F))
        gub[:, 0::2], gub[:, 1::2] = W[p + "ffn_gate_exps.bias"], W[p + "ffn_up_exps.bias"]
        sd[q + "mlp.experts.gate_up_proj"], sd[q + "mlp.experts.gate_up_proj_bias"] = gu, gub
        sd[q + "mlp.experts.down_proj"] = W[p + "ffn_down_exps.weight"].transpose(0, 2, 1)
        sd[q + "mlp.experts.down_proj_bias"] = W[p + "ffn_down_exps.bias"]
    model = tf.GptOssForCausalLM(cfg).double().eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        return model(torch.tensor([tokens]), use_cache=False).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gpt_oss(tmp_path_factory.mktemp("goss") / "g.gguf")


@pytest.mark.parametrize("kw", [dict(), dict(exp_qtype=Q.MXFP4), dict(yarn=None, window=6, n_layers=2, E=4)])
def test_gpt_oss_matches_transformers(tmp_path, kw):
    path = write_tiny_gpt_oss(tmp_path / "g.gguf", **kw)
    with exact_activations():
        model = build_model(open_gguf(path))
        got = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
    assert rel_err(got, hf_gpt_oss_logits(path, TOKENS)) <= 1e-3


def _hf_tiny_gpt_oss():
    """A random transformers GptOssForCausalLM (SmolLM2 vocabulary, for hf_convert.make_gguf):
    4 layers alternating sliding (window 4) / full, YaRN x4 over 64 positions, sinks ~ N(0, 1.5),
    gate / up scaled so that some values pass the +-7 clamps."""
    import torch
    import transformers as tf

    from tests.reference.hf_convert import VOCAB_SIZE, randomize_

    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                beta_fast=32.0, beta_slow=1.0, truncate=True)
    cfg = tf.GptOssConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                          num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention",
                                                                                "full_attention"] * 2,
                          max_position_embeddings=256, rope_parameters=rope, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    m = randomize_(tf.GptOssForCausalLM(cfg).float(), bias_std=0.3)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.sinks.normal_(0, 1.5)
            layer.mlp.experts.gate_up_proj.mul_(6)
            layer.mlp.router.weight.mul_(0.3)  # router margins well above float rounding
    return m


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_gpt_oss_llama_cpp_converter(tmp_path, monkeypatch, fuse_qkv):
    """A transformers checkpoint through llama.cpp's own convert_hf_to_gguf.py (f32: the converter
    splits the interleaved gate_up_proj into ffn_gate_exps / ffn_up_exps and their biases;
    --fuse-qkv writes one attn_qkv weight and bias instead of attn_q / attn_k / attn_v)."""
    import subprocess

    from tests.reference.hf_convert import hf_logits_f64, make_gguf, sample_tokens

    if fuse_qkv:  # make_gguf has no argument for converter flags: add it to the converter's argv
        run = subprocess.run

        def with_flag(argv, *a, **kw):
            if any(str(x).endswith("convert_hf_to_gguf.py") for x in argv):
                argv = [*argv, "--fuse-qkv"]
            return run(argv, *a, **kw)
        monkeypatch.setattr(subprocess, "run", with_flag)
    m = _hf_tiny_gpt_oss()
    path = make_gguf(m, tmp_path, "f32")
    toks = sample_tokens(16)
    with exact_activations():
        g = open_gguf(path)
        assert ("blk.0.attn_qkv.bias" in g.tensors) == fuse_qkv and ("blk.0.attn_q.weight" in g.tensors) != fuse_qkv
        model = build_model(g)
        got = model.forward(Batch.single(model.new_cache(64), toks, all_logits=True))
    assert rel_err(got, hf_logits_f64(m, toks)) <= 1e-3


def _llama_imatrix():
    import os

    from dsd.shard.yardstick import yardsticks_dir

    path = os.path.join(yardsticks_dir(), "llama.cpp", "llama-imatrix")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(_llama_imatrix() is None, reason="llama.cpp's llama-imatrix is not built "
                    "(bench/build_yardsticks.sh); CI does not compile llama.cpp")
def test_gpt_oss_perplexity_matches_llama_cpp(tmp_path):
    """llama.cpp's own gpt-oss graph (llama-imatrix's perplexity: per chunk of N tokens, the
    second half's next-token NLL) on the converted file against dsd's logits for the same tokens
    (measured 3.5e-5 relative; llama.cpp keeps K/V in f16)."""
    import re
    import subprocess

    from dsd.shard.tokenizer import Tokenizer
    from tests.reference.hf_convert import make_gguf

    path = make_gguf(_hf_tiny_gpt_oss(), tmp_path, "f32")
    text = ("The quick brown fox jumps over the lazy dog. " * 3 + "Numbers 12345 and words, punctuation; "
            "more text here! ") * 8
    (tmp_path / "t.txt").write_text(text)
    N = 64
    r = subprocess.run([_llama_imatrix(), "-m", path, "-f", str(tmp_path / "t.txt"), "-c", str(N), "--chunks", "2",
                        "-t", "2", "-o", str(tmp_path / "im.gguf"),
                        "--override-kv", "tokenizer.ggml.add_bos_token=bool:false"],
                       capture_output=True, text=True, timeout=600)
    theirs = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", r.stdout + r.stderr)]
    assert len(theirs) == 2, (r.stdout + r.stderr)[-2000:]
    g = open_gguf(path)
    ids = Tokenizer.from_metadata(g.metadata).encode(text, add_bos=False)
    model = build_model(g)
    nll, cnt, ours = 0.0, 0, []
    for c in range(2):
        chunk = ids[c * N:(c + 1) * N]
        with exact_activations():
            lg = model.forward(Batch.single(model.new_cache(N), chunk, all_logits=True)).astype(np.float64)
        for i in range(N // 2, N - 1):
            row = lg[i] - lg[i].max()
            nll -= row[chunk[i + 1]] - np.log(np.exp(row).sum())
            cnt += 1
        ours.append(np.exp(nll / cnt))  # cumulative, as llama.cpp prints it
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)


def test_gpt_oss_window_and_sinks_matter(tiny):
    """The test model is sensitive to what it checks: another window or no sinks changes the logits."""
    with exact_activations():
        model = build_model(open_gguf(tiny))
        base = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
        assert [a.window for a in model.attn] == [4, 0, 4, 0]
        for a in model.attn:
            a.window = 0
        wide = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
    assert rel_err(wide[:4], base[:4]) < 1e-6 < rel_err(wide[5:], base[5:])  # identical while pos < window


def test_gpt_oss_incremental_decode(tiny):
    with exact_activations():
        model = build_model(open_gguf(tiny))
        full = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
        cache = model.new_cache(64)
        rows = [model.forward(Batch.single(cache, TOKENS[:3], all_logits=True))]
        rows += [model.forward(Batch.single(cache, [t])) for t in TOKENS[3:]]
    assert rel_err(np.concatenate(rows), full) <= 1e-5


def test_gpt_oss_batch_invariant(tmp_path):
    """Deterministic mode (batch_invariant): a prompt's rows are bit-identical to the same tokens
    decoded one at a time (sinks / window attention and the biased experts included)."""
    from dsd.shard.kernels import batch_invariant

    path = write_tiny_gpt_oss(tmp_path / "g.gguf", exp_qtype=Q.MXFP4)
    with batch_invariant():
        model = build_model(open_gguf(path))
        full = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
        cache = model.new_cache(64)
        rows = [model.forward(Batch.single(cache, TOKENS[:5], all_logits=True))]
        rows += [model.forward(Batch.single(cache, [t])) for t in TOKENS[5:]]
    assert np.array_equal(np.concatenate(rows), full)


def test_gpt_oss_default_activations(tiny):
    """The default (possibly 8-bit activation) kernels stay close to the float path."""
    model = build_model(open_gguf(tiny))
    got = model.forward(Batch.single(model.new_cache(64), TOKENS, all_logits=True))
    assert rel_err(got, hf_gpt_oss_logits(tiny, TOKENS)) <= 3e-2


# -- attention sinks + sliding window --------------------------------------------------------------

def ref_attention(q, k, v, q_pos0, scale, sinks=None, window=0):
    """float64: q [n, H, Dk], k [Hkv, L, Dk], v [Hkv, L, Dv] -> [n, H, Dv]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, H, _ = q.shape
    g = H // k.shape[0]
    out = np.zeros((n, H, v.shape[2]))
    for i in range(n):
        p = q_pos0 + i
        lo = max(0, p - window + 1) if window else 0
        for h in range(H):
            s = k[h // g, lo:p + 1] @ q[i, h] * scale
            cols = np.r_[s, sinks[h]] if sinks is not None else s
            e = np.exp(cols - cols.max())
            out[i, h] = e[:len(s)] @ v[h // g, lo:p + 1] / e.sum()
    return out


def _qkv(rng, n, H, Hkv, L, Dk, Dv, dtype=np.float32):
    q = rng.standard_normal((n, H, Dk)).astype(np.float32)
    k = (rng.standard_normal((Hkv, L, Dk)) * 0.5).astype(dtype)
    v = rng.standard_normal((Hkv, L, Dv)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("L,window,dtype", [(1, 0, np.float32), (37, 0, np.float32), (37, 8, np.float16),
                                            (700, 0, np.float32), (700, 128, np.float32), (3, 8, np.float32)])
def test_decode_kernel_sinks_window(L, window, dtype):
    rng = np.random.default_rng(L + window)
    H, Hkv, D = 8, 2, 64
    q, k, v = _qkv(rng, 1, H, Hkv, L, D, D, dtype)
    sinks = rng.standard_normal(H).astype(np.float32) * 2
    sinks[0], sinks[1] = 60.0, -60.0  # a dominating and a negligible sink: no overflow either way
    got = ak.decode(q[0], k, v, 0.125, sinks=sinks, window=window)
    want = ref_attention(q, k, v, L - 1, 0.125, sinks, window)[0]
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max() + 1e-6
    # no options: the plain kernel, bit-identical to calling it without the new arguments
    assert np.array_equal(ak.decode(q[0], k, v, 0.125, sinks=None, window=0), ak.decode(q[0], k, v, 0.125))


def test_decode_split_sinks_matches_serial():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 1, 8, 2, 900, 64, 64)
    sinks = rng.standard_normal(8).astype(np.float32)
    out_s = np.empty((8, 64), np.float32)
    out_p = np.empty((8, 64), np.float32)
    aks.decode_serial_sinks(q[0], k, v, np.float32(0.125), sinks, out_s)
    aks.decode_split_sinks(q[0], k, v, np.float32(0.125), sinks, out_p, 3)
    want = ref_attention(q, k, v, 899, 0.125, sinks)[0]
    for out in (out_s, out_p):
        assert np.abs(out - want).max() <= 2e-5 * np.abs(want).max()


@pytest.mark.parametrize("n,q_pos0,window,sinks", [(12, 0, 4, True), (12, 5, 4, True), (12, 5, 0, True),
                                                   (12, 5, 0, False), (150, 3, 7, True)])
def test_causal_attention_prompt(n, q_pos0, window, sinks):
    rng = np.random.default_rng(n + q_pos0)
    H, Hkv = 4, 2
    q, k, v = _qkv(rng, n, H, Hkv, q_pos0 + n, 16, 16)
    s = rng.standard_normal(H).astype(np.float32) if sinks else None
    got = ak.causal_attention(q, k, v, q_pos0, 0.25, sinks=s, window=window)
    want = ref_attention(q, k, v, q_pos0, 0.25, s, window)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# -- router and experts ----------------------------------------------------------------------------

class _W:
    """A weight source of float32 arrays (the GGUFWeights interface the MoE builder uses)."""

    def __init__(self, arrays):
        self.a = arrays

    def has(self, name):
        return name in self.a

    def vector(self, name):
        return self.a[name]

    def linear(self, name):
        from dsd.shard.weights import Linear
        x = np.ascontiguousarray(self.a[name], np.float32)
        return Linear(x.view(np.uint8).reshape(x.shape[0], -1), int(Q.F32), x.shape[1], name)

    def experts(self, name):
        from dsd.shard.weights import ExpertStack
        x = np.ascontiguousarray(self.a[name], np.float32)
        return ExpertStack(x.view(np.uint8).reshape(x.shape[0], x.shape[1], -1), int(Q.F32), x.shape[2], name)


def _moe_arrays(rng, E=8, F=32, D=64):
    return {"blk.0.ffn_gate_inp.weight": rng.standard_normal((E, D)).astype(np.float32) / 4,
            "blk.0.ffn_gate_inp.bias": rng.standard_normal(E).astype(np.float32),
            "blk.0.ffn_gate_exps.weight": rng.standard_normal((E, F, D)).astype(np.float32),
            "blk.0.ffn_up_exps.weight": rng.standard_normal((E, F, D)).astype(np.float32),
            "blk.0.ffn_down_exps.weight": rng.standard_normal((E, D, F)).astype(np.float32) / 8,
            "blk.0.ffn_gate_exps.bias": rng.standard_normal((E, F)).astype(np.float32),
            "blk.0.ffn_up_exps.bias": rng.standard_normal((E, F)).astype(np.float32),
            "blk.0.ffn_down_exps.bias": rng.standard_normal((E, D)).astype(np.float32)}


def ref_gpt_oss_moe(A, x, k):
    """float64 gpt-oss MoE: softmax over the top-k raw router logits, clamped SwiGLU, biases."""
    p = "blk.0."
    A = {n: np.asarray(a, np.float64) for n, a in A.items()}
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = A[p + "ffn_gate_inp.weight"] @ x[t] + A[p + "ffn_gate_inp.bias"]
        ids = np.argsort(-logits, kind="stable")[:k]
        w = np.exp(logits[ids] - logits[ids].max())
        w /= w.sum()
        for e, we in zip(ids, w):
            g = A[p + "ffn_gate_exps.weight"][e] @ x[t] + A[p + "ffn_gate_exps.bias"][e]
            u = A[p + "ffn_up_exps.weight"][e] @ x[t] + A[p + "ffn_up_exps.bias"][e]
            g = np.minimum(g, 7.0)
            h = g / (1 + np.exp(-1.702 * g)) * (np.clip(u, -7, 7) + 1)
            out[t] += we * (A[p + "ffn_down_exps.weight"][e] @ h + A[p + "ffn_down_exps.bias"][e])
    return out


@pytest.mark.parametrize("T", [1, 3, 40])  # decode, gathered small batch, per-expert prompt path
def test_gpt_oss_moe_ffn(T):
    from dsd.shard.moe import ACT_SWIGLU_OAI, GATING_SOFTMAX_WEIGHT, moe_ffn_from_weights

    rng = np.random.default_rng(T)
    A = _moe_arrays(rng)
    x = rng.standard_normal((T, 64)).astype(np.float32)
    with exact_activations():
        ffn = moe_ffn_from_weights(_W(A), 0, 2, gating=GATING_SOFTMAX_WEIGHT, act=ACT_SWIGLU_OAI)
        assert not ffn.experts.plain
        got = ffn(x)
        ids, w = ffn.router(x)
    want = ref_gpt_oss_moe(A, x, 2)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


def test_expert_row_slices_with_biases_add_up():
    """Row-sliced shares (a daemon worker's) with biases: partial sums add to the full output."""
    from dsd.shard.moe import ACT_SWIGLU_OAI, RoutedExperts

    rng = np.random.default_rng(1)
    A = _moe_arrays(rng, F=64)
    W = _W(A)
    st = [W.experts(f"blk.0.ffn_{n}_exps.weight") for n in ("gate", "up", "down")]
    b = tuple(A[f"blk.0.ffn_{n}_exps.bias"] for n in ("gate", "up", "down"))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    ids = np.array([[1, 5], [5, 2]])
    w = np.array([[0.7, 0.3], [0.6, 0.4]], np.float32)
    with exact_activations():
        full = RoutedExperts(*st, act=ACT_SWIGLU_OAI, biases=b)(x, ids, w)
        parts = sum(RoutedExperts(*st, experts=ex, rows=r, act=ACT_SWIGLU_OAI, biases=b)(x, ids, w)
                    for r in ((0, 32), (32, 64)) for ex in ({1, 2}, {5}))
    np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-5)


def test_swiglu_oai_clamps():
    from dsd.shard.moe import swiglu_oai

    g = np.array([-20, -1, 0, 3, 7, 9, 50], np.float32)
    u = np.array([-9, -7, 0, 2, 7, 8, -50], np.float32)
    gc = np.minimum(g.astype(np.float64), 7)
    want = gc / (1 + np.exp(-1.702 * gc)) * (np.clip(u, -7, 7) + 1)
    np.testing.assert_allclose(swiglu_oai(g, u), want, rtol=1e-6, atol=1e-7)


def test_split_placements(tiny):
    """Daemon placements: one worker holding everything builds and runs as the single process;
    with two workers (experts and rows) each worker's expert biases are the share matching its
    expert weights, and the workers' partial expert outputs add up to the single process's
    (prompt-sized and decode-sized batches); the down bias is held by one worker only."""
    from dsd.daemon.placement import make_plan
    from dsd.daemon.slice_weights import SliceWeights

    with open_gguf(tiny) as g:
        sw = SliceWeights(g, make_plan(g, 1, "auto").pieces[0], node=0, pages="4k")
        try:
            with exact_activations():
                m = build_model(g, sw)
                got = m.forward(Batch.single(m.new_cache(64), TOKENS, all_logits=True))
                one = build_model(g)
                want = one.forward(Batch.single(one.new_cache(64), TOKENS, all_logits=True))
            assert np.array_equal(got, want)
        finally:
            sw.free()
        one = build_model(g)
        rng = np.random.default_rng(3)
        for mode in ("experts", "rows"):
            plan = make_plan(g, 2, mode)
            assert plan.mode == mode
            sws = [SliceWeights(g, plan.pieces[w], node=0, pages="4k") for w in range(2)]
            try:
                held = [{p.name for p in plan.pieces[w]} for w in range(2)]
                for i in range(4):
                    name = f"blk.{i}.ffn_down_exps.bias"
                    n_hold = sum(name in h for h in held)
                    assert n_hold == (2 if mode == "experts" else 1)
                models = [build_model(g, sw) for sw in sws]
                for T in (1, 3, 40):  # decode, gathered small batch, per-expert prompt path
                    x = rng.standard_normal((T, 64)).astype(np.float32)
                    for i in range(4):
                        ids, w = one.ffn[i].router(x)
                        with exact_activations():
                            want = one.ffn[i].experts(x, ids, w)
                            parts = [mm.ffn[i].experts(x, ids, w) for mm in models]
                        np.testing.assert_allclose(parts[0] + parts[1], want, rtol=1e-5, atol=1e-5)
                        if T == 40:  # (one token's 2 experts may both be one worker's)
                            assert np.abs(parts[0]).max() > 0 and np.abs(parts[1]).max() > 0
            finally:
                for sw in sws:
                    sw.free()


def test_synth_gpt_oss(tmp_path):
    """shard/synth.py's gpt-oss-shaped file (narrowed here) passes gguf_check and runs."""
    from dsd.shard.synth import gpt_oss_spec, write_synthetic

    spec = gpt_oss_spec(layers=2, hidden=256, heads=8, kv_heads=2, experts=8, experts_used=4, expert_ffn=128,
                        sliding_window=4)
    path = tmp_path / "s.gguf"
    write_synthetic(path, spec)
    with open_gguf(str(path)) as g:
        assert g.architecture == "gpt-oss" and g.tensors["blk.0.ffn_gate_exps.weight"].ggml_type == Q.MXFP4
        m = build_model(g)
        assert [a.window for a in m.attn] == [4, 0] and m.args.yarn_factor == 32.0
        cache = m.new_cache(64)
        full = m.forward(Batch.single(cache, TOKENS[:8], all_logits=True))
        step = m.forward(Batch.single(cache, TOKENS[8:9]))
    assert full.shape == (8, 49152) and np.isfinite(full).all() and np.isfinite(step).all()


def test_chat_template_tojson_concatenation():
    """Harmony renders a tool result as "<|start|>functions.X to=assistant<|channel|>commentary
    <|message|>" + content|tojson + "<|end|>": tojson must give a plain str (as transformers'),
    not markupsafe.Markup, which HTML-escaped the strings added to it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from dsd.shard.chat_template import ChatTemplate

    src = ("{%- for m in messages %}{{- '<|start|>' + m.role + '<|channel|>commentary<|message|>' + "
           "m.content|tojson + '<|end|>' }}{%- endfor %}{{- (tools|tojson(indent=1)) if tools }}"
           "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}")
    msgs = [{"role": "user", "content": "x < y & \"é\""}, {"role": "tool", "content": "<b>sunny</b>"}]
    tools = [{"name": "f", "description": "ü"}]
    ours = str(ChatTemplate(src).render(msgs, True, tools=tools))
    theirs = render_jinja_template(conversations=[msgs], chat_template=src, add_generation_prompt=True,
                                   tools=tools)[0][0]
    assert ours == theirs and "&lt;" not in ours and "<|end|>" in ours
