"""Per-sequence KV cache: one growable buffer set per layer.

Each layer stores named arrays.  Rows arrive position-first ([n, *row_shape]).  By default they
are stored position-first too ([capacity, *row_shape]; DeepSeek MLA keeps its compressed latent
[cap, kv_lora + rope dims] this way).  With heads_first=True a row [n, H, D] is stored as
[H, capacity, D], so each head's keys/values are contiguous [L, D] matrices and attention's
matrix products read them without a copy (llama: k and v as [Hkv, cap, Dh]).
Capacity doubles as the sequence grows, so short requests do not reserve the whole context.
Heads-first buffers (llama-family K/V) may be stored as float16 (kv_dtype=np.float16, like
llama.cpp's default f16 KV cache): decode attention is bound by reading them (layers x 2 x
[Hkv, L, Dh] per token) and float16 halves that (kernels/attention.py reads the fp16 bits
directly; measured 50 -> 28 us per SmolLM2 layer at 512 positions with cold caches). The default
stays float32: fp16 K/V moves logits ~2e-3 relative, beyond the 1e-3 reference-test tolerances.
Position-first buffers are always float32.
"""
from __future__ import annotations

import numpy as np


class SequenceCache:
    def __init__(self, n_layers: int, max_len: int, initial: int = 256, kv_dtype=np.float32):
        self.max_len = max_len
        self.kv_dtype = np.dtype(kv_dtype)  # dtype of heads_first buffers
        self.initial = initial
        self.layers: list[dict[str, np.ndarray]] = [dict() for _ in range(n_layers)]
        self.length = 0  # positions filled in every layer after a full forward
        self.heads_first: set[str] = set()   # names of the [H, cap, D] buffers

    def append(self, layer: int, pos0: int, heads_first: bool = False,
               **rows: np.ndarray) -> dict[str, np.ndarray]:
        """Write rows[name] [n, ...] at positions pos0..pos0+n-1; return views of positions 0..pos0+n-1
        ([L, ...], or [H, L, D] when heads_first)."""
        store = self.layers[layer]
        ax = 1 if heads_first else 0
        if heads_first:
            self.heads_first.update(rows)
        out = {}
        for name, r in rows.items():
            end = pos0 + r.shape[0]
            if end > self.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the context size {self.max_len}")
            buf = store.get(name)
            if buf is None or buf.shape[ax] < end:
                cap = min(max(self.initial, end, 0 if buf is None else 2 * buf.shape[ax]), self.max_len)
                shape = (r.shape[1], cap) + r.shape[2:] if heads_first else (cap,) + r.shape[1:]
                new = np.empty(shape, dtype=self.kv_dtype if heads_first else np.float32)
                if buf is not None:
                    if heads_first:
                        new[:, :pos0] = buf[:, :pos0]
                    else:
                        new[:pos0] = buf[:pos0]
                store[name] = buf = new
            if heads_first:
                buf[:, pos0:end] = r.swapaxes(0, 1)
                out[name] = buf[:, :end]
            else:
                buf[pos0:end] = r
                out[name] = buf[:end]
        return out

    def fork(self, n: int) -> "SequenceCache":
        """A new cache holding a copy of this one's first n positions (a prefix another
        sequence starts from: prefix caching)."""
        n = min(n, self.length)
        out = SequenceCache(len(self.layers), self.max_len, self.initial, self.kv_dtype)
        out.heads_first = set(self.heads_first)
        cap = min(max(self.initial, n), self.max_len)
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
