"""gpt-oss through the daemon: greedy tokens of `dsd start --nodes 2` under the experts and rows
placements equal the one-process Engine's, on a tiny gpt-oss GGUF (tests/test_gpt_oss.py's
writer: expert biases [E, F] / [E, D], clamped SwiGLU, sinks, sliding window, YaRN).

The expert biases travel with the experts (daemon/placement.py): experts mode gives each worker
the bias rows of its expert range, rows mode the gate / up bias columns of its rows and the down
bias to worker 0 alone.  The workers' weight bytes are checked against the plan: every tensor is
tiled exactly once by the pieces (no byte held twice, none missing), and each worker's
weight_bytes is its pieces' bytes (each rounded up to SliceWeights' 64-byte alignment).
"""
from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q

from dsd.daemon.placement import make_plan
from dsd.shard.gguf_file import open_gguf
from tests.test_daemon_same_answers import check_same
from tests.test_daemon_util import running_daemon
from tests.test_gpt_oss import write_tiny_gpt_oss

ALIGN = 64  # daemon/slice_weights.py: every piece starts on a 64-byte boundary


def _tiles_once(g, plan) -> None:
    """Every tensor of the file is held exactly once: one whole piece, or split pieces whose
    ranges tile its split dimension, and the piece bytes add up to the file's tensor bytes."""
    by_name: dict[str, list] = {}
    for ps in plan.pieces:
        for p in ps:
            by_name.setdefault(p.name, []).append(p)
    assert set(by_name) == set(g.tensors)
    for name, ps in by_name.items():
        t = g.tensors[name]
        if any(p.mode == "whole" for p in ps):
            assert len(ps) == 1, (name, ps)
            continue
        spans = sorted((p.a, p.b) for p in ps)
        assert spans[0][0] == 0 and all(a == b for (_, a), (b, _) in zip(spans, spans[1:])), (name, spans)
        assert sum(p.nbytes for p in ps) == t.nbytes, name
    assert sum(p.nbytes for ps in plan.pieces for p in ps) == g.tensor_nbytes_total()


@pytest.mark.parametrize("placement,kw", [
    ("experts", dict()),
    ("rows", dict()),
    ("rows", dict(exp_qtype=Q.MXFP4, F=64)),  # rows on MXFP4's 32-element blocks
])
def test_gpt_oss_two_nodes_equals_one_process(tmp_path, placement, kw):
    path = write_tiny_gpt_oss(tmp_path / "g.gguf", **kw)
    with open_gguf(path) as g:
        plan = make_plan(g, 2, placement)
        _tiles_once(g, plan)
        want_bytes = [sum((p.nbytes + ALIGN - 1) // ALIGN * ALIGN for p in ps) for ps in plan.pieces]
        bias = {p.name: w for w, ps in enumerate(plan.pieces) for p in ps if p.name.endswith("_exps.bias")}
    # the biases are split like the weights (rows: the down bias with worker 0 only)
    assert len(bias) == 3 * 4
    if placement == "rows":
        assert {w for n, w in bias.items() if "down" in n} == {0}
    with running_daemon(tmp_path, "--model", path, "--nodes", "2", "--placement", placement) as run:
        st = run.client().status()
        assert st["placement"] == placement
        assert len(st["workers"]) == 2 and all(w["state"] == "ready" for w in st["workers"])
        assert [w["weight_bytes"] for w in st["workers"]] == want_bytes
        check_same(run, path)
