"""In-process decode step time at batch 1 and batch B (continuous-batching decode without the
daemon), optionally with the time per kernel call site.  What bounds the daemon's
"B streams vs one stream" ratio, measured without any process hand-overs.

    python bench/batch_step.py /tmp/dsd-bench-synth-L4.gguf --batch 8 [--profile] [--threads 2]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import dsd  # noqa: F401  (before numpy: sets OPENBLAS_THREAD_TIMEOUT, see dsd/__init__.py)
import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="time every kernel call by (entry, shape, type)")
    args = ap.parse_args()

    from dsd.shard import kernels
    from dsd.shard.batch import Batch
    from dsd.shard.engine import Engine

    model = Engine(args.model, threads=args.threads).model
    caches = [model.new_cache(64 + 4 * args.steps) for _ in range(args.batch)]
    for i, c in enumerate(caches):  # distinct 11-token prompts, as bench/daemon_bench.py sends
        b = Batch.single(c, [1] + list(range(200 + 7 * i, 210 + 7 * i)))
        model.forward(b)
        b.finish()
    calls = collections.defaultdict(lambda: [0, 0.0])
    if args.profile:
        for name in ("matvec", "matmul", "matvec_gather"):
            fn = getattr(kernels, name)

            def timed(raw, gt, *a, _fn=fn, _name=name, **k):
                t = time.perf_counter()
                r = _fn(raw, gt, *a, **k)
                v = calls[(_name, raw.shape, gt)]
                v[0] += 1
                v[1] += time.perf_counter() - t
                return r
            setattr(kernels, name, timed)  # the weights module calls kernels.<name> at call time

    # each sequence decodes its own greedy continuation: feeding one fixed token to all of them
    # (as this script did before session 5) makes their routing alike, so a batch chose fewer
    # distinct experts than real streams do and the batch looked ~1.4x cheaper than it is
    last = [300] * len(caches)

    def step(cs):
        b = Batch.decode(cs, np.asarray(last[:len(cs)]))
        logits = model.forward(b)
        b.finish()
        last[:len(cs)] = np.argmax(logits, axis=-1).tolist()

    res = {}
    for cs in (caches[:1], caches):
        for _ in range(2):
            step(cs)
        calls.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(cs)
        dt = (time.perf_counter() - t0) / args.steps
        res[len(cs)] = dt
        print(f"batch {len(cs)}: {dt * 1e3:.1f} ms/step, {len(cs) / dt:.1f} tok/s")
        for (name, shape, gt), (n, t) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:8]:
            print(f"    {name:14s} {str(shape):18s} type {gt:<3d} {n / args.steps:5.1f} calls "
                  f"{t / args.steps * 1e3:6.2f} ms per step")
    if args.batch > 1:
        print(f"batch {args.batch} aggregate = {args.batch * res[1] / res[args.batch]:.2f}x batch 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
