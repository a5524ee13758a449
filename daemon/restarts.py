"""When a dead worker is restarted: a rate limit, not a lifetime count.

A worker may be restarted `restart_max` times within any `restart_window_s`; once it has run
healthy (ready) for `restart_healthy_s` since its last start, its earlier deaths are forgotten.
A worker that dies more often than that is crash-looping (bad memory, a bug a request
triggers): the daemon stops and says so instead of failing requests forever.
"""
from __future__ import annotations

import time
from collections import deque


class RestartPolicy:
    def __init__(self, max_restarts: int, window_s: float, healthy_s: float, clock=time.monotonic):
        self.max, self.window, self.healthy = int(max_restarts), float(window_s), float(healthy_s)
        self.clock = clock
        self.times: deque = deque()        # when each recent restart happened
        self.ready_since: float | None = None
        self.total = 0

    def ready(self) -> None:
        self.ready_since = self.clock()

    def _prune(self, now: float) -> None:
        if self.ready_since is not None and now - self.ready_since >= self.healthy:
            self.times.clear()             # ran healthy long enough: a fresh start
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()

    def allow(self) -> tuple[bool, str]:
        """After a death: may the worker restart now? (yes/no, and why not)."""
        now = self.clock()
        self._prune(now)
        self.ready_since = None
        if len(self.times) >= self.max:
            return False, (f"it died {len(self.times) + 1} times within {self.window:g} s "
                           f"(restart_max {self.max} per restart_window_s {self.window:g}; a worker "
                           f"that stays ready {self.healthy:g} s is forgiven its earlier deaths)")
        self.times.append(now)
        self.total += 1
        return True, ""

    def recent(self) -> int:
        self._prune(self.clock())
        return len(self.times)

    def report(self) -> dict:
        return {"restarts": self.total, "recent_restarts": self.recent(), "restart_max": self.max,
                "restart_window_s": self.window}
