"""Per-sequence KV cache: one growable buffer set per layer.

Each layer stores named arrays of shape [capacity, *row_shape] (llama: k [cap, Hkv, Dh] and
v [cap, Hkv, Dh]; DeepSeek MLA: the compressed latent [cap, kv_lora + rope dims]).  Capacity
doubles as the sequence grows, so short requests do not reserve the whole context.
"""
from __future__ import annotations

import numpy as np


class SequenceCache:
    def __init__(self, n_layers: int, max_len: int, initial: int = 256):
        self.max_len = max_len
        self.initial = initial
        self.layers: list[dict[str, np.ndarray]] = [dict() for _ in range(n_layers)]
        self.length = 0  # positions filled in every layer after a full forward

    def append(self, layer: int, pos0: int, **rows: np.ndarray) -> dict[str, np.ndarray]:
        """Write rows[name] [n, ...] at positions pos0..pos0+n-1; return views [0:pos0+n]."""
        store = self.layers[layer]
        out = {}
        for name, r in rows.items():
            end = pos0 + r.shape[0]
            if end > self.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the context size {self.max_len}")
            buf = store.get(name)
            if buf is None or buf.shape[0] < end:
                cap = max(self.initial, end, 0 if buf is None else 2 * buf.shape[0])
                new = np.empty((min(cap, self.max_len),) + r.shape[1:], dtype=np.float32)
                if buf is not None:
                    new[:pos0] = buf[:pos0]
                store[name] = buf = new
            buf[pos0:end] = r
            out[name] = buf[:end]
        return out

    def truncate(self, n: int) -> None:
        """Forget positions >= n (used when a prompt shares a prefix with the cached one)."""
        self.length = min(self.length, n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer.values())
