"""Stall watchdog: a worker that holds a command far longer than steps take is reported, and
killed (then restarted by the supervisor) if it does not recover.

The coordinator's I/O thread calls check() every loop turn.  A worker is busy while its
channel has a command it has not answered (Channel.idle() is False).  Busy for longer than
max(stall_timeout_s, 50 x the longest step the driver has timed) makes it "stalled": its state
and the daemon's become "stalled" (status; /health answers 503).  If it answers, both go back
to ready.  Busy stall_kill_s longer still, it is killed with SIGKILL: its pidfd wakes the
driver, the in-flight requests fail with a message that says the worker stalled, and the
supervisor restarts it under the restart policy.  A stopped process (SIGSTOP, state T) is
preferred as the culprit; otherwise (deadlock) every stalled worker is killed.
"""
from __future__ import annotations

import signal
import time

FACTOR = 50


def _proc_state(pid) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


class StallWatch:
    def __init__(self, d, timeout_s: float, kill_s: float, clock=time.monotonic):
        self.d = d
        self.timeout, self.kill_after = float(timeout_s), float(kill_s)
        self.clock = clock
        self.busy_since: dict[int, float] = {}
        self.notes: dict[int, str] = {}      # pid -> why it was killed (for the failed requests)
        self.stalls = 0
        self.kills = 0

    def limit(self) -> float:
        exp = getattr(getattr(self.d, "driver", None), "_expect", {}) or {}
        return max(self.timeout, FACTOR * max(exp.values(), default=0.0))

    def check(self) -> None:
        if self.timeout <= 0:
            return
        now = self.clock()
        limit = self.limit()
        stalled = []
        for h in self.d.handles:
            busy = h.state in ("ready", "stalled") and h.channel is not None and not h.channel.idle()
            if not busy:
                self.busy_since.pop(h.index, None)
                if h.state == "stalled":
                    self._recovered(h)
                continue
            t0 = self.busy_since.setdefault(h.index, now)
            if now - t0 >= limit:
                if h.state != "stalled":
                    self.stalls += 1
                    h.state = "stalled"
                    h.error = (f"stalled: no reply for {now - t0:.0f} s (steps take ~{limit / FACTOR:.3g} s); "
                               f"killed in {self.kill_after:g} s unless it recovers")
                    self.d.state = "stalled"
                    self.d.log(f"worker {h.index} (pid {h.pid}) {h.error}")
                stalled.append((h, now - t0))
        due = [(h, t) for h, t in stalled if t >= limit + self.kill_after]
        if due:
            stopped = [(h, t) for h, t in due if _proc_state(h.pid) in ("T", "t")]
            for h, t in stopped or due:
                self._kill(h, t)

    def _recovered(self, h) -> None:
        h.state, h.error = "ready", ""
        self.d.log(f"worker {h.index} (pid {h.pid}) answered again; no longer stalled")
        if self.d.state == "stalled" and not any(x.state == "stalled" for x in self.d.handles):
            self.d.state = "ready"

    def _kill(self, h, waited: float) -> None:
        note = (f"worker {h.index} (pid {h.pid}) stalled: no reply for {waited:.0f} s "
                f"(process state {_proc_state(h.pid)}); the daemon killed it and is restarting it")
        self.notes[h.pid] = note
        while len(self.notes) > 32:
            self.notes.pop(next(iter(self.notes)))
        self.kills += 1
        self.d.log(note)
        try:
            signal.pidfd_send_signal(h.pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError, TypeError):
            pass
        self.busy_since.pop(h.index, None)

    def explain(self, message: str) -> str:
        """A request failure caused by a worker this watchdog killed says so."""
        for pid, note in self.notes.items():
            if f"(pid {pid})" in message:
                return f"{note}; retry the request"
        return message

    def report(self) -> dict:
        return {"stall_timeout_s": self.limit() if self.timeout > 0 else None, "stalls": self.stalls,
                "stall_kills": self.kills}
