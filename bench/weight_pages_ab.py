"""Same-process A/B: decode speed with the weights read from the GGUF file's mapping (4 KiB
page-cache pages, the single-process default) vs copied into anonymous memory with transparent
huge pages, 4 KiB pages or 2 MiB hugetlb pages (numa.allocate, as a daemon worker does), in
GGUF's own block layout.  Answers whether the daemon's faster decode comes from the pages or
from the copy.  Interleaved rounds; medians.

    python bench/weight_pages_ab.py [--model F] [--rounds 3] [--tokens 32] [--pages mmap,thp,4k,2m]
"""
from __future__ import annotations

import argparse
import time

import dsd  # noqa: F401  (sets the OpenBLAS spin policy before numpy loads)
import numpy as np


def copied_weights(gguf, pages: str):
    """A GGUFWeights whose tensor bytes live in one numa.allocate buffer of `pages`."""
    from dsd.numa import allocate
    from dsd.shard.weights import GGUFWeights

    infos = list(gguf.tensors.values())
    sizes = [(i.nbytes + 63) // 64 * 64 for i in infos]
    buf = allocate(sum(sizes), 0, pages=pages)
    arena = buf.array(np.uint8, (sum(sizes),))
    off = 0
    copies = {}
    for info, n in zip(infos, sizes):
        src = info.raw()
        dst = arena[off:off + src.nbytes].reshape(src.shape)
        dst[...] = src
        copies[info.name] = dst
        off += n
    class CopiedWeights(GGUFWeights):
        def _info(self, name):  # the tensor's info, whose raw() returns its copy
            return _CopiedInfo(super()._info(name), copies[name])

    return CopiedWeights(gguf), buf


class _CopiedInfo:
    def __init__(self, info, copy):
        self._info, self._copy = info, copy

    def raw(self):
        return self._copy

    def __getattr__(self, k):
        return getattr(self._info, k)


def decode_ms(model, tokens: int, prompt: list[int]) -> float:
    from dsd.shard.batch import Batch

    cache = model.new_cache(len(prompt) + tokens + 2)
    model.forward(Batch.single(cache, prompt))
    tok = prompt[-1]
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(np.argmax(model.forward(Batch.single(cache, [tok]))[-1]))
    return 1000 * (time.perf_counter() - t0) / tokens


def main() -> int:
    from dsd.shard.bench import synthetic_prompt
    from dsd.shard.engine import set_threads
    from dsd.shard.gguf_file import open_gguf
    from dsd.shard.model_path import resolve_model
    from dsd.shard.models import build_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pages", default="mmap,thp,4k")
    args = ap.parse_args()
    set_threads(None)
    path = resolve_model(args.model)
    models, keep = {}, []
    for kind in args.pages.split(","):
        g = open_gguf(path)
        if kind == "mmap":
            g.prefault()
            models[kind] = build_model(g)
        else:
            w, buf = copied_weights(g, kind)
            keep.append(buf)
            models[kind] = build_model(g, weights=w)
    prompt = synthetic_prompt(next(iter(models.values())).args.vocab_size, 64)
    for m in models.values():
        decode_ms(m, 2, prompt)  # warm-up
    res = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            res[k].append(decode_ms(m, args.tokens, prompt))
    base = float(np.median(res["mmap"])) if "mmap" in res else None
    for k, v in res.items():
        med = float(np.median(v))
        extra = f"  {base / med:.3f}x the mmap" if base else ""
        print(f"{k:5s} decode {med:7.2f} ms/token ({1000 / med:6.1f} tok/s)  rounds {['%.1f' % x for x in v]}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
