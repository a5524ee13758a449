"""Registry of supported GGML types and the public entry points (dequantize, matvec, matmul).

Conventions (see DESIGN.md): a weight W of shape (rows, n_cols) is given as its raw GGUF bytes,
a uint8 array (rows, row_bytes) whose inner dimension is contiguous; its row stride may be
larger than row_bytes (a column slice raw[:, c0:c1] of a wider matrix at block boundaries), and
it may be a read-only np.memmap. Kernels see it as a 1-D read-only uint8 array `flat` with row r
starting at flat[r * stride], so one compiled specialisation serves every case.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided
from gguf import GGMLQuantizationType as G

from dsd.errors import GGUFError

import numba
from numba import typeof
from numba.core import types as nbtypes

from ._common import F16_TABLE
from . import drivers as dv
from . import drivers_i8 as di
from . import split
from . import stats as _stats
from . import products_iq as _piq
from .rows import DECODERS, USE_PERM
from .rows_i8 import MULTI_KINDS
from .rows_perm import PERM_DECODERS


@dataclass(frozen=True)
class QuantType:
    ggml_type: int          # gguf.GGMLQuantizationType value
    name: str
    block_size: int         # elements per block
    type_size: int          # bytes per block
    # rows.py decoder geometry: elements / bytes per SIMD block (32 elements for float types),
    # offset groups per block and elements per offset group (for the x group sums)
    simd_bs: int = 0
    simd_ts: int = 0
    gsz: int = 32

    def row_bytes(self, n_cols: int) -> int:
        return row_bytes(self.ggml_type, n_cols)


QUANT_TYPES: dict[int, QuantType] = {}

# Matrices smaller than this many bytes run single-threaded. Measured (bench/kernels_bench.py,
# 2 threads, omp layer): a parallel region adds ~3 us back to back, ~7 us typical on a busy
# machine; 192x576 Q4_1 (69 KB) 10.6 us serial vs 13.1 us parallel, 576x576 (207 KB) 21.6 us
# serial vs 18.2 us parallel.
PAR_MIN_BYTES = 128 * 1024

# Contention back-off. A numba parallel region ends at a barrier, so when another process keeps
# one of the 2 cores busy (measured: a qemu VM at 100% of a core) every parallel call waits for
# a scheduler slice, ~4 ms instead of ~0.1 ms. After a parallel call that took far longer than
# the single-thread estimate, kernels stay serial for PAR_BACKOFF_S seconds, then retry.
PAR_BACKOFF_S = float(os.environ.get("DSD_PAR_BACKOFF_S", "0.05"))  # measured: 1.0 s kept SmolLM2 decode serial after any hiccup (13.9 vs 12.0 ms/token)
_serial_rate = 8e9      # bytes/s of serial kernels, running estimate (EWMA of large-ish calls)
_par_off_until = 0.0


def _par_ok(nbytes: int) -> bool:
    return nbytes >= PAR_MIN_BYTES and (not _par_off_until or time.monotonic() >= _par_off_until)


def _note(parallel: bool, nbytes: int, dt: float) -> None:
    """Record one kernel call's duration (see PAR_BACKOFF_S)."""
    global _serial_rate, _par_off_until
    if parallel:
        if dt > 4.0 * nbytes / _serial_rate + 5e-4:
            _par_off_until = time.monotonic() + PAR_BACKOFF_S
    elif nbytes >= 32 * 1024 and dt > 0:
        _serial_rate = 0.9 * _serial_rate + 0.1 * (nbytes / dt)

def _has_vnni() -> bool:
    from .rows_i8 import has_vnni

    return has_vnni()


# Q4_K, Q5_K, Q6_K and Q4_1 products quantize x to 8 bits per element (one scale per 256 / 32
# elements, llama.cpp's Q8_K / Q8_1) and multiply integers (rows_i8.py): with AVX-512 VNNI
# ~1.5x the float kernels' speed; on AVX2 alone (vpmaddubsw + vpmaddwd, the same integer sums)
# matvec 1.35x (Q4_1) to 1.9x (Q4_K) and 3-4x (Q5_K, Q6_K) one thread's float kernels; the
# way llama.cpp computes these products. Results move by ~1e-3 of sum|w x|.
# DSD_EXACT_ACTIVATIONS=1 (or exact_activations()) keeps float32 x everywhere.
def _has_int8_dot() -> bool:
    from .rows_i8 import has_avx2_int8

    return _has_vnni() or has_avx2_int8()


INT8_ACTIVATIONS = os.environ.get("DSD_EXACT_ACTIVATIONS", "") in ("", "0") and _has_int8_dot()
_VNNI = _has_vnni()


# Batch invariance (DSD_DETERMINISTIC=1, or batch_invariant()): every product computes a token's
# row with the same arithmetic whatever the other rows of X are and however many there are --
# matvec's row kernel on the token's own prepared (or 8-bit quantized) x.  The K-quants' 8-bit
# kernels are invariant in either mode (the multi-token kernel runs the one-token kernel's
# arithmetic per token, rows_i8._token_block); in this mode Q4_1 also takes its 8-bit
# multi-token kernel (slower than the float kernels for prompts), Q8_0 its 8-bit kernels,
# and every float-x product with T >= 2 runs drivers.mm_rowdot (each row decoded per token)
# instead of the fused kernels or dequantize + sgemm.
BATCH_INVARIANT = os.environ.get("DSD_DETERMINISTIC", "") not in ("", "0")


class batch_invariant:
    """Context manager: batch-invariant products (see BATCH_INVARIANT) while inside."""

    def __init__(self, on: bool = True):
        self.on = on

    def __enter__(self):
        global BATCH_INVARIANT
        self._saved, BATCH_INVARIANT = BATCH_INVARIANT, self.on
        return self

    def __exit__(self, *exc):
        global BATCH_INVARIANT
        BATCH_INVARIANT = self._saved


class exact_activations:
    """Context manager: float32 activations in every product (the exact path) while inside."""

    def __enter__(self):
        global INT8_ACTIVATIONS
        self._saved, INT8_ACTIVATIONS = INT8_ACTIVATIONS, False
        return self

    def __exit__(self, *exc):
        global INT8_ACTIVATIONS
        INT8_ACTIVATIONS = self._saved


# vectors per call of the fused float kernel (each weight row dequantized once into L1 and
# dotted with all of them); a default decode batch (max_batch 16) is one call
FUSED_MAX_T = 16
# Up to this many vectors the fused kernel runs in chunks of FUSED_MAX_T; the dequantize + sgemm
# path costs a float copy of the whole matrix per call, which only pays off for long prompts:
# Q8_0 2048 x 1408 (an expert's down projection in a DeepSeek-V2-Lite-shaped file) at T = 24 /
# 48 / 96 / 192: 1.72 / 2.44 / 3.79 / 6.46 ms that way, 0.80 / 1.52 / 3.04 / 6.12 ms fused in
# chunks; 2048 x 10944 crosses over at T ~ 150.  SmolLM2's Q4_1 (float kernels on VNNI machines
# for T >= 2) 1536 x 576 at T = 17 / 32 / 64: 0.63 / 1.87 / 1.95 ms that way, 0.45 / 0.79 / 0.95
# ms fused in chunks; a whole 17-token forward pass 322 ms that way (the copies, and OpenBLAS's
# spinning threads beside numba's) against 43 ms fused; 512 tokens 1,544 vs 1,088 ms (in a forward
# pass the sgemm path also pays for OpenBLAS's threads spinning beside numba's), so prompt chunks up
# to 1024 tokens stay fused.  8-bit products never come here.
FUSED_CHUNKS_MAX_T = 1024
# Rows dequantized per BLAS call in matmul (prefill): 4 Mi elements = 16 MiB of float32. Small
# (L2-sized) tiles measured far slower: OpenBLAS is inefficient for thin (T x 64..128) products.
_TILE_ELEMS = 4 * 1024 * 1024


def _register(gt: G):
    """Adding a type = one call here plus its decoder in rows.py and branch in drivers.py."""
    from gguf.constants import GGML_QUANT_SIZES
    bs, ts = GGML_QUANT_SIZES[gt]
    kind = int(gt)
    _, sbs, sts, _, gsz = DECODERS[kind]
    QUANT_TYPES[kind] = QuantType(kind, gt.name, bs, ts, sbs, sts, gsz)


_register(G.F32)
_register(G.F16)
_register(G.BF16)
_register(G.Q4_0)
_register(G.Q4_1)
_register(G.Q5_0)
_register(G.Q5_1)
_register(G.Q8_0)
_register(G.Q2_K)
_register(G.Q3_K)
_register(G.Q4_K)
_register(G.Q5_K)
_register(G.Q6_K)
# the low-bit types (IQ1_S ... IQ4_XS, MXFP4, TQ1_0, TQ2_0): their own decoders and products in
# dequant_iq.py / products_iq.py; each entry point below hands them over first
for _k, (_bs, _ts) in _piq.IQ_TYPES.items():
    QUANT_TYPES[_k] = QuantType(_k, G(_k).name, _bs, _ts, _bs, _ts, 32)
_IQ = frozenset(_piq.IQ_TYPES)

def _wide_vectors() -> bool:
    """True when numba compiles for AVX-512 (32 vector registers): the fused small-batch matmul
    then uses 4-row passes; AVX2 targets (the project's machines) use 2-row passes."""
    from numba.core.registry import cpu_target
    return "+avx512f" in cpu_target.target_context.codegen()._tm_features


_WIDE = _wide_vectors()
_FLOAT_ITEM = {int(G.F32): 4, int(G.F16): 2, int(G.BF16): 2}
_EP: dict = {}


def _entry(fn, kind, variant, *args):
    """Call numba driver fn(kind, *args) with kind as a compile-time literal through its compiled
    entry point (the dispatcher would redo literal typing on every call, ~16 ms). `variant` must
    capture whatever makes the numba argument types differ between calls (array class and
    writeability of caller-supplied arrays; ours are fixed)."""
    key = (fn, kind, variant)
    ep = _EP.get(key)
    if ep is not None:
        if _stats.enabled:
            return _stats.timed(fn.__name__, ep, kind, *args)
        return ep(kind, *args)
    res = fn(kind, *args)  # compiles (or loads from the on-disk cache) the literal specialisation
    sig = (nbtypes.literal(kind),) + tuple(typeof(a) for a in args)
    _EP[key] = fn.overloads[sig].entry_point
    return res


_PERMS: dict = {}


def _perm(kind: int, nb: int, bs: int):
    """Row permutation of x for the dword-lane matvec decoders (identity where none applies):
    whole super-blocks permuted, remainder blocks in order -> (int32 index, float32 factor),
    x_perm = x[index] * factor (factors are powers of two: exact)."""
    key = (kind, nb)
    p = _PERMS.get(key)
    if p is None:
        idx = np.arange(nb * bs, dtype=np.int32)
        fac = np.ones(nb * bs, dtype=np.float32)
        if kind in PERM_DECODERS and kind in USE_PERM:
            _, factor, sb, _, exps = PERM_DECODERS[kind]
            nsb = nb // factor
            sbp = np.asarray(sb, dtype=np.int32)
            idx[:nsb * len(sbp)] = (np.arange(nsb, dtype=np.int32)[:, None] * len(sbp) + sbp).reshape(-1)
            fac[:nsb * len(sbp)] = np.tile(np.ldexp(np.float32(1), -np.asarray(exps)).astype(np.float32), nsb)
        idx.flags.writeable = fac.flags.writeable = False
        p = _PERMS[key] = (idx, fac)
    return p


def _float_cols(raw_part, kind):
    """Tail columns of a float-type matrix (rows, k*itemsize bytes) -> float32 (rows, k)."""
    a = np.ascontiguousarray(raw_part)
    if kind == int(G.F32):
        return a.view(np.float32).copy()
    if kind == int(G.F16):
        return a.view(np.float16).astype(np.float32)
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def quant_type(ggml_type: int) -> QuantType:
    qt = QUANT_TYPES.get(ggml_type)
    if qt is None:
        try:
            name = G(ggml_type).name
        except ValueError:
            name = f"unknown type id {ggml_type}"
        supported = ", ".join(q.name for q in QUANT_TYPES.values())
        raise GGUFError(f"GGML tensor type {name} ({ggml_type}) is not supported by dsd kernels; "
                        f"supported: {supported}. Re-quantize the model to one of these "
                        f"(e.g. llama-quantize ... Q4_K_M).")
    return qt


def row_bytes(ggml_type: int, n_cols: int) -> int:
    qt = quant_type(ggml_type)
    if n_cols <= 0 or n_cols % qt.block_size:
        raise GGUFError(f"row of {n_cols} elements is not a positive multiple of the {qt.name} "
                        f"block size {qt.block_size}; such a tensor cannot be stored as {qt.name}")
    return n_cols // qt.block_size * qt.type_size


def split_unit(ggml_type: int) -> int:
    """Elements per unit in which a row may be cut into column shares (a worker's slice of a
    down projection): whole blocks, and for Q8_0 whole block pairs, because its 8-bit kernel
    quantizes x per 64 elements (rows_i8_32._q8_0_row) and a share must quantize its part of x as
    the whole row does, or placements would not compute what one process computes."""
    qt = quant_type(ggml_type)
    return 2 * qt.block_size if qt.ggml_type == G.Q8_0 else qt.block_size


def _flat(raw: np.ndarray, rb: int):
    """raw uint8 (rows, rb), inner dim contiguous -> (read-only 1-D uint8 view, row stride)."""
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise GGUFError(f"raw weights must be a 2-D uint8 array of block bytes, got "
                        f"{raw.dtype} with shape {raw.shape}")
    if raw.shape[1] != rb:
        raise GGUFError(f"raw weights have {raw.shape[1]} bytes per row, expected {rb} "
                        f"for this type and column count")
    if raw.flags.c_contiguous:
        flat = raw.reshape(-1)
        stride = rb
    else:
        stride, s1 = raw.strides
        if s1 != 1 or stride < rb:
            raise GGUFError(f"raw weights must have contiguous rows (strides {raw.strides}); "
                            f"pass a row-major view or np.ascontiguousarray(raw)")
        flat = as_strided(raw, shape=((raw.shape[0] - 1) * stride + rb,), strides=(1,))
    if flat.flags.writeable:
        flat.flags.writeable = False  # one numba specialisation for memmaps and arrays
    return flat, stride


def _ncols(qt: QuantType, rb: int) -> int:
    return rb // qt.type_size * qt.block_size


def _geometry(qt: QuantType, raw: np.ndarray):
    """-> (flat, stride, n_cols, nb SIMD blocks per row, n_main columns covered by them)."""
    rb = raw.shape[1] if raw.ndim == 2 else -1
    n_cols = rb // qt.type_size * qt.block_size
    flat, stride = _flat(raw, rb if rb % qt.type_size == 0 else -1)
    nb = n_cols // qt.simd_bs
    return flat, stride, n_cols, nb, nb * qt.simd_bs


def dequantize(raw: np.ndarray, ggml_type: int, n_cols: int) -> np.ndarray:
    """raw (rows, row_bytes) uint8 -> float32 (rows, n_cols), bit-exact with gguf-py."""
    qt = quant_type(ggml_type)
    if qt.ggml_type in _IQ:
        return _piq.dequantize(raw, qt.ggml_type, n_cols)
    _flat(raw, row_bytes(ggml_type, n_cols))  # validates raw against n_cols
    flat, stride, n_cols, nb, main = _geometry(qt, raw)
    out = np.empty((raw.shape[0], n_cols), dtype=np.float32)
    if raw.shape[0]:
        if nb:
            # a few rows (an embedding lookup per decoded token) run on the calling thread: a
            # parallel region costs more than the work and stalls when a core is busy
            fn = dv.deq_rows if _par_ok(raw.shape[0] * raw.shape[1]) else dv.deq_rows_serial
            _entry(fn, qt.ggml_type, type(flat), flat, stride, raw.shape[0], nb, F16_TABLE, out)
        if main < n_cols:
            it = _FLOAT_ITEM[qt.ggml_type]
            out[:, main:] = _float_cols(raw[:, main * it:], qt.ggml_type)
    return out


def _vec(x, n_cols, what="x"):
    if x.dtype != np.float32 or x.ndim != 1 or x.shape[0] != n_cols or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 or x.shape[0] != n_cols:
            raise GGUFError(f"{what} has shape {x.shape}, expected ({n_cols},)")
    return x


# types with 8-bit activation kernels (rows_i8.py): one vector per matrix (drivers_i8.mv_*),
# and T vectors through one matrix with each row decoded once per 16 of them (mm_*, MULTI_KINDS).
# Q8_0 on rows of whole block pairs (rows_i8_32._q8_0_row).
_I8_KINDS = (int(G.Q4_K), int(G.Q5_K), int(G.Q6_K), int(G.Q4_1), int(G.Q8_0))
_I8_MULTI = frozenset(MULTI_KINDS)


def _int8_rows(kind: int, nb: int) -> bool:
    """The 8-bit activation row kernels take rows of nb SIMD blocks of this type."""
    return INT8_ACTIVATIONS and kind in _I8_KINDS and (kind != G.Q8_0 or nb % 2 == 0)
# one matrix at offset 0, one vector (matvec on the gather drivers); writeable like the gather's
# own offs/xi arrays, so both use one compiled specialisation
_XI0 = np.zeros(1, np.int64)


def _int8_products(flat, offs, stride, nrows, nb, X, xi, out, nbytes, kind) -> None:
    """Products with 8-bit activations (see INT8_ACTIVATIONS); nb = blocks per row."""
    par = _par_ok(nbytes)
    t0 = time.perf_counter()
    _entry(di.mv_i8_parallel if par else di.mv_i8_serial, kind, (type(flat), X.flags.writeable),
           flat, offs, stride, nrows, nb, F16_TABLE, X, xi, out)
    _note(par, nbytes, time.perf_counter() - t0)


def matvec(raw: np.ndarray, ggml_type: int, x: np.ndarray, out: np.ndarray | None = None):
    """W @ x for W given as raw blocks (rows, row_bytes); x float32 (n_cols,) -> (rows,)."""
    qt = QUANT_TYPES.get(ggml_type) or quant_type(ggml_type)
    if qt.ggml_type in _IQ:
        return _piq.matvec(raw, qt.ggml_type, x, out)
    flat, stride, n_cols, nb, main = _geometry(qt, raw)
    x = _vec(x, n_cols)
    nrows = raw.shape[0]
    if out is None:
        out = np.empty(nrows, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (nrows,) or not out.flags.c_contiguous:
        raise GGUFError(f"out must be a contiguous float32 array of shape ({nrows},)")
    if nrows and _int8_rows(qt.ggml_type, nb) and nb * qt.simd_bs == n_cols:
        _int8_products(flat, _XI0, stride, nrows, nb, x[None], _XI0, out[None], nrows * raw.shape[1],
                qt.ggml_type)
        return out
    if nrows:
        nbytes = nrows * raw.shape[1]
        par = _par_ok(nbytes)
        t0 = time.perf_counter()
        _entry(dv.mv_parallel if par else dv.mv_serial, qt.ggml_type, (type(flat), x.flags.writeable),
               flat, stride, nrows, nb, qt.gsz, F16_TABLE, *_perm(qt.ggml_type, nb, qt.simd_bs), x, out)
        _note(par, nbytes, time.perf_counter() - t0)
        if main < n_cols:
            it = _FLOAT_ITEM[qt.ggml_type]
            out += _float_cols(raw[:, main * it:], qt.ggml_type) @ x[main:]
    return out


def prepare_matvec(raw: np.ndarray, ggml_type: int):
    """-> mv(x): matvec(raw, ggml_type, x) as a new float32 [1, rows] for x float32 [n_cols], checks
    and dispatch done once (a decoded token runs the same few hundred products every step:
    matvec's validation costs ~4 us each, the kernel's entry point ~1 us).  The exact path and
    whatever the 8-bit row kernels do not cover go through matvec itself."""
    qt = QUANT_TYPES.get(int(ggml_type)) or quant_type(ggml_type)
    kind = qt.ggml_type
    nrows = raw.shape[0]
    if kind in _IQ or nrows == 0:
        return lambda x: matvec(raw, kind, x)[None]
    flat, stride, n_cols, nb, main = _geometry(qt, raw)
    if main != n_cols:
        return lambda x: matvec(raw, kind, x)[None]
    nbytes = nrows * raw.shape[1]
    serial, parallel = (di.mv_i8_serial, kind, (type(flat), True)), (di.mv_i8_parallel, kind, (type(flat), True))

    def mv(x: np.ndarray) -> np.ndarray:
        out = np.empty((1, nrows), np.float32)
        if not (_int8_rows(kind, nb) and x.dtype == np.float32 and x.shape == (n_cols,)
                and x.flags.c_contiguous and x.flags.writeable):
            matvec(raw, kind, x, out[0])
            return out
        par = _par_ok(nbytes)
        ep = _EP.get(parallel if par else serial)
        if ep is None or _stats.enabled:
            _int8_products(flat, _XI0, stride, nrows, nb, x.reshape(1, n_cols), _XI0, out, nbytes, kind)
            return out
        t0 = time.perf_counter()
        ep(kind, flat, _XI0, stride, nrows, nb, F16_TABLE, x.reshape(1, n_cols), _XI0, out)
        _note(par, nbytes, time.perf_counter() - t0)
        return out
    return mv


def _fused(qt, raw, flat, stride, nb, main, n_cols, X, o) -> None:
    """o [2 <= T <= FUSED_MAX_T, rows] (C-contiguous) = X @ W.T with the fused float kernels."""
    T, nrows = X.shape[0], raw.shape[0]
    nbytes = nrows * raw.shape[1]
    par = _par_ok(nbytes)
    t0 = time.perf_counter()
    if T <= 3:
        kern = dv.mm_direct_parallel if par else dv.mm_direct_serial
    elif _WIDE:
        kern = dv.mm_fused4_parallel if par else dv.mm_fused4_serial
    else:
        kern = dv.mm_fused_parallel if par else dv.mm_fused_serial
    if nb:
        _entry(kern, qt.ggml_type, (type(flat), X.flags.writeable), flat, stride, nrows, nb, main,
               F16_TABLE, X, o)
        if par:  # T vectors cost at most T matvecs: a generous single-thread estimate
            _note(True, T * nbytes, time.perf_counter() - t0)
    else:
        o[:] = 0
    if main < n_cols:
        it = _FLOAT_ITEM[qt.ggml_type]
        o += X[:, main:] @ _float_cols(raw[:, main * it:], qt.ggml_type).T


def _rowdot(qt, raw, flat, stride, nb, main, n_cols, X, out):
    """Batch-invariant float-x product (drivers.mm_rowdot): out[t] == matvec(raw, X[t]) bit for bit."""
    T, nrows = X.shape[0], raw.shape[0]
    o = out if out.flags.c_contiguous else np.empty((T, nrows), np.float32)
    nbytes = nrows * raw.shape[1]
    par = _par_ok(nbytes)
    if nb:
        _entry(dv.mm_rowdot_parallel if par else dv.mm_rowdot_serial, qt.ggml_type,
               (type(flat), X.flags.writeable), flat, stride, nrows, nb, qt.gsz, F16_TABLE,
               *_perm(qt.ggml_type, nb, qt.simd_bs), X, o)
    else:
        o[:] = 0
    if main < n_cols:  # float-type tail columns, per token as matvec adds them
        tail = _float_cols(raw[:, main * _FLOAT_ITEM[qt.ggml_type]:], qt.ggml_type)
        for t in range(T):
            o[t] += tail @ X[t, main:]
    if o is not out:
        out[:] = o
    return out


def matmul(raw: np.ndarray, ggml_type: int, X: np.ndarray, out: np.ndarray | None = None):
    """X @ W.T for X float32 (T, n_cols), W raw blocks (rows, row_bytes) -> float32 (T, rows).

    Q4_K / Q5_K / Q6_K with 8-bit activations (INT8_ACTIVATIONS): any T, each weight row decoded once
    per 16 vectors (drivers_i8.mm_*).  Otherwise T <= FUSED_CHUNKS_MAX_T (batched decode, a
    prompt chunk, an expert's tokens): fused kernel on 16 vectors at a time, each weight row
    read and dequantized once per 16 and dotted with them; longer prompts: dequantize tiles of
    rows (bit-exact SIMD dequant) and let numpy's sgemm do the product."""
    qt = QUANT_TYPES.get(ggml_type) or quant_type(ggml_type)
    if qt.ggml_type in _IQ:
        return _piq.matmul(raw, qt.ggml_type, X, out)
    flat, stride, n_cols, nb, main = _geometry(qt, raw)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != n_cols:
        raise GGUFError(f"X has shape {X.shape}, expected (T, {n_cols})")
    if X.dtype != np.float32 or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float32)
    T, nrows = X.shape[0], raw.shape[0]
    if out is None:
        out = np.empty((T, nrows), dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (T, nrows):
        raise GGUFError(f"out must be a float32 array of shape ({T}, {nrows})")
    if T == 0 or nrows == 0:
        return out
    if T == 1 and out.flags.c_contiguous:
        matvec(raw, ggml_type, X[0], out[0])
        return out
    int8 = qt.ggml_type in _I8_MULTI and _int8_rows(qt.ggml_type, nb)
    if BATCH_INVARIANT:
        if not (int8 and nb * qt.simd_bs == n_cols):
            return _rowdot(qt, raw, flat, stride, nb, main, n_cols, X, out)
    elif qt.ggml_type == G.Q4_1:
        # With VNNI the float kernels are faster for T >= 2 (fused: 1.2-1.35x at T = 8; dequantize
        # + sgemm 2.5x at T = 512: the 8-bit multi-token kernel is load-bound, one x load per
        # vpdpbusd).  On AVX2 the float row decode costs more: the 8-bit kernel is 1.1-1.4x the
        # fused one at T = 8 (SmolLM2's 1536 x 576 and 576 x 1536), so decode batches take it
        # there (which also makes them batch-invariant without the mode); prompts keep sgemm.
        int8 = int8 and not _VNNI and T <= FUSED_MAX_T
    if int8:
        # 8-bit activations, each row decoded once per 16 vectors: batched decode, and prompts
        # (1.4-5.8x the dequantize + sgemm path below for Q4_K at T = 32-512)
        o = out if out.flags.c_contiguous else np.empty((T, nrows), np.float32)
        nbytes = nrows * raw.shape[1]
        par = _par_ok(nbytes)
        t0 = time.perf_counter()
        rb = split.rows_per_item(nrows, -(-T // di.MULTI_MAX_T), numba.get_num_threads()) if par else di.ROW_BLOCK
        _entry(di.mm_i8_parallel if par else di.mm_i8_serial, qt.ggml_type, (type(flat), X.flags.writeable),
               flat, stride, nrows, nb, F16_TABLE, X, o, rb)
        if par:
            _note(True, T * nbytes, time.perf_counter() - t0)
        if o is not out:
            out[:] = o
        return out
    if T <= FUSED_CHUNKS_MAX_T:
        o = out if out.flags.c_contiguous else np.empty((T, nrows), np.float32)
        for t0 in range(0, T, FUSED_MAX_T):  # 16 vectors per kernel call (row kept in L1 for them)
            if T - t0 == 1:  # the fused kernels take 2..16 vectors
                matvec(raw, ggml_type, X[t0], o[t0])
            else:
                _fused(qt, raw, flat, stride, nb, main, n_cols, X[t0:t0 + FUSED_MAX_T], o[t0:t0 + FUSED_MAX_T])
        if o is not out:
            out[:] = o
        return out
    # Prefill: dequantize a tile of rows (serially: a numba parallel region next to OpenBLAS
    # calls costs ms while BLAS threads spin), then one sgemm per tile into a contiguous buffer.
    tile_rows = max(1, min(nrows, _TILE_ELEMS // n_cols))
    tile = np.empty((tile_rows, n_cols), dtype=np.float32)
    res = np.empty((T, tile_rows), dtype=np.float32) if tile_rows < nrows else None
    for r0 in range(0, nrows, tile_rows):
        r1 = min(nrows, r0 + tile_rows)
        t = tile[: r1 - r0]
        part = raw[r0:r1]
        if nb:
            pf, ps = _flat(part, raw.shape[1])
            _entry(dv.deq_rows_serial, qt.ggml_type, type(pf), pf, ps, r1 - r0, nb, F16_TABLE, t)
        if main < n_cols:
            t[:, main:] = _float_cols(part[:, main * _FLOAT_ITEM[qt.ggml_type]:], qt.ggml_type)
        if res is None:
            np.matmul(X, t.T, out=out)
        else:
            o = res[:, : r1 - r0]
            np.matmul(X, t.T, out=o)
            out[:, r0:r1] = o
    return out


def warm_up(ggml_types) -> float:
    """Load (or compile) every kernel specialisation the products of these types use, serial and
    parallel, on tiny all-zero matrices -> seconds spent.  A daemon worker calls this before it
    reports ready, so the first request does not pay ~1 s of numba cache loading."""
    global PAR_MIN_BYTES, _par_off_until
    t0 = time.perf_counter()
    saved = PAR_MIN_BYTES
    try:
        for gt in sorted({int(t) for t in ggml_types}):
            qt = quant_type(gt)
            if gt in _IQ:
                _piq.warm_up(gt)
                continue
            cols = 2 * max(qt.block_size, qt.simd_bs or qt.block_size)  # 2 blocks: Q8_0's 8-bit prompt kernel takes pairs
            raw = np.zeros((2, 4, row_bytes(gt, cols)), dtype=np.uint8)
            calls = [lambda: matvec(raw[0], gt, np.zeros(cols, np.float32)),
                     lambda: matvec_gather(raw, gt, [1, 0], np.zeros((2, cols), np.float32)),
                     lambda: dequantize(raw[0], gt, cols)]
            calls += [lambda T=T: matmul(raw[0], gt, np.zeros((T, cols), np.float32))
                      for T in (2, 4, FUSED_MAX_T + 1, FUSED_CHUNKS_MAX_T + 1)]  # fused, chunks, sgemm
            for PAR_MIN_BYTES in (1 << 62, 0):
                for call in calls:
                    _par_off_until = 0.0  # a loading call looks like a stall to the back-off
                    call()
        from .attention import warm_up as attention_warm_up
        attention_warm_up()
    finally:
        PAR_MIN_BYTES = saved
        _par_off_until = 0.0  # the first (loading) calls looked like stalls to the back-off
    return time.perf_counter() - t0


# products over stacks of matrices (experts, MLA heads, fused q/k/v): stacks.py
from .stacks import (experts_down_sum, experts_gate_up, has_simd_rows, matvec_gather,  # noqa: E402,F401
                     matvec_offsets, stack_view)
