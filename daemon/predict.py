"""Placement model: predicted decode speed (one stream, batch 1) of each placement (issue 16).

Nobody here has a two-socket server, so this is a small, explicit model, not a measurement.
For a plan from `make_plan(gguf, n, mode)` and a machine description it adds up, per token:

  weights   sum over stages of max over the workers running that stage of bytes / rate.
            A layer is its owner's unsplit bytes (norms, router, latent, whole attention or
            FFN: the owner alone) plus one stage per collective of `collectives(plan, i)`
            (attention heads, experts, dense FFN rows) in which every worker reads its share at
            the same time; the head likewise.  In layers mode (a pipeline) only the owner works.
            Bytes read per token: every dense weight a worker holds, n_used / n_experts of its
            routed-expert bytes (expected value, uniform routing), none of token_embd (one
            row) unless it is the tied head.  rate = min(node bandwidth / workers on the node,
            cores of the worker x core_gbs): workers w go to node w % nodes, and workers that
            share a node share its bandwidth and cores.  Weights are never read across nodes.
  hops      on the critical path: 2 per collective (the owner's requests to every peer go out
            back to back, then it waits for the replies: ~2 hop latencies, not 2 per peer),
            1 per change of owner between consecutive layers (h [T, D] moves; its ack is
            collected later, off the path), 2 per step (the coordinator's descriptor, logits
            back), each hop_us.
  xfer      activations across nodes only: per collective x [T, D] float32 out and the
            [T, D] share back per peer on another node (the head: the vocab share back), per
            hand-over one [T, D], at cross-node bandwidth, one after another.
  overhead  layer_us per layer: the Python and kernel launches of a layer on its critical path.

Not modelled: attention over the cache (small at short context), caches, routing imbalance
(experts mode pays it in practice; `choose_mode`'s Monte Carlo estimates it), spin/yield
effects of co-located workers, prefill.  `--shape` models (no file) take their bytes from the
architecture and a bits-per-weight table: an estimate of the file, not its tensor table.

Check on this machine (one NUMA node, 2 cores, shared with other work): see the section
"Placement model (dsd plan --predict)" at the end of BENCHMARKS.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dsd.daemon.placement import _DENSE, _EXPS, _MLA, _SHEXP, make_plan
from dsd.daemon.sharded import collectives
from dsd.errors import DsdError

# Defaults for the figures that are not read from the machine (topology) or measured at once
# (bandwidth); where they come from is in BENCHMARKS.md's "Placement model" section.
CORE_GBS = 14.7    # weight bytes per second one core's product kernels get through, GB/s
LAYER_US = 570.0   # Python + launches per layer per decoded token, us: an MoE model's layer
LAYER_US_DENSE = 150.0  # ... a dense model's (SmolLM2: 4.5 ms outside kernels / 30 layers)
HOP_US = 10.0      # one shared-memory message between two processes, us (DESIGN.md: w ~ 7-9 us)


@dataclass
class Machine:
    nodes: int = 1          # NUMA nodes (sockets)
    bw: float = 30.0        # read bandwidth per node, GB/s
    cores: int = 2          # cores per node
    xbw: float = 30.0       # cross-node bandwidth, GB/s (activations only)
    hop_us: float = HOP_US
    layer_us: float | None = None   # None: LAYER_US for an MoE model, LAYER_US_DENSE otherwise
    core_gbs: float = CORE_GBS

    def rates(self, n_workers: int) -> list[float]:
        """GB/s each worker reads its weights at."""
        share = [sum(1 for v in range(n_workers) if v % self.nodes == w % self.nodes)
                 for w in range(n_workers)]
        return [min(self.bw / s, self.cores / s * self.core_gbs) for s in share]

    def node_of(self, w: int) -> int:
        return w % self.nodes


def _stage(name: str, mode: str) -> str:
    """Which stage of its layer a piece is read in: 'own' (the owner alone) or a collective."""
    if mode == "whole":
        return "own"
    if _EXPS.match(name) or _SHEXP.match(name):
        return "experts"
    if _MLA.match(name):
        return "attn"
    if _DENSE.match(name):
        return "ffn"
    return "head" if name == "output.weight" else "own"


def _layer(name: str, n_layers: int) -> int:
    """Layer index of a tensor; n_layers for the head (output, output_norm, tied embeddings)."""
    return int(name.split(".")[1]) if name.startswith("blk.") else n_layers


def predict(plan, m: Machine, n_used: int, n_experts: int, dim: int, vocab: int) -> dict:
    """Predicted seconds per token and its terms for `plan` on machine `m`."""
    N, L = plan.n_workers, plan.n_layers
    rate = m.rates(N)
    tied = not any(p.name == "output.weight" for ps in plan.pieces for p in ps)
    # read[layer][stage][worker] = bytes read per token
    read: list[dict[str, list[float]]] = [{} for _ in range(L + 1)]
    for w, ps in enumerate(plan.pieces):
        for p in ps:
            if p.name == "token_embd.weight" and not tied:
                continue
            b = p.nbytes * (n_used / n_experts if _EXPS.match(p.name) and n_experts else 1.0)
            st = read[_layer(p.name, L)].setdefault(_stage(p.name, p.mode), [0.0] * N)
            st[w] += b
    t_w = 0.0
    for i in range(L + 1):
        owner = plan.layer_owner[i] if i < L else plan.head_owner
        for st, per in read[i].items():
            if st == "own":
                t_w += per[owner] / (rate[owner] * 1e9)
            else:
                t_w += max(b / (r * 1e9) for b, r in zip(per, rate))
    coll = [(i, c) for i in range(L) for c in collectives(plan, i)]
    if plan.split and plan.split_head():
        coll.append((L, "head"))
    holder = [plan.embed_owner] + list(plan.layer_owner) + [plan.head_owner]
    handovers = [(a, b) for a, b in zip(holder, holder[1:]) if a != b]
    hops = 2 * len(coll) + len(handovers) + 2
    act = 4 * dim  # one token's h, float32
    xbytes = 0.0
    for i, c in coll:
        owner = plan.layer_owner[i] if i < L else plan.head_owner
        far = sum(1 for j in range(N) if m.node_of(j) != m.node_of(owner))
        xbytes += far * (act + (4 * vocab / N if c == "head" else act))
    xbytes += sum(act for a, b in handovers if m.node_of(a) != m.node_of(b))
    terms = {"weights_s": t_w, "hops": hops, "hops_s": hops * m.hop_us * 1e-6,
             "xfer_s": xbytes / (m.xbw * 1e9), "overhead_s": L * _layer_us(m, plan) * 1e-6}
    total = terms["weights_s"] + terms["hops_s"] + terms["xfer_s"] + terms["overhead_s"]
    bytes_w = [sum(st[w] for d in read for st in d.values()) for w in range(N)]
    return {"mode": plan.mode, "nodes": N, "s_per_token": total, "tok_s": 1.0 / total,
            "bytes_per_worker": bytes_w, "messages": 2 * (N - 1) * len(coll) + 2 * len(handovers) + 2 * N,
            "rates_gbs": rate, **terms}


def _layer_us(m: Machine, plan) -> float:
    return m.layer_us if m.layer_us is not None else LAYER_US if plan.moe_layers else LAYER_US_DENSE


def _shape_facts(g) -> tuple[int, int, int, int]:
    n_exp = int(g.arch_get("expert_count", 0) or 0)
    n_used = int(g.arch_get("expert_used_count", 0) or 0)
    dim = int(g.arch_get("embedding_length", 0) or 0)
    vocab = int(g.tensors["token_embd.weight"].shape[0])
    return n_used, n_exp, dim, vocab


def predict_all(g, m: Machine, n: int) -> list[tuple[str, dict]]:
    """Every placement that applies for nodes = 1 and n: -> [(label, prediction)]."""
    facts = _shape_facts(g)
    out = [("nodes 1", predict(make_plan(g, 1, "auto"), m, *facts))]
    if n > 1:
        auto = make_plan(g, n, "auto").mode
        for mode in (["experts", "rows"] if facts[1] else ["layers"]):
            try:
                plan = make_plan(g, n, mode if facts[1] else "auto")
            except DsdError as e:
                out.append((f"nodes {n} {mode}", {"error": str(e)}))
                continue
            out.append((f"nodes {n} {mode}" + (" (auto)" if mode == auto else ""), predict(plan, m, *facts)))
    return out


# -- model shapes without a file --------------------------------------------------------------------
# SynthSpec fields (shard/synth.py) + bits per weight by role: an estimate of the real file.
SHAPES = {
    "deepseek-r1-q4_k_m": dict(
        spec=dict(layers=61, hidden=7168, heads=128, q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64,
                  v_head=128, experts=256, experts_used=8, shared=1, expert_ffn=2048, dense_ffn=18432,
                  dense_lead=3, vocab=129280),
        # Q4_K_M: Q4_K (4.5 bpw) with Q6_K (6.56) for about half the layers' ffn_down / attn_v,
        # Q6_K head; file ~404 GB (unsloth / bartowski list 404-405 GB)
        bpw=dict(exps=4.8, mat=5.0, embd=4.5, output=6.5625, f32=32.0),
        note="DeepSeek R1 / V3 671B, Q4_K_M (bytes estimated from the architecture)"),
    "deepseek-v2-lite-q4_k_m": dict(
        spec=dict(layers=27, hidden=2048, heads=16, q_lora=0, kv_lora=512, experts=64, experts_used=6,
                  shared=2, expert_ffn=1408, dense_ffn=10944, dense_lead=1, vocab=102400),
        bpw=dict(exps=4.8, mat=5.0, embd=4.5, output=6.5625, f32=32.0),
        note="DeepSeek-V2-Lite 16B, Q4_K_M (bytes estimated from the architecture)"),
}


@dataclass
class _T:
    name: str
    shape: tuple
    ggml_type: int
    nbytes: int


class ShapeModel:
    """What make_plan reads of a GGUF (tensors, architecture, arch_get, path), from a shape."""

    def __init__(self, key: str):
        from dsd.shard.synth import SynthSpec, _choose_type, _tensor_plan

        if key not in SHAPES:
            raise DsdError(f"unknown --shape {key!r}; known: {', '.join(sorted(SHAPES))}")
        d = SHAPES[key]
        s, bpw = SynthSpec(**d["spec"]), d["bpw"]
        self.path, self.architecture, self.note = f"shape:{key}", "deepseek2", d["note"]
        self.tensors = {}
        for name, shape, kind in _tensor_plan(s):
            n = math.prod(shape)
            role = "f32" if kind != "mat" else "exps" if "_exps." in name else \
                "embd" if name == "token_embd.weight" else "output" if name == "output.weight" else "mat"
            qt = int(_choose_type(s, shape, name)) if kind == "mat" else 0
            self.tensors[name] = _T(name, tuple(shape), qt, int(n * bpw[role] / 8))
        self.metadata = {"deepseek2.block_count": s.layers, "deepseek2.expert_count": s.experts,
                         "deepseek2.expert_used_count": s.experts_used, "deepseek2.embedding_length": s.hidden,
                         "deepseek2.attention.head_count": s.heads}

    def arch_get(self, suffix: str, default=None):
        return self.metadata.get(f"deepseek2.{suffix}", default)


def machine_from_args(args) -> Machine:
    """Flags, with the defaults read from this machine (topology; bandwidth measured now)."""
    from dsd.numa import read_topology

    topo = read_topology()
    nodes = args.machine_nodes or len(topo.nodes)
    cores = args.cores or max(1, min(len(n.cores) or len(n.cpus) for n in topo.nodes))
    bw = args.bandwidth
    if not bw:
        from dsd.shard.bench import measure_read_bandwidth

        bw = measure_read_bandwidth(256 << 20, 3)
    xbw = args.cross_bandwidth or (bw if nodes == 1 else bw / 4)
    pick = lambda v, d: d if v is None else v  # noqa: E731  (0 is a value: no overhead)
    return Machine(nodes, bw, cores, xbw, pick(args.hop_us, HOP_US), args.layer_us, pick(args.core_gbs, CORE_GBS))


def report(g, m: Machine, n: int) -> list[str]:
    lu = m.layer_us if m.layer_us is not None else \
        LAYER_US if any(_EXPS.match(t) for t in g.tensors) else LAYER_US_DENSE
    lines = [f"model: {g.path}" + (f" ({g.note})" if getattr(g, "note", "") else ""),
             f"file: {sum(t.nbytes for t in g.tensors.values()) / 1e9:.1f} GB; machine: {m.nodes} node(s) x "
             f"{m.cores} cores, {m.bw:.1f} GB/s per node (core kernels {m.core_gbs:g} GB/s each), "
             f"cross-node {m.xbw:.1f} GB/s, hop {m.hop_us:g} us, "
             f"{lu:g} us per layer",
             "predicted decode, one stream, batch 1 (a model, not a measurement; terms in ms/token):"]
    for label, p in predict_all(g, m, n):
        if "error" in p:
            lines.append(f"  {label:<24} does not apply: {p['error']}")
            continue
        gb = max(p["bytes_per_worker"]) / 1e9
        lines.append(f"  {label:<24} {p['tok_s']:8.2f} tok/s = 1 / ({1e3 * p['weights_s']:.2f} weights "
                     f"[max {gb:.2f} GB/worker at {min(p['rates_gbs']):.1f} GB/s] + {1e3 * p['hops_s']:.2f} hops "
                     f"[{p['hops']} x {m.hop_us:g} us] + {1e3 * p['xfer_s']:.3f} xfer + "
                     f"{1e3 * p['overhead_s']:.2f} overhead)")
    return lines
