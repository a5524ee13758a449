"""Decode speed by KV cache type (f32 / f16 / bf16 / q8_0, shard/kv_cache.py) at a given context,
one process, like `dsd bench`'s decode loop: the cache is filled with `--context` positions of
random rows (attention cost does not depend on the values; a real prefill of 4K tokens would
take minutes per type), then --tokens greedy single-token steps are timed.

    python bench/kv_types_bench.py [--model PATH] [--context 4096] [--tokens 32] [--types f32,f16,q8_0]
    python bench/kv_types_bench.py --synth-deepseek   # a 4-layer synthetic DeepSeek-V2-Lite (dsd synth)

Also reports the attention kernel alone (one layer's decode over the filled cache, best of 20)
and the cache's bytes.
"""
import argparse
import os
import tempfile
import time

import dsd  # noqa: F401  (before numpy)
import numpy as np


def fill(model, cache, n: int, rng) -> None:
    """n positions of random rows in every layer, shaped as the model's attention appends them."""
    a = model.args
    for i in range(model.n_layers):
        if hasattr(a, "kv_lora_rank"):
            lat = rng.standard_normal((n, a.kv_lora_rank + a.qk_rope), dtype=np.float32) * 0.5
            cache.append(i, 0, mla=lat)
        else:
            k = rng.standard_normal((n, a.n_kv_heads, a.head_dim), dtype=np.float32)
            cache.append(i, 0, heads_first=True, k=k, v=k[::-1].copy())
    cache.length = n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--synth-deepseek", action="store_true")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--types", default="f32,f16,bf16,q8_0")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from dsd.shard.batch import Batch
    from dsd.shard.engine import Engine

    path = args.model
    if args.synth_deepseek:
        import subprocess
        import sys
        path = os.path.join(tempfile.mkdtemp(), "ds.gguf")
        subprocess.run([sys.executable, "-m", "dsd.cli", "synth", "--layers", "4", path], check=True,
                       stdout=subprocess.DEVNULL)
    eng = Engine(path, threads=args.threads)
    m = eng.model
    from dsd.shard.kernels.attention import warm_up
    warm_up(tuple(args.types.split(",")))
    print(f"model {os.path.basename(eng.path)}: {m.n_layers} layers, threads {eng.threads}, "
          f"context {args.context}")
    rng = np.random.default_rng(0)
    for t in args.types.split(","):
        cache = m.new_cache(args.context + args.tokens + 2, kv_type=t)
        fill(m, cache, args.context, rng)
        tok = 1
        m.forward(Batch.single(cache, [tok]))           # first step (compiles nothing new)
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            tok = int(np.argmax(m.forward(Batch.single(cache, [tok]))[-1]))
        dt = time.perf_counter() - t0
        # the attention kernel alone over layer 0's cache
        from dsd.shard.kernels import attention as A
        a = m.args
        if hasattr(a, "kv_lora_rank"):
            H = m.attn[0].H
            kv = cache.append(0, cache.length, mla=np.zeros((1, a.kv_lora_rank + a.qk_rope), np.float32))["mla"]
            k, v = kv[None], kv[None, :, :a.kv_lora_rank]
            q = rng.standard_normal((H, a.kv_lora_rank + a.qk_rope), dtype=np.float32)
        else:
            z = np.zeros((1, a.n_kv_heads, a.head_dim), np.float32)
            kv = cache.append(0, cache.length, heads_first=True, k=z, v=z)
            k, v = kv["k"], kv["v"]
            q = rng.standard_normal((a.n_heads, a.head_dim), dtype=np.float32)
        best = 1e9
        for _ in range(20):
            s = time.perf_counter()
            A.decode(q, k, v, 0.1)
            best = min(best, time.perf_counter() - s)
        print(f"  {t:5s} decode {args.tokens / dt:7.2f} tok/s ({dt / args.tokens * 1e3:7.2f} ms/token)   "
              f"attention, one layer: {best * 1e6:8.1f} us   cache {cache.nbytes / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
