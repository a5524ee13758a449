"""GLM-4.5 (GGUF arch glm4moe) against transformers' Glm4MoeForCausalLM (issue 18, point 2).

A tiny random model (seeded): GQA 4/2 with q/k/v biases and QK-norm, head_dim 32 with RoPE over
its first 16 dims (partial_rotary_factor 0.5), layer 0 dense, layers 1-2 with 8 sigmoid-routed
experts (top-2, random correction bias, renormalised, x2.5) plus one shared expert.  The saved
checkpoint gets an MTP block (model.layers.3.*: eh_proj, enorm, hnorm, shared_head.norm and a
full MoE block), which llama.cpp's convert_hf_to_gguf.py writes as blk.3 with block_count 4 and
nextn_predict_layers 1; transformers does not load it, and neither may dsd.

Error of a run: the median over positions of max_vocab |logits - truth| / max_vocab |truth|.
q8_0: as tests/test_qwen_dense.py, the yardstick is transformers in float64 over gguf-py's
dequantization of the same file (llama.cpp's own logits are not available here).
"""
from __future__ import annotations

import numpy as np
import pytest

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.kernels import exact_activations
from dsd.shard.models import build_model
from dsd.shard.weights import GGUFWeights
from tests.reference.hf_convert import (hf_logits_f32, hf_logits_f64, make_gguf, randomize_,
                                        sample_tokens, vocab_size, with_gguf_weights)

TOKENS = sample_tokens(24, seed=5)
L, E, F_EXP = 3, 8, 32


def _config(**kw):
    import transformers as tf

    c = dict(vocab_size=vocab_size("glm4_moe"), hidden_size=64, intermediate_size=128, num_hidden_layers=L,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
             rms_norm_eps=1e-5, attention_bias=True, use_qk_norm=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
             moe_intermediate_size=F_EXP, num_experts_per_tok=2, n_shared_experts=1, n_routed_experts=E,
             routed_scaling_factor=2.5, n_group=1, topk_group=1, first_k_dense_replace=1,
             norm_topk_prob=True, num_nextn_predict_layers=1, tie_word_embeddings=False)
    c.update(kw)
    return tf.Glm4MoeConfig(**c)


def _hf_model():
    import torch
    import transformers as tf

    torch.manual_seed(0)
    m = randomize_(tf.Glm4MoeForCausalLM(_config()), seed=21)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):   # a buffer: randomize_ leaves it at 0
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return m


def _add_mtp_block(hf_dir):
    """Append the MTP block the converter keeps (blk.L): a copy of layer L-1's tensors (perturbed)
    plus the nextn projection and norms, with random values."""
    import torch
    from safetensors.torch import load_file, save_file

    f = hf_dir / "model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(23)
    add = {}
    for k, v in sd.items():
        if k.startswith(f"model.layers.{L - 1}."):
            add[k.replace(f"layers.{L - 1}.", f"layers.{L}.")] = v + 0.5 * torch.randn(v.shape, generator=g)
    D = sd["model.norm.weight"].shape[0]
    p = f"model.layers.{L}."
    add[p + "eh_proj.weight"] = torch.randn(D, 2 * D, generator=g)
    for n in ("enorm", "hnorm", "shared_head.norm"):
        add[p + n + ".weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    sd.update(add)
    save_file(sd, str(f), metadata={"format": "pt"})


class _Case:
    def __init__(self, tmp):
        self.hf = _hf_model()
        self.f32 = make_gguf(self.hf, tmp, "f32", edit_checkpoint=_add_mtp_block)
        self.q8 = make_gguf(self.hf, tmp, "q8_0", edit_checkpoint=_add_mtp_block)
        self.truth32 = hf_logits_f32(self.hf, TOKENS)
        self.truth64 = hf_logits_f64(self.hf, TOKENS)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return _Case(tmp_path_factory.mktemp("glm4moe"))


def _err(got, truth):
    return float(np.median(np.abs(got - truth).max(-1) / np.abs(truth).max(-1)))


class _Recording:
    """A weight source that records every tensor name the model constructor asks for."""

    def __init__(self, inner):
        self.inner, self.asked = inner, set()

    def __getattr__(self, name):
        f = getattr(self.inner, name)

        def call(tensor, *a, **kw):
            self.asked.add(tensor)
            return f(tensor, *a, **kw)
        return call


def _dsd(path, tokens=TOKENS):
    m = build_model(open_gguf(path))
    return m, m.forward(Batch.single(m.new_cache(64), tokens, all_logits=True))


def test_converted_file_has_the_mtp_block_and_dsd_does_not_load_it(case):
    with open_gguf(case.f32) as g:
        assert g.architecture == "glm4moe"
        assert g.arch_get("block_count") == L + 1 and g.arch_get("nextn_predict_layers") == 1
        assert g.arch_get("rope.dimension_count") == 16 and g.arch_get("attention.key_length") == 32
        assert g.arch_get("expert_gating_func") == 2 and g.arch_get("leading_dense_block_count") == 1
        t = g.tensors
        assert f"blk.{L}.nextn.eh_proj.weight" in t and f"blk.{L}.ffn_gate_exps.weight" in t
        assert "blk.1.exp_probs_b.bias" in t and "blk.1.ffn_gate_shexp.weight" in t
        assert "blk.0.ffn_gate.weight" in t and "blk.0.attn_q.bias" in t and "blk.0.attn_q_norm.weight" in t
    g = open_gguf(case.f32)
    w = _Recording(GGUFWeights(g))
    m = build_model(g, w)
    assert type(m).__name__ == "Glm4MoeModel" and m.n_layers == L and len(m.ffn) == L
    assert w.asked and not [n for n in w.asked if n.startswith(f"blk.{L}.")]
    from dsd.daemon.placement import make_plan

    for plan in (make_plan(g, 2, "experts"), make_plan(g, 1)):   # nor does any daemon worker hold it
        assert plan.n_layers == L and len(plan.layer_owner) == L
        assert not [p.name for ps in plan.pieces for p in ps if p.name.startswith(f"blk.{L}.")]


def test_f32_logits_match_transformers(case):
    _, got = _dsd(case.f32)
    scale = np.abs(case.truth64).max()
    assert np.abs(got - case.truth32).max() <= 1e-3 * scale
    assert np.abs(got - case.truth64).max() <= 1e-3 * scale
    assert _err(got, case.truth64) < 1e-4


def test_incremental_decode_equals_full_prompt(case):
    m, full = _dsd(case.f32)
    cache = m.new_cache(64)
    rows = [m.forward(Batch.single(cache, TOKENS[:7], all_logits=True))]
    for t in TOKENS[7:]:
        rows.append(m.forward(Batch.single(cache, [t])))
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=2e-5 * np.abs(full).max())


_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
_PER_LAYER = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
              "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
              "ffn_down_shexp": "mlp.shared_experts.down_proj"}


def _hf_name(name, a):
    """GGUF tensor -> the transformers Glm4Moe parameter / buffer (experts: gate and up are the
    two halves of gate_up_proj [E, 2F, D]); the MTP block has no counterpart."""
    parts = name.split(".")
    if parts[0] != "blk":
        return f"{_NAMES[parts[0]]}.{parts[1]}", None, a
    i, kind = int(parts[1]), parts[2]
    if i >= L:
        return None
    p = f"model.layers.{i}."
    if kind == "exp_probs_b":
        return p + "mlp.gate.e_score_correction_bias", None, a
    if kind in ("ffn_gate_exps", "ffn_up_exps"):
        half = slice(0, F_EXP) if kind == "ffn_gate_exps" else slice(F_EXP, 2 * F_EXP)
        return p + "mlp.experts.gate_up_proj", (slice(None), half), a
    if kind == "ffn_down_exps":
        return p + "mlp.experts.down_proj", None, a
    return f"{p}{_PER_LAYER[kind]}.{parts[3]}", None, a


def test_q8_0_error_is_the_weights_error(case):
    """As test_qwen_dense: exact activations reproduce the float64 forward pass over the
    dequantized file; the default path's 8-bit activations add a bounded rounding."""
    ref = hf_logits_f64(with_gguf_weights(case.hf, case.q8, _hf_name), TOKENS)
    weights_err = _err(ref, case.truth32)
    assert 1e-3 < weights_err < 0.05, weights_err
    with exact_activations():
        _, exact = _dsd(case.q8)
    assert _err(exact, ref) < 1e-4
    assert _err(exact, case.truth32) <= 1.05 * weights_err
    _, got = _dsd(case.q8)
    err, act = _err(got, case.truth32), _err(got, ref)
    print(f"glm4moe q8_0: dsd {err:.4g} (exact activations {_err(exact, case.truth32):.4g}; "
          f"vs the file's own float64 answer {act:.3g}), weights alone {weights_err:.4g}")
    assert act < 0.02 and err <= 2 * weights_err, (err, act, weights_err)


@pytest.mark.parametrize("placement", ["experts", "rows"])
def test_daemon_two_workers_equals_one_process(tmp_path_factory, placement):
    """Greedy ids through `dsd start --nodes 2` equal the one-process engine (on a file without
    the MTP block, whose experts are wide enough for `rows`; the plan of a file with one is
    checked above)."""
    import torch
    import transformers as tf

    from tests.test_daemon_same_answers import check_same
    from tests.test_daemon_util import running_daemon

    d = tmp_path_factory.mktemp("glm4moe-daemon")
    path = d / "glm4_moe-nomtp-q8_0.gguf"
    if not path.exists():
        torch.manual_seed(0)
        m = randomize_(tf.Glm4MoeForCausalLM(_config(num_nextn_predict_layers=0, moe_intermediate_size=128)),
                      seed=31)   # 128: two whole q8_0 block pairs (kernels.split_unit), so `rows` can split the experts
        path = make_gguf(m, d, "q8_0", name="glm4_moe-nomtp-q8_0")
    with running_daemon(d, "--model", str(path), "--nodes", "2", "--placement", placement) as run:
        st = run.client().status()
        assert st["placement"] == placement and len(st["workers"]) == 2
        check_same(run, str(path), [TOKENS[:6], TOKENS[6:16]])
