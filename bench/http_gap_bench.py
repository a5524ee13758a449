"""Does the HTTP front end cost the scheduling loop anything?  The coordinator's gap between two
consecutive steps (p50/p99, `dsd status` scheduler.step_gap_us) and the clients' inter-token
latency while N streams decode, once through the native client (ctl.sock) and once as N
streaming OpenAI-API clients over HTTP, each on a fresh daemon started with --http.

    python bench/http_gap_bench.py                        # SmolLM2, 32 streams, 48 tokens each
    python bench/http_gap_bench.py --streams 8 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon_bench import dsd  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1492,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _native(sock_dir, n_streams, n_tokens):
    from dsd.client import AsyncClient

    ac = AsyncClient(socket_dir=sock_dir)

    async def one(k):
        ts = []
        async for ch in ac.generate(PROMPTS[k % len(PROMPTS)], stream=True, temperature=0,
                                    max_tokens=n_tokens, ignore_eos=True):
            ts.extend([time.perf_counter()] * len(ch.token_ids or []))
        return ts
    return await asyncio.gather(*[one(k) for k in range(n_streams)])


async def _http(url, n_streams, n_tokens):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def one(k):
            ts = []
            body = {"model": "dsd", "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": n_tokens,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        ch = json.loads(line[6:])
                        if ch.get("choices") and ch["choices"][0].get("text"):
                            ts.append(time.perf_counter())
            return ts
        return await asyncio.gather(*[one(k) for k in range(n_streams)])


def run(via, args, tmp) -> dict:
    from dsd.client import Client

    inst = "httpgap" + uuid.uuid4().hex[:6]
    sock = os.path.join(tmp, inst)
    port = _free_port()
    env = dict(os.environ, DSD_SOCKET_DIR=sock, DSD_INSTANCE=inst, DSD_LOG_FILE=os.path.join(tmp, inst + ".log"))
    model = ["--model", args.model] if args.model else []
    dsd(["start", *model, "--nodes", "1", "--max-batch", str(args.streams), "--http", f"127.0.0.1:{port}"], env)
    try:
        c = Client(socket_dir=sock, timeout=120)
        c.generate("Hi", temperature=0, max_tokens=4)   # warm-up
        t0 = time.perf_counter()
        if via == "native":
            stamps = asyncio.run(_native(sock, args.streams, args.tokens))
        else:
            stamps = asyncio.run(_http(f"http://127.0.0.1:{port}", args.streams, args.tokens))
        wall = time.perf_counter() - t0
        gaps = c.status()["scheduler"]["step_gap_us"] or {}
        itl = sorted(b - a for ts in stamps for a, b in zip(ts, ts[1:]))
        return {"via": via, "streams": args.streams, "tokens": sum(len(ts) for ts in stamps),
                "tok_s": round(sum(len(ts) for ts in stamps) / wall, 1),
                "gap_p50_us": gaps.get("p50"), "gap_p99_us": gaps.get("p99"),
                "itl_p50_ms": round(itl[len(itl) // 2] * 1e3, 2) if itl else None,
                "itl_p99_ms": round(itl[len(itl) * 99 // 100] * 1e3, 2) if itl else None}
    finally:
        dsd(["stop"], env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2)")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runs: dict = {"native": [], "http": []}
    with tempfile.TemporaryDirectory(prefix="dsd-httpgap-") as tmp:
        for rnd in range(args.rounds):   # interleaved
            for via in ("native", "http"):
                r = run(via, args, tmp)
                runs[via].append(r)
                print(json.dumps(dict(r, round=rnd)), flush=True)
    print(f"medians over {args.rounds} round(s), {args.streams} streams:")
    for via, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs if r[k] is not None)
               for k in ("tok_s", "gap_p50_us", "gap_p99_us", "itl_p50_ms", "itl_p99_ms")}
        print(f"  {via:6s} " + "  ".join(f"{k} {v:g}" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
