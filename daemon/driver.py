"""The coordinator's forward pass: runs Plan.program() stages over the workers' channels.

One call = one flat batch (several sequences' new tokens, as in dsd.shard.batch): the token ids
and segment table go to every stage, activations [T, D] float32 go through shared memory, and
the last stage returns logits [len(logit_rows), vocab].  A worker that dies mid-pass raises
WorkerDied at once (its pidfd wakes the waiting select).
"""
from __future__ import annotations

import time

import numpy as np

from dsd.daemon.shm_channel import PeerDied


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

    def free(self, seq_ids) -> None:
        for q in self.pending_free:
            q.extend(seq_ids)

    def _call(self, w: int, hdr: dict, arrays: dict) -> None:
        h = self.handles[w]
        hdr = dict(hdr)
        if self.pending_free[w]:
            hdr["free"], self.pending_free[w] = self.pending_free[w], []
        h.channel.send(hdr, arrays)
        h.outstanding = True

    def _wait(self, w: int) -> dict:
        h = self.handles[w]
        try:
            rh, arr = h.channel.reply_wait()
        except PeerDied:
            raise WorkerDied(w, h.pid) from None
        finally:
            h.outstanding = False
        if not rh.get("ok", False):
            raise WorkerError(rh.get("error", f"worker {w} failed"))
        return arr

    def drain(self) -> None:
        """After a failed pass: collect the replies live workers still owe, so the next command
        never overwrites a channel a worker is reading."""
        for w, h in enumerate(self.handles):
            if h.outstanding:
                try:
                    h.channel.reply_wait(deadline=time.perf_counter() + 30)
                except Exception:
                    pass
                h.outstanding = False

    def flush_frees(self) -> None:
        """Send pending KV frees now (used when idle, so caches do not linger)."""
        for w, q in enumerate(self.pending_free):
            if q:
                self._call(w, {"ops": []}, {})
                self._wait(w)

    def forward(self, tokens: np.ndarray, seqs: list[int], ns: list[int], pos0: list[int],
                logit_rows: list[int]) -> np.ndarray:
        base = {"seqs": seqs, "n": ns, "pos0": pos0, "logit_rows": logit_rows}
        tokens = np.asarray(tokens, dtype=np.int64)
        h = None
        route = None
        for st in self.program:
            if st["kind"] == "seq":
                w = st["worker"]
                arrays = {"tokens": tokens}
                if h is not None:
                    arrays["h"] = h
                t0 = time.perf_counter_ns()
                self._call(w, dict(base, ops=st["ops"]), arrays)
                out = self._wait(w)
                if len(tokens) == 1 and st["ops"] == [["embed"]]:
                    self.hop_ns.append(time.perf_counter_ns() - t0)
                if "logits" in out:
                    self.steps += 1
                    return out["logits"]
                h = out["h"]
                if "xn" in out:
                    route = out
            else:  # every worker's share of the routed experts, then the sum
                i = st["layer"]
                arrays = {"tokens": tokens, "xn": route["xn"], "ids": route["ids"], "w": route["w"]}
                for w in range(len(self.handles)):
                    self._call(w, dict(base, ops=[["experts", i]]), arrays)
                parts = [self._wait(w)["p"] for w in range(len(self.handles))]
                total = parts[0]
                for p in parts[1:]:
                    total = total + p
                h = h + total
        raise RuntimeError("placement program has no head stage")
