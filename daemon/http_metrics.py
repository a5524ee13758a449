"""Prometheus text exposition for the HTTP API (format 0.0.4, no client library needed).

The HTTP layer counts what it sees itself (requests by endpoint and status, prompt and
completion tokens, decode time), and appends whatever numbers the daemon's `status()` reports
(queue depth, per-node bytes, page sizes, ...) flattened into `dsd_daemon_*` gauges, so a new
status field shows up in /metrics without a change here.
"""
from __future__ import annotations

import math
import re
import threading
from collections import defaultdict

# Keys that name an element of a list of objects (workers, nodes); they become labels.
_LABEL_KEYS = ("index", "node", "node_id", "id", "name", "rank", "worker")
# Status strings that are paths, prose or protocol bookkeeping, not a state worth a series.
_SKIP_KEYS = {"type", "v", "pid", "socket_dir", "log_file", "error", "numa_note", "model", "plan",
              "instance"}
_MAX_INFO_LEN = 64


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _name(s: str) -> str:
    s = re.sub(r"[^a-zA-Z0-9_]", "_", str(s))
    return s if not s[:1].isdigit() else "_" + s


def _labels(d: dict) -> str:
    if not d:
        return ""
    return "{" + ",".join(f'{_name(k)}="{_esc(v)}"' for k, v in sorted(d.items())) + "}"


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def flatten_status(obj, prefix: str = "dsd_daemon", labels: dict | None = None,
                   out: list | None = None) -> list[tuple[str, dict, float]]:
    """Numbers in a nested status dict as (metric name, labels, value).

    {"scheduler": {"queued": 2}, "workers": [{"index": 0, "node": 0, "weight_bytes": 5,
    "state": "ready"}]} becomes dsd_daemon_scheduler_queued 2,
    dsd_daemon_workers_weight_bytes{index="0",node="0"} 5 and
    dsd_daemon_workers_state_info{index="0",node="0",value="ready"} 1. Short strings become
    info metrics; lists of plain values (cpu lists) and keys in _SKIP_KEYS are left out."""
    out = [] if out is None else out
    labels = labels or {}
    if hasattr(obj, "__dict__") and not isinstance(obj, (dict, list, tuple)):
        obj = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, bool) or isinstance(obj, (int, float)):
        out.append((prefix, labels, obj))
    elif isinstance(obj, str):
        if len(obj) <= _MAX_INFO_LEN:
            out.append((prefix + "_info", {**labels, "value": obj}, 1))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if str(k) not in _SKIP_KEYS:
                flatten_status(v, f"{prefix}_{re.sub(r'[^a-zA-Z0-9_]', '_', str(k))}", labels, out)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            if not isinstance(item, dict):
                continue
            sub = dict(labels)
            keys = [k for k in _LABEL_KEYS if isinstance(item.get(k), (str, int))
                    and not isinstance(item.get(k), bool)]
            for k in keys:
                sub[k] = str(item[k])
            if not keys:
                sub["index"] = str(i)
            flatten_status({k: v for k, v in item.items() if k not in keys}, prefix, sub, out)
    return out


def known_status_metrics(st) -> list[tuple[str, str, str, list]]:
    """The daemon numbers the issue asks for by name (queue depth, per-node bytes and page
    sizes), read from the shape dsd.daemon.requests.status() answers:
    {"scheduler": {"queued", "active", "decode_tok_s"}, "workers": [{"index", "node",
    "weight_bytes", "kv_bytes", "page_kinds": {kind: bytes}}]}. Missing fields are skipped."""
    if not isinstance(st, dict):
        return []
    out = []
    sched = st.get("scheduler") if isinstance(st.get("scheduler"), dict) else {}
    q = sched.get("queued", st.get("queue_depth"))
    if isinstance(q, (int, float)) and not isinstance(q, bool):
        out.append(("dsd_queue_depth", "gauge", "Requests waiting for a batch slot.", [({}, q)]))
    a = sched.get("active")
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        out.append(("dsd_active_sequences", "gauge", "Sequences being decoded now.", [({}, a)]))
    tps = sched.get("decode_tok_s")
    if isinstance(tps, (int, float)) and not isinstance(tps, bool):
        out.append(("dsd_daemon_decode_tokens_per_second", "gauge",
                    "Decode speed over the daemon's recent window (all sequences).", [({}, tps)]))
    wb, kv, pages = [], [], []
    by_node: dict[str, float] = {}
    for i, w in enumerate(st.get("workers") or []):
        if not isinstance(w, dict):
            continue
        # where the kernel actually put each worker's weights (placement proof), summed per node
        place = w.get("placement") if isinstance(w.get("placement"), dict) else {}
        for node, n in (place.get("bytes_by_node") or {}).items() if isinstance(place.get("bytes_by_node"), dict) else ():
            if isinstance(n, (int, float)) and not isinstance(n, bool):
                by_node[str(node)] = by_node.get(str(node), 0) + n
        lab = {"worker": str(w.get("index", i)), "node": str(w.get("node", ""))}
        if isinstance(w.get("weight_bytes"), int):
            wb.append((lab, w["weight_bytes"]))
        if isinstance(w.get("kv_bytes"), int):
            kv.append((lab, w["kv_bytes"]))
        for kind, n in (w.get("page_kinds") or {}).items() if isinstance(w.get("page_kinds"), dict) else ():
            if isinstance(n, (int, float)):
                pages.append(({**lab, "page_size": str(kind)}, n))
    if by_node:
        out.append(("dsd_numa_node_weight_bytes", "gauge",
                     "Weight bytes resident on each NUMA node (all workers).",
                     [({"node": k}, v) for k, v in sorted(by_node.items())]))
    if wb:
        out.append(("dsd_node_weight_bytes", "gauge", "Weight bytes held by each worker.", wb))
    if kv:
        out.append(("dsd_node_kv_bytes", "gauge", "KV-cache bytes held by each worker.", kv))
    if pages:
        out.append(("dsd_node_page_bytes", "gauge", "Weight bytes by page size, per worker.", pages))
    return out


class Metrics:
    """Counters kept by the HTTP layer; thread-safe because uvicorn may run in a thread of the
    coordinator while /metrics is scraped."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)        # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.decode_tokens = 0                  # tokens after the first of each request
        self.decode_seconds = 0.0               # time between a request's first and last token
        self.last_decode_tps = 0.0
        self.in_flight = 0
        self.disconnects = 0

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, completion: int, decode_seconds: float | None) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            if decode_seconds and decode_seconds > 0 and completion > 1:
                self.decode_tokens += completion - 1
                self.decode_seconds += decode_seconds
                self.last_decode_tps = (completion - 1) / decode_seconds

    def render(self, status=None, status_error: str | None = None) -> str:
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                lines.append(f"{name}{_labels(labels)} {_fmt(v)}")

        with self._lock:
            metric("dsd_http_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                   [({"endpoint": e, "code": str(c)}, n) for (e, c), n in sorted(self.requests.items())])
            metric("dsd_http_requests_in_flight", "gauge", "Generation requests being answered now.",
                   [({}, self.in_flight)])
            metric("dsd_http_client_disconnects_total", "counter",
                   "Generations cancelled because the client went away.", [({}, self.disconnects)])
            metric("dsd_prompt_tokens_total", "counter", "Prompt tokens processed (tokens in).",
                   [({}, self.prompt_tokens)])
            metric("dsd_completion_tokens_total", "counter", "Tokens generated (tokens out).",
                   [({}, self.completion_tokens)])
            metric("dsd_decode_tokens_total", "counter",
                   "Generated tokens after each request's first (decode phase).", [({}, self.decode_tokens)])
            metric("dsd_decode_seconds_total", "counter",
                   "Seconds between each request's first and last token.", [({}, self.decode_seconds)])
            avg = self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
            metric("dsd_decode_tokens_per_second", "gauge",
                   "Decode speed: of the last request (window=last) and over all requests (window=all).",
                   [({"window": "last"}, self.last_decode_tps), ({"window": "all"}, avg)])
        metric("dsd_daemon_up", "gauge", "1 when the daemon answered the status query.",
               [({}, 0 if status_error is not None else 1)])
        if status is not None:
            for name, kind, help_, samples in known_status_metrics(status):
                metric(name, kind, help_, samples)
            groups: dict[str, list] = {}
            for name, labels, v in flatten_status(status):
                groups.setdefault(name, []).append((labels, v))
            for name, samples in groups.items():
                if name == "dsd_daemon_up":
                    continue
                metric(name, "gauge", "Reported by the daemon's status().", samples)
        return "\n".join(lines) + "\n"
