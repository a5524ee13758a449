"""Daemon benchmarks: --nodes 1 vs --nodes 2 decode, coordinator<->worker hop latency, and the
aggregate decode speed of concurrent streams.  Ratios measured in one run (the machine is noisy).

    python bench/daemon_bench.py                          # synthetic DeepSeek-shaped model
    python bench/daemon_bench.py --model X.gguf --streams 8 --tokens 48 --rounds 3

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


def concurrent(sock_dir, prompts, n) -> tuple[float, float]:
    """-> (end-to-end, steady) aggregate decode tok/s of len(prompts) streams started together.
    end-to-end: tokens after each stream's first one, over the time from the first first-token
    to the end (it includes the later streams' prefills, so it favours one stream); steady: the
    tokens that arrive while every stream is decoding (from the last first-token to the first
    stream's last token) over that window: the decode speed of a full batch."""
    from dsd.client import AsyncClient

    async def go():
        ac = AsyncClient(socket_dir=sock_dir)
        stamps = []

        async def one(p):
            ts = []
            async for ch in ac.generate(p, stream=True, temperature=0, max_tokens=n, ignore_eos=True):
                ts.extend([time.perf_counter()] * len(ch.token_ids or []))
            stamps.append(ts)

        await asyncio.gather(*[one(p) for p in prompts])
        return stamps

    stamps = [ts for ts in asyncio.run(go()) if ts]
    if not stamps:
        return 0.0, 0.0
    t0, t_end = min(ts[0] for ts in stamps), max(ts[-1] for ts in stamps)
    e2e = (sum(len(ts) for ts in stamps) - len(stamps)) / (t_end - t0)
    a, b = max(ts[0] for ts in stamps), min(ts[-1] for ts in stamps)
    steady = sum(sum(1 for t in ts if a < t <= b) for ts in stamps) / (b - a) if b > a else 0.0
    return e2e, steady


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
        e2e, steady = concurrent(sock, prompts, args.tokens) if args.streams > 1 else (None, None)
        st = c.status()
        return {"nodes": nodes, "placement": st["placement"], "start_s": round(load_s, 1),
                "decode_tok_s": round(single, 2), "hop_us_median": [round(h, 1) for h in hop_us],
                "streams": args.streams, "aggregate_tok_s": round(e2e, 2) if e2e else None,
                "steady_tok_s": round(steady, 2) if steady else None,
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
    ap.add_argument("--rounds", type=int, default=1, help="repeat every config this many times, interleaved")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = f"/tmp/dsd-bench-synth-L{args.synth_layers}.gguf"
        if not os.path.exists(model):
            print(f"writing {model} ...", file=sys.stderr)
            dsd(["synth", model, "--layers", str(args.synth_layers)], dict(os.environ))
    configs = [(int(n), pl) for n, pl in (c.split(":") for c in args.configs.split(","))]
    runs: dict = {cfg: [] for cfg in configs}
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        for rnd in range(args.rounds):  # interleaved: a noisy minute hits every config alike
            for cfg in configs:
                r = run_config(model, cfg[0], cfg[1], args, tmp)
                r["round"] = rnd
                runs[cfg].append(r)
                print(json.dumps(r) if args.json else
                      f"round {rnd} nodes {r['nodes']} {r['placement']:8s} decode {r['decode_tok_s']:7.2f} tok/s | "
                      f"hop median {r['hop_us_median']} us | {r['streams']} streams {r['aggregate_tok_s']} "
                      f"tok/s end-to-end, {r['steady_tok_s']} steady (max batch {r['max_decode_batch']}) | "
                      f"start {r['start_s']}s", flush=True)

    def med(cfg, key):
        vals = [r[key] for r in runs[cfg] if r[key]]
        return statistics.median(vals) if vals else None

    base = configs[0]
    print(f"medians over {args.rounds} round(s):")
    for cfg in configs:
        one, e2e, steady = med(cfg, "decode_tok_s"), med(cfg, "aggregate_tok_s"), med(cfg, "steady_tok_s")
        line = f"  nodes {cfg[0]} {cfg[1]:8s} decode {one:.2f} tok/s"
        if cfg != base:
            ratios = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs[cfg], runs[base])]
            line += f" = {one / med(base, 'decode_tok_s'):.2f}x of nodes {base[0]} (per-round {[round(x, 2) for x in ratios]})"
        if e2e:
            line += f" | {args.streams} streams {e2e / one:.2f}x one stream end-to-end, {steady / one:.2f}x steady"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
