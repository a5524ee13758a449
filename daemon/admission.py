"""Backpressure in the coordinator: a bounded number of requests in flight, per-request
deadlines, and the numbers /metrics shows (queue depth, waits for the first token).

A generate request is admitted while fewer than max_batch + max_queue requests are in flight
(max_batch decode together, max_queue wait for a slot); past that it is refused at once with
kind "busy" and a retry_after estimated from how long recent requests took, which the HTTP API
answers as 429 with Retry-After.  A request whose deadline ("timeout" seconds in the request,
else the daemon's request_timeout; 0 = none) passes is cancelled and answered with kind
"timeout".  The coordinator's I/O thread calls all of this (no locks needed).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass
class _Entry:
    t_submit: float
    deadline: float | None
    timeout: float | None
    first: bool = False
    stream: bool = True


class Admission:
    def __init__(self, max_batch: int, max_queue: int, default_timeout: float = 0.0,
                 clock=time.monotonic):
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.default_timeout = float(default_timeout or 0)
        self.clock = clock
        self.reqs: dict[tuple[bytes, str], _Entry] = {}
        self.waits: deque = deque(maxlen=256)       # seconds to the first token, recent requests
        self.durations: deque = deque(maxlen=64)    # seconds from submit to the end
        self.rejected = 0
        self.timed_out = 0

    @property
    def limit(self) -> int:
        return self.max_batch + self.max_queue

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: a typical request's duration per batch's worth
        of requests ahead."""
        d = sorted(self.durations)
        typical = d[len(d) // 2] if d else 5.0
        ahead = max(1, len(self.reqs) - self.limit + 1)
        return round(min(120.0, max(1.0, typical * ahead / max(1, self.max_batch))), 1)

    def admit(self, ident: bytes, rid: str, timeout: float | None, stream: bool = True) -> bool:
        if len(self.reqs) >= self.limit:
            self.rejected += 1
            return False
        t = float(timeout) if timeout else self.default_timeout
        now = self.clock()
        self.reqs[(ident, rid)] = _Entry(now, now + t if t > 0 else None, t if t > 0 else None,
                                         stream=bool(stream))
        return True

    def silent(self) -> list[tuple[bytes, str]]:
        """Requests whose client hears nothing until the end (non-streaming): the coordinator
        pings their clients now and then, so one that went away is noticed and cancelled."""
        return [k for k, e in self.reqs.items() if not e.stream]

    def on_reply(self, ident: bytes, msg: dict) -> None:
        key = (ident, msg.get("id"))
        e = self.reqs.get(key)
        if e is None:
            return
        now = self.clock()
        if msg.get("type") == "chunk" and not e.first:
            e.first = True
            self.waits.append(now - e.t_submit)
        if msg.get("type") == "error" or msg.get("finish_reason") is not None:
            del self.reqs[key]
            if msg.get("type") == "chunk":
                self.durations.append(now - e.t_submit)

    def forget(self, ident: bytes, rid) -> None:
        self.reqs.pop((ident, rid), None)

    def expired(self) -> list[tuple[bytes, str, float]]:
        """Requests past their deadline (removed; the caller cancels and answers them)."""
        now = self.clock()
        out = [(k[0], k[1], e.timeout) for k, e in self.reqs.items()
               if e.deadline is not None and now >= e.deadline]
        for ident, rid, _ in out:
            del self.reqs[(ident, rid)]
        self.timed_out += len(out)
        return out

    def stats(self) -> dict:
        w = sorted(self.waits)
        waiting = sum(1 for e in self.reqs.values() if not e.first)
        return {"in_flight": len(self.reqs), "waiting": waiting, "limit": self.limit,
                "rejected": self.rejected, "timed_out": self.timed_out,
                "first_token_wait_s_p50": w[len(w) // 2] if w else None,
                "first_token_wait_s_max": w[-1] if w else None}
