"""The coordinator's forward pass: runs Plan.program() stages over the workers' channels.

One call = one flat batch (several sequences' new tokens, as in dsd.shard.batch): the token ids
and segment table go to every stage, activations [T, D] float32 go through shared memory, and
the last stage returns logits [len(logit_rows), vocab].  A worker that dies mid-pass raises
WorkerDied at once (its pidfd wakes the waiting select).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from dsd.daemon.shm_channel import PeerDied


_TRACE = bool(os.environ.get("DSD_TRACE_STEPS"))  # log each forward's time and its waits
# A wait expected to last long blocks until this long before its expected end, then spins (up
# to twice this, then blocks again): timed wake-ups overshoot ~30 us here (DESIGN.md, "How a
# process waits for its peer": the margin must exceed the host's timer overshoot).
NAP_MARGIN = 50e-6


class WorkerDied(Exception):
    def __init__(self, index: int, pid: int | None):
        super().__init__(f"worker {index} (pid {pid}) died")
        self.index, self.pid = index, pid


class WorkerError(Exception):
    """A worker raised while computing (reported back through its channel)."""


class Driver:
    def __init__(self, plan, handles):
        self.plan = plan
        self.program = plan.program()
        self.handles = handles            # list of WorkerHandle (channel, pid)
        self.pending_free: list[list[int]] = [[] for _ in handles]
        self.hop_ns: list[int] = []       # send->reply latency of tiny stages (bench)
        self.steps = 0
        # duration (s) of each (stage, worker, batch rows) last time: a wait expected to outlast
        # the channel's spin budget first sleeps through most of it, so the coordinator does not
        # take CPU time from the workers (2 cores here; measured: a process spinning 20% of a
        # core slowed a 2-thread decode step by 17-60%)
        self._expect: dict[tuple, float] = {}
        self._fwd_procs: list = []            # worker processes when the current pass began
        self._idle: dict[tuple, float] = {}   # (stage, worker, rows) -> idle time after it, last time
        self._seen: dict[int, tuple] = {}     # worker -> (key, time) of its last reply
        self._waited = 0.0
        self._t_end = 0.0
        self._stage_w: list[str] = []
        self.block_on: set[int] = set()   # workers on our CPUs: wait for them without spinning
        # worker pids when the last command went out: a death is reported with the pid that died,
        # not the restarted worker's (the coordinator's I/O thread may respawn it before we look)
        self._pids: list[int | None] = [h.pid for h in handles]

    def free(self, seq_ids) -> None:
        for q in self.pending_free:
            q.extend(seq_ids)

    def _call(self, w: int, hdr: dict, arrays: dict, key: tuple | None = None) -> None:
        h = self.handles[w]
        hdr = dict(hdr)
        now = time.perf_counter()
        prev = self._seen.pop(w, None)
        if prev is not None:  # how long w sat idle after its previous reply
            self._idle[prev[0]] = now - prev[1]
        if key is not None and key in self._idle:
            hdr["idle"] = self._idle[key]  # expected wait for w's next command after this one
        if _TRACE:
            hdr["t_sent"] = time.perf_counter()
        if self.pending_free[w]:
            hdr["free"], self.pending_free[w] = self.pending_free[w], []
        if self.plan.split and "ops" in hdr:  # channels of the others, lent for this stage
            hdr["peers"] = [[i, o.channel.name, o.pid, o.channel.path]
                            for i, o in enumerate(self.handles) if i != w]
            # their KV frees ride along (the owner passes them on with its first command): a
            # worker that drives no layer (rows mode) never gets a command from us
            pf = [[i, q] for i, q in enumerate(self.pending_free) if i != w and q]
            if pf and self.plan.gathers(hdr["ops"]):
                hdr["peer_free"] = pf
                for i, _ in pf:
                    self.pending_free[i] = []
        self._pids = [o.pid for o in self.handles]
        h.channel.resync()  # another worker may have driven this channel since our last command
        h.channel.send(hdr, arrays)
        h.outstanding = True

    def _wait(self, w: int, key: tuple | None = None, t_sent: float = 0.0) -> dict:
        h = self.handles[w]
        t_w = time.perf_counter()
        nap = spin = 0.0
        exp = self._expect.get(key, 0.0) if key is not None else 0.0
        if w in self.block_on:  # it computes on the CPU we would spin on: block until kicked
            nap, spin = 0.0, 1e-9
        elif exp > 4 * h.channel.spin:  # long stage: block through most of it, then spin
            nap = exp - (time.perf_counter() - t_sent) - NAP_MARGIN
            spin = 2 * NAP_MARGIN
        try:
            rh, arr = h.channel.reply_wait(nap=nap, spin=spin or None)
            if key is not None:
                self._seen[w] = (key, time.perf_counter())
                self._expect[key] = time.perf_counter() - t_sent
                if _TRACE:
                    self._waited += time.perf_counter() - t_w
                    late = (time.perf_counter() - rh["t_done"]) * 1e3 if "t_done" in rh else -1
                    self._stage_w.append(f"{key[0]}.{w}:{(time.perf_counter() - t_sent) * 1e3:.2f}"
                                         f"(seen+{late:.2f},nap {nap * 1e3:.2f})")
        except PeerDied:
            raise WorkerDied(w, self._pids[w]) from None
        finally:
            h.outstanding = False
        if not isinstance(rh, dict) or not isinstance(arr, dict):
            raise WorkerError(f"worker {w} sent a malformed reply header ({type(rh).__name__})")
        if rh.get("ok", False) is not True:
            d = rh.get("dead_peer")
            if isinstance(d, int) and 0 <= d < len(self._pids):  # its peer died computing a share
                raise WorkerDied(d, self._pids[d])
            raise WorkerError(str(rh.get("error", f"worker {w} failed")))
        return arr

    def drain(self) -> None:
        """After a failed pass: collect the replies live workers still owe (to us, or to a layer
        owner that was driving their channel), so the next command never overwrites a channel a
        worker is reading."""
        for w, h in enumerate(self.handles):
            if h.outstanding:
                try:
                    h.channel.reply_wait(deadline=time.perf_counter() + 30)
                except Exception:
                    pass
                h.outstanding = False
        deadline = time.perf_counter() + 30
        for h, proc in zip(self.handles, self._fwd_procs):
            # only a process that ran during the failed pass: a replacement never answers it
            while (not h.channel.idle() and time.perf_counter() < deadline and proc is not None
                   and proc is getattr(h, "proc", None) and proc.poll() is None):
                time.sleep(0.001)

    def flush_frees(self) -> None:
        """Send pending KV frees now (used when idle, so caches do not linger)."""
        for w, q in enumerate(self.pending_free):
            if q:
                self._call(w, {"ops": []}, {})
                self._wait(w)

    def _trace(self, T: int, t_fwd: float) -> None:
        """DSD_TRACE_STEPS: one log line per forward (duration, time in waits, idle time before
        it, and per stage: duration, how late the reply was seen, the nap taken)."""
        print(f"[dsd driver] T={T} forward {(time.perf_counter() - t_fwd) * 1e3:.2f} ms, waits "
              f"{self._waited * 1e3:.2f} ms, gap before {(t_fwd - self._t_end) * 1e3:.2f} ms; "
              + " ".join(self._stage_w), file=sys.stderr, flush=True)
        self._stage_w = []
        self._t_end = time.perf_counter()
        self._waited = 0.0

    def forward(self, tokens: np.ndarray, seqs: list[int], ns: list[int], pos0: list[int],
                logit_rows: list[int]) -> np.ndarray:
        base = {"seqs": seqs, "n": ns, "pos0": pos0, "logit_rows": logit_rows}
        tokens = np.asarray(tokens, dtype=np.int64)
        h = None
        t_fwd = time.perf_counter()
        self._fwd_procs = [getattr(w, "proc", None) for w in self.handles]
        for si, st in enumerate(self.program):
            if st["kind"] == "seq":
                w = st["worker"]
                arrays = {"tokens": tokens}
                if h is not None:
                    arrays["h"] = h
                t0 = time.perf_counter_ns()
                key = (si, w, len(tokens))
                self._call(w, dict(base, ops=st["ops"]), arrays, key)
                out = self._wait(w, key, t0 * 1e-9)
                if len(tokens) == 1 and st["ops"] == [["embed"]]:
                    self.hop_ns.append(time.perf_counter_ns() - t0)
                if "logits" in out:
                    self.steps += 1
                    if _TRACE:
                        self._trace(len(tokens), t_fwd)
                    return out["logits"]
                h = out["h"]
        raise RuntimeError("placement program has no head stage")
