"""Daemon benchmarks: --nodes 1 vs --nodes 2 decode, coordinator<->worker hop latency, and the
aggregate decode speed of concurrent streams.  Ratios measured in one run (the machine is noisy).

    python bench/daemon_bench.py                          # synthetic DeepSeek-shaped model
    python bench/daemon_bench.py --model X.gguf --streams 8 --tokens 48

Without --model a synthetic model is written once with `dsd synth` (--synth-layers, default 4,
V2-Lite widths) to /tmp/dsd-bench-synth-L<layers>.gguf.  Each configuration starts its own
daemon on a private socket directory and stops it afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid


def dsd(args, env, timeout=1800):
    p = subprocess.run([sys.executable, "-m", "dsd.cli", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"dsd {' '.join(args)} failed:\n{p.stderr}")
    return p


def single_stream(c, prompt, n) -> float:
    t_first = t_last = None
    got = 0
    for ch in c.generate(prompt, stream=True, temperature=0, max_tokens=n, ignore_eos=True):
        now = time.perf_counter()
        got += len(ch.token_ids or [])
        if t_first is None:
            t_first, first_n = now, got
        t_last = now
    return (got - first_n) / (t_last - t_first)


def concurrent(sock_dir, prompts, n) -> float:
    from dsd.client import AsyncClient

    async def go():
        ac = AsyncClient(socket_dir=sock_dir)
        firsts, counts = [], []

        async def one(p):
            k = 0
            async for ch in ac.generate(p, stream=True, temperature=0, max_tokens=n, ignore_eos=True):
                if k == 0:
                    firsts.append(time.perf_counter())
                k += len(ch.token_ids or [])
            counts.append(k)

        t0 = time.perf_counter()
        await asyncio.gather(*[one(p) for p in prompts])
        t_end = time.perf_counter()
        # tokens after each stream's first one, over the time from the first first-token to the
        # end (streams join one prefill per step, so this slightly favours one stream)
        return (sum(counts) - len(prompts)) / (t_end - min(firsts)) if firsts else 0.0 + 0 * t0

    return asyncio.run(go())


def run_config(model, nodes, placement, args, tmp) -> dict:
    from dsd.client import Client

    inst = "bench" + uuid.uuid4().hex[:6]
    sock = os.path.join(tmp, inst)
    env = dict(os.environ, DSD_SOCKET_DIR=sock, DSD_INSTANCE=inst,
               DSD_LOG_FILE=os.path.join(tmp, inst + ".log"))
    t0 = time.perf_counter()
    dsd(["start", "--model", model, "--nodes", str(nodes), "--placement", placement,
         "--max-batch", str(max(8, args.streams))], env)
    load_s = time.perf_counter() - t0
    try:
        c = Client(socket_dir=sock, timeout=120)
        prompt = [1] + list(range(100, 116))
        c.generate(prompt, temperature=0, max_tokens=4, ignore_eos=True)   # warm up
        single = statistics.median(single_stream(c, prompt, args.tokens) for _ in range(args.repeats))
        hops = c._call({"type": "hops", "n": args.hops})["ns"]
        hop_us = [statistics.median(h) / 1000 for h in hops]
        prompts = [[1] + list(range(200 + 7 * i, 210 + 7 * i)) for i in range(args.streams)]
        agg = concurrent(sock, prompts, args.tokens) if args.streams > 1 else None
        st = c.status()
        return {"nodes": nodes, "placement": st["placement"], "start_s": round(load_s, 1),
                "decode_tok_s": round(single, 2), "hop_us_median": [round(h, 1) for h in hop_us],
                "streams": args.streams, "aggregate_tok_s": round(agg, 2) if agg else None,
                "max_decode_batch": st["scheduler"]["max_decode_batch"]}
    finally:
        dsd(["stop"], env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--synth-layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--hops", type=int, default=2000)
    ap.add_argument("--configs", default="1:auto,2:rows,2:experts",
                    help="comma-separated NODES:PLACEMENT list")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = f"/tmp/dsd-bench-synth-L{args.synth_layers}.gguf"
        if not os.path.exists(model):
            print(f"writing {model} ...", file=sys.stderr)
            dsd(["synth", model, "--layers", str(args.synth_layers)], dict(os.environ))
    results = []
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        for cfg in args.configs.split(","):
            n, pl = cfg.split(":")
            r = run_config(model, int(n), pl, args, tmp)
            results.append(r)
            print(json.dumps(r) if args.json else
                  f"nodes {r['nodes']} {r['placement']:8s} decode {r['decode_tok_s']:7.2f} tok/s | "
                  f"hop median {r['hop_us_median']} us | {r['streams']} streams "
                  f"{r['aggregate_tok_s']} tok/s (max batch {r['max_decode_batch']}) | start {r['start_s']}s",
                  flush=True)
    base = results[0]
    for r in results[1:]:
        print(f"nodes {r['nodes']} {r['placement']}: decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x "
              f"of nodes {base['nodes']}")
    for r in results:
        if r["aggregate_tok_s"]:
            print(f"nodes {r['nodes']} {r['placement']}: {r['streams']} streams "
                  f"{r['aggregate_tok_s'] / r['decode_tok_s']:.2f}x one stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
