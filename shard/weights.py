"""Weight objects the model code computes with, and where their bytes come from.

A `Linear` is a (possibly quantized) matrix W [rows, cols] stored as raw GGUF block bytes
[rows, row_bytes]; calling it computes x @ W.T through dsd.shard.kernels.  Model wiring only
sees these objects, so the same model runs on weights that are memory-mapped from the file
(one process) or copied into node-local hugepages (a daemon worker).
"""
from __future__ import annotations

import numpy as np

from dsd.errors import UnsupportedModelError
from dsd.shard import kernels


# Up to this many rows of activations (decode steps of a batch), products run as matrix-vector
# style kernels that read each weight row once from memory; above it (prefill), dequantized
# tiles and BLAS.
SMALL_BATCH_MAX = kernels.FUSED_MAX_T


class ReadCounter:
    """Bytes of weights read by matrix products, for `dsd bench` (one int add per product)."""

    bytes = 0

    @classmethod
    def reset(cls) -> int:
        n, cls.bytes = cls.bytes, 0
        return n


class Linear:
    """W [rows, cols] as raw bytes; __call__(x [cols] or [T, cols]) -> [rows] or [T, rows]."""

    __slots__ = ("raw", "ggml_type", "rows", "cols", "name", "_mv")

    def __init__(self, raw: np.ndarray, ggml_type: int, cols: int, name: str = ""):
        self.raw = raw  # uint8 [rows, row_bytes]
        self.ggml_type = int(ggml_type)
        self.rows = raw.shape[0]
        self.cols = int(cols)
        self.name = name
        self._mv = None  # kernels.prepare_matvec(raw, ggml_type), made on the first decode step

    @property
    def nbytes(self) -> int:
        return self.raw.shape[0] * self.raw.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        ReadCounter.bytes += self.raw.shape[0] * self.raw.shape[1]
        if x.ndim == 1:
            return kernels.matvec(self.raw, self.ggml_type, x)
        if x.shape[0] == 1:  # one token (decode): the matrix-vector kernel, no dequantized copy
            if self._mv is None:
                self._mv = kernels.prepare_matvec(self.raw, self.ggml_type)
            return self._mv(x[0])
        return kernels.matmul(self.raw, self.ggml_type, x)

    def row_slice(self, r0: int, r1: int) -> "Linear":
        """Output rows r0:r1 (e.g. one worker's share of an expert's intermediate dim)."""
        return Linear(self.raw[r0:r1], self.ggml_type, self.cols, self.name)

    def col_slice(self, c0: int, c1: int) -> "Linear":
        """Input columns c0:c1, which must lie on quantization-block boundaries."""
        qt = kernels.quant_type(self.ggml_type)
        if c0 % qt.block_size or c1 % qt.block_size:
            raise ValueError(f"{self.name}: column slice {c0}:{c1} not aligned to {qt.block_size}")
        b0 = c0 // qt.block_size * qt.type_size
        b1 = c1 // qt.block_size * qt.type_size
        return Linear(self.raw[:, b0:b1], self.ggml_type, c1 - c0, self.name)

    def dequantize(self) -> np.ndarray:
        return kernels.dequantize(self.raw, self.ggml_type, self.cols)


def _root(a: np.ndarray):
    """The object that owns an array's memory (an mmap, a node-local buffer, or the array)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else a.base


def common_flat(arrays: list[np.ndarray]):
    """(read-only 1-D uint8 view spanning all the arrays, byte offset of each in it) when they
    are views of one allocation (same root; non-negative strides, contiguous inner rows, as
    weight bytes are), so one kernel call can address them all; else None."""
    from numpy.lib.stride_tricks import as_strided

    if any(a.dtype != np.uint8 or a.size == 0 or a.strides[-1] != 1 or min(a.strides) < 0
           or any(st < a.shape[-1] for st in a.strides[:-1]) for a in arrays):
        return None
    root = _root(arrays[0])
    if any(_root(a) is not root for a in arrays):
        return None
    ptrs = [a.__array_interface__["data"][0] for a in arrays]
    ends = [p + sum((n - 1) * st for n, st in zip(a.shape, a.strides)) + 1 for p, a in zip(ptrs, arrays)]
    lo = int(np.argmin(ptrs))
    flat = as_strided(arrays[lo], shape=(max(ends) - ptrs[lo],), strides=(1,))
    flat.flags.writeable = False
    return flat, [p - ptrs[lo] for p in ptrs]


class FusedLinear:
    """Matrices of one type and column count that multiply the same x (llama's q / k / v,
    MLA's q_a and kv_a, a SwiGLU's gate and up): __call__(x [T, cols]) -> [out_i [T, rows_i]].

    One token (decode) runs all of them in ONE kernel call: they lie in one buffer (the file's
    mmap in one process, a worker's node-local buffer in the daemon), so each is cut into chunks
    of g rows (g = gcd of the row counts) and the chunks' byte offsets feed the gathered matvec
    kernel, one parallel region instead of one per matrix (~5-20 us each here, the larger part
    of a small model's decode step).  Every row is the same row kernel on the same quantized x
    as in the separate calls, so the results are bit-identical to them.  More tokens, matrices
    from different buffers or float-type tail columns: one call per matrix, as before."""

    def __init__(self, parts: list[Linear]):
        self.parts = parts
        self._plan = self._chunk_plan(parts)

    @staticmethod
    def _chunk_plan(parts):
        import math

        p0 = parts[0]
        same = all(p.ggml_type == p0.ggml_type and p.cols == p0.cols for p in parts)
        if len(parts) < 2 or not same or not kernels.has_simd_rows(p0.ggml_type, p0.cols):
            return None
        raws = [p.raw for p in parts]
        if any(r.ndim != 2 or r.shape[0] == 0 for r in raws):
            return None
        common = common_flat(raws)
        rstride = raws[0].strides[0]
        if common is None or any(r.strides[0] != rstride for r in raws):
            return None
        flat, bases = common
        g = math.gcd(*[r.shape[0] for r in raws])
        offs = np.asarray([b + c * g * rstride for b, r in zip(bases, raws)
                           for c in range(r.shape[0] // g)], dtype=np.int64)
        bounds = np.cumsum([0] + [r.shape[0] for r in raws]).tolist()
        return flat, offs, rstride, g, bounds, np.zeros(len(offs), np.int64)

    @property
    def fused(self) -> bool:
        return self._plan is not None

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        if self._plan is None or x.shape[0] != 1:
            return [p(x) for p in self.parts]
        flat, offs, rstride, g, bounds, xi = self._plan
        p0 = self.parts[0]
        X = x if x.dtype == np.float32 and x.flags.c_contiguous else np.ascontiguousarray(x, np.float32)
        out = np.empty((len(offs), g), dtype=np.float32)
        for p in self.parts:
            ReadCounter.bytes += p.nbytes
        kernels.matvec_offsets(flat, offs, rstride, g, p0.ggml_type, p0.cols, X, xi, out)
        out = out.reshape(1, -1)
        return [out[:, a:b] for a, b in zip(bounds, bounds[1:])]


class FusedExperts:
    """A decode step's routed experts in two kernel calls (kernels.experts_gate_up / _down_sum):
    __call__(x [T, cols], pe [P] expert ids, tok int64 [P] sorted token of each pair, w [P]
    routing weights) -> [T, D] = sum over each token's pairs of w * down(silu(gate x) * up x).
    gate / up / down: ExpertStacks [E, F, cols] / [E, F, cols] / [E, D, F] (a worker's expert
    subset or row share are views; gate and up must lie in one buffer).  `ok` is False when the
    stacks do not allow it (different buffers or types, float-type tail columns): the caller
    then runs the gathered products."""

    def __init__(self, gate: "ExpertStack", up: "ExpertStack", down: "ExpertStack"):
        self.gate, self.up, self.down = gate, up, down
        common = common_flat([gate.raw, up.raw])
        self.ok = (common is not None and gate.ggml_type == up.ggml_type
                   and gate.raw.strides == up.raw.strides
                   and gate.expert_ids == up.expert_ids == down.expert_ids
                   and kernels.has_simd_rows(gate.ggml_type, gate.cols)
                   and kernels.has_simd_rows(down.ggml_type, down.cols))
        if self.ok:
            self._flat, (self._gbase, self._ubase) = common
            self._mstride, self._rstride = gate.raw.strides[0], gate.raw.strides[1]
            self._dflat, self._dmstride, self._drstride = down.view
            self._matrix_bytes = sum(st.raw.shape[1] * st.raw.shape[2] for st in (gate, up, down))

    def __call__(self, x: np.ndarray, pe: list, tok: np.ndarray, w: np.ndarray) -> np.ndarray:
        g, d = self.gate, self.down
        T = x.shape[0]
        loc = np.asarray([g._local[e] for e in pe], dtype=np.int64)
        X = x if x.dtype == np.float32 and x.flags.c_contiguous else np.ascontiguousarray(x, np.float32)
        H = np.empty((len(pe), g.rows), np.float32)   # [P, F]: silu(gate x) * up x per pair
        kernels.experts_gate_up(self._flat, self._gbase + loc * self._mstride, self._ubase + loc * self._mstride,
                                self._rstride, g.rows, g.ggml_type, g.cols, X, tok, H)
        t = np.arange(T)
        lo = np.searchsorted(tok, t, side="left").astype(np.int64)   # token t's pairs: lo[t]:hi[t]
        hi = np.searchsorted(tok, t, side="right").astype(np.int64)
        out = np.empty((T, d.rows), np.float32)
        kernels.experts_down_sum(self._dflat, loc * self._dmstride, self._drstride, d.rows, d.ggml_type, d.cols,
                                 H, lo, hi, np.ascontiguousarray(w, dtype=np.float32), out)
        ReadCounter.bytes += len(set(pe)) * self._matrix_bytes  # each distinct expert read once
        return out


class Embedding:
    """Token embedding table E [vocab, D] (any quant type); lookup dequantizes only the used rows."""

    def __init__(self, linear: Linear):
        self.table = linear

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        t = self.table
        return kernels.dequantize(t.raw[np.asarray(ids, dtype=np.int64)], t.ggml_type, t.cols)


class ExpertStack:
    """Stacked expert matrices [E, rows, cols] (ffn_*_exps); expert(e) is a Linear view, no copy.

    `expert_ids` maps local index -> global expert id when a worker holds only some experts.
    """

    def __init__(self, raw: np.ndarray, ggml_type: int, cols: int, name: str = "",
                 expert_ids: list[int] | None = None):
        self.raw = raw  # uint8 [E_local, rows, row_bytes]
        self.ggml_type = int(ggml_type)
        self.cols = int(cols)
        self.rows = raw.shape[1]
        self.name = name
        ids = list(range(raw.shape[0])) if expert_ids is None else list(expert_ids)
        self._local = {g: i for i, g in enumerate(ids)}
        self._view = None  # kernels.stack_view(raw), made on the first gather

    @property
    def split_unit(self) -> int:
        """Columns come in shares of whole units of this many elements (kernels.split_unit)."""
        return kernels.split_unit(self.ggml_type)

    @property
    def expert_ids(self) -> list[int]:
        return list(self._local)

    def has(self, e: int) -> bool:
        return e in self._local

    def expert(self, e: int) -> Linear:
        return Linear(self.raw[self._local[e]], self.ggml_type, self.cols, f"{self.name}[{e}]")


    @property
    def view(self):
        """kernels.stack_view(raw), made once: what every gathered product needs."""
        if self._view is None:
            self._view = kernels.stack_view(self.raw)
        return self._view

    def gather(self, ids, X: np.ndarray, xi=None) -> np.ndarray:
        """out[i] = expert(ids[i]) @ X[xi[i]] -> [len(ids), rows], one kernel call for all pairs
        (X [n, cols]; xi defaults to one row of X per id, or row 0 for all when n == 1).
        Counts each distinct matrix's bytes once: repeated ones are re-read from cache."""
        loc = [self._local[int(e)] for e in np.asarray(ids).reshape(-1)]
        ReadCounter.bytes += len(set(loc)) * self.raw.shape[1] * self.raw.shape[2]
        return kernels.matvec_gather(self.raw, self.ggml_type, loc, X, xi, view=self.view)

    def per_matrix(self, X: np.ndarray) -> np.ndarray:
        """X [T, E, cols] -> [T, E, rows]: matrix e applied to X[:, e] for every e the stack holds
        (MLA's per-head k_b / v_b).  Decode-sized T: one gathered call over all (token, matrix)
        pairs; prefill: one matrix product per matrix over all T rows."""
        T, E = X.shape[0], X.shape[1]
        if T > SMALL_BATCH_MAX:
            out = np.empty((T, E, self.rows), dtype=np.float32)
            for e in range(E):
                out[:, e] = self.expert(self.expert_ids[e])(np.ascontiguousarray(X[:, e]))
            return out
        ReadCounter.bytes += E * self.raw.shape[1] * self.raw.shape[2]
        flat = np.ascontiguousarray(X, dtype=np.float32).reshape(T * E, -1)
        ids = np.tile(np.arange(E), T)
        return kernels.matvec_gather(self.raw, self.ggml_type, ids, flat, view=self.view).reshape(T, E, -1)


class GGUFWeights:
    """Weight source backed by a memory-mapped GGUF file (the single-process engine)."""

    def __init__(self, model):
        self.model = model  # dsd.shard.gguf_file.GGUFModel

    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def _info(self, name: str):
        try:
            return self.model.tensors[name]
        except KeyError:
            raise UnsupportedModelError(
                f"{self.model.path}: tensor {name!r} is missing; the file does not match the "
                f"'{self.model.architecture}' architecture dsd expects") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's block bytes (a view of the file's mapping here)."""
        return self._info(name).raw()

    def vector(self, name: str) -> np.ndarray:
        """A 1-D (or small) float tensor as float32, e.g. a norm weight [D]."""
        info = self._info(name)
        return kernels.dequantize(self.raw(name).reshape(1, -1), info.ggml_type,
                                  info.n_elements).reshape(info.shape)

    def linear(self, name: str) -> Linear:
        info = self._info(name)
        if len(info.shape) != 2:
            raise UnsupportedModelError(f"{self.model.path}: {name} has shape {info.shape}, expected 2-D")
        return Linear(self.raw(name), info.ggml_type, info.shape[1], name)

    def experts(self, name: str) -> ExpertStack:
        info = self._info(name)
        if len(info.shape) != 3:
            raise UnsupportedModelError(f"{self.model.path}: {name} has shape {info.shape}, expected 3-D")
        return ExpertStack(self.raw(name), info.ggml_type, info.shape[2], name)


class HugePageWeights(GGUFWeights):
    """Every tensor copied once, in GGUF's own block layout, into one anonymous buffer of huge
    pages (numa.allocate pages="auto": reserved 1 GiB / 2 MiB pools first, then transparent huge
    pages): the single-process default when the file fits in memory twice over.

    Why: the file's mapping is page cache in 4 KiB pages.  Same-process A/B on the 12-layer
    DeepSeek-shaped Q4_K file (bench/weight_pages_ab.py, 2 threads, interleaved rounds): decode
    1.09-1.11x faster from THP or 2 MiB hugetlb copies than from the mapping, and 1.007x from a
    4 KiB-page copy, so the gain is the page size (TLB reach), not the copy or its layout."""

    ALIGN = 64

    def __init__(self, model, node: int = 0, pages: str = "auto"):
        from dsd.numa import allocate, load_file_range

        super().__init__(model)
        infos = list(model.tensors.values())
        offs, total = [], 0
        for info in infos:
            offs.append(total)
            total += (info.nbytes + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        self.buffer = allocate(max(total, 4096), node, pages=pages)
        self._copies = {}
        for info, off in zip(infos, offs):
            # the page cache of what was read is dropped: the copy replaces it
            load_file_range(info.file, info.offset, info.nbytes, self.buffer, off)
            shape = tuple(info.shape[:-1]) + (info.row_bytes,)
            self._copies[info.name] = self.buffer.array("uint8", shape, off)

    def raw(self, name: str) -> np.ndarray:
        self._info(name)  # the missing-tensor error
        return self._copies[name]

    def page_kind(self) -> str:
        return self.buffer.page_kind
