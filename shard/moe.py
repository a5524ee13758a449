"""Mixture-of-experts building blocks shared by every MoE architecture.

    Router          x [T, D] -> (expert ids [T, k] int64, weights [T, k] float32)
    RoutedExperts   sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = ids[t, j]
    MoEFFN          router + routed experts (+ shared experts, DeepSeek/Qwen style)

Routing follows llama.cpp's build_moe_ffn (src/llama-graph.cpp), which is what GGUF files are
converted for:
  logits   += ffn_gate_inp.bias when the router has one (gpt-oss)
  probs     = softmax(logits) (Mixtral, Qwen3-MoE, DeepSeek V2) or sigmoid(logits) (DeepSeek V3/R1),
              or the logits themselves (gpt-oss, LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT)
  selection = probs + exp_probs_b (DeepSeek V3 "noaux_tc" bias; weights still come from probs)
  groups    = if expert_group_count > 1: keep the expert_group_used_count groups with the
              highest group score, others masked out.  Group score: sum of the group's top-2
              selection scores (DeepSeek V3 "noaux_tc", sigmoid gating; llama.cpp uses this for
              every deepseek2 file) or, with softmax gating, the group's max score (DeepSeek V2's
              published "group_limited_greedy"; llama.cpp deviates from the model there)
  ids       = top-k(selection);  w = probs[ids];  w = softmax(w) with SOFTMAX_WEIGHT gating
  w        /= max(sum(w), 2^-14)  if expert_weights_norm
  w        *= expert_weights_scale if it is set (non-zero)

Experts: SwiGLU silu(gate) * up by default; gpt-oss's clamped variant (act="swiglu_oai",
llama.cpp's ggml_swiglu_oai): g = min(gate, limit), u = clamp(up, -limit, limit),
h = g * sigmoid(alpha * g) * (u + 1), alpha 1.702, limit 7.  Optional per-expert biases
(ffn_{gate,up,down}_exps.bias [E, F] / [E, D], gpt-oss) are added after each product; the down
bias is part of the expert's output, so it is scaled by the routing weight like the rest.  The
fused decode kernels (weights.FusedExperts) know neither: experts with biases or the clamped
activation always take the gathered products, with biases and activation in numpy.

RoutedExperts reads only the chosen experts' bytes.  A daemon worker may hold a subset of the
experts (ExpertStack.expert_ids / experts=...) and/or a slice rows=(r0, r1) of the intermediate
dimension F; its output is then a *partial* sum, and the partial sums of a partition of
(experts x rows) add up to the full output: the intermediate activation is elementwise in F and
the down projection is linear in its columns, so down[:, r0:r1] @ h[r0:r1] summed over slices
is the full product.
"""
from __future__ import annotations

import numpy as np

import os

from dsd.shard import ops
from dsd.shard.ffn import DenseFFN
from dsd.shard.weights import SMALL_BATCH_MAX, ExpertStack, FusedExperts, Linear

# Decode-sized batches run the routed experts as weights.FusedExperts (two fused kernel calls);
# DSD_UNFUSED_MOE=1 keeps the three gathered products (A/B benchmarks, tests).
FUSED_MOE = os.environ.get("DSD_UNFUSED_MOE", "") in ("", "0")

GATING_SOFTMAX = 1  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX (also the default when absent)
GATING_SIGMOID = 2  # LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID (DeepSeek V3/R1)
GATING_SOFTMAX_WEIGHT = 3  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT: top-k of the raw logits,
                           # softmax over those k (gpt-oss)
ACT_SILU, ACT_SWIGLU_OAI = "silu", "swiglu_oai"
_NORM_MIN = 6.103515625e-5  # llama.cpp clamps the weight sum from below by 2^-14


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def swiglu_oai(gate: np.ndarray, up: np.ndarray, alpha: float = 1.702, limit: float = 7.0) -> np.ndarray:
    """gpt-oss's clamped SwiGLU (float32): min(gate, limit) * sigmoid(alpha * min(gate, limit))
    * (clamp(up, -limit, limit) + 1)."""
    g = np.minimum(gate, np.float32(limit))
    out = np.multiply(g, np.float32(-alpha))
    np.exp(out, out=out)
    out += np.float32(1.0)
    np.divide(g, out, out=out)
    out *= np.clip(up, np.float32(-limit), np.float32(limit)) + np.float32(1.0)
    return out.astype(np.float32, copy=False)


def topk_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, largest first (stable on ties). [T, N] -> [T, k]."""
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    # sort the k chosen by (value desc, index asc) so ties resolve like a stable sort
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


class Router:
    """Expert selection for a batch: gate_inp W [E, D]; see module docstring for the semantics."""

    def __init__(self, gate_inp: Linear, n_used: int, gating: int = GATING_SOFTMAX,
                 norm: bool = False, scale: float = 0.0, bias: np.ndarray | None = None,
                 n_groups: int = 1, n_groups_used: int = 0, logit_bias: np.ndarray | None = None):
        self.gate_inp = gate_inp
        self.n_experts = gate_inp.rows
        self.n_used = int(n_used)
        self.gating = GATING_SOFTMAX if gating in (0, None) else int(gating)
        if self.gating not in (GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_WEIGHT):
            from dsd.errors import UnsupportedModelError
            raise UnsupportedModelError(
                f"expert_gating_func {gating} is not supported (dsd knows 1=softmax, 2=sigmoid, "
                "3=softmax of the top-k logits)")
        # ffn_gate_inp.bias (gpt-oss): added to the logits before anything else
        self.logit_bias = None if logit_bias is None else np.asarray(logit_bias, dtype=np.float32).reshape(-1)
        self.norm, self.scale = bool(norm), float(scale or 0.0)
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32).reshape(-1)
        self.n_groups = int(n_groups or 1)
        self.n_groups_used = int(n_groups_used or self.n_groups)

    def probs(self, x: np.ndarray) -> np.ndarray:
        logits = self.gate_inp(x)  # [T, E]
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        if self.gating == GATING_SOFTMAX_WEIGHT:
            return logits
        return ops.softmax(logits) if self.gating == GATING_SOFTMAX else sigmoid(logits)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs = self.probs(x)
        if probs.shape[0] == 1 and self.bias is None and not (1 < self.n_groups and self.n_groups_used < self.n_groups):
            # decode (one token, no bias, no group limit): a stable argsort of E scores is the same
            # top-k as topk_desc, without its argpartition/lexsort/take_along_axis overheads (~30 us)
            p = probs[0]
            ids = np.argsort(-p, kind="stable")[:self.n_used]
            w = p[ids].astype(np.float32)
            if self.gating == GATING_SOFTMAX_WEIGHT:
                w = ops.softmax(w)
            if self.norm:
                w /= max(np.float32(w.sum()), np.float32(_NORM_MIN))
            if self.scale:
                w *= np.float32(self.scale)
            return ids[None].astype(np.int64), w[None]
        sel = probs if self.bias is None else probs + self.bias
        if self.n_groups > 1 and self.n_groups_used < self.n_groups:
            T, E = sel.shape
            g = sel.reshape(T, self.n_groups, E // self.n_groups)
            if self.gating == GATING_SIGMOID:
                gscore = np.sort(g, axis=2)[:, :, -2:].sum(axis=2)  # [T, G]: top-2 sum per group
            else:
                gscore = g.max(axis=2)                              # [T, G]: V2 group max
            keep = topk_desc(gscore, self.n_groups_used)       # [T, G_used]
            mask = np.zeros((T, self.n_groups), dtype=bool)
            np.put_along_axis(mask, keep, True, axis=1)
            sel = np.where(np.repeat(mask, E // self.n_groups, axis=1), sel, -np.inf)
        ids = topk_desc(sel, self.n_used)
        w = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
        if self.gating == GATING_SOFTMAX_WEIGHT:
            w = ops.softmax(w, axis=1)
        if self.norm:
            w = w / np.maximum(w.sum(axis=1, keepdims=True), np.float32(_NORM_MIN))
        if self.scale:
            w = w * np.float32(self.scale)
        return ids.astype(np.int64), w.astype(np.float32)


class RoutedExperts:
    """The routed-expert FFN (SwiGLU experts), optionally restricted to a worker's share.

    gate_exps / up_exps: ExpertStack [E, F, D]; down_exps: ExpertStack [E, D, F].
    experts: global expert ids this object computes (default: all the stacks hold).
    rows: (r0, r1) slice of the intermediate dim F (default all); r0 and r1 must lie on the
          quantization-block boundaries of down_exps' rows.
    __call__(x [T, D], ids [T, k], weights [T, k]) -> partial sum [T, D] float32 over the
    (expert, row-slice) pairs this object owns.  Tokens routed to the same expert are computed
    as one matrix product.  bytes_read accumulates the weight bytes touched (each chosen expert
    once per call); reset_stats() zeroes it.
    act: ACT_SILU (default) or ACT_SWIGLU_OAI (alpha, limit); biases: (gate [E', F'], up [E', F'],
    down [E', D]), each optional (module docstring), given for exactly what the matching stack
    holds: row j is the bias of the stack's j-th expert (expert_ids[j]), F' is the stack's rows
    (a daemon worker's row-share stack comes with the same columns of the gate / up biases).
    With a row slice rows=(r0, r1) of the stacks, gate/up biases are sliced likewise and the
    down bias is added by the slice holding row 0 only, so the slices' partial sums still add up
    to the full output; a daemon worker whose stacks are a row share not starting at F's row 0
    is given no down bias (placement gives it to one worker).
    """

    def __init__(self, gate_exps: ExpertStack, up_exps: ExpertStack, down_exps: ExpertStack,
                 experts=None, rows: tuple[int, int] | None = None, *, act: str = ACT_SILU,
                 alpha: float = 1.702, limit: float = 7.0, biases=(None, None, None)):
        self.gate_exps, self.up_exps, self.down_exps = gate_exps, up_exps, down_exps
        if act not in (ACT_SILU, ACT_SWIGLU_OAI):
            raise ValueError(f"unknown expert activation {act!r}")
        self.act, self.alpha, self.limit = act, float(alpha), float(limit)
        held = set(gate_exps.expert_ids) & set(up_exps.expert_ids) & set(down_exps.expert_ids)
        chosen = held if experts is None else set(int(e) for e in experts)
        missing = chosen - held
        if missing:
            raise ValueError(f"experts {sorted(missing)[:8]} are not held by these expert stacks")
        self.experts = frozenset(chosen)
        F = gate_exps.rows
        r0, r1 = (0, F) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= r0 < r1 <= F:
            raise ValueError(f"row range {r0}:{r1} is outside the intermediate dim {F}")
        if (r0, r1) != (0, F):
            blk = down_exps.split_unit
            if r0 % blk or r1 % blk:
                raise ValueError(f"row range {r0}:{r1} must lie on multiples of {blk} (the split unit of "
                                 f"{down_exps.name or 'ffn_down_exps'}); use aligned_row_ranges()")
        self.rows = (r0, r1)
        self.full_rows = (r0, r1) == (0, F)
        gb, ub, db = (None if b is None else np.asarray(b, dtype=np.float32) for b in biases)
        self._bias_row = {}  # "gate"/"up"/"down" -> global expert id -> its row in that bias
        for b, st, what in ((gb, gate_exps, "gate"), (ub, up_exps, "up"), (db, down_exps, "down")):
            # one bias row per expert the stack holds, one column per row of the stack: a share's
            # bias must come as the same share (SliceWeights serves it so), never guessed
            if b is not None and (b.ndim != 2 or b.shape != (st.raw.shape[0], st.rows)):
                raise ValueError(f"{what} expert bias of shape {b.shape} does not match the stack's "
                                 f"{st.raw.shape[0]} experts x {st.rows} rows")
            if b is not None:
                ids = st.expert_ids
                lut = np.full(max(ids) + 1, -1, dtype=np.int64)
                lut[ids] = np.arange(len(ids))
                self._bias_row[what] = lut
        self.gate_b = None if gb is None else gb[:, r0:r1]
        self.up_b = None if ub is None else ub[:, r0:r1]
        self.down_b = db if r0 == 0 else None
        # the fused decode kernels compute silu(gate x) * up x without biases
        self.plain = act == ACT_SILU and gb is None and ub is None and db is None
        # this object's share of every held expert as stacks (views, no copy) for the gathered
        # small-batch path: gate/up rows r0:r1 [E, r1-r0, D], down columns r0:r1 [E, D, r1-r0]
        self._gate_s, self._up_s, self._down_s = gate_exps, up_exps, down_exps
        if not self.full_rows:
            b0, b1 = (down_exps.raw.shape[2] * r // F for r in (r0, r1))
            self._gate_s, self._up_s = (ExpertStack(st.raw[:, r0:r1], st.ggml_type, st.cols, st.name,
                                                    st.expert_ids) for st in (gate_exps, up_exps))
            self._down_s = ExpertStack(down_exps.raw[:, :, b0:b1], down_exps.ggml_type, r1 - r0,
                                       down_exps.name, down_exps.expert_ids)
        self._views: dict[int, tuple[Linear, Linear, Linear]] = {}
        self._fused = None  # FusedExperts over the share's stacks
        self.bytes_read = 0
        self.calls = 0
        self.expert_evals = 0  # (expert, call) pairs computed

    def reset_stats(self) -> None:
        self.bytes_read = self.calls = self.expert_evals = 0

    def views(self, e: int) -> tuple[Linear, Linear, Linear]:
        """(gate [r1-r0, D], up [r1-r0, D], down [D, r1-r0]) Linear views of expert e (no copy)."""
        v = self._views.get(e)
        if v is None:
            g, u, d = self.gate_exps.expert(e), self.up_exps.expert(e), self.down_exps.expert(e)
            if not self.full_rows:
                r0, r1 = self.rows
                g, u, d = g.row_slice(r0, r1), u.row_slice(r0, r1), d.col_slice(r0, r1)
            v = self._views[e] = (g, u, d)
        return v

    def expert_nbytes(self, e: int) -> int:
        return sum(lin.nbytes for lin in self.views(e))

    def __call__(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        T = x.shape[0]
        if T <= SMALL_BATCH_MAX or ops.batch_invariant_mode():
            # (batch invariance: a prompt's tokens take the decode path's arithmetic)
            return self._gathered(x, ids, weights)
        out = np.zeros((T, self.down_exps.rows), dtype=np.float32)
        ids = np.asarray(ids).reshape(T, -1)
        weights = np.asarray(weights, dtype=np.float32).reshape(T, -1)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = np.argsort(flat, kind="stable")  # group (token, slot) pairs by expert
        sorted_e = flat[order]
        bounds = np.flatnonzero(np.diff(sorted_e)) + 1
        self.calls += 1
        for grp in np.split(order, bounds):
            if grp.size == 0:
                continue
            e = int(flat[grp[0]])
            if e not in self.experts:
                continue
            tok = grp // k                       # tokens that chose e (each at most once)
            w = weights.reshape(-1)[grp]         # [n]
            gate, up, down = self.views(e)
            if self.plain:
                if tok.size == 1:                # decode: matrix-vector kernels
                    xt = x[tok[0]]
                    y = down(ops.silu_mul(gate(xt), up(xt)))[None, :]
                else:
                    xs = x[tok]
                    y = down(ops.silu_mul(gate(xs), up(xs)))
            else:
                xs = x[tok]
                pe = np.full(tok.size, e, dtype=np.int64)
                y = self._down_bias(down(self._hidden(gate(xs), up(xs), pe)), pe)
            out[tok] += y * w[:, None]
            self.bytes_read += gate.nbytes + up.nbytes + down.nbytes
            self.expert_evals += 1
        return out

    def _hidden(self, g: np.ndarray, u: np.ndarray, pe) -> np.ndarray:
        """The intermediate activation of pairs [P, F'] whose experts are pe [P]: biases, then
        silu(g) * u or the clamped gpt-oss SwiGLU."""
        if self.gate_b is not None:
            g = g + self.gate_b[self._bias_row["gate"][pe]]
        if self.up_b is not None:
            u = u + self.up_b[self._bias_row["up"][pe]]
        if self.act == ACT_SWIGLU_OAI:
            return swiglu_oai(g, u, self.alpha, self.limit)
        return ops.silu_mul(g, u)

    def _down_bias(self, y: np.ndarray, pe) -> np.ndarray:
        if self.down_b is not None:
            y = y + self.down_b[self._bias_row["down"][pe]]
        return y

    def _gathered(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Decode-sized T: every owned (token, chosen expert) pair in two fused kernel calls
        (weights.FusedExperts), or three gathered ones (gate, up, down over all pairs) where the stacks do not
        allow fusing, instead of three per expert.  An expert chosen by several tokens is read
        once from memory, then from cache."""
        T = x.shape[0]
        D = self.down_exps.rows
        ids = np.asarray(ids).reshape(T, -1)
        k = ids.shape[1]
        flat = ids.reshape(-1).tolist()
        own = [i for i, e in enumerate(flat) if e in self.experts]
        self.calls += 1
        if not own:
            return np.zeros((T, D), dtype=np.float32)
        pe = [flat[i] for i in own]                       # expert of each owned pair
        tok = np.asarray(own, dtype=np.int64) // k        # its token
        if FUSED_MOE and self.plain:
            if self._fused is None:  # made on the first decode step
                self._fused = FusedExperts(self._gate_s, self._up_s, self._down_s)
            if self._fused.ok:
                distinct = set(pe)
                self.bytes_read += sum(self.expert_nbytes(e) for e in distinct)
                self.expert_evals += len(distinct)
                w = np.asarray(weights, dtype=np.float32).reshape(-1)[own]
                return self._fused(x, pe, tok, w)
        xs = np.ascontiguousarray(x, dtype=np.float32)
        if self.plain:
            h = ops.silu_mul(self._gate_s.gather(pe, xs, tok), self._up_s.gather(pe, xs, tok))  # [P, F']
            y = self._down_s.gather(pe, h)                                                     # [P, D]
        else:
            pa = np.asarray(pe, dtype=np.int64)
            h = self._hidden(self._gate_s.gather(pe, xs, tok), self._up_s.gather(pe, xs, tok), pa)
            y = self._down_bias(self._down_s.gather(pe, np.ascontiguousarray(h, dtype=np.float32)), pa)
        y *= np.asarray(weights, dtype=np.float32).reshape(-1)[own][:, None]
        distinct = set(pe)
        self.bytes_read += sum(self.expert_nbytes(e) for e in distinct)
        self.expert_evals += len(distinct)
        if T == 1:
            return y.sum(axis=0, keepdims=True)
        # pairs are in token order: sum each token's run of rows (np.add.at took 0.86 ms for 48
        # pairs x 2048, np.add.reduceat 0.25 ms, this loop 0.04 ms)
        starts = np.flatnonzero(np.r_[True, tok[1:] != tok[:-1]])
        ends = np.r_[starts[1:], len(tok)]
        out = np.zeros((T, D), dtype=np.float32)
        for a, b in zip(starts.tolist(), ends.tolist()):
            np.sum(y[a:b], axis=0, out=out[tok[a]])
        return out


def aligned_row_ranges(down_exps: ExpertStack, n_parts: int) -> list[tuple[int, int]]:
    """Split the intermediate dim F into n_parts near-equal (r0, r1) ranges on down_exps' split
    units (kernels.split_unit: the column slices of down must be whole blocks, Q8_0's whole block
    pairs). Fewer ranges if F is too small."""
    F = down_exps.cols
    blk = down_exps.split_unit
    nblk = F // blk
    n = max(1, min(n_parts, nblk))
    cuts = [round(i * nblk / n) * blk for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


class MoEFFN:
    """Routed experts plus optional always-on shared experts: x [T, D] -> [T, D]."""

    def __init__(self, router: Router, experts: RoutedExperts, shared=None):
        self.router, self.experts, self.shared = router, experts, shared

    def __call__(self, x: np.ndarray) -> np.ndarray:
        ids, w = self.router(x)
        out = self.experts(x, ids, w)
        if self.shared is not None:
            out += self.shared(x)
        return out


def moe_ffn_from_weights(w, layer: int, n_used: int, *, gating: int = GATING_SOFTMAX,
                         norm: bool = False, scale: float = 0.0, n_groups: int = 1,
                         n_groups_used: int = 0, shared: bool = False, act: str = ACT_SILU,
                         alpha: float = 1.702, limit: float = 7.0) -> MoEFFN:
    """Build a layer's MoEFFN from the standard GGUF tensor names blk.N.ffn_{gate_inp,*_exps,*_shexp}
    (with the router's and the experts' .bias tensors where the file has them, gpt-oss)."""
    p = f"blk.{layer}."
    holds = getattr(w, "holds", None)  # a daemon worker's SliceWeights

    def opt(name):
        return w.vector(p + name) if w.has(p + name) else None

    def opt_share(name):
        # an expert bias: the worker's share of it (or None where it holds none, e.g. the
        # down bias on every worker but one in rows placement)
        if holds is not None and w.has(p + name) and not holds(p + name):
            return None
        return opt(name)

    router = Router(w.linear(p + "ffn_gate_inp.weight"), n_used, gating, norm, scale, opt("exp_probs_b.bias"),
                    n_groups, n_groups_used, logit_bias=opt("ffn_gate_inp.bias"))
    biases = tuple(opt_share(f"ffn_{n}_exps.bias") for n in ("gate", "up", "down"))
    experts = RoutedExperts(w.experts(p + "ffn_gate_exps.weight"), w.experts(p + "ffn_up_exps.weight"),
                            w.experts(p + "ffn_down_exps.weight"), act=act, alpha=alpha, limit=limit,
                            biases=biases)
    sh = None
    if shared and w.has(p + "ffn_gate_shexp.weight"):
        sh = DenseFFN(w.linear(p + "ffn_gate_shexp.weight"), w.linear(p + "ffn_up_shexp.weight"),
                      w.linear(p + "ffn_down_shexp.weight"))
    return MoEFFN(router, experts, sh)


def llama_moe_ffn(args, weights, layer_index: int) -> MoEFFN:
    """Mixtral (llama arch with experts): softmax over all experts, top-k, renormalised."""
    return moe_ffn_from_weights(weights, layer_index, args.n_experts_used,
                                gating=GATING_SOFTMAX, norm=True)


# -- statistics for `dsd bench` -------------------------------------------------------------------
# Active routed-expert bytes per token: reset_moe_stats(model); decode N tokens one at a time
# (Batch.single(cache, [tok])); moe_bytes_read(model) / N.  In a decode step every chosen expert
# is read once per layer, so this is (experts used x layers x expert bytes) minus overlaps; add
# the dense weights (attention, shared experts, dense layers, output) for total bytes per token.

def routed_experts_of(model) -> list[RoutedExperts]:
    """Every RoutedExperts object of a built model (walks model.ffn)."""
    out = []
    for f in getattr(model, "ffn", []):
        ex = getattr(f, "experts", None)
        if isinstance(ex, RoutedExperts):
            out.append(ex)
    return out


def moe_bytes_read(model) -> int:
    """Routed-expert weight bytes read since the last reset_moe_stats(model)."""
    return sum(ex.bytes_read for ex in routed_experts_of(model))


def reset_moe_stats(model) -> None:
    for ex in routed_experts_of(model):
        ex.reset_stats()
