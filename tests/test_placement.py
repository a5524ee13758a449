"""Placement plans from GGUF tensor tables: every byte held exactly once, block-aligned rows,
balanced layer ranges, auto's cost model, the program the coordinator runs, and loading a
worker's slice into node-local memory (only its bytes, right values)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dsd.daemon.placement import choose_mode, make_plan
from dsd.daemon.sharded import collectives
from dsd.errors import DsdError
from dsd.shard.gguf_file import open_gguf
from dsd.shard.model_path import default_model_path
from tests.tiny_moe import write_tiny_deepseek2, write_tiny_mixtral


def _coverage(plan, g):
    """Assert each tensor's bytes are split into disjoint pieces covering it exactly once."""
    by_name = {}
    for w, ps in enumerate(plan.pieces):
        for p in ps:
            by_name.setdefault(p.name, []).append((w, p))
    for name, t in g.tensors.items():
        ps = by_name.get(name, [])
        if name == "rope_freqs.weight":
            continue
        assert ps, f"{name} held by nobody"
        modes = {p.mode for _, p in ps}
        if modes == {"whole"}:
            assert len(ps) == 1, f"{name} held {len(ps)} times"
        else:
            spans = sorted((p.a, p.b) for _, p in ps)
            if modes == {"experts"}:  # experts, or MLA heads of k_b / v_b (rows mode)
                full = t.shape[0]
            elif modes == {"cols"}:   # attn_output: the columns of each worker's heads
                full = t.shape[1]
            elif len(t.shape) == 2:  # shared experts, dense FFNs (rows mode): rows of F ([F, D]
                # gate/up, [D, F] down); the output head (rows mode): vocab rows
                full = t.shape[1] if "down" in name else t.shape[0]
            else:
                full = t.shape[2] if "down" in name else t.shape[1]
            assert spans[0][0] == 0 and spans[-1][1] == full
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
            assert len({w for w, _ in ps}) == len(ps)


def test_smollm2_layer_pipeline():
    with open_gguf(default_model_path()) as g:
        for n in (1, 2, 3):
            plan = make_plan(g, n, "auto")
            assert plan.mode == "layers"
            _coverage(plan, g)
            own = plan.layer_owner
            assert own == sorted(own) and set(own) == set(range(n))
            wb = plan.worker_bytes()
            assert sum(wb) == g.tensor_nbytes_total()
            assert max(wb) < 1.3 * sum(wb) / n  # balanced by bytes
            assert plan.head_owner == own[-1] and plan.embed_owner == own[-1]  # tied embeddings
        plan = make_plan(g, 2, "auto")
        # the hidden state's path (embedding, layers, head): tied embeddings live with the head
        path = [plan.embed_owner] + plan.layer_owner + [plan.head_owner]
        assert [w for k, w in enumerate(path) if k == 0 or path[k - 1] != w] == [1, 0, 1]
        assert not any(collectives(plan, i) for i in range(plan.n_layers))  # nothing is split


@pytest.mark.parametrize("mode", ["experts", "rows"])
def test_moe_plans_cover_every_byte_once(tmp_path, mode):
    path = write_tiny_deepseek2(str(tmp_path / "d.gguf"), n_layers=4, E=10, k=3, F=192, ffn=192, vdim=64,
                                qtype=Q.Q8_0)  # shares of whole 64-element Q8_0 units for 3 workers
    with open_gguf(path) as g:
        for n in (2, 3):
            plan = make_plan(g, n, mode)
            assert plan.mode == mode
            _coverage(plan, g)
            assert sum(plan.worker_bytes()) == g.tensor_nbytes_total()
            for w in range(n):
                for p in plan.pieces[w]:
                    if (p.mode == "rows" and "ffn" in p.name) or p.mode == "cols":
                        assert p.a % 64 == 0 and p.b % 64 == 0  # Q8_0 block pairs (kernels.split_unit)
            # every MoE layer (not the dense lead layer 0): the owner gathers every worker's
            # expert share
            got = [i for i in range(plan.n_layers) if "experts" in collectives(plan, i)]
            assert got == plan.moe_layers == [1, 2, 3]
            # shared experts run in the experts stage: every worker holds a row share of them
            for name in ("blk.1.ffn_gate_shexp.weight", "blk.1.ffn_down_shexp.weight"):
                held = [p for ps in plan.pieces for p in ps if p.name == name]
                assert len(held) == n and {p.mode for p in held} == {"rows"}, name
            # rows mode also splits the dense lead layer's FFN and the output head (vocab rows);
            # experts mode keeps them whole with the layer's owner
            for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "output.weight"):
                held = [p for ps in plan.pieces for p in ps if p.name == name]
                want = (n, {"rows"}) if mode == "rows" else (1, {"whole"})
                assert (len(held), {p.mode for p in held}) == want, name
            if mode == "rows":
                assert collectives(plan, 0) == ["attn", "ffn"] and plan.split_head()
                assert all(collectives(plan, i) == ["attn", "experts"] for i in (1, 2, 3))
                # MLA: every worker holds the q rows, k_b / v_b matrices and attn_output
                # columns of a head range; the latent's weights stay with the layer's owner
                assert all(plan.split_attn(i) for i in range(4))
                for w in range(n):
                    q = [p for p in plan.pieces[w] if p.name == "blk.2.attn_q.weight"][0]
                    kb = [p for p in plan.pieces[w] if p.name == "blk.2.attn_k_b.weight"][0]
                    wo = [p for p in plan.pieces[w] if p.name == "blk.2.attn_output.weight"][0]
                    H = g.tensors["blk.2.attn_k_b.weight"].shape[0]
                    per_q = g.tensors["blk.2.attn_q.weight"].shape[0] // H
                    v = g.tensors["blk.2.attn_output.weight"].shape[1] // H
                    assert kb.mode == "experts" and (q.a, q.b) == (kb.a * per_q, kb.b * per_q)
                    assert wo.mode == "cols" and (wo.a, wo.b) == (kb.a * v, kb.b * v)
                kva = [p for ps in plan.pieces for p in ps if p.name == "blk.2.attn_kv_a_mqa.weight"]
                assert len(kva) == 1 and kva[0] in plan.pieces[plan.layer_owner[2]]
                rows = plan.head_rows()
                assert rows[0][0] == 0 and rows[-1][1] == g.tensors["output.weight"].shape[0]
                assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
            else:
                # the dense lead layer runs whole on its owner, the head whole on the last's
                assert collectives(plan, 0) == [] and not plan.split_head()
        if mode == "experts":  # 10 experts over 3 workers: the 4-expert share rotates
            counts = np.zeros(3)
            for w in range(3):
                counts[w] = sum(p.b - p.a for p in plan.pieces[w] if p.mode == "experts")
            assert counts.max() - counts.min() <= 3  # 3 tensors per layer, one layer's rotation


def test_rows_refused_when_blocks_do_not_split(tmp_path):
    path = write_tiny_mixtral(str(tmp_path / "m.gguf"), F=32, qtype=Q.Q8_0)  # one block per row
    with open_gguf(path) as g:
        with pytest.raises(DsdError, match="--placement experts"):
            make_plan(g, 2, "rows")
        assert make_plan(g, 2, "auto").mode == "experts"


def test_auto_cost_model():
    mode, cost, why = choose_mode(64, 6, 2, rows_ok=True)
    assert mode == "rows" and cost["experts"] > cost["rows"] and "uneven routing" in why
    # expected max of a hypergeometric split of 6 of 64 over 2 halves: about 3.7
    assert 3.4 < cost["experts"] < 4.0
    assert choose_mode(64, 6, 2, rows_ok=False)[0] == "experts"


def test_slice_weights_load_only_own_values(tmp_path):
    """A worker's SliceWeights (real numa allocation + load_file_range) equals the file's
    tensors restricted to its experts / rows, and other workers' tensors are placeholders."""
    from dsd.daemon.slice_weights import SliceWeights

    path = write_tiny_deepseek2(str(tmp_path / "d.gguf"), n_layers=3, E=8, k=2, F=128, qtype=Q.Q8_0)
    with open_gguf(path) as g:
        for mode in ("experts", "rows"):
            plan = make_plan(g, 2, mode)
            for w in range(2):
                sw = SliceWeights(g, plan.pieces[w], node=0, pages="4k")
                try:
                    assert sw.placement().all_on(0)
                    name = "blk.1.ffn_down_exps.weight"
                    full = g.tensors[name].raw()
                    st = sw.experts(name)
                    p = sw.pieces[name]
                    if mode == "experts":
                        assert st.expert_ids == list(range(p.a, p.b))
                        assert np.array_equal(st.raw, full[p.a:p.b])
                    else:
                        b0, b1 = p.a // 32 * 34, p.b // 32 * 34
                        assert np.array_equal(st.raw, full[:, :, b0:b1]) and st.cols == p.b - p.a
                        gate = sw.experts("blk.1.ffn_gate_exps.weight")
                        assert np.array_equal(gate.raw, g.tensors["blk.1.ffn_gate_exps.weight"].raw()[:, p.a:p.b])
                    for lname in ("blk.0.attn_output.weight", "blk.2.attn_output.weight"):
                        lin = sw.linear(lname)
                        if sw.holds(lname):
                            full = g.tensors[lname].raw()
                            pc = sw.pieces[lname]
                            if pc.mode == "cols":  # rows mode: the columns of this worker's heads
                                full = full[:, pc.a // 32 * 34:pc.b // 32 * 34]
                                assert lin.cols == pc.b - pc.a
                            assert np.array_equal(lin.raw, full)
                        else:
                            with pytest.raises(RuntimeError, match="another worker"):
                                lin(np.zeros(lin.cols, dtype=np.float32))
                finally:
                    sw.free()


@pytest.mark.parametrize("mode", ["experts", "rows"])
def test_slice_weights_parallel_reads_equal_serial_and_report_phases(tmp_path, mode):
    """READERS pieces in flight give the same bytes as one at a time, and progress goes
    'allocating' (pre-faulting) then 'loading', each rising to its total, from this thread."""
    import threading

    from dsd.daemon.slice_weights import SliceWeights

    path = write_tiny_deepseek2(str(tmp_path / "d.gguf"), n_layers=3, E=8, k=2, F=128, qtype=Q.Q8_0)
    with open_gguf(path) as g:
        plan = make_plan(g, 2, mode)
        seen = []
        me = threading.get_ident()

        def progress(done, total, phase):
            assert threading.get_ident() == me   # the worker's ZMQ socket is not thread-safe
            seen.append((phase, done, total))

        one = SliceWeights(g, plan.pieces[1], node=0, pages="4k", readers=1)
        four = SliceWeights(g, plan.pieces[1], node=0, pages="4k", readers=4, progress=progress)
        try:
            assert set(one.arrays) == set(four.arrays)
            for name, (raw, cols) in one.arrays.items():
                assert np.array_equal(raw, four.arrays[name][0]) and cols == four.arrays[name][1]
            phases = [p for p, _, _ in seen]
            assert phases[0] == "allocating" and phases[-1] == "loading"
            assert phases == sorted(phases)   # 'allocating' entries all come before 'loading'
            for ph in ("allocating", "loading"):
                xs = [(d, t) for p, d, t in seen if p == ph]
                assert [d for d, _ in xs] == sorted(d for d, _ in xs) and xs[-1][0] == xs[-1][1]
            assert seen[-1][1] == sum(raw.nbytes for raw, _ in four.arrays.values())
        finally:
            one.free()
            four.free()
