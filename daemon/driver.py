"""The coordinator's side of a forward pass: one step descriptor to every worker, logits back.

One call = one flat batch (several sequences' new tokens, as in dsd.shard.batch).  Every worker
gets the same descriptor (token ids, segment table, KV frees) on its own shared-memory channel
and runs the model's forward pass over its shards (daemon/sharded.py); hidden states move
between the workers over their own links, never through here.  The head's owner replies with
logits [len(logit_rows), vocab]; the others reply empty when their part is done.  A worker that
dies mid-pass raises WorkerDied at once (its pidfd wakes the waiting select); after any failure
the other workers are told to abort the step, and the next step first resyncs the peer links.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from dsd.daemon.schema import ProtocolError
from dsd.daemon.shm_channel import BadMessage, PeerDied
from dsd.daemon.worker_protocol import REPLY


_TRACE = bool(os.environ.get("DSD_TRACE_STEPS"))  # log each forward's time
# A wait expected to last long blocks until nap_margin before its expected end, then spins (up
# to twice that, then blocks again): the margin covers the host's timer overshoot, measured at
# start (daemon/calibrate.py; DESIGN.md, "How a process waits for its peer").
NAP_MARGIN = 50e-6   # (when not measured: twice the ~25 us overshoot measured on the 2-core VMs)
WARM_SEQ = -1   # the throwaway sequence of the warm-up steps


class StepResult:
    """What the head's owner sent for the logit rows of a step: token ids of the plain-greedy
    rows (argmax computed there) and logits [rows, vocab] of the others, in row order."""

    def __init__(self, out: dict, greedy: list[int], n_rows: int):
        self.ids = dict(zip(greedy, (int(t) for t in out.get("ids", ()))))
        rest = [k for k in range(n_rows) if k not in self.ids]
        self.rows = dict(zip(rest, range(len(rest))))
        self.logits = out.get("logits")

    def token(self, row: int, sampler, history) -> int:
        if row in self.ids:
            return self.ids[row]
        return sampler.sample(self.logits[self.rows[row]], history)


class WorkerDied(Exception):
    def __init__(self, index: int, pid: int | None):
        super().__init__(f"worker {index} (pid {pid}) died")
        self.index, self.pid = index, pid


class WorkerError(Exception):
    """A worker raised while computing (reported back through its channel)."""


class Driver:
    def __init__(self, plan, handles, nap_margin: float = NAP_MARGIN):
        self.plan = plan
        self.nap_margin = nap_margin
        self.handles = handles            # list of WorkerHandle (channel, pid)
        self.pending_free: list[int] = []
        self.pending_compact: list[list[int]] = []   # [seq, positions] kept by the prefix cache
        self.hop_ns: list[int] = []       # command -> reply latency of an empty command (pings)
        self.steps = 0
        # duration (s) of the last step of each batch size: a wait expected to outlast the
        # channel's spin budget first sleeps through most of it, so the coordinator does not
        # take CPU time from the workers (2 cores here; measured: a process spinning 20% of a
        # core slowed a 2-thread decode step by 17-60%); the watchdog scales its limit by it
        self._expect: dict[int, float] = {}
        self.block_on: set[int] = set()   # workers on our CPUs: wait for them without spinning
        self.lock = threading.Lock()      # one step at a time (engine thread, warm-up)
        self._pids_sent: list[int | None] = [None] * len(handles)  # per worker: pids it was told
        self._prepared: tuple | None = None   # worker pids the links were resynced and warmed for
        self._resync = False
        # worker pids when the last command went out: a death is reported with the pid that died,
        # not the restarted worker's (the coordinator's I/O thread may respawn it before we look)
        self._pids: list[int | None] = [h.pid for h in handles]

    def free(self, seq_ids) -> None:
        self.pending_free.extend(seq_ids)

    def compact(self, seq: int, n: int) -> None:
        self.pending_compact.append([seq, n])

    # -- one command to every worker -------------------------------------------------------------
    def _send_all(self, hdr: dict, arrays: dict) -> None:
        self._pids = [h.pid for h in self.handles]
        pids = [[i, p] for i, p in enumerate(self._pids) if p is not None]
        if self.pending_free:
            hdr["free"], self.pending_free = self.pending_free, []
        if self.pending_compact and hdr.get("type") == "step":
            hdr["compact"], self.pending_compact = self.pending_compact, []
        for w, h in enumerate(self.handles):
            # abort: the counter a waiting worker watches (see _collect)
            hw = dict(hdr, abort=h.channel.abort_count())
            if len(self.handles) > 1 and self._pids_sent[w] != tuple(self._pids):
                hw["pids"] = pids   # the peers' processes, when they changed
                self._pids_sent[w] = tuple(self._pids)
            h.channel.send(hw, arrays)
            h.outstanding = True

    def _wait(self, w: int, nap: float = 0.0) -> dict:
        h = self.handles[w]
        spin = None
        if w in self.block_on:  # it computes on the CPU we would spin on: block until kicked
            nap, spin = 0.0, 1e-9
        elif nap > 0:
            spin = 2 * self.nap_margin
        try:
            rh, arr = h.channel.reply_wait(nap=nap, spin=spin)
        except BadMessage as e:
            raise WorkerError(f"worker {w}: {e}") from None
        except PeerDied:
            self._pids_sent[w] = None
            raise WorkerDied(w, self._pids[w]) from None
        finally:
            h.outstanding = False
        try:
            REPLY.check(rh)
        except ProtocolError as e:
            raise WorkerError(f"worker {w} sent a malformed reply: {e}") from None
        if rh.get("ok", False) is not True:
            d = rh.get("dead_peer")
            if isinstance(d, int) and 0 <= d < len(self._pids):  # a peer died during the step
                raise WorkerDied(d, self._pids[d])
            if rh.get("aborted"):
                raise _Aborted()
            raise WorkerError(str(rh.get("error", f"worker {w} failed")))
        return arr

    def _collect(self, first: int, nap: float = 0.0) -> dict:
        """Every worker's reply (first: the head's owner, with nap); a failure aborts the step
        on the others, collects what they still owe, and raises the first real cause."""
        order = [first] + [w for w in range(len(self.handles)) if w != first]
        out, err = {}, None
        for w in order:
            if err is not None and not self.handles[w].outstanding:
                continue
            try:
                if w == first and err is None and len(self.handles) > 2:
                    self._watch_others(first)
                arr = self._wait(w, nap if w == first else 0.0)
                if w == first:
                    out = arr
            except _Aborted:
                continue
            except (WorkerDied, WorkerError) as e:
                if err is None:
                    err = e
                    self._resync = True
                    for h in self.handles:   # peers waiting on the failed one give up the step
                        if h.outstanding:
                            h.channel.abort_step()
        if err is not None:
            raise err
        return out

    def _watch_others(self, first: int) -> None:
        """With three or more workers, a worker can fail while the head's owner waits for a
        third one that waits for the failed one: poll the others' channels meanwhile, and read
        a failure at once (its reply makes _collect abort the rest)."""
        h = self.handles[first]
        while True:
            try:
                h.channel.reply_wait(deadline=time.perf_counter() + 0.02, spin=1e-9)
                return   # (the reply stays in the channel for _wait to read)
            except TimeoutError:
                pass
            except PeerDied:
                return   # _wait reports it
            for w, o in enumerate(self.handles):
                if w != first and o.outstanding and o.channel.idle():
                    try:
                        self._wait(w)   # raises the failure if that reply is one
                    except _Aborted:
                        pass

    # -- steps -------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """After a start, a restart or a failed step: resync the peer links, then run two warm-up
        steps (a 5-token prompt and one decode token of a throwaway sequence), so numba loads
        every kernel now, not during a request."""
        pids = tuple(h.pid for h in self.handles)
        if self._prepared == pids and not self._resync:
            return
        if len(self.handles) > 1:
            self._send_all({"type": "resync"}, {})
            self._collect(0)
        self._resync = False
        if self._prepared != pids:
            for pos0, T in ((0, 5), (5, 1)):
                self._step(np.zeros(T, np.int64), [WARM_SEQ], [T], [pos0], [T - 1])
            self.pending_free.append(WARM_SEQ)   # freed now: no worker keeps its cache
            self._send_all({"type": "free"}, {})
            self._collect(0)
        self._prepared = pids

    def _step(self, tokens, seqs, ns, pos0, logit_rows, greedy=(), forks=(), caps=None) -> dict:
        T = len(tokens)
        hdr = {"type": "step", "seqs": seqs, "n": ns, "pos0": pos0, "logit_rows": logit_rows}
        if caps:
            hdr["caps"] = list(caps)
        if greedy:
            hdr["greedy"] = list(greedy)
        if forks:   # [cached seq, new seq, positions]: copied before the batch runs (prefix cache)
            hdr["fork"] = [list(f) for f in forks]
        t0 = time.perf_counter()
        self._send_all(hdr, {"tokens": np.asarray(tokens, dtype=np.int64)})
        exp = self._expect.get(T, 0.0)
        nap = exp - (time.perf_counter() - t0) - self.nap_margin if exp > 4 * self.handles[0].channel.spin else 0.0
        out = self._collect(self.plan.head_owner, nap)
        self._expect[T] = time.perf_counter() - t0
        if len(out.get("ids", ())) != len(greedy) or (len(greedy) < len(logit_rows) and "logits" not in out):
            raise WorkerError(f"worker {self.plan.head_owner} (the head's owner) sent no logits")
        return out

    def forward(self, tokens: np.ndarray, seqs: list[int], ns: list[int], pos0: list[int],
                logit_rows: list[int], greedy: list[int] = (), forks=(), caps=None) -> StepResult:
        """One step; greedy: indices into logit_rows whose token is the argmax of its logits;
        forks: [cached sequence, new sequence, positions, capacity] to copy first
        (daemon/prefix_cache.py); caps: per segment, the positions a new sequence may grow to."""
        with self.lock:
            self._prepare()
            t = time.perf_counter()
            out = self._step(tokens, seqs, ns, pos0, logit_rows, greedy, forks, caps)
            self.steps += 1
            if _TRACE:
                print(f"[dsd driver] T={len(tokens)} step {(time.perf_counter() - t) * 1e3:.2f} ms",
                      file=sys.stderr, flush=True)
            return StepResult(out, list(greedy), len(logit_rows))

    def needs_prepare(self) -> bool:
        return self._resync or self._prepared != tuple(h.pid for h in self.handles)

    def prepare(self) -> None:
        with self.lock:
            self._prepare()

    def ping(self, w: int) -> int:
        """Round trip of an empty command to worker w (ns)."""
        with self.lock:
            t0 = time.perf_counter_ns()
            self.handles[w].channel.send({"type": "free"}, {})
            self.handles[w].outstanding = True
            self._wait(w)
            ns = time.perf_counter_ns() - t0
            self.hop_ns.append(ns)
            return ns

    def drain(self) -> None:
        """After a failed pass: collect the replies live workers still owe (so the next command
        never overwrites a channel a worker is reading); the next step resyncs the links."""
        self._resync = True
        for w, h in enumerate(self.handles):
            if h.outstanding:
                h.channel.abort_step()
                try:
                    h.channel.reply_wait(deadline=time.perf_counter() + 30)
                except Exception:
                    pass
                h.outstanding = False

    def flush_frees(self) -> None:
        """Send pending KV frees now (used when idle, so caches do not linger)."""
        with self.lock:
            if self.pending_free:
                self._send_all({"type": "free"}, {})
                self._collect(0)


class _Aborted(Exception):
    """A worker gave up the step because the coordinator aborted it (another worker failed)."""


class LocalDriver:
    """The Driver's interface over a model in this process (`dsd generate`, Engine.generate):
    the scheduler drives it exactly as it drives the workers."""

    def __init__(self, model, context: int):
        self.model, self.context = model, context
        self.caches: dict = {}
        self.pending_free: list[int] = []
        self.handles: list = []
        self.steps = 0

    def forward(self, tokens, seqs, ns, pos0, logit_rows, greedy=(), forks=(), caps=None) -> StepResult:
        from dsd.shard.batch import Batch

        for sid in self.pending_free:
            self.caches.pop(sid, None)
        self.pending_free = []
        for src, dst, n, cap in forks:
            self.caches[dst] = self.caches[src].fork(n, cap=cap)
        batch = Batch.of_sequences(self.caches, lambda cap: self.model.new_cache(self.context),
                                   tokens, seqs, ns, pos0, logit_rows)
        self.steps += 1
        return StepResult({"logits": self.model.forward(batch)}, [], len(logit_rows))

    def free(self, seq_ids) -> None:
        self.pending_free.extend(seq_ids)

    def compact(self, seq: int, n: int) -> None:
        pass   # (one process: the cache keeps its buffers)

    def flush_frees(self) -> None:
        for sid in self.pending_free:
            self.caches.pop(sid, None)
        self.pending_free = []

    def needs_prepare(self) -> bool:
        return False

    def prepare(self) -> None:
        pass

    def drain(self) -> None:
        pass
