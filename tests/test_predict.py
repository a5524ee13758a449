"""daemon/predict.py: the placement performance model behind `dsd plan --predict` (no daemon)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType as Q

from dsd.daemon.placement import make_plan
from dsd.daemon.predict import Machine, ShapeModel, _shape_facts, predict, predict_all
from dsd.shard.gguf_file import open_gguf
from tests.tiny_moe import write_tiny_deepseek2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_deepseek2(str(tmp_path_factory.mktemp("pred") / "d.gguf"), n_layers=4, E=10, k=3,
                                F=192, qtype=Q.Q8_0)


def test_monotone_in_bandwidth(tiny):
    r1 = ShapeModel("deepseek-r1-q4_k_m")
    with open_gguf(tiny) as g:
        for model in (g, r1):
            facts = _shape_facts(model)
            for n, mode in ((1, "auto"), (2, "experts"), (2, "rows")):
                plan = make_plan(model, n, mode)
                for nodes in (1, 2):
                    got = [predict(plan, Machine(nodes=nodes, bw=bw, cores=32, xbw=bw / 4), *facts)["tok_s"]
                           for bw in (1, 5, 20, 100, 300, 1000)]
                    assert all(a <= b for a, b in zip(got, got[1:])), (mode, nodes, got)
                    assert got[0] < got[-1]


def test_two_nodes_beat_one_for_a_memory_bound_moe(tiny):
    # two sockets of equal bandwidth, cores enough that memory is the limit
    m = Machine(nodes=2, bw=300, cores=32, xbw=80, hop_us=2, layer_us=50, core_gbs=20)
    for model in (ShapeModel("deepseek-r1-q4_k_m"), ShapeModel("deepseek-v2-lite-q4_k_m")):
        got = dict(predict_all(model, m, 2))
        one = got["nodes 1"]["tok_s"]
        split = [p["tok_s"] for label, p in got.items() if label.startswith("nodes 2")]
        assert len(split) == 2 and all(s > one for s in split), got
        # each worker reads about half the weights
        rows = next(p for label, p in got.items() if "rows" in label)
        b = rows["bytes_per_worker"]
        assert abs(b[0] - b[1]) < 0.1 * sum(b)
        assert sum(b) == pytest.approx(got["nodes 1"]["bytes_per_worker"][0], rel=1e-3)
    # the same two workers on ONE node share its bandwidth: no gain, only hops
    with open_gguf(tiny) as g:
        one_node = Machine(nodes=1, bw=300, cores=32, core_gbs=20)
        got = dict(predict_all(g, one_node, 2))
        assert all(p["tok_s"] < got["nodes 1"]["tok_s"] for label, p in got.items() if label != "nodes 1")


def test_hops_match_a_hand_count(tiny):
    m = Machine(nodes=2, bw=10, cores=2, xbw=5, hop_us=10, layer_us=0)
    with open_gguf(tiny) as g:
        facts = _shape_facts(g)
        D, V = 64, 96
        # one worker: the coordinator's descriptor and the logits back
        p1 = predict(make_plan(g, 1, "auto"), m, *facts)
        assert (p1["hops"], p1["messages"], p1["xfer_s"]) == (2, 2, 0.0)
        # rows on 2: worker 0 drives every layer; layer 0: attention heads + dense FFN rows,
        # layers 1-3: attention heads + experts, then the split head: 9 collectives x 2 hops,
        # no hand-over, + 2 for the step
        plan = make_plan(g, 2, "rows")
        assert plan.layer_owner == [0, 0, 0, 0] and plan.embed_owner == plan.head_owner == 0
        p = predict(plan, m, *facts)
        assert p["hops"] == 2 * 9 + 0 + 2
        assert p["messages"] == 2 * 9 + 2 * 2          # request + reply per collective; step
        assert p["hops_s"] == pytest.approx(20 * 10e-6)
        xfer = 8 * 2 * 4 * D + (4 * D + 4 * V / 2)      # worker 1 is on the other node
        assert p["xfer_s"] == pytest.approx(xfer / 5e9)
        # experts on 2: layers 0-1 on worker 0, 2-3 on worker 1 (the head with the last layer);
        # 3 MoE layers' experts, one hand-over (1 -> 2)
        plan = make_plan(g, 2, "experts")
        assert plan.layer_owner == [0, 0, 1, 1] and (plan.embed_owner, plan.head_owner) == (0, 1)
        p = predict(plan, m, *facts)
        assert p["hops"] == 2 * 3 + 1 + 2
        assert p["xfer_s"] == pytest.approx((3 * 2 * 4 * D + 4 * D) / 5e9)


def test_r1_shape_estimates_the_file():
    s = ShapeModel("deepseek-r1-q4_k_m")
    total = sum(t.nbytes for t in s.tensors.values())
    assert 380e9 < total < 420e9                          # ~404 GB for the real Q4_K_M file
    n_used, n_exp, dim, vocab = _shape_facts(s)
    assert (n_used, n_exp, dim, vocab) == (8, 256, 7168, 129280)
    plan = make_plan(s, 2, "auto")
    assert len(plan.moe_layers) == 58 and plan.n_layers == 61


def test_plan_predict_prints_a_line_per_placement(tiny):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "dsd.cli", "plan", "--predict", "--bandwidth", "20", *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return [ln for ln in r.stdout.splitlines() if "tok/s" in ln]

    lines = run("--model", tiny, "--nodes", "2")
    assert [ln.split()[0] + " " + ln.split()[1] for ln in lines] == ["nodes 1", "nodes 2", "nodes 2"]
    assert [ln.split()[2] for ln in lines[1:]] == ["experts", "rows"]
    assert all("weights" in ln and "hops" in ln and "overhead" in ln for ln in lines)
    lines = run("--shape", "deepseek-r1-q4_k_m", "--machine-nodes", "2", "--cores", "32",
                "--cross-bandwidth", "80", "--hop-us", "2")
    assert len(lines) == 3 and lines[2].split()[:3] == ["nodes", "2", "rows"]
