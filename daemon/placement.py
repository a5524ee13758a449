"""Placement: which worker holds which bytes of a GGUF model, computed from its tensor table.

A Plan is data, applied to a plain model from outside: each worker builds the normal model over a
weight source that holds only its pieces (daemon/slice_weights.py), and daemon/sharded.py turns
the split modules into collectives over the workers' links.  Modes:

  layers   dense models (and --nodes 1): contiguous layer ranges, a pipeline.
  experts  MoE: every MoE layer's routed experts split between all workers as whole experts
           (contiguous id ranges, the extra expert of an uneven split rotating between workers
           so bytes balance); attention, norms, routers, shared experts and dense layers by
           layer ranges.
  rows     MoE: every routed expert's intermediate dim F split between all workers
           (block-aligned), so each worker does an equal share of every chosen expert; the
           dense FFN layers (blk.N.ffn_{gate,up,down}) and an untied output head (vocab rows)
           are split by rows as well, and DeepSeek's MLA by heads (the owner keeps the latent's
           weights and sends the latent), so no heavy product runs on one worker while the
           others wait (on a shared node that lets every worker keep its own CPUs).  When all
           of that splits, worker 0 owns every layer's small remainder and drives each step.
  In both split modes the shared experts (blk.N.ffn_*_shexp, DeepSeek/Qwen) are split by rows
  too: they run in the same stage as the routed experts, and a whole shared expert on one
  worker would make that worker the slowest of the stage every layer.
  auto     the cheaper of experts/rows under the cost model in `choose_mode`.

Ownership rules (no weight is held twice): token_embd / output / output_norm belong to the
worker of the last layer (token_embd to the first layer's worker if output.weight exists, i.e.
embeddings are not tied); blk.N.* to layer N's owner except blk.N.ffn_{gate,up,down}_exps and
(split modes) blk.N.ffn_{gate,up,down}_shexp, which are split.  The routed experts' biases
(blk.N.ffn_{gate,up,down}_exps.bias, gpt-oss) travel with the experts: in experts mode the same
expert ranges; in rows mode the gate / up bias columns of each worker's rows [r0, r1) ("cols"
pieces of [E, F]) and the down bias [E, D] whole to the worker holding rows from 0 (worker 0),
which alone adds it.  Tensors outside blk.* that are neither (rope_freqs: a constant frequency table of a
few hundred bytes) are given to every worker.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from dsd.errors import DsdError

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_EXPS_B = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.bias$")  # gpt-oss: [E, F] / [E, D]
_SHEXP = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight$")
_MLA = re.compile(r"^blk\.(\d+)\.(attn_q|attn_q_b|attn_k_b|attn_v_b|attn_kv_b|attn_output)\.weight$")
_DENSE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
_BLK = re.compile(r"^blk\.(\d+)\.")
HEAD = ("output.weight", "output_norm.weight")


@dataclass
class Piece:
    name: str
    mode: str            # "whole" | "experts" | "rows" | "cols"
    a: int = 0           # experts: first expert (or head) id; rows: first row; cols: first column
    b: int = 0           # experts: end expert (or head) id;   rows: end row;   cols: end column
    nbytes: int = 0


@dataclass
class Plan:
    model_path: str
    arch: str
    n_workers: int
    mode: str                         # layers | experts | rows
    n_layers: int
    layer_owner: list[int]
    embed_owner: int
    head_owner: int
    moe_layers: list[int]
    pieces: list[list[Piece]]         # per worker
    reason: str = ""
    cost: dict = field(default_factory=dict)

    @property
    def split(self) -> bool:
        return self.mode in ("experts", "rows") and self.n_workers > 1

    def worker_bytes(self) -> list[int]:
        return [sum(p.nbytes for p in ps) for ps in self.pieces]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["pieces"] = [[Piece(**p) for p in ps] for ps in d["pieces"]]
        return cls(**d)

    def layers_of(self, w: int) -> list[int]:
        return [i for i, o in enumerate(self.layer_owner) if o == w]

    def experts_of(self, w: int) -> dict[int, tuple[str, int, int]]:
        """layer -> (mode, a, b) of the routed experts worker w holds."""
        out = {}
        for p in self.pieces[w]:
            m = _EXPS.match(p.name)
            if m and p.mode != "whole":
                out[int(m.group(1))] = (p.mode, p.a, p.b)
            elif m:
                out[int(m.group(1))] = ("whole", 0, 0)
        return out

    @functools.cached_property
    def _split_names(self) -> frozenset[str]:
        # (asked per op of every step: computed once; pieces do not change after planning)
        return frozenset(p.name for ps in self.pieces for p in ps if p.mode in ("rows", "cols"))

    def split_attn(self, i: int) -> bool:
        """Are layer i's attention heads split between the workers (rows mode, MLA)?"""
        return f"blk.{i}.attn_output.weight" in self._split_names

    def split_ffn(self, i: int) -> bool:
        """Is layer i's dense FFN split by rows between the workers?"""
        return f"blk.{i}.ffn_gate.weight" in self._split_names

    def split_head(self) -> bool:
        return "output.weight" in self._split_names

    def head_rows(self) -> list[tuple[int, int]]:
        """Vocab rows (a, b) of the output head per worker (a split head)."""
        out = []
        for ps in self.pieces:
            rs = [(p.a, p.b) for p in ps if p.name == "output.weight"]
            out.append(rs[0] if rs else (0, 0))
        return out

    def describe(self) -> list[str]:
        lines = [f"placement: {self.mode} on {self.n_workers} worker(s) — {self.reason}"]
        for w in range(self.n_workers):
            layers = self.layers_of(w)
            lr = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
            extra = []
            if self.embed_owner == w:
                extra.append("token embedding")
            if self.head_owner == w:
                extra.append("output norm" if self.split and self.split_head() else "output head")
            ex = self.experts_of(w)
            if ex and self.split:
                modes = {m for m, _, _ in ex.values()}
                if "experts" in modes:
                    counts = sorted({b - a for m, a, b in ex.values()})
                    extra.append(f"routed experts of {len(ex)} MoE layers "
                                 f"({'/'.join(map(str, counts))} experts each, e.g. "
                                 f"{next(iter(ex.values()))[1]}-{next(iter(ex.values()))[2] - 1})")
                else:
                    a, b = next(iter(ex.values()))[1:]
                    extra.append(f"rows {a}:{b} of every routed expert in {len(ex)} MoE layers")
            heads = [p for p in self.pieces[w] if p.mode == "experts" and p.name.endswith(("attn_k_b.weight",
                                                                                           "attn_v_b.weight"))]
            n_att = sum(1 for i in range(self.n_layers) if self.split and self.split_attn(i))
            if n_att:
                hp = [p for p in self.pieces[w] if p.name.endswith("attn_output.weight") and p.mode == "cols"]
                extra.append(f"a head share of the attention of {n_att} layers"
                             + (f" (heads {heads[0].a}-{heads[0].b - 1})" if heads else
                                f" (attn_output columns {hp[0].a}:{hp[0].b})" if hp else ""))
            dense = [i for i in range(self.n_layers) if self.split and self.split_ffn(i)]
            if dense:
                extra.append(f"a row share of the dense FFN of layer{'s' if len(dense) > 1 else ''} "
                             f"{', '.join(map(str, dense))}")
            if self.split and self.split_head():
                a, b = self.head_rows()[w]
                extra.append(f"vocab rows {a}:{b} of the output head")
            lines.append(f"worker {w}: {lr}" + (f"; {', '.join(extra)}" if extra else "")
                         + f"; {self.worker_bytes()[w] / 2**20:.1f} MiB")
        return lines


# ------------------------------------------------------------------------------------------------
def _balanced_ranges(costs: list[float], n: int, head_cost: float, first_cost: float) -> list[int]:
    """Owner per layer: contiguous ranges minimising the largest share (DP over cut points).
    first_cost / head_cost are added to the first / last range."""
    L = len(costs)
    n = min(n, L) if L else 1
    pre = np.concatenate([[0.0], np.cumsum(costs)])
    INF = float("inf")
    # best[k][j]: min over partitions of layers [0, j) into k ranges of the max range cost
    best = [[INF] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(1, L + 1):
            for i in range(k - 1, j):
                c = pre[j] - pre[i] + (first_cost if i == 0 else 0.0) + (head_cost if j == L else 0.0)
                v = max(best[k - 1][i], c)
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    owner = [0] * L
    j = L
    for k in range(n, 0, -1):
        i = cut[k][j]
        for x in range(i, j):
            owner[x] = k - 1
        j = i
    return owner


def _split_even(total: int, n: int, rotate: int) -> list[tuple[int, int]]:
    q, r = divmod(total, n)
    sizes = [q + (1 if (w - rotate) % n < r else 0) for w in range(n)]
    out, a = [], 0
    for s in sizes:
        out.append((a, a + s))
        a += s
    return out


def choose_mode(n_experts: int, n_used: int, n_workers: int, rows_ok: bool) -> tuple[str, dict, str]:
    """Cost model at batch 1 (decode), in units of one expert's bytes read by the slowest worker:
    experts: E[max_w X_w], X_w = chosen experts worker w holds (k of E drawn without replacement,
             Monte Carlo with a fixed seed); the slowest worker sets the pace.
    rows:    k / N exactly, times 1.05 for the narrower matrix products' fixed costs.
    Both pay the same hops (one broadcast + one reduction per MoE layer)."""
    rng = np.random.default_rng(0)
    bounds = _split_even(n_experts, n_workers, 0)
    owner = np.zeros(n_experts, dtype=np.int64)
    for w, (a, b) in enumerate(bounds):
        owner[a:b] = w
    k = max(1, min(n_used, n_experts))
    draws = np.argsort(rng.random((4000, n_experts)), axis=1)[:, :k]
    counts = np.stack([(owner[draws] == w).sum(axis=1) for w in range(n_workers)], axis=1)
    c_exp = float(counts.max(axis=1).mean())
    c_rows = k / n_workers * 1.05
    cost = {"experts": round(c_exp, 3), "rows": round(c_rows, 3) if rows_ok else None}
    if rows_ok and c_rows < c_exp:
        return "rows", cost, (f"rows: the slowest worker reads {c_rows:.2f} expert-equivalents per token "
                              f"vs {c_exp:.2f} with whole experts (uneven routing of {k} of {n_experts})")
    why = "rows cannot split F into block-aligned shares" if not rows_ok else \
        f"whole experts cost {c_exp:.2f} vs rows {c_rows:.2f} expert-equivalents per token"
    return "experts", cost, f"experts: {why}"


def _mla_heads(gguf_model, i: int, n: int, rotate: int) -> list[tuple[int, int]] | None:
    """Head ranges per worker for layer i's multi-head latent attention (deepseek2, rows mode),
    or None when it stays whole with the layer's owner.  The owner keeps the latent (kv_a, its
    norm, q_a) and sends it; every worker holds the q / k_b / v_b rows of its heads and the
    matching columns of attn_output, whose split points must fall on block boundaries."""
    from dsd.shard.kernels import quant_type, split_unit

    t = gguf_model.tensors
    p = f"blk.{i}."
    if gguf_model.architecture != "deepseek2" or p + "attn_output.weight" not in t:
        return None
    H = int(gguf_model.arch_get("attention.head_count", 0) or 0)
    wo = t[p + "attn_output.weight"]
    if H <= 0 or wo.shape[1] % H:
        return None
    v = wo.shape[1] // H
    bs = split_unit(wo.ggml_type)
    unit = bs // math.gcd(bs, v)  # heads per split unit: unit * v is a whole number of blocks
    if H % unit or H // unit < n:
        return None
    return [(a * unit, b * unit) for a, b in _split_even(H // unit, n, rotate)]


def _dense_split_ok(tensors, i: int, n: int) -> bool:
    """Can layer i's dense FFN intermediate dim F be split into n shares of whole blocks (the
    down projection's blocks run along F)?"""
    from dsd.shard.kernels import quant_type, split_unit

    down = tensors[f"blk.{i}.ffn_down.weight"]
    F, bs = down.shape[1], split_unit(down.ggml_type)
    return F % bs == 0 and F // bs >= n


def _mla_pieces(t, kind: str, spans: list[tuple[int, int]]) -> list[Piece]:
    H = spans[-1][1]
    if kind in ("attn_k_b", "attn_v_b"):  # [H, ., .] per-head matrices
        per = t.nbytes // H
        return [Piece(t.name, "experts", a, b, per * (b - a)) for a, b in spans]
    if kind == "attn_output":             # [D, H * v]: the columns of each worker's heads
        v = t.shape[1] // H
        return [Piece(t.name, "cols", a * v, b * v, t.nbytes * (b - a) // H) for a, b in spans]
    per = t.shape[0] // H                  # q / q_b / fused kv_b [H * per, .]: rows
    return [Piece(t.name, "rows", a * per, b * per, t.nbytes * (b - a) // H) for a, b in spans]


def make_plan(gguf_model, n_workers: int, placement: str = "auto") -> Plan:
    from dsd.shard.kernels import quant_type, split_unit

    tensors = gguf_model.tensors
    arch = gguf_model.architecture
    # MTP ("nextn") blocks after the trunk (GLM-4.5, DeepSeek V3 files) are never run: nobody
    # holds them, so they cost no memory
    L = int(gguf_model.arch_get("block_count")) - int(gguf_model.arch_get("nextn_predict_layers", 0) or 0)
    tensors = {n: t for n, t in tensors.items() if not ((m := _BLK.match(n)) and int(m.group(1)) >= L)}
    n_exp = int(gguf_model.arch_get("expert_count", 0) or 0)
    n_used = int(gguf_model.arch_get("expert_used_count", 0) or 0)
    moe_layers = sorted({int(m.group(1)) for t in tensors if (m := _EXPS.match(t))})
    tied = "output.weight" not in tensors
    per_layer = [0.0] * L
    for name, t in tensors.items():
        m = _BLK.match(name)
        if m and not _EXPS.match(name) and not _EXPS_B.match(name):
            per_layer[int(m.group(1))] += t.nbytes
    emb = tensors["token_embd.weight"].nbytes
    head = sum(tensors[n].nbytes for n in HEAD if n in tensors) + (emb if tied else 0)
    mode, cost, reason = "layers", {}, "dense model: layer ranges (pipeline)"
    if moe_layers and n_workers > 1:
        F = tensors[f"blk.{moe_layers[0]}.ffn_gate_exps.weight"].shape[1]
        bs = max(split_unit(tensors[f"blk.{i}.ffn_down_exps.weight"].ggml_type)
                 for i in moe_layers)
        rows_ok = F % bs == 0 and F // bs >= n_workers
        if placement == "auto":
            mode, cost, reason = choose_mode(n_exp, n_used, n_workers, rows_ok)
        elif placement == "rows":
            if not rows_ok:
                raise DsdError(f"--placement rows: the expert intermediate size {F} cannot be split "
                               f"into {n_workers} shares of whole {bs}-element blocks; use "
                               f"--placement experts")
            mode, reason = "rows", "rows (asked for)"
        else:
            if n_exp < n_workers:
                raise DsdError(f"--placement experts: {n_exp} experts cannot be split between "
                               f"{n_workers} workers; use --placement rows or fewer --nodes")
            mode, reason = "experts", "experts (asked for)"
    elif moe_layers:
        reason = "one worker holds the whole model"
    if mode != "layers":
        reason += "; attention and dense layers by layer ranges"
    if n_workers > 1 and L < n_workers and mode == "layers":
        raise DsdError(f"the model has {L} layers, too few for {n_workers} workers in a pipeline; "
                       f"use --nodes {L} or fewer")
    one_driver = False
    mla_ok = {i for i in range(L) if mode == "rows" and _mla_heads(gguf_model, i, n_workers, 0)}
    if mode == "rows":  # the split dense FFNs, heads and output head do not weigh on their owner
        split_all = True
        for name, t in tensors.items():
            if (md := _DENSE.match(name)):
                if _dense_split_ok(tensors, int(md.group(1)), n_workers):
                    per_layer[int(md.group(1))] -= t.nbytes
                else:
                    split_all = False
            elif (ma := _MLA.match(name)) and int(ma.group(1)) in mla_ok:
                per_layer[int(ma.group(1))] -= t.nbytes
        split_all = split_all and len(mla_ok) == L
        if not tied:
            head -= tensors["output.weight"].nbytes
        if split_all:
            # what is left per layer (norms, the latent's kv_a, routers) is < 1% of the bytes:
            # one worker drives every layer, so a step is one stage (no hand-over between
            # workers through the coordinator) and the others only compute shares
            one_driver = True
            reason = reason.replace("; attention and dense layers by layer ranges",
                                    "; dense FFNs and the output head by rows, attention by heads; "
                                    "worker 0 drives every layer (norms, latent, routing)")
        else:
            reason = reason.replace("; attention and dense layers by layer ranges",
                                    "; dense FFNs and the output head by rows; attention heads (MLA) "
                                    "split, the rest of attention by layer ranges")
    owner = [0] * L if one_driver else _balanced_ranges(per_layer, n_workers, head, 0.0 if tied else emb)
    last = owner[-1] if owner else 0
    embed_owner = last if tied else owner[0]
    pieces: list[list[Piece]] = [[] for _ in range(n_workers)]
    moe = set(moe_layers)
    heads = {i: _mla_heads(gguf_model, i, n_workers, owner[i] + 1) for i in mla_ok}
    for name, t in tensors.items():
        ma = _MLA.match(name)
        if ma and heads.get(int(ma.group(1))):
            for w, piece in enumerate(_mla_pieces(t, ma.group(2), heads[int(ma.group(1))])):
                if piece.b > piece.a:
                    pieces[w].append(piece)
            continue
        m = _EXPS.match(name)
        if m and mode in ("experts", "rows"):
            i = int(m.group(1))
            if mode == "experts":
                per = t.nbytes // t.shape[0]
                for w, (a, b) in enumerate(_split_even(t.shape[0], n_workers, i)):
                    if b > a:
                        pieces[w].append(Piece(name, "experts", a, b, per * (b - a)))
            else:
                F = t.shape[1] if m.group(2) != "down" else t.shape[2]
                bs = split_unit(tensors[f"blk.{i}.ffn_down_exps.weight"].ggml_type)
                for w, (a, b) in enumerate(_split_even(F // bs, n_workers, 0)):
                    frac = (b - a) * bs / F
                    pieces[w].append(Piece(name, "rows", a * bs, b * bs, int(t.nbytes * frac)))
            continue
        mb_ = _EXPS_B.match(name)
        if mb_ and mode in ("experts", "rows") and len(t.shape) == 2:
            i = int(mb_.group(1))
            if mode == "experts":  # the same expert ranges as the layer's expert weights
                per = t.nbytes // t.shape[0]
                for w, (a, b) in enumerate(_split_even(t.shape[0], n_workers, i)):
                    if b > a:
                        pieces[w].append(Piece(name, "experts", a, b, per * (b - a)))
            elif mb_.group(2) == "down":
                # [E, D]: added once per (token, expert) pair, by the worker whose rows start
                # at 0 (worker 0: the rows split below does not rotate), so the sum has it once
                pieces[0].append(Piece(name, "whole", 0, 0, t.nbytes))
            else:
                # gate / up [E, F]: the columns of the rows each worker holds of the weights
                F = t.shape[1]
                bs = split_unit(tensors[f"blk.{i}.ffn_down_exps.weight"].ggml_type)
                if bs % quant_type(t.ggml_type).block_size:
                    raise DsdError(f"--placement rows: {name} ({quant_type(t.ggml_type).name}) cannot be "
                                   f"cut at the {bs}-element blocks of the expert weights; use "
                                   f"--placement experts")
                for w, (a, b) in enumerate(_split_even(F // bs, n_workers, 0)):
                    pieces[w].append(Piece(name, "cols", a * bs, b * bs, int(t.nbytes * (b - a) * bs / F)))
            continue
        ms = _SHEXP.match(name)
        if ms and mode in ("experts", "rows") and int(ms.group(1)) in moe:
            i = int(ms.group(1))
            F = t.shape[0] if ms.group(2) != "down" else t.shape[1]
            bs = split_unit(tensors[f"blk.{i}.ffn_down_shexp.weight"].ggml_type)
            # an uneven split leaves the smaller share with the layer's owner, which also sends
            # the routed tokens to the others and adds up their shares
            spans = _split_even(F // bs, n_workers, owner[i] + 1) if F % bs == 0 else [(0, F // bs)]
            for w, (a, b) in enumerate(spans):
                if b > a:
                    pieces[w].append(Piece(name, "rows", a * bs, b * bs, int(t.nbytes * (b - a) * bs / F)))
            continue
        md = _DENSE.match(name)
        if mode == "rows" and (md or (name == "output.weight" and len(t.shape) == 2)):
            # gate/up [F, D] rows, down [D, F] columns (block-aligned), output [V, D] rows
            i = int(md.group(1)) if md else L - 1
            if md:
                F = t.shape[0] if md.group(2) != "down" else t.shape[1]
                bs = split_unit(tensors[f"blk.{i}.ffn_down.weight"].ggml_type)
            else:
                F, bs = t.shape[0], 1
            if (_dense_split_ok(tensors, i, n_workers) if md else F >= n_workers):
                for w, (a, b) in enumerate(_split_even(F // bs, n_workers, owner[i] + 1)):
                    pieces[w].append(Piece(name, "rows", a * bs, b * bs, int(t.nbytes * (b - a) * bs / F)))
                continue
        if name == "token_embd.weight":
            ws = [embed_owner]
        elif name in HEAD:
            ws = [last]
        elif (mb := _BLK.match(name)):
            ws = [owner[int(mb.group(1))]]
        else:
            ws = sorted(set(owner)) or [0]
        for w in ws:
            pieces[w].append(Piece(name, "whole", 0, 0, t.nbytes))
    return Plan(str(gguf_model.path), arch, n_workers, mode, L, owner, embed_owner, last,
                moe_layers, pieces, reason, cost)
