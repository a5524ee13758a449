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

# Keys that name an element of a list of objects (nodes, workers); they become labels.
_LABEL_KEYS = ("node", "node_id", "id", "name", "rank", "worker")


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

    {"queue_depth": 2, "nodes": [{"node": 0, "bytes": 5, "page_size": "2m"}]} becomes
    dsd_daemon_queue_depth 2, dsd_daemon_nodes_bytes{node="0"} 5 and
    dsd_daemon_nodes_page_size_info{node="0",value="2m"} 1 (strings become info metrics)."""
    out = [] if out is None else out
    labels = labels or {}
    if hasattr(obj, "__dict__") and not isinstance(obj, (dict, list, tuple)):
        obj = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, bool) or isinstance(obj, (int, float)):
        out.append((prefix, labels, obj))
    elif isinstance(obj, str):
        out.append((prefix + "_info", {**labels, "value": obj}, 1))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten_status(v, f"{prefix}_{_name(k)}", labels, out)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            sub = dict(labels)
            if isinstance(item, dict):
                key = next((k for k in _LABEL_KEYS if isinstance(item.get(k), (str, int))
                            and not isinstance(item.get(k), bool)), None)
                if key is not None:
                    sub[key] = str(item[key])
                    item = {k: v for k, v in item.items() if k != key}
                else:
                    sub["index"] = str(i)
            else:
                sub["index"] = str(i)
            flatten_status(item, prefix, sub, out)
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
            groups: dict[str, list] = {}
            for name, labels, v in flatten_status(status):
                groups.setdefault(name, []).append((labels, v))
            for name, samples in groups.items():
                if name == "dsd_daemon_up":
                    continue
                metric(name, "gauge", "Reported by the daemon's status().", samples)
        return "\n".join(lines) + "\n"
