"""Per-sequence KV cache: one growable buffer set per layer, stored as f32, f16, bf16 or q8_0.

Each layer stores named arrays.  Rows arrive position-first ([n, *row_shape], float32).  By
default they are stored position-first too ([capacity, *row_shape]; DeepSeek MLA keeps its
compressed latent [cap, kv_lora + rope dims] this way).  With heads_first=True a row [n, H, D] is
stored as [H, capacity, D], so each head's keys/values are contiguous [L, D] matrices and
attention reads them without a copy (llama: k and v as [Hkv, cap, Dh]).
Capacity doubles as the sequence grows, so short requests do not reserve the whole context.

kv_type (one per cache, both layouts; `--kv-type`, conf `kv_type`):
  f32   float32 (the default: the reference-test tolerances of 1e-3 assume it)
  f16   IEEE half (numpy float16), as llama.cpp's default f16 cache
  bf16  bfloat16 bit patterns stored as uint16 (round to nearest even from float32)
  q8_0  llama.cpp's block_q8_0 along the last (head / latent) axis: per 32 values one fp16 scale
        d = max|x| / 127 followed by 32 int8 codes round(x / d), 34 bytes (the bytes ggml's
        reference quantizer writes), the scale stored beside
        its codes in one int8 buffer ([..., D / 32 * 34]); the row length must be a multiple of 32
append() encodes the new rows on the way in; what it hands back for positions 0..end-1 is a
float32 / float16 ndarray (f32, f16) or a KVRows view of the stored rows (bf16, q8_0), which
kernels/attention.py reads directly (decode: each cached row read once, no float32 copy).
Bytes per cached value: 4, 2, 2, 34/32 (ELEMENT_BYTES).  Decode attention is bound by reading
the cache (layers x 2 x [Hkv, L, Dh] per token), so smaller types are also faster at long
contexts.  Accuracy against f32 on the tiny reference models: tests/test_kv_types.py.

The legacy kv_dtype=np.float16 argument (no kv_type) stores only heads-first buffers as float16
and keeps position-first ones float32, as before.
"""
from __future__ import annotations

import numpy as np

KV_TYPES = ("f32", "f16", "bf16", "q8_0")
QK8_0 = 32            # values per q8_0 block
Q8_0_BYTES = 34       # bytes per q8_0 block: fp16 scale + 32 int8 codes
ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": Q8_0_BYTES / QK8_0}
_STORAGE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "q8_0": np.int8}


def check_kv_type(kv_type: str) -> str:
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type {kv_type!r} is unknown; use one of {', '.join(KV_TYPES)}")
    return kv_type


def row_units(kv_type: str, d: int) -> int:
    """Storage elements of one row of d values."""
    if kv_type == "q8_0":
        if d % QK8_0:
            raise ValueError(f"kv_type q8_0 needs rows whose length is a multiple of {QK8_0} "
                             f"(this model caches rows of {d}); use f16 or bf16")
        return d // QK8_0 * Q8_0_BYTES
    return d


def row_values(kv_type: str, units: int) -> int:
    """Values in a row of `units` storage elements (row_units' inverse)."""
    return units // Q8_0_BYTES * QK8_0 if kv_type == "q8_0" else units


_NUMBA_ROWS_MAX = 1 << 16   # values up to which encode() uses the compiled encoders (same bytes)


def encode(kv_type: str, x: np.ndarray) -> np.ndarray:
    """float rows [..., d] -> their storage [..., row_units(d)] (a new array)."""
    x = np.asarray(x, dtype=np.float32)
    if kv_type == "f32":
        return x.copy()
    if kv_type == "f16":
        return x.astype(np.float16)
    if kv_type == "bf16":
        if x.size <= _NUMBA_ROWS_MAX:   # a decode step's rows: one compiled call (kernels/attention.py)
            from dsd.shard.kernels.kv_encode import encode_bf16
            x = np.ascontiguousarray(x)
            out = np.empty(x.shape, np.uint16)
            encode_bf16(x.reshape(-1).view(np.uint32), out.reshape(-1))
            return out
        u = x.view(np.uint32)
        return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    d = x.shape[-1]
    if x.size <= _NUMBA_ROWS_MAX:
        from dsd.shard.kernels.kv_encode import encode_q8_0
        x2 = np.ascontiguousarray(x).reshape(-1, d)
        out = np.empty((x2.shape[0], row_units("q8_0", d)), np.int8)
        encode_q8_0(x2, out)
        return out.reshape(x.shape[:-1] + (out.shape[1],))
    nb = row_units("q8_0", d) // Q8_0_BYTES
    blk = x.reshape(x.shape[:-1] + (nb, QK8_0))
    # ggml-quants.c quantize_row_q8_0_ref: d = amax / 127, codes roundf(x / d) (half away from
    # zero) with d in float32, then d stored as fp16 (bit for bit what llama.cpp's reference writes)
    d = np.abs(blk).max(axis=-1, keepdims=True) / np.float32(127.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):   # (subnormal d: as ggml)
        inv = np.where(d == 0, np.float32(0.0), np.float32(1.0) / d)
        y = blk * inv
        q = np.sign(y) * np.floor(np.abs(y) + np.float32(0.5))
        out = np.empty(x.shape[:-1] + (nb, Q8_0_BYTES), np.int8)
        out[..., :2] = d.astype(np.float16).view(np.int8)
        out[..., 2:] = q.astype(np.int8)
    return out.reshape(x.shape[:-1] + (nb * Q8_0_BYTES,))


def decode(kv_type: str, raw: np.ndarray) -> np.ndarray:
    """Storage [..., units] -> float32 values [..., d] (a new array)."""
    if kv_type in ("f32", "f16"):
        return np.asarray(raw, dtype=np.float32).copy()
    if kv_type == "bf16":
        return (np.asarray(raw, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    raw = np.ascontiguousarray(raw)
    nb = raw.shape[-1] // Q8_0_BYTES
    blk = raw.reshape(raw.shape[:-1] + (nb, Q8_0_BYTES))
    d = np.ascontiguousarray(blk[..., :2]).view(np.float16).astype(np.float32)   # [..., nb, 1]
    return (blk[..., 2:].astype(np.float32) * d).reshape(raw.shape[:-1] + (nb * QK8_0,))


class KVRows:
    """Read-only view of rows of a bf16 or q8_0 cache: `raw` is the stored array (uint16, or int8
    blocks) whose last axis holds the encoded rows; shape is the logical [..., d].  Indexing
    slices the leading axes freely and the last one at block boundaries (MLA's V is the first
    kv_lora columns of the latent K); astype(np.float32) / np.asarray dequantize."""
    __slots__ = ("raw", "kv_type")

    def __init__(self, raw: np.ndarray, kv_type: str):
        self.raw, self.kv_type = raw, kv_type

    @property
    def shape(self) -> tuple:
        return self.raw.shape[:-1] + (row_values(self.kv_type, self.raw.shape[-1]),)

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, key) -> "KVRows":
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            raise TypeError("KVRows: no Ellipsis indexing")
        used = [i for i, k in enumerate(key) if k is not None]
        if len(used) > self.ndim:
            raise IndexError("KVRows: too many indices")
        if len(used) == self.ndim:   # the row axis is indexed: translate values -> storage
            i = used[-1]
            sl = key[i]
            if not isinstance(sl, slice):
                raise TypeError("KVRows: the row axis can only be sliced")
            a, b, st = sl.indices(self.shape[-1])
            unit = QK8_0 if self.kv_type == "q8_0" else 1
            if st != 1 or a % unit or b % unit:
                raise ValueError(f"KVRows {self.kv_type}: row slices must be contiguous and on "
                                 f"{unit}-value block boundaries, got {a}:{b}:{st}")
            per = Q8_0_BYTES if self.kv_type == "q8_0" else 1
            key = key[:i] + (slice(a // unit * per, b // unit * per),) + key[i + 1:]
        return KVRows(self.raw[key], self.kv_type)

    def dequantize(self) -> np.ndarray:
        return decode(self.kv_type, self.raw)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return self.dequantize().astype(dtype, copy=False)

    def __array__(self, dtype=None, copy=None):
        a = self.dequantize()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"KVRows({self.kv_type}, shape={self.shape})"


class SequenceCache:
    def __init__(self, n_layers: int, max_len: int, initial: int = 256, kv_dtype=np.float32,
                 kv_type: str | None = None):
        self.max_len = max_len
        self.initial = initial
        self.layers: list[dict[str, np.ndarray]] = [dict() for _ in range(n_layers)]
        self.length = 0  # positions filled in every layer after a full forward
        self.heads_first: set[str] = set()   # names of the [H, cap, D] buffers
        if kv_type is None:   # legacy: kv_dtype for heads-first buffers, float32 position-first
            self.kv_type = "f16" if np.dtype(kv_dtype) == np.float16 else "f32"
            self._pos_type = "f32"
        else:
            self.kv_type = self._pos_type = check_kv_type(kv_type)
            if kv_type in ("bf16", "q8_0"):
                from dsd.shard.kernels.attention import warm_up_kv_type
                warm_up_kv_type(kv_type)   # once per process: load/compile its decode kernels
        self.kv_dtype = np.dtype(_STORAGE[self.kv_type])  # storage dtype of heads_first buffers

    def _type_of(self, heads_first: bool) -> str:
        return self.kv_type if heads_first else self._pos_type

    def append(self, layer: int, pos0: int, heads_first: bool = False,
               **rows: np.ndarray) -> dict:
        """Write rows[name] [n, ...] at positions pos0..pos0+n-1; return views of positions
        0..pos0+n-1 ([L, ...], or [H, L, D] when heads_first): ndarrays for f32 / f16, KVRows
        for bf16 / q8_0."""
        store = self.layers[layer]
        ax = 1 if heads_first else 0
        t = self._type_of(heads_first)
        if heads_first:
            self.heads_first.update(rows)
        out = {}
        for name, r in rows.items():
            end = pos0 + r.shape[0]
            if end > self.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the context size {self.max_len}")
            units = row_units(t, r.shape[-1])
            buf = store.get(name)
            if buf is None or buf.shape[ax] < end:
                cap = min(max(self.initial, end, 0 if buf is None else 2 * buf.shape[ax]), self.max_len)
                shape = (r.shape[1], cap) + r.shape[2:] if heads_first else (cap,) + r.shape[1:]
                new = np.empty(shape[:-1] + (units,), dtype=_STORAGE[t])
                if buf is not None:
                    if heads_first:
                        new[:, :pos0] = buf[:, :pos0]
                    else:
                        new[:pos0] = buf[:pos0]
                store[name] = buf = new
            enc = r if t in ("f32", "f16") else encode(t, r)   # f32/f16: numpy casts on assignment
            if heads_first:
                buf[:, pos0:end] = enc.swapaxes(0, 1)
                view = buf[:, :end]
            else:
                buf[pos0:end] = enc
                view = buf[:end]
            out[name] = view if t in ("f32", "f16") else KVRows(view, t)
        return out

    def fork(self, n: int, cap: int | None = None) -> "SequenceCache":
        """A new cache holding a copy of this one's first n positions (a prefix another
        sequence starts from: prefix caching); same kv_type, stored rows copied as they are.
        cap: positions to allocate (default as for a new cache; n makes an exact-size copy)."""
        n = min(n, self.length)
        out = SequenceCache.__new__(SequenceCache)
        out.max_len, out.kv_type, out._pos_type = self.max_len, self.kv_type, self._pos_type
        out.initial = self.initial if cap is None else int(cap)
        out.kv_dtype = self.kv_dtype
        out.layers = [dict() for _ in self.layers]
        out.heads_first = set(self.heads_first)
        cap = min(max(out.initial, n), self.max_len)
        for src, dst in zip(self.layers, out.layers):
            for name, buf in src.items():
                if name in self.heads_first:
                    new = np.empty((buf.shape[0], cap) + buf.shape[2:], dtype=buf.dtype)
                    new[:, :n] = buf[:, :n]
                else:
                    new = np.empty((cap,) + buf.shape[1:], dtype=buf.dtype)
                    new[:n] = buf[:n]
                dst[name] = new
        out.length = n
        return out

    def truncate(self, n: int) -> None:
        """Forget positions >= n (used when a prompt shares a prefix with the cached one)."""
        self.length = min(self.length, n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer.values())
