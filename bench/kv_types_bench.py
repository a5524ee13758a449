"""Decode speed by KV cache type (f32 / f16 / bf16 / q8_0, shard/kv_cache.py) at given context
depths, one process, like `dsd bench`'s decode loop: the cache is filled with `depth` positions
of random rows (attention cost does not depend on the values; a real prefill of 16K tokens would
take many minutes per type), then --tokens greedy single-token steps are timed.

    python bench/kv_types_bench.py [--model PATH] [--depths 0,4096] [--tokens 32] [--types f32,f16,q8_0]
    python bench/kv_types_bench.py --synth-deepseek   # a 4-layer synthetic DeepSeek-V2-Lite (dsd synth)
    python bench/kv_types_bench.py --synth-deepseek --depths 0,4096,16384 --types f16,q8_0 \
        --against ~/.cache/dsd-yardsticks/llama.cpp/llama-bench

--against (repeatable): the same file, threads and token count through that llama-bench with
the same cache type for K and V (`-ctk T -ctv T -fa 1`, decode after `-d depth`, or `-gp
depth,N` on ik_llama.cpp, which also gets its MoE/MLA flags), `--repeat` repetitions (one is
enough at 16K); prints the dsd / yardstick ratio.  Also reports the attention kernel alone (one
layer's decode over the filled cache, best of 20) and the cache's bytes.
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
    ap.add_argument("--context", type=int, default=None, help="one depth (same as --depths N)")
    ap.add_argument("--depths", default="4096", help="comma-separated context depths (default 4096)")
    ap.add_argument("--against", action="append", default=[], metavar="LLAMA_BENCH")
    ap.add_argument("--repeat", type=int, default=2, help="llama-bench repetitions (-r)")
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
    depths = [args.context] if args.context is not None else [int(d) for d in args.depths.split(",")]
    types = args.types.split(",")
    yards = []
    if args.against:
        from dsd.shard.yardstick import Yardstick, gguf_architecture, sidecar_commit
        arch = gguf_architecture(eng.path)
        yards = [Yardstick(b) for b in args.against]
    print(f"model {os.path.basename(eng.path)}: {m.n_layers} layers, threads {eng.threads}, "
          f"depths {depths}, {args.tokens} tokens")
    rng = np.random.default_rng(0)
    for t in types:   # warm-up: every kernel the timed steps use is compiled or loaded, weights touched
        cache = m.new_cache(4 * args.tokens + 2, kv_type=t)
        tok = 1
        for _ in range(4 * args.tokens):
            tok = int(np.argmax(m.forward(Batch.single(cache, [tok]))[-1]))
    rows = []
    for depth in depths:
        for t in types:
            cache = m.new_cache(depth + args.tokens + 2, kv_type=t)
            if depth:
                fill(m, cache, depth, rng)
            tok = 1
            m.forward(Batch.single(cache, [tok]))           # first step (compiles nothing new)
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                tok = int(np.argmax(m.forward(Batch.single(cache, [tok]))[-1]))
            dt = time.perf_counter() - t0
            line = (f"  depth {depth:6d}  {t:5s} decode {args.tokens / dt:7.2f} tok/s "
                    f"({dt / args.tokens * 1e3:7.2f} ms/token)   attention, one layer: "
                    f"{attention_alone(m, cache, rng) * 1e6:8.1f} us   cache {cache.nbytes / 2**20:8.1f} MiB")
            row = {"depth": depth, "kv_type": t, "dsd": args.tokens / dt}
            for y in yards:
                tg = yard_decode(y, eng.path, arch, eng.threads, depth, args.tokens, t, args.repeat)
                commit = str(tg.get("build_commit") or "unknown")
                name = f"{y.kind}@{sidecar_commit(y.binary) or commit if commit == 'unknown' else commit}"
                row[name] = float(tg["avg_ts"])
                line += f"\n      {name}: {tg['avg_ts']:7.2f} tok/s -> dsd {row['dsd'] / tg['avg_ts']:.2f}x"
            print(line, flush=True)
            rows.append(row)
            del cache
    if yards:
        print("| depth | KV type | dsd | " + " | ".join(k for k in rows[0] if k not in ("depth", "kv_type", "dsd")) + " |")
        for r in rows:
            others = [(k, v) for k, v in r.items() if k not in ("depth", "kv_type", "dsd")]
            print(f"| {r['depth']} | {r['kv_type']} | {r['dsd']:.2f} | "
                  + " | ".join(f"{v:.2f} ({r['dsd'] / v:.2f}x)" for _, v in others) + " |")


def attention_alone(m, cache, rng) -> float:
    """Best of 20: the attention kernel alone over layer 0's cache (s)."""
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
    return best


def yard_decode(y, model: str, arch: str, threads: int, depth: int, n: int, kv_type: str, repeat: int) -> dict:
    """llama-bench's decode test at this depth with K and V cached as kv_type (flash attention on:
    llama.cpp quantizes V only with it)."""
    flags = y.engine_flags(arch)
    argv = [y.binary, "-m", model, "-t", str(threads), "-r", str(repeat), "-o", "json", *flags,
            "-ctk", kv_type, "-ctv", kv_type]
    if "-fa" not in flags:
        argv += ["-fa", "1"]
    if depth and y.depth_method == "-d":
        argv += ["-p", "0", "-n", str(n), "-d", str(depth)]
    elif depth and y.depth_method == "-gp":
        argv += ["-p", "0", "-n", "0", "-gp", f"{depth},{n}"]
    elif depth:
        raise SystemExit(f"{y.binary} has neither -d nor -gp: it cannot decode at depth {depth}")
    else:
        argv += ["-p", "0", "-n", str(n)]
    return y._pick(y._bench(argv), n, argv)


if __name__ == "__main__":
    main()
