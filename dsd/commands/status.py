"""dsd status: the daemon's state, workers (node, pid, CPUs, memory placement, KV, speed)."""
from __future__ import annotations

import json

HELP = "show the running daemon's workers, memory placement, KV cache use and speed"


def add_arguments(p) -> None:
    p.add_argument("--instance", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def format_status(st: dict) -> str:
    out = [f"dsd daemon pid {st['pid']}: {st['state']}" + (f" ({st['error']})" if st.get("error") else "")
           + f", up {st['uptime_s']:.0f}s, placement {st.get('placement')}",
           f"model: {st.get('model')}  context {st.get('context')}",
           f"log: {st.get('log_file')}  sockets: {st.get('socket_dir')}"]
    if st.get("numa_note"):
        out.append(f"note: {st['numa_note']}")
    out += [f"  {line}" for line in st.get("plan", [])]
    for w in st.get("workers", []):
        pl = w.get("placement") or {}
        nodes = ", ".join(f"node {k}: {_mib(v)}" for k, v in (pl.get("bytes_by_node") or {}).items()) or "-"
        pages = ", ".join(f"{k}: {_mib(v)}" for k, v in (pl.get("bytes_by_page") or {}).items()) or "-"
        rate = w.get("busy_tok_s")
        out.append(f"worker {w['index']}: {w['state']}, pid {w['pid']}, node {w['node']}, CPUs "
                   f"{','.join(map(str, w['cpus']))} ({w['threads']} threads)"
                   + (f"; stages it runs alone use node CPUs {','.join(map(str, w['node_cpus']))} "
                      f"({w.get('stage_threads')} threads)" if w.get("node_cpus") else ""))
        out.append(f"    weights {_mib(w.get('weight_bytes'))}; on {nodes}; pages {pages}")
        out.append(f"    KV cache {_mib(w.get('kv_bytes'))} for {w.get('sequences', 0)} sequence(s); "
                   f"{w.get('tokens', 0)} tokens, "
                   + (f"{rate:.1f} tok/s while busy" if rate else "idle")
                   + (f"; restarted {w['restarts']}x ({w.get('recent_restarts', 0)} in the last "
                      f"{w.get('restart_window_s', 0):g} s, limit {w.get('restart_max')})"
                      if w.get("restarts") else ""))
    s = st.get("scheduler", {})
    if s:
        tps = s.get("decode_tok_s")
        out.append(f"requests: {s.get('active', 0)} active, {s.get('queued', 0)} queued, "
                   f"{s.get('completed', 0)} completed, {s.get('failed', 0)} failed; decode "
                   + (f"{tps:.1f} tok/s (recent)" if tps else "-"))
    q = st.get("queue") or {}
    if q:
        wait = q.get("first_token_wait_s_p50")
        out.append(f"queue: {q.get('in_flight', 0)} in flight of at most {q.get('limit')}, "
                   f"{q.get('rejected', 0)} refused as busy, {q.get('timed_out', 0)} timed out"
                   + (f"; first token after {wait:.2f} s (median)" if wait is not None else ""))
    wd = st.get("watchdog") or {}
    if wd.get("stalls"):
        out.append(f"watchdog: {wd['stalls']} stall(s), {wd.get('stall_kills', 0)} worker(s) killed")
    return "\n".join(out)


def run(args) -> int:
    from dsd.client import Client

    st = Client(instance=args.instance).status()
    st.pop("type", None)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0
