"""Every low-bit type of issue 15 in one model file: a tiny DeepSeek2-shaped GGUF (dsd synth's
writer, random blocks with sane scales) whose matrices cycle through IQ1_S ... TQ2_0 -- token
embedding (row lookup), head, MLA projections, the dense lead FFN, routed and shared experts.
dsd's logits (prompt, decode, batched decode, huge-page copy) against a float64 numpy forward
pass over gguf.quants.dequantize of the same tensors (tests/reference/moe_ref.py, no dsd code),
and the daemon placements' shares (experts / rows) adding up to the whole layer."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.kernels import batch_invariant, exact_activations, registry
from dsd.shard.models import build_model
from dsd.shard.synth import SynthSpec, write_synthetic
from tests.reference.moe_ref import deepseek2_logits

from .test_quant_iq import IQ

# hidden 256 and expert / dense widths of 512: rows of whole 256-element super-blocks (two per
# down row, so the rows placement can split them between two workers);
# the 64-wide attn_k_b rows and 128-wide attn_output rows take the 32-element types
SPEC = dict(layers=3, hidden=256, heads=2, experts=8, experts_used=2, shared=1, expert_ffn=512,
            dense_ffn=512, kv_lora=256, qk_nope=64, qk_rope=32, v_head=64, dense_lead=1,
            yarn_factor=1.0, context=4096, fallback_qtype="Q8_0")
TYPES = {
    "token_embd.weight": "IQ4_XS", "output.weight": "IQ3_S",
    "blk.0.attn_q.weight": "IQ2_XXS", "blk.0.attn_kv_a_mqa.weight": "IQ2_XS", "blk.0.attn_k_b.weight": "MXFP4",
    "blk.0.attn_v_b.weight": "IQ2_S", "blk.0.attn_output.weight": "IQ4_NL",
    "blk.0.ffn_gate.weight": "IQ3_XXS", "blk.0.ffn_up.weight": "IQ1_S", "blk.0.ffn_down.weight": "IQ1_M",
    "blk.1.ffn_gate_exps.weight": "TQ1_0", "blk.1.ffn_up_exps.weight": "TQ2_0",
    "blk.1.ffn_down_exps.weight": "IQ2_XXS", "blk.1.ffn_gate_shexp.weight": "IQ4_XS",
    "blk.1.ffn_up_shexp.weight": "IQ3_S", "blk.1.ffn_down_shexp.weight": "IQ2_S",
    "blk.1.attn_k_b.weight": "IQ4_NL", "blk.1.attn_output.weight": "MXFP4",
    "blk.2.ffn_gate_exps.weight": "IQ1_M", "blk.2.ffn_up_exps.weight": "IQ1_S",
    "blk.2.ffn_down_exps.weight": "IQ3_S", "blk.2.ffn_gate_shexp.weight": "TQ1_0",
    "blk.2.ffn_up_shexp.weight": "TQ2_0", "blk.2.ffn_down_shexp.weight": "IQ3_XXS",
}
TOKENS = [1, 500, 1000, 42, 7, 9000, 33, 12, 40000, 5]


@pytest.fixture(scope="module")
def all_types_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("iq") / "all_iq.gguf"
    write_synthetic(path, SynthSpec(**SPEC, qtype="Q4_K", attn_type="IQ4_XS", overrides=TYPES))
    return str(path)


def _rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_file_holds_every_new_type(all_types_file):
    g = open_gguf(all_types_file)
    have = {t.type_name for t in g.tensors.values()}
    assert {t.name for t in IQ} <= have, sorted({t.name for t in IQ} - have)
    for name, want in TYPES.items():
        assert g.tensors[name].type_name == want, name


def test_logits_match_float64_reference(all_types_file):
    """Prompt (all positions), then decode steps, against the float64 reference; the token
    embedding is a row lookup of IQ4_XS rows, the head an IQ3_S matrix."""
    with exact_activations():  # float32 x: the 8-bit x of IQ4_NL / IQ4_XS / MXFP4 is tested below
        _check_logits(all_types_file, 2e-5)  # float32 products of exactly decoded weights


@pytest.mark.int8
def test_logits_with_int8_activations_close_to_float64(all_types_file):
    """The same with 8-bit activations for the types that have integer kernels (rows_iq8 and
    rows_iq1: all twelve types; x rounded to 1/254 of its block's max): within 1.5e-2 of the
    largest logit (measured 1.08e-2 once IQ1_S / IQ1_M / TQ1_0 got 8-bit kernels too), the same
    greedy tokens where the reference's margin is wider."""
    if not registry.INT8_ACTIVATIONS:
        pytest.skip("no 8-bit activation kernels on this CPU (or DSD_EXACT_ACTIVATIONS=1)")
    _check_logits(all_types_file, 1.5e-2)


def _check_logits(path, tol):
    g = open_gguf(path)
    model = build_model(g)
    ref = deepseek2_logits(path, TOKENS)
    assert np.isfinite(ref).all() and ref.std() > 0.1
    cache = model.new_cache(64)
    got = model.forward(Batch.single(cache, TOKENS[:7], all_logits=True))
    assert _rel(got, ref[:7]) <= tol
    for t in range(7, len(TOKENS)):  # one-token decode: matvec, gathered / fused experts
        step = model.forward(Batch.single(cache, [TOKENS[t]]))
        assert _rel(step[-1], ref[t]) <= tol, t
    # greedy tokens the same wherever the reference's top-2 margin exceeds the allowed error
    top2 = np.sort(ref[:7], axis=-1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 2 * tol * np.abs(ref[:7]).max()
    assert sure.sum() >= 4 and (got.argmax(-1) == ref[:7].argmax(-1))[sure].all()


def _last_logits(model, work):
    """One forward batch over [(cache, new tokens)] -> each sequence's last logits row."""
    from dsd.shard.batch import Segment

    toks, pos, segs, rows, start = [], [], [], [], 0
    for cache, new in work:
        segs.append(Segment(cache, start, len(new), cache.length))
        toks += list(new)
        pos += range(cache.length, cache.length + len(new))
        start += len(new)
        rows.append(start - 1)
    return model.forward(Batch(tokens=np.asarray(toks, np.int64), positions=np.asarray(pos, np.int64),
                               segments=segs, logit_rows=np.asarray(rows)))


def test_batch_invariant_and_huge_page_copy(all_types_file):
    """batch_invariant: a prompt's logits are bit-identical alone, beside another prompt in one
    batch, and prefilled in two chunks; the huge-page copy of the weights gives the file
    mapping's logits exactly."""
    from dsd.shard.weights import GGUFWeights, HugePageWeights

    g = open_gguf(all_types_file)
    a, b = TOKENS, [3, 77, 30000, 8, 19, 2, 600, 45, 46, 47, 48, 49, 50]
    with batch_invariant():
        outs = []
        for w in (GGUFWeights(g), HugePageWeights(g)):
            m = build_model(g, weights=w)
            outs.append(_last_logits(m, [(m.new_cache(32), a)])[0])
        np.testing.assert_array_equal(outs[0], outs[1])
        together = _last_logits(m, [(m.new_cache(32), a), (m.new_cache(32), b)])[0]
        c = m.new_cache(32)
        _last_logits(m, [(c, a[:4])])
        chunked = _last_logits(m, [(c, a[4:])])[0]
    np.testing.assert_array_equal(together, outs[0])
    np.testing.assert_array_equal(chunked, outs[0])


def _moe_layer(weights, layer: int, experts=None, rows=None):
    from dsd.shard.moe import RoutedExperts

    p = f"blk.{layer}."
    st = [weights.experts(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down")]
    return RoutedExperts(*st, experts=experts, rows=rows)


@pytest.mark.parametrize("mode", ["experts", "rows"])
def test_daemon_placement_shares_add_up(all_types_file, mode, monkeypatch):
    """Two workers' SliceWeights (the daemon's loader): their routed-expert and shared-expert
    partial sums add up to the whole layer's output (rows mode splits F on 256-element block
    boundaries of the IQ2_XXS / IQ3_S down projections, experts mode splits the experts)."""
    from dsd.daemon.placement import make_plan
    from dsd.daemon.slice_weights import SliceWeights
    from dsd.shard.models.llama import DenseFFN
    from dsd.shard.weights import GGUFWeights

    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0)
    g = open_gguf(all_types_file)
    plan = make_plan(g, 2, mode)
    assert plan.mode == mode
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    ids = rng.integers(0, 8, size=(5, 2))
    wts = rng.uniform(0.2, 1.0, size=(5, 2)).astype(np.float32)
    full = GGUFWeights(g)
    for layer in (1, 2):
        p = f"blk.{layer}."
        want = _moe_layer(full, layer)(x, ids, wts)
        shw = DenseFFN(*(full.linear(p + f"ffn_{n}_shexp.weight") for n in ("gate", "up", "down")))(x)
        got = np.zeros_like(want)
        got_sh = np.zeros_like(shw)
        for w in range(2):
            sw = SliceWeights(g, plan.pieces[w], node=0, pages="4k")
            try:
                name = p + "ffn_down_exps.weight"
                pc = sw.pieces[name]
                if mode == "rows":
                    assert pc.a % 256 == 0 and pc.b % 256 == 0 and pc.b > pc.a
                    got += _moe_layer(sw, layer)(x, ids, wts)
                else:
                    got += _moe_layer(sw, layer, experts=range(pc.a, pc.b))(x, ids, wts)
                sh = p + "ffn_down_shexp.weight"
                if sw.holds(sh):
                    got_sh += DenseFFN(*(sw.linear(p + f"ffn_{n}_shexp.weight") for n in ("gate", "up", "down")))(x)
            finally:
                sw.free()
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-5 * scale, (layer, mode)
        assert np.abs(got_sh - shw).max() <= 1e-5 * np.abs(shw).max(), (layer, mode)


def test_rows_placement_refuses_a_cut_inside_a_super_block(tmp_path):
    """Routed experts 256 wide in IQ2_XXS: one super-block per down row cannot be shared by two
    workers; --placement rows says so (auto picks whole experts) instead of cutting a block."""
    from dsd.daemon.placement import make_plan
    from dsd.errors import DsdError

    path = tmp_path / "narrow.gguf"
    spec = dict(SPEC, expert_ffn=256, layers=2)
    write_synthetic(path, SynthSpec(**spec, qtype="Q8_0", expert_type="IQ2_XXS"))
    g = open_gguf(str(path))
    assert g.tensors["blk.1.ffn_down_exps.weight"].type_name == "IQ2_XXS"
    with pytest.raises(DsdError, match="256-element blocks"):
        make_plan(g, 2, "rows")
    assert make_plan(g, 2, "auto").mode == "experts"


@pytest.mark.parametrize("placement", ["experts", "rows"])
def test_two_node_daemon_greedy_equals_one_process(all_types_file, tmp_path, placement):
    """`dsd start --nodes 2` on the all-types file (workers load their slices, warm up the IQ
    kernels, split experts or rows on block boundaries): greedy tokens equal the one-process
    engine's, token for token."""
    from dsd.shard.engine import Engine
    from dsd.shard.sampling import SamplingParams
    from tests.test_daemon_util import running_daemon

    ids = [1, 500, 1000, 42, 7]
    eng = Engine(all_types_file, threads=1)
    want = [s.token for s in eng.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]
    with running_daemon(tmp_path, "--model", all_types_file, "--nodes", "2", "--placement", placement) as run:
        c = run.client()
        st = c.status()
        assert st["placement"] == placement and all(w["state"] == "ready" for w in st["workers"])
        got = c.generate(ids, temperature=0, max_tokens=8, ignore_eos=True)
        assert got.token_ids == want
