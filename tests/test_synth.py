"""Synthetic DeepSeek-shaped GGUF: valid blocks, complete metadata and tokenizer, dsd runs it and
agrees with the float64 reference on its quantized (Q4_K / Q8_0 / Q5_0) weights."""
import subprocess
import sys

import numpy as np

from dsd.shard.kernels import exact_activations
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from dsd.shard.batch import Batch
from dsd.shard.gguf_file import open_gguf
from dsd.shard.models import build_model
from dsd.shard.synth import SynthSpec, random_blocks, write_synthetic
from tests.reference.moe_ref import deepseek2_logits

SMALL = dict(layers=3, hidden=256, heads=2, experts=8, experts_used=2, shared=1, expert_ffn=352,
             dense_ffn=512, kv_lora=256, qk_nope=64, qk_rope=32, v_head=64, dense_lead=1)


IQ_TYPES = [Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS,
            Q.MXFP4, Q.TQ1_0, Q.TQ2_0]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16]
                         + IQ_TYPES, ids=lambda q: q.name)
def test_random_blocks_decode_to_finite_values_of_chosen_size(qtype):
    raw = random_blocks(qtype, (16, 1024), np.random.default_rng(0), std=0.05)
    a = dequantize(raw, qtype)
    assert a.shape == (16, 1024) and np.isfinite(a).all()
    assert 0.02 < a.std() < 0.1 and abs(a.mean()) < 0.02


def test_synthetic_model_runs_and_matches_reference(tmp_path):
    path = tmp_path / "syn.gguf"
    res = write_synthetic(path, SynthSpec(**SMALL, fallback_qtype="Q5_0"))
    assert res["bytes"] > res["tensor_bytes"] > 0
    g = open_gguf(str(path))
    md = g.metadata
    assert md["general.architecture"] == "deepseek2"
    assert md["deepseek2.attention.q_lora_rank"] == 0            # llama.cpp requires the key
    assert len(md["tokenizer.ggml.tokens"]) == g.tensors["token_embd.weight"].shape[0] == 49152
    assert md["tokenizer.ggml.pre"] == "smollm" and len(md["tokenizer.ggml.merges"]) > 1000
    t = g.tensors
    assert t["blk.1.ffn_gate_exps.weight"].type_name == "Q4_K"        # 256-wide rows
    assert t["blk.1.ffn_down_exps.weight"].type_name == "Q5_0"        # 352-wide rows -> fallback
    assert t["blk.1.attn_k_b.weight"].type_name == "Q5_0"            # 64-wide rows
    assert t["blk.1.ffn_gate_inp.weight"].type_name == "F32"
    assert t["blk.1.attn_k_b.weight"].shape == (2, 256, 64)
    from dsd.shard.tokenizer import Tokenizer
    assert Tokenizer.from_metadata(md).encode("Hello world")
    model = build_model(g)
    tokens = [1, 500, 1000, 42, 7, 9000, 33, 12]
    with exact_activations():  # float32 activations: the architecture to float32 rounding
        got = model.forward(Batch.single(model.new_cache(64), tokens, all_logits=True))
    assert np.isfinite(got).all() and got.std() > 0.1
    ref = deepseek2_logits(str(path), tokens)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3
    # the default path (Q4_K products with 8-bit activations on VNNI CPUs, as llama.cpp does)
    fast = model.forward(Batch.single(model.new_cache(64), tokens, all_logits=True))
    assert np.abs(fast - ref).max() / np.abs(ref).max() <= 2e-2
    assert (fast.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_cli_writes_file_and_refuses_overwrite(tmp_path):
    out = tmp_path / "s.gguf"
    args = [sys.executable, "-m", "dsd.cli", "synth", str(out), "--layers", "2", "--hidden", "256",
            "--experts", "4", "--experts-used", "2", "--expert-ffn", "256", "--dense-ffn", "256",
            "--kv-lora", "256", "--heads", "2", "--type", "q8_0", "--no-yarn"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    g = open_gguf(str(out))
    assert g.metadata["deepseek2.block_count"] == 2 and "deepseek2.rope.scaling.type" not in g.metadata
    assert g.tensors["blk.1.ffn_up_exps.weight"].type_name == "Q8_0"
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "--force" in r.stderr
    r = subprocess.run(args[:-3] + ["--type", "Q7_X", "--force"], capture_output=True, text=True)
    assert r.returncode == 1 and "not supported" in r.stderr


def _mix_args(out, *extra):
    return [sys.executable, "-m", "dsd.cli", "synth", str(out), "--layers", "2", "--hidden", "512",
            "--heads", "4", "--experts", "8", "--experts-used", "2", "--expert-ffn", "512",
            "--dense-ffn", "1024", "--kv-lora", "256", "--no-yarn", *extra]


def test_cli_writes_unsloth_style_mix(tmp_path):
    """--expert-type / --expert-down-type / --attn-type / --shared-type / --embd-type /
    --output-type: routed experts in a low-bit type, the rest higher, as unsloth's dynamic quants;
    rows that do not fit a type's block take --fallback-type."""
    out = tmp_path / "ud.gguf"
    r = subprocess.run(_mix_args(out, "--type", "Q4_K", "--expert-type", "iq2_xxs", "--expert-down-type",
                                 "IQ3_XXS", "--attn-type", "Q6_K", "--shared-type", "Q8_0", "--embd-type",
                                 "IQ4_XS", "--output-type", "Q6_K", "--fallback-type", "Q8_0"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    t = open_gguf(str(out)).tensors
    want = {"blk.1.ffn_gate_exps.weight": "IQ2_XXS", "blk.1.ffn_up_exps.weight": "IQ2_XXS",
            "blk.1.ffn_down_exps.weight": "IQ3_XXS", "blk.1.attn_q.weight": "Q6_K",
            "blk.1.attn_k_b.weight": "Q8_0",  # 128-wide rows: not whole Q6_K super-blocks
            "blk.1.ffn_up_shexp.weight": "Q8_0", "token_embd.weight": "IQ4_XS", "output.weight": "Q6_K",
            "blk.0.ffn_down.weight": "Q4_K"}
    assert {n: t[n].type_name for n in want} == want
    r = subprocess.run(_mix_args(tmp_path / "x.gguf", "--expert-type", "IQ9_Z"), capture_output=True, text=True)
    assert r.returncode == 1 and "--expert-type IQ9_Z is not supported" in r.stderr


def _llama_bench():
    from dsd.shard.yardstick import yardsticks_dir
    import os
    path = os.path.join(yardsticks_dir(), "llama.cpp", "llama-bench")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(_llama_bench() is None, reason="llama.cpp's llama-bench is not built "
                    "(bench/build_yardsticks.sh); CI does not compile llama.cpp")
@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda q: q.name)
def test_llama_cpp_loads_and_runs_each_low_bit_type(tmp_path, qtype):
    """What dsd synth writes with every matrix it can in the type (32-element IQ4_NL where rows
    do not fit a super-block), llama.cpp loads and runs: a 16-token prompt and 4 decode steps."""
    out = tmp_path / "t.gguf"
    r = subprocess.run(_mix_args(out, "--type", qtype.name, "--fallback-type", "IQ4_NL"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([_llama_bench(), "-m", str(out), "-p", "16", "-n", "4", "-t", "2", "-r", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    runs = json.loads(r.stdout)
    assert {(x["n_prompt"], x["n_gen"]) for x in runs} == {(16, 0), (0, 4)} and all(x["avg_ts"] > 0 for x in runs)
