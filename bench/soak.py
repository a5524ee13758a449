"""Soak: N streaming clients for M minutes with random cancels and worker kills.

Each client loops: a random prompt (some sharing a system prompt, so the prefix cache is used),
a streaming request of random length through the native client or the HTTP API, cancelled at
a random point with probability --cancel.  At evenly spaced times a random worker is killed
with SIGKILL (the daemon fails its in-flight requests and restarts it).  Reported: requests
finished / cancelled / failed (failures are expected only around a kill), p50/p99 time to first
token, and the coordinator's and workers' RSS and open file descriptors, before and after.

    python bench/soak.py --minutes 10 --clients 32 --kills 2
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon_bench import dsd  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and precisely."
WORDS = "the a cat dog river mountain quick slow red blue idea number seven theory music".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs(sock_dir) -> dict:
    from dsd.client import Client

    st = Client(socket_dir=sock_dir, timeout=60).status()
    out = {}
    for name, pid in [("coordinator", st["pid"])] + [(f"worker{w['index']}", w["pid"]) for w in st["workers"]]:
        try:
            p = psutil.Process(pid)
            out[name] = {"pid": pid, "rss_mb": round(p.memory_info().rss / 2**20, 1), "fds": p.num_fds()}
        except psutil.Error:
            out[name] = {"pid": pid}
    return out


def client_loop(k, sock_dir, url, t_end, args, stats, lock):
    import httpx

    from dsd.client import Client, RequestFailed

    rng = random.Random(k)
    c = Client(socket_dir=sock_dir, timeout=300)
    http = httpx.Client(base_url=url, timeout=300)
    while time.monotonic() < t_end:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        msgs = ([{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []) + \
            [{"role": "user", "content": words}]
        n = rng.randint(4, 64)
        cancel_at = rng.randint(1, n) if rng.random() < args.cancel else None
        t0 = time.monotonic()
        first, kind = None, "finished"
        try:
            if rng.random() < 0.5:
                it = c.chat(msgs, stream=True, temperature=0.7, max_tokens=n)
                for i, ch in enumerate(it):
                    first = first or time.monotonic()
                    if cancel_at is not None and i >= cancel_at:
                        it.close()
                        kind = "cancelled"
                        break
            else:
                body = {"model": "dsd", "messages": msgs, "max_tokens": n, "stream": True, "temperature": 0.7}
                with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        kind = f"http {r.status_code}"
                    else:
                        for i, line in enumerate(r.iter_lines()):
                            if line.startswith("data: "):
                                first = first or time.monotonic()
                            if cancel_at is not None and i >= cancel_at:
                                kind = "cancelled"
                                break
        except RequestFailed as e:
            kind = f"failed: {str(e)[:60]}"
        except Exception as e:   # transport errors: counted, the loop goes on
            kind = f"error: {type(e).__name__}"
        with lock:
            stats["outcomes"][kind.split(":")[0]] = stats["outcomes"].get(kind.split(":")[0], 0) + 1
            if kind.startswith(("failed", "error", "http")):
                stats["examples"].setdefault(kind, 0)
                stats["examples"][kind] += 1
            if first is not None:
                stats["ttft"].append(first - t0)
    http.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--cancel", type=float, default=0.2, help="probability a request is cancelled")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsd-soak-") as tmp:
        inst = "soak" + uuid.uuid4().hex[:6]
        sock = os.path.join(tmp, inst)
        port = _free_port()
        env = dict(os.environ, DSD_SOCKET_DIR=sock, DSD_INSTANCE=inst, DSD_LOG_FILE=os.path.join(tmp, "log"))
        model = ["--model", args.model] if args.model else []
        dsd(["start", *model, "--nodes", str(args.nodes), "--max-batch", "16", "--http", f"127.0.0.1:{port}"], env)
        try:
            before = _procs(sock)
            stats = {"outcomes": {}, "examples": {}, "ttft": []}
            lock = threading.Lock()
            t_end = time.monotonic() + args.minutes * 60
            threads = [threading.Thread(target=client_loop, args=(k, sock, f"http://127.0.0.1:{port}", t_end,
                                                                   args, stats, lock), daemon=True)
                       for k in range(args.clients)]
            for t in threads:
                t.start()
            kills = []
            for i in range(args.kills):   # evenly spaced through the run
                time.sleep(args.minutes * 60 / (args.kills + 1))
                victim = random.choice([w for w in before if w.startswith("worker")])
                pid = _procs(sock)[victim]["pid"]
                os.kill(pid, signal.SIGKILL)
                kills.append({"t_s": round(time.monotonic() - (t_end - args.minutes * 60), 1), "worker": victim})
            for t in threads:
                t.join(timeout=max(1.0, t_end - time.monotonic() + 300))
            time.sleep(3)   # the last cancels and frees reach the workers
            after = _procs(sock)
            tt = sorted(stats["ttft"])
            report = {"minutes": args.minutes, "clients": args.clients, "kills": kills,
                      "outcomes": stats["outcomes"], "failures": stats["examples"],
                      "ttft_p50_ms": round(statistics.median(tt) * 1e3, 1) if tt else None,
                      "ttft_p99_ms": round(tt[len(tt) * 99 // 100] * 1e3, 1) if tt else None,
                      "before": before, "after": after}
            print(json.dumps(report, indent=1))
        finally:
            dsd(["stop"], env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
