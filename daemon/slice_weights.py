"""A worker's weight source: only its pieces of the model, in one node-local buffer.

`SliceWeights` offers the interface of dsd.shard.weights.GGUFWeights (has / vector / linear /
experts), so the normal model constructors build over it unchanged.  Tensors the worker does not
hold come back as inert placeholders of the right shape whose bytes are a zero-stride view of one
zero row (no memory): the model objects of other workers' layers exist but are never called.

Loading reads only the worker's byte ranges, READERS pieces at a time (preadv drops the GIL;
NVMe drives need several reads in flight to reach their bandwidth, and the copy out of the page
cache runs on more than one core), from the file (numa.load_file_range into a buffer
from numa.allocate on the worker's node).  One exception: column slices (a row share of
ffn_down_exps [E, D, F], of a 2-D down projection [D, F], the columns of a worker's heads in
attn_output, the gate / up expert bias columns [E, F] of a worker's rows) are strided in the
file; each matrix is read into a scratch buffer and the worker's columns copied out (the page cache sees every byte of it anyway, since a share of one row is
smaller than a page).
"""
from __future__ import annotations

import numpy as np

from dsd.errors import UnsupportedModelError
from dsd.shard import kernels
from dsd.shard.weights import ExpertStack, Linear

ALIGN = 64
READERS = 4


def _zero_view(shape: tuple[int, ...], row_bytes: int) -> np.ndarray:
    z = np.zeros((1,) * (len(shape) - 1) + (row_bytes,), dtype=np.uint8)
    return np.broadcast_to(z, tuple(shape[:-1]) + (row_bytes,))


def _piece_layout(t, p) -> tuple[tuple[int, ...], int, int]:
    """(raw shape held, cols, nbytes) of piece p of tensor t."""
    qt = kernels.quant_type(t.ggml_type)
    rb = t.row_bytes
    if p.mode == "whole":
        return tuple(t.shape[:-1]) + (rb,), t.shape[-1], t.nbytes
    if p.mode == "experts":
        shape = (p.b - p.a,) + tuple(t.shape[1:-1]) + (rb,)
        return shape, t.shape[-1], int(np.prod(shape))
    if p.mode == "cols" or (len(t.shape) == 2 and "down" in t.name):
        # columns a:b of a 2-D [rows, cols] matrix (a shared expert's or dense FFN's down
        # projection: rows of F; attn_output: the columns of a worker's heads)
        shape = (t.shape[0], (p.b - p.a) // qt.block_size * qt.type_size)
        return shape, p.b - p.a, int(np.prod(shape))
    if len(t.shape) == 2:       # rows a:b (gate/up [F, D], q, output [V, D])
        return (p.b - p.a, rb), t.shape[-1], (p.b - p.a) * rb
    if "down_exps" in t.name:   # [E, D, F]: columns a:b of F
        cb = (p.b - p.a) // qt.block_size * qt.type_size
        shape = (t.shape[0], t.shape[1], cb)
        return shape, p.b - p.a, int(np.prod(shape))
    shape = (t.shape[0], p.b - p.a, rb)  # gate/up [E, F, D]: rows a:b of F
    return shape, t.shape[-1], int(np.prod(shape))


class _Absent(Linear):
    """Placeholder for a matrix another worker holds: right shape, no bytes, never multiplied."""

    __slots__ = ()

    def __call__(self, x):
        raise RuntimeError(f"{self.name} is held by another worker; the placement program is wrong")

    def dequantize(self) -> np.ndarray:  # constructors may precompute from it (MLA kv_b)
        return np.broadcast_to(np.zeros(1, dtype=np.float32), (self.rows, self.cols))

    def row_slice(self, r0: int, r1: int) -> "Linear":
        return _Absent(self.raw[r0:r1], self.ggml_type, self.cols, self.name)


class SliceWeights:
    def __init__(self, gguf_model, pieces: list, node: int = 0, pages: str = "auto",
                 progress=None, allocate=True, readers: int = READERS):
        """progress: optional callable(done_bytes, total_bytes, phase) with phase "allocating"
        (pages being pre-faulted) then "loading" (bytes read from the file); called from this
        thread only."""
        self.model = gguf_model
        self.pieces = {p.name: p for p in pieces}
        self.arrays: dict[str, tuple[np.ndarray, int]] = {}
        layouts = {}
        total = 0
        for p in pieces:
            t = gguf_model.tensors[p.name]
            shape, cols, nbytes = _piece_layout(t, p)
            layouts[p.name] = (shape, cols, nbytes, total)
            total += (nbytes + ALIGN - 1) // ALIGN * ALIGN
        self.nbytes = total
        self.buffer = None
        if not allocate or total == 0:
            return
        from dsd.numa import allocate as numa_allocate

        self.buffer = numa_allocate(max(total, 4096), node, pages=pages,
                                    progress=(lambda d, n: progress(d, n, "allocating")) if progress else None)
        from concurrent.futures import ThreadPoolExecutor, as_completed

        def load(p):
            shape, cols, nbytes, off = layouts[p.name]
            self._load(gguf_model.tensors[p.name], p, off, nbytes)
            return p, shape, cols, off, nbytes

        done, data = 0, sum(lay[2] for lay in layouts.values())
        with ThreadPoolExecutor(max(1, readers), thread_name_prefix="dsd-read") as pool:
            # biggest first, so the last reads in flight are short ones
            futures = [pool.submit(load, p) for p in sorted(pieces, key=lambda p: -layouts[p.name][2])]
            try:
                for f in as_completed(futures):
                    p, shape, cols, off, nbytes = f.result()
                    self.arrays[p.name] = (self.buffer.array("uint8", shape, off), cols)
                    done += nbytes
                    if progress:
                        progress(done, data, "loading")
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _load(self, t, p, off: int, nbytes: int) -> None:
        from dsd.numa import load_file_range

        if p.mode == "whole":
            load_file_range(t.file, t.offset, nbytes, self.buffer, off)
            return
        E = t.shape[0]
        per = t.nbytes // E
        if p.mode == "experts":  # experts a:b of [E, ...] (an expert bias [E, F]: its rows a:b)
            load_file_range(t.file, t.offset + p.a * per, nbytes, self.buffer, off)
            return
        if len(t.shape) == 2:  # a row or column share of a 2-D matrix
            rb = t.row_bytes
            if p.mode != "cols" and "down" not in t.name:
                load_file_range(t.file, t.offset + p.a * rb, nbytes, self.buffer, off)
                return
            qt = kernels.quant_type(t.ggml_type)
            b0, b1 = (x // qt.block_size * qt.type_size for x in (p.a, p.b))
            scratch = np.empty(t.nbytes, dtype=np.uint8)
            load_file_range(t.file, t.offset, t.nbytes, scratch)
            self.buffer.array("uint8", (t.shape[0], b1 - b0), off)[:] = scratch.reshape(t.shape[0], rb)[:, b0:b1]
            return
        rb = t.row_bytes
        if "down_exps" not in t.name:
            share = (p.b - p.a) * rb
            for e in range(E):
                load_file_range(t.file, t.offset + e * per + p.a * rb, share, self.buffer,
                                off + e * share)
            return
        qt = kernels.quant_type(t.ggml_type)
        b0 = p.a // qt.block_size * qt.type_size
        b1 = p.b // qt.block_size * qt.type_size
        D = t.shape[1]
        scratch = np.empty(per, dtype=np.uint8)
        dest = self.buffer.array("uint8", (E, D, b1 - b0), off)
        for e in range(E):
            load_file_range(t.file, t.offset + e * per, per, scratch)
            dest[e] = scratch.reshape(D, rb)[:, b0:b1]

    # -- the GGUFWeights interface ---------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def _info(self, name: str):
        try:
            return self.model.tensors[name]
        except KeyError:
            raise UnsupportedModelError(f"{self.model.path}: tensor {name!r} is missing") from None

    def holds(self, name: str) -> bool:
        return name in self.arrays

    def vector(self, name: str) -> np.ndarray:
        """The tensor as float32; for a piece that is a share (an expert bias [E, F] split by
        experts or columns: gpt-oss) the share only, [b - a, F] or [E, b - a]; zeros of the full
        shape for a tensor another worker holds (`holds` tells them apart)."""
        t = self._info(name)
        if name not in self.arrays:
            return np.zeros(t.shape, dtype=np.float32)
        raw, cols = self.arrays[name]
        p = self.pieces[name]
        if p.mode == "whole":
            return kernels.dequantize(raw.reshape(1, -1), t.ggml_type, t.n_elements).reshape(t.shape)
        rows = raw.reshape(-1, raw.shape[-1])
        return kernels.dequantize(rows, t.ggml_type, cols).reshape(tuple(raw.shape[:-1]) + (cols,))

    def linear(self, name: str) -> Linear:
        t = self._info(name)
        if len(t.shape) != 2:
            raise UnsupportedModelError(f"{self.model.path}: {name} has shape {t.shape}, expected 2-D")
        if name in self.arrays:
            raw, cols = self.arrays[name]
            return Linear(raw, t.ggml_type, cols, name)
        return _Absent(_zero_view(t.shape, t.row_bytes), t.ggml_type, t.shape[1], name)

    def experts(self, name: str) -> ExpertStack:
        t = self._info(name)
        if len(t.shape) != 3:
            raise UnsupportedModelError(f"{self.model.path}: {name} has shape {t.shape}, expected 3-D")
        p = self.pieces.get(name)
        if p is None:
            return ExpertStack(_zero_view(t.shape, t.row_bytes), t.ggml_type, t.shape[2], name)
        raw, cols = self.arrays[name]
        ids = list(range(p.a, p.b)) if p.mode == "experts" else None
        return ExpertStack(raw, t.ggml_type, cols, name, expert_ids=ids)

    def placement(self):
        return None if self.buffer is None else self.buffer.placement()

    def free(self) -> None:
        if self.buffer is not None:
            self.arrays.clear()
            self.buffer.free()
