"""Daemon benchmarks: --nodes 1 vs --nodes 2 decode, coordinator<->worker hop latency, and the
aggregate decode speed of concurrent streams.  Ratios measured in one run (the machine is noisy).

    python bench/daemon_bench.py                          # synthetic DeepSeek-shaped model
    python bench/daemon_bench.py --model X.gguf --streams 8 --tokens 48 --rounds 3

Without --model a synthetic model is written once with `dsd synth` (--synth-layers, default 4,
V2-Lite widths) to /tmp/dsd-bench-synth-L<layers>.gguf.  Each configuration starts its own
daemon on a private socket directory and stops it afterwards.

A/B of two versions of the code: --tree DIR (repeatable) runs every configuration with the
daemon of each source tree, interleaved (e.g. `git worktree add /tmp/before <commit>`; the
client side is this tree's, so both must speak the same protocol version).  Per configuration
it also prints the peer-link messages and the coordinator's CPU time per decoded token.
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
    # cwd "/": `python -m` puts the working directory first on sys.path, and a source tree's
    # dsd/ there would shadow PYTHONPATH (--tree)
    p = subprocess.run([sys.executable, "-m", "dsd.cli", *args], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd="/")
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


def shadow_package(tree: str, tmp: str) -> str:
    """A directory to put first on PYTHONPATH so `import dsd` is `tree`'s code: dsd/ holds the
    tree's dsd/ files and links to its daemon/, shard/, numa/, client/, conf/ (the package-dir
    mapping of pyproject.toml)."""
    root = os.path.join(tmp, "tree-" + uuid.uuid4().hex[:6])
    pkg = os.path.join(root, "dsd")
    os.makedirs(pkg)
    for f in os.listdir(os.path.join(tree, "dsd")):
        os.symlink(os.path.join(tree, "dsd", f), os.path.join(pkg, f))
    for sub in ("daemon", "shard", "numa", "client", "conf"):
        os.symlink(os.path.join(tree, sub), os.path.join(pkg, sub))
    return root


def _counters(st) -> tuple[int, float]:
    return (sum(w.get("link_messages") or 0 for w in st["workers"]), st.get("cpu_s") or 0.0)


def run_config(model, nodes, placement, args, tmp, tree=None) -> dict:
    from dsd.client import Client

    inst = "bench" + uuid.uuid4().hex[:6]
    sock = os.path.join(tmp, inst)
    env = dict(os.environ, DSD_SOCKET_DIR=sock, DSD_INSTANCE=inst,
               DSD_LOG_FILE=os.path.join(tmp, inst + ".log"))
    if tree:
        env["PYTHONPATH"] = shadow_package(tree, tmp) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    dsd(["start", "--model", model, "--nodes", str(nodes), "--placement", placement,
         "--max-batch", str(max(8, args.streams))], env)
    load_s = time.perf_counter() - t0
    try:
        c = Client(socket_dir=sock, timeout=120)
        prompt = [1] + list(range(100, 116))
        c.generate(prompt, temperature=0, max_tokens=4, ignore_eos=True)   # warm up
        time.sleep(1.2)   # (workers report their counters every second)
        m0, cpu0 = _counters(c.status())
        single = statistics.median(single_stream(c, prompt, args.tokens) for _ in range(args.repeats))
        time.sleep(1.2)
        m1, cpu1 = _counters(c.status())
        steps = args.repeats * args.tokens   # one prefill step + tokens - 1 decode steps each
        hops = c._call({"type": "hops", "n": args.hops})["ns"]
        hop_us = [statistics.median(h) / 1000 for h in hops]
        prompts = [[1] + list(range(200 + 7 * i, 210 + 7 * i)) for i in range(args.streams)]
        e2e, steady = concurrent(sock, prompts, args.tokens) if args.streams > 1 else (None, None)
        st = c.status()
        return {"tree": tree or ".", "nodes": nodes, "placement": st["placement"], "start_s": round(load_s, 1),
                "link_msgs_per_token": round((m1 - m0) / steps, 1),
                "coord_cpu_ms_per_token": round((cpu1 - cpu0) / steps * 1e3, 3),
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
    ap.add_argument("--tree", action="append", default=None,
                    help="run the daemon of this source tree (repeat for an interleaved A/B)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = f"/tmp/dsd-bench-synth-L{args.synth_layers}.gguf"
        if not os.path.exists(model):
            print(f"writing {model} ...", file=sys.stderr)
            dsd(["synth", model, "--layers", str(args.synth_layers)], dict(os.environ))
    configs = [(int(n), pl, t) for n, pl in (c.split(":") for c in args.configs.split(","))
               for t in (args.tree or [None])]
    runs: dict = {cfg: [] for cfg in configs}
    with tempfile.TemporaryDirectory(prefix="dsd-bench-") as tmp:
        for rnd in range(args.rounds):  # interleaved: a noisy minute hits every config alike
            for cfg in configs:
                r = run_config(model, cfg[0], cfg[1], args, tmp, cfg[2])
                r["round"] = rnd
                runs[cfg].append(r)
                print(json.dumps(r) if args.json else
                      f"round {rnd} {r['tree']} nodes {r['nodes']} {r['placement']:8s} decode {r['decode_tok_s']:7.2f} tok/s | "
                      f"link msgs {r['link_msgs_per_token']}/token, coordinator CPU {r['coord_cpu_ms_per_token']} ms/token | "
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
        line = f"  {cfg[2] or '.'} nodes {cfg[0]} {cfg[1]:8s} decode {one:.2f} tok/s"
        if cfg != base:
            ratios = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs[cfg], runs[base])]
            line += (f" = {one / med(base, 'decode_tok_s'):.2f}x of {base[2] or '.'} nodes {base[0]} "
                     f"(per-round {[round(x, 2) for x in ratios]})")
        if e2e:
            line += f" | {args.streams} streams {e2e / one:.2f}x one stream end-to-end, {steady / one:.2f}x steady"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
