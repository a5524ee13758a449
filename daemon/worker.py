"""A daemon worker: one process per (real or virtual) NUMA node.

Life: connect to the coordinator's workers.sock, say hello (protocol version), receive the
assignment (plan, node, CPUs, channel), pin to the node, allocate node-local memory for exactly
its pieces and read only those bytes, build the normal model over that weight source, report
ready with proof of placement, then serve commands from the shared-memory channel until told
to stop or until the coordinator dies.  An I/O thread owns the ZeroMQ socket (stats every
second, stop) so the compute loop only computes.

Commands (header of a channel message; arrays named in brackets):
  ops: ["embed"] [tokens] -> [h];  ["layers", a, b] [h] -> [h];
       ["attn", i] [h] -> [h] (attention only; in rows mode every worker's heads, if split);
       ["route", i] (routing kept for experts_all); ["experts_all", i] -> [h] (this worker's expert share plus the other workers', which it
       requests itself through their channels, lent in hdr["peers"]);
       ["experts", i] [xn, ids, w] -> [p] (this worker's share, sent by a layer owner);
       ["head"] [h] -> [logits]
  rows mode also splits MLA heads, dense FFNs and the output head:
       ["ffn_all", i] -> [h] and ["head_all"] -> [logits] (every worker's share, gathered by
       the owner as in experts_all); ["attn_share", i] [q_in, lat] -> [p], ["ffn", i] [xn]
       -> [p] and ["head_share"] [hn] -> [lg] (this worker's share)
  seqs/n/pos0: the batch's segments (sequence id, new tokens, first position);
  logit_rows: rows of h the head computes;  free: sequence ids whose KV cache to drop.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from dsd.daemon import protocol as P
from dsd.daemon.shm_channel import PeerDied
from dsd.numa._sys import big_blocks_unmap_at_free, trim_heap

_TRACE = bool(os.environ.get("DSD_TRACE_STEPS"))  # log every command's batch size and duration


_STATELESS = ("experts", "ffn", "head_share")
# Wait constants: DESIGN.md, "How a process waits for its peer" (spin with a spare CPU; otherwise
# spin about one wake-up latency, then block).
PEER_SPIN_S = 1e-3  # a layer owner waiting for another worker's expert share spins this long
# rows mode: a worker waiting for its next command spins this long before it blocks (the gaps
# inside a decode step are < 1 ms; an idle daemon's workers sleep after this)
BETWEEN_SPIN_S = 3e-3


class PeerWorkerDied(Exception):
    """Another worker died while computing the expert share this worker asked of it."""

    def __init__(self, index: int, pid):
        super().__init__(f"worker {index} (pid {pid}) died")
        self.index = index


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
        self.sock.connect(P.workers_endpoint(sock_dir))
        self.lock = threading.Lock()  # the socket is shared by the main thread until ready
        self.caches: dict = {}
        self.tokens = 0
        self.busy = 0.0
        self.stop = False
        self.peer_channels: dict = {}   # channel name -> Channel (driver side) of other workers
        self.peer_pids: dict = {}

    def send(self, type_: str, **fields) -> None:
        msg = P.build(P.FROM_WORKER, type_, index=self.index, **fields)
        with self.lock:
            self.sock.send(P.pack(msg))

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
                return P.decode(data, P.TO_WORKER)
            except P.ProtocolError as e:
                log(self.index, f"ignored a frame from the coordinator: {e}")

    # -- startup -------------------------------------------------------------------------------
    def start(self) -> None:
        from dsd.daemon.placement import Plan

        self.send("hello", pid=os.getpid())
        a = self.recv(60)
        if a["type"] != "assign" or a.get("v") != P.VERSION:
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
        mine = set(plan.layers_of(self.index))
        for i in range(plan.n_layers):  # drop the inert objects of other workers' layers
            if i not in mine:
                if not plan.split_attn(i):
                    self.model.attn[i] = None
                if not plan.split:
                    self.model.ffn[i] = None
        self.context = int(a["context"])
        self.warm_up()
        self.load_s = time.perf_counter() - t0
        from dsd.daemon.shm_channel import Channel

        self.ch = Channel.attach(a["channel"], self.sock_dir, a.get("spin_us", 300), a.get("channel_path"))
        self.ch.peer_fd = os.pidfd_open(a["coordinator_pid"])
        self.placement = self.weights.placement()
        log(self.index, f"node {a['node']} CPUs {self.cpus} threads {self.threads}: "
                        f"{self.weights.nbytes / 2**20:.1f} MiB loaded in {self.load_s:.1f}s"
                        + (f" ({self.weights.buffer.report()})" if self.weights.buffer else ""))
        self.send("ready", pid=os.getpid(), stats=self.stats())

    def warm_up(self) -> None:
        """Run this worker's stages once on zeros (one decode token, then a 5-token prefill) for
        a throwaway sequence: numba loads every kernel now instead of during the first request
        (which took ~1 s longer otherwise)."""
        import numpy as np

        from dsd.shard import kernels

        kernels.warm_up({self.gguf.tensors[p.name].ggml_type for p in self.plan.pieces[self.index]})
        D, k = self.model.args.d_model, max(1, self.model.args.n_experts_used)
        sid = -1
        pos = 0
        for T in (1, 5):
            base = {"seqs": [sid], "n": [T], "pos0": [pos], "logit_rows": [T - 1]}
            arrays = {"tokens": np.zeros(T, np.int64), "h": np.zeros((T, D), np.float32),
                      "xn": np.zeros((T, D), np.float32), "ids": np.tile(np.arange(k), (T, 1)),
                      "w": np.full((T, k), 1.0 / k, np.float32), "hn": np.zeros((1, D), np.float32)}
            if any(hasattr(x, "prelude") for x in self.model.attn):  # MLA head shares
                a_ = self.model.args
                arrays["q_in"] = np.zeros((T, a_.q_lora_rank or D), np.float32)
                arrays["lat"] = np.zeros((T, a_.kv_lora_rank + a_.qk_rope), np.float32)
            for st in self.plan.program():
                if st["worker"] == self.index:  # no "peers" here: only this worker's share
                    self.execute(dict(base, ops=st["ops"]), dict(arrays))
                else:  # the expert shares other layer owners will ask of this worker
                    share = {"experts_all": "experts", "ffn_all": "ffn", "head_all": "head_share",
                             "attn": "attn_share"}
                    for op in st["ops"]:
                        if self.plan.gathers([op]):
                            self.execute(dict(base, ops=[[share[op[0]], *op[1:]]]), dict(arrays))
            pos += T
        self.caches.pop(sid, None)
        self.tokens = 0

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
                "blocking_waits": self.ch.wait_stats[1]}

    # -- I/O thread ----------------------------------------------------------------------------
    def io_loop(self) -> None:
        import zmq

        next_stats = 0.0
        while not self.stop:
            if self.sock.poll(200, zmq.POLLIN):
                try:
                    msg = P.decode(self.sock.recv(), P.TO_WORKER)
                except P.ProtocolError as e:
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
        import numpy as np

        from dsd.shard.batch import Batch, Segment
        from dsd.shard.kv_cache import SequenceCache

        segs, pos, start = [], [], 0
        for sid, n, p0 in zip(hdr["seqs"], hdr["n"], hdr["pos0"]):
            c = self.caches.get(sid)
            if c is None:
                c = self.caches[sid] = SequenceCache(self.plan.n_layers, self.context)
            segs.append(Segment(c, start, n, p0))
            pos.append(np.arange(p0, p0 + n, dtype=np.int64))
            start += n
        lr = hdr.get("logit_rows")
        return Batch(tokens=tokens, positions=np.concatenate(pos), segments=segs,
                     logit_rows=None if lr is None else np.asarray(lr, dtype=np.int64))

    def execute(self, hdr: dict, arr: dict) -> dict:
        import numpy as np

        from dsd.shard import ops as O

        freed = [self.caches.pop(sid, None) for sid in hdr.get("free", ())]
        if any(c is not None for c in freed):
            del freed
            trim_heap()   # finished sequences' KV goes back to the node (numa/_sys.py)
        if not hdr.get("ops"):
            return {}
        if self.threads != self.stage_threads:
            self._set_threads(self.stage_threads)
        m = self.model
        # a share of experts / FFN rows / head rows needs no sequence state (and must not create
        # KV caches here); everything else runs on the batch
        batch = None if all(op[0] in _STATELESS for op in hdr["ops"]) else self.batch(hdr, arr["tokens"])
        h = arr.get("h")
        out = {}
        route = None
        attn_ran = False
        for op in hdr["ops"]:
            kind = op[0]
            if kind == "embed":
                h = m.embed(batch.tokens)
            elif kind == "layers":
                for i in range(op[1], op[2]):
                    h = m.block(i, h, batch)
                attn_ran = True
            elif kind == "attn":  # attention only; every worker's heads if split (rows mode)
                i = op[1]
                x = O.rms_norm(h, m.attn_norm[i], m.args.norm_eps)
                if self.plan.split_attn(i):
                    q_in, lat = m.attn[i].prelude(x, batch)
                    arrs = {"tokens": batch.tokens, "q_in": q_in, "lat": lat}
                    h = h + self.gather(hdr, ["attn_share", i], arrs,
                                        lambda: self.share(lambda: m.attn[i].heads(q_in, lat, batch)), "p")
                else:
                    h = h + m.attn[i](x, batch)
                attn_ran = True
            elif kind == "route":  # the MoE router of layer i (after "attn")
                i = op[1]
                xn = O.rms_norm(h, m.ffn_norm[i], m.args.norm_eps)
                ids, w = m.ffn[i].router(xn)
                route = {"tokens": batch.tokens, "xn": xn, "ids": ids, "w": w}
            elif kind == "attn_share":  # this worker's heads of layer i, for the layer's owner
                out["p"] = self.share(lambda: m.attn[op[1]].heads(arr["q_in"], arr["lat"], batch))
                attn_ran = True  # (the latent rows went into this worker's cache too)
                h = None
            elif kind == "experts":  # this worker's share, for whoever drives the layer
                out["p"] = self.expert_share(op[1], arr)
                h = None
            elif kind == "ffn":  # this worker's rows of a dense FFN, for the layer's owner
                out["p"] = self.share(lambda: m.ffn[op[1]](arr["xn"]))
                h = None
            elif kind == "head_share":  # this worker's vocab rows of the output head
                out["lg"] = self.share(lambda: m.output(arr["hn"]))
                h = None
            elif kind == "experts_all":  # layer owner: every worker's share, added to h
                i = op[1]
                h = h + self.gather(hdr, ["experts", i], route, lambda: self.expert_share(i, route), "p")
            elif kind == "ffn_all":  # layer owner: every worker's rows of the dense FFN, added
                i = op[1]
                xn = O.rms_norm(h, m.ffn_norm[i], m.args.norm_eps)
                if self.plan.split_ffn(i):
                    arrs = {"tokens": batch.tokens, "xn": xn}
                    h = h + self.gather(hdr, ["ffn", i], arrs, lambda: self.share(lambda: m.ffn[i](xn)), "p")
                else:  # F does not split into whole blocks: the owner runs it
                    h = h + m.ffn[i](xn)
            elif kind == "head_all":  # every worker's vocab rows of the head, in row order
                hr = h if batch.logit_rows is None else h[batch.logit_rows]
                hn = O.rms_norm(hr, m.output_norm, m.args.norm_eps)
                arrs = {"tokens": batch.tokens, "hn": hn}
                parts = self.gather(hdr, ["head_share"], arrs, lambda: self.share(lambda: m.output(hn)), "lg",
                                    add=False)
                out["logits"] = np.concatenate([parts[w] for w in sorted(parts)], axis=-1)
                h = None
            elif kind == "head":
                hr = h if batch.logit_rows is None else h[batch.logit_rows]
                out["logits"] = m.head(hr)
                h = None
            else:
                raise ValueError(f"unknown op {kind}")
        if attn_ran:
            batch.finish()
        if h is not None:
            out["h"] = h
        self.tokens += int(len(arr["tokens"]))
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

    def expert_share(self, i: int, arr: dict):
        """This worker's routed experts (and rows of the shared experts) of layer i: [T, D]."""
        def run():
            f = self.model.ffn[i]
            p = f.experts(arr["xn"], arr["ids"], arr["w"])
            if f.shared is not None and self.weights.holds(f"blk.{i}.ffn_gate_shexp.weight"):
                p += f.shared(arr["xn"])
            return p
        return self.share(run)

    def gather(self, hdr: dict, op: list, arrays: dict, own, key: str, add: bool = True):
        """Hand op to every other worker, compute our own share (own()) meanwhile, collect
        theirs: the sum of all shares (add) or {worker index: share}."""
        t_a = time.perf_counter()
        peers = self.send_to_peers(hdr, op, arrays)
        mine = own()
        t_b = time.perf_counter()
        parts = {self.index: mine}
        for idx, pid, ch in peers:
            try:
                # the peer computes its share on the other CPUs at the same time as ours:
                # spinning here takes no CPU anyone needs, and saves a wake-up
                rh, parr = ch.reply_wait(spin=PEER_SPIN_S)
            except PeerDied:
                raise PeerWorkerDied(idx, pid) from None
            if not rh.get("ok", False):
                raise RuntimeError(rh.get("error", f"worker {idx} failed its share of {op}"))
            if add:
                mine += parr[key]
            else:
                parts[idx] = parr[key]
        if _TRACE:
            log(self.index, f"  {op}: own share {(t_b - t_a) * 1e3:.2f} ms, then waited "
                            f"{(time.perf_counter() - t_b) * 1e3:.2f} ms for the others")
        return mine if add else parts

    def send_to_peers(self, hdr: dict, op: list, arrays: dict) -> list:
        """Hand op (with its arrays, tokens included) to every other worker through its channel, which the
        coordinator lends us for this stage (hdr["peers"]: [index, channel, pid])."""
        from dsd.daemon.shm_channel import Channel

        chans = []
        base = {k: hdr[k] for k in ("seqs", "n", "pos0") if k in hdr}
        frees = {i: q for i, q in hdr.pop("peer_free", ())}  # passed on once (first command)
        for idx, name, pid, path in hdr.get("peers", ()):
            ch = self.peer_channels.get(name)
            if ch is None:
                ch = self.peer_channels[name] = Channel.attach_driver(name, self.sock_dir, self.ch.spin * 1e6,
                                                                      path)
            if self.peer_pids.get(name) != pid:  # the peer was restarted: watch the new process
                if ch.peer_fd is not None:
                    os.close(ch.peer_fd)
                try:
                    ch.peer_fd, self.peer_pids[name] = os.pidfd_open(pid), pid
                except (ProcessLookupError, TypeError):
                    ch.peer_fd = None
                    self.peer_pids.pop(name, None)
                    raise PeerWorkerDied(idx, pid) from None
            ch.resync()
            ch.send(dict(base, ops=[op], free=frees.get(idx, []), **({"t_sent": time.perf_counter()} if _TRACE else {})),
                    arrays)
            chans.append((idx, pid, ch))
        return chans

    def serve(self) -> None:

        io = threading.Thread(target=self.io_loop, name="dsd-worker-io", daemon=True)
        io.start()
        from dsd.daemon.driver import NAP_MARGIN

        idle = 0.0
        while not self.stop:
            try:
                # the coordinator's hint of this idle gap: block through it, spin at its end
                if self.assign.get("spin_between"):  # see Coordinator._assign
                    hdr, arr = self.ch.wait_command(0.0, BETWEEN_SPIN_S)
                elif self.assign.get("block_between"):  # the coordinator runs on our CPUs
                    hdr, arr = self.ch.wait_command(0.0, 1e-9)
                else:
                    nap = idle - NAP_MARGIN if idle > 4 * self.ch.spin else 0.0
                    hdr, arr = self.ch.wait_command(nap, 2 * NAP_MARGIN if nap > 0 else None)
                idle = float(hdr.get("idle", 0.0))
            except PeerDied:
                break
            t0 = time.perf_counter()
            try:
                out = self.execute(hdr, arr)
                if _TRACE:
                    t1 = time.perf_counter()
                    self.ch.reply({"ok": True, "t_done": t1}, out)
                    log(self.index, f"T={len(arr.get('tokens', ()))} ops={hdr.get('ops')} "
                                    f"{(t1 - t0) * 1e3:.2f} ms (woke {(t0 - hdr.get('t_sent', t0)) * 1e3:.2f} ms "
                                    f"after the send)")
                else:
                    self.ch.reply({"ok": True}, out)
            except PeerWorkerDied as exc:  # the coordinator fails the requests, restarts it
                self.ch.reply({"ok": False, "error": str(exc), "dead_peer": exc.index}, {})
            except Exception as exc:  # report, keep serving: one bad batch must not kill us
                import traceback

                traceback.print_exc()
                self.ch.reply({"ok": False, "error": f"worker {self.index}: {type(exc).__name__}: {exc}"}, {})
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
