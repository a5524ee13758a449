"""A daemon worker: one process per (real or virtual) NUMA node.

Life: connect to the coordinator's workers.sock, say hello (protocol version), receive the
assignment (plan, node, CPUs, channels), pin to the node, allocate node-local memory for exactly
its pieces and read only those bytes, build the normal model over that weight source, apply the
plan to it (daemon/sharded.py), report ready with proof of placement, then serve commands from
the coordinator's shared-memory channel until told to stop or until the coordinator dies.  An
I/O thread owns the ZeroMQ socket (stats every second, stop) so the compute loop only computes.

Every worker gets the same step descriptor and runs the model's forward pass over its shards:
header {seqs, n, pos0: the batch's segments (sequence id, new tokens, first position),
logit_rows, free: sequence ids whose KV cache to drop, abort: the coordinator's abort counter,
pids: [[worker, pid]] when they changed} and array tokens [T] int64.  Shares of split layers
and hidden states move between workers over the fixed peer links; the head's owner replies with
logits [len(logit_rows), vocab], every other worker with an empty reply; a "resync" command
resets the peer links after a failed step (the schemas: daemon/worker_protocol.py).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from dsd.daemon import worker_protocol as W
from dsd.daemon.protocol import workers_endpoint
from dsd.daemon.schema import ProtocolError, pack
from dsd.daemon.shm_channel import PeerDied
from dsd.numa._sys import big_blocks_unmap_at_free, trim_heap

_TRACE = bool(os.environ.get("DSD_TRACE_STEPS"))  # log every command's batch size and duration


# Wait constants: DESIGN.md, "How a process waits for its peer" (spin with a spare CPU; otherwise
# spin about one wake-up latency, then block).
PEER_SPIN_S = 1e-3  # waiting for a share a peer computes on its own CPUs alongside ours
# a worker with CPUs of its own waiting for the next request spins this long before it blocks
# (the gaps inside a decode step are < 1 ms; an idle daemon's workers sleep after this)
BETWEEN_SPIN_S = 3e-3


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel sends SIGKILL if the coordinator dies, even by SIGKILL
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def log(index: int, msg: str) -> None:
    print(f"[dsd worker {index} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


class Worker:
    def __init__(self, sock_dir: str, index: int):
        import zmq

        self.sock_dir, self.index = sock_dir, index
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"w{index}".encode())
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.connect(workers_endpoint(sock_dir))
        self.lock = threading.Lock()  # the socket is shared by the main thread until ready
        self.caches: dict = {}
        self.tokens = 0
        self.busy = 0.0
        self.stop = False
        self.links = None               # sharded.PeerLinks (more than one worker)

    def send(self, type_: str, **fields) -> None:
        msg = W.build(W.FROM_WORKER, type_, index=self.index, **fields)
        with self.lock:
            self.sock.send(pack(msg))

    def recv(self, timeout_s: float) -> dict:
        """The coordinator's next valid message (a frame that is not one is logged and skipped)."""
        import zmq

        t_end = time.monotonic() + timeout_s
        while True:
            left = t_end - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000), zmq.POLLIN):
                raise TimeoutError("no assignment from the coordinator")
            data = self.sock.recv()
            try:
                return W.decode(data, W.TO_WORKER)
            except ProtocolError as e:
                log(self.index, f"ignored a frame from the coordinator: {e}")

    # -- startup -------------------------------------------------------------------------------
    def start(self) -> None:
        from dsd.daemon.placement import Plan

        self.send("hello", pid=os.getpid())
        a = self.recv(60)
        if a["type"] != "assign" or a.get("v") != W.VERSION:
            raise RuntimeError(f"unexpected handshake reply {a['type']} v{a.get('v')}")
        self.assign = a
        from dsd.numa import pin_to_node

        # Workers sharing a real node (more --nodes than nodes) are pinned to all of its CPUs:
        # a stage only this worker runs uses them all (the siblings are blocked waiting), the
        # experts stage that every worker runs at once uses this worker's share (a["threads"]).
        own = list(a["cpus"])
        pin = pin_to_node(a["node"], cpus=a.get("node_cpus") or own)
        self.cpus = own
        import numba  # (after pinning: the pool gets one thread per pinned CPU)
        from dsd.shard.engine import set_threads

        self.stage_threads = set_threads(len(pin.cpus) if a.get("node_cpus") else (a.get("threads") or len(own)))
        self.threads = min(self.stage_threads, a.get("threads") or len(own))
        self._set_threads = numba.set_num_threads
        from dsd.shard.gguf_file import open_gguf
        from dsd.shard.models import build_model
        from dsd.daemon.slice_weights import SliceWeights

        plan = Plan.from_dict(a["plan"])
        self.plan = plan
        last = [0.0]

        def progress(done, total, phase):
            now = time.monotonic()
            if now - last[0] > 0.2 or done == total:
                last[0] = now
                self.send("progress", done=int(done), total=int(total), phase=phase)

        t0 = time.perf_counter()
        self.gguf = open_gguf(plan.model_path)
        self.weights = SliceWeights(self.gguf, plan.pieces[self.index], node=a["node"],
                                    pages=a["pages"], progress=progress)
        self.model = build_model(self.gguf, self.weights)
        self.context = int(a["context"])
        from dsd.shard import kernels

        kernels.warm_up({self.gguf.tensors[p.name].ggml_type for p in plan.pieces[self.index]})
        self.load_s = time.perf_counter() - t0
        from dsd.daemon.sharded import PeerLinks, ShardedModel
        from dsd.daemon.shm_channel import Channel

        spin_us = a.get("spin_us", 50)
        self.ch = Channel.attach(a["channel"], self.sock_dir, spin_us, a.get("channel_path"))
        self.ch.peer_fd = os.pidfd_open(a["coordinator_pid"])
        # how long to spin for the next message before blocking (DESIGN.md, "How a process waits")
        own = bool(a.get("spin_between"))   # this worker's CPUs are its own (rows, one per node)
        self.command_spin = 1e-9 if a.get("block_between") else BETWEEN_SPIN_S if own else self.ch.spin
        if a.get("links"):
            out, inn = {}, {}
            for j, out_name, out_path, in_name, in_path in a["links"]:
                out[j] = Channel.attach_driver(out_name, self.sock_dir, spin_us, out_path)
                inn[j] = Channel.attach(in_name, self.sock_dir, spin_us, in_path)
            self.links = PeerLinks(self.index, out, inn, reply_spin=PEER_SPIN_S,
                                   recv_spin=BETWEEN_SPIN_S if own else self.ch.spin)
        self.sharded = ShardedModel(self.model, plan, self.index, self.links, self.weights.holds, self.share)
        self.placement = self.weights.placement()
        log(self.index, f"node {a['node']} CPUs {self.cpus} threads {self.threads}: "
                        f"{self.weights.nbytes / 2**20:.1f} MiB loaded in {self.load_s:.1f}s"
                        + (f" ({self.weights.buffer.report()})" if self.weights.buffer else ""))
        self.send("ready", pid=os.getpid(), stats=self.stats())

    def stats(self) -> dict:
        pl = self.placement
        return {"index": self.index, "pid": os.getpid(), "node": self.assign["node"],
                "cpus": self.cpus, "threads": self.threads, "stage_threads": self.stage_threads,
                "weight_bytes": self.weights.nbytes,
                "placement": pl.to_dict() if pl is not None else None,
                "page_kinds": self.weights.buffer.bytes_by_kind() if self.weights.buffer else {},
                "kv_bytes": sum(c.nbytes for c in list(self.caches.values())),
                "sequences": len(self.caches), "tokens": self.tokens, "busy_s": self.busy,
                "load_s": self.load_s, "spin_hits": self.ch.wait_stats[0],
                "blocking_waits": self.ch.wait_stats[1],
                "link_messages": self.links.messages if self.links is not None else 0}

    # -- I/O thread ----------------------------------------------------------------------------
    def io_loop(self) -> None:
        import zmq

        next_stats = 0.0
        while not self.stop:
            if self.sock.poll(200, zmq.POLLIN):
                try:
                    msg = W.decode(self.sock.recv(), W.TO_WORKER)
                except ProtocolError as e:
                    log(self.index, f"ignored a frame from the coordinator: {e}")
                    continue
                if msg["type"] == "stop":
                    self.stop = True
                    self.ch.stop()
                    break
                if msg["type"] == "stats":
                    next_stats = 0.0
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + 1.0
                self.send("stats", stats=self.stats())

    # -- compute loop --------------------------------------------------------------------------
    def batch(self, hdr: dict, tokens):
        from dsd.shard.batch import Batch
        from dsd.shard.kv_cache import SequenceCache

        # a new sequence's cache is allocated once at the size it may grow to (the scheduler's
        # prompt + max_tokens: what the KV budget charges it), not grown by doubling
        return Batch.of_sequences(
            self.caches, lambda cap: SequenceCache(self.plan.n_layers, self.context, initial=cap or 256,
                                                   kv_type=self.assign.get("kv_type")),
            tokens, hdr["seqs"], hdr["n"], hdr["pos0"], hdr.get("logit_rows"), hdr.get("caps"))

    def execute(self, hdr: dict, arr: dict) -> dict:
        """One command of the coordinator: a step descriptor (every worker gets the same one:
        the batch's tokens and segments, KV frees), a resync of the peer links after a failed
        step, or an empty message (ping, frees only)."""
        freed = [self.caches.pop(sid, None) for sid in hdr.get("free", ())]
        if any(c is not None for c in freed):
            del freed
            trim_heap()   # finished sequences' KV goes back to the node (numa/_sys.py)
        if self.links is not None:
            if "pids" in hdr:
                self.links.watch({int(j): int(pid) for j, pid in hdr["pids"]})
            if hdr["type"] == "resync":
                self.links.resync()
        for seq, n in hdr.get("compact", ()):   # kept by the prefix cache: exactly n positions
            if seq in self.caches:
                self.caches[seq] = self.caches[seq].fork(n, cap=n)
        for src, dst, n, cap in hdr.get("fork", ()):   # prefix cache: start dst from src's first n
            if src in self.caches:
                self.caches[dst] = self.caches[src].fork(n, cap=cap)
        tokens = arr.get("tokens")
        if tokens is None or not len(tokens):
            return {}
        batch = self.batch(hdr, tokens)
        if self.links is not None:
            self.links.begin_step((self.ch.ctl, int(hdr.get("abort", 0)), self.ch.to_worker))
        logits = self.sharded.forward(batch)
        self.tokens += int(len(tokens))
        if logits is None:
            return {}
        greedy = hdr.get("greedy")
        if not greedy:
            return {"logits": logits}
        import numpy as np

        # plain-greedy rows: only their argmax goes back (the coordinator would compute the same)
        keep = np.ones(len(logits), dtype=bool)
        keep[greedy] = False
        out = {"ids": np.argmax(logits[greedy], axis=-1).astype(np.int64)}
        if keep.any():
            out["logits"] = logits[keep]
        return out

    def share(self, fn):
        """Run fn (this worker's share of a split product) on this worker's own CPUs: the other
        workers compute their shares at the same time."""
        if self.threads != self.stage_threads:
            self._set_threads(self.threads)
        try:
            return fn()
        finally:
            if self.threads != self.stage_threads:
                self._set_threads(self.stage_threads)

    def serve(self) -> None:
        from dsd.daemon.sharded import PeerWorkerDied
        from dsd.daemon.shm_channel import BadMessage, StepAborted

        io = threading.Thread(target=self.io_loop, name="dsd-worker-io", daemon=True)
        io.start()
        while not self.stop:
            try:
                hdr, arr = self.ch.wait_command(0.0, self.command_spin)
            except PeerDied:
                break
            except BadMessage as e:   # answered, logged; the loop goes on
                log(self.index, f"refused a command: {e}")
                self.ch.reply({"type": "reply", "ok": False, "error": f"worker {self.index}: {e}"}, {})
                continue
            t0 = time.perf_counter()
            try:
                W.COMMANDS.check(hdr)
            except ProtocolError as e:   # a bug in a sender, never a reason to stop
                log(self.index, f"refused a command: {e}")
                self.ch.reply({"type": "reply", "ok": False, "error": f"worker {self.index}: {e}"}, {})
                continue
            try:
                out = self.execute(hdr, arr)
                self.ch.reply({"type": "reply", "ok": True}, out)
                if _TRACE:
                    log(self.index, f"T={len(arr.get('tokens', ()))} {(time.perf_counter() - t0) * 1e3:.2f} ms")
            except PeerWorkerDied as exc:  # the coordinator fails the requests, restarts it
                self.ch.reply({"type": "reply", "ok": False, "error": str(exc), "dead_peer": exc.index}, {})
            except StepAborted:   # another worker failed this step; the coordinator knows why
                self.ch.reply({"type": "reply", "ok": False, "error": "step aborted", "aborted": True}, {})
            except Exception as exc:  # report, keep serving: one bad batch must not kill us
                import traceback

                traceback.print_exc()
                self.ch.reply({"type": "reply", "ok": False, "error": f"worker {self.index}: {type(exc).__name__}: {exc}"}, {})
            self.busy += time.perf_counter() - t0


def main(sock_dir: str, index: int) -> int:
    _die_with_parent()
    big_blocks_unmap_at_free()   # KV buffers are unmapped when their sequence ends
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    w = Worker(sock_dir, index)
    try:
        w.start()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        from dsd.errors import is_user_error

        msg = str(exc) if is_user_error(exc) else f"{type(exc).__name__}: {exc}"
        w.send("fatal", message=msg[:60000])
        time.sleep(0.3)
        return 1
    w.serve()
    os._exit(0)  # numba/zmq threads need no orderly teardown
