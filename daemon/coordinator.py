"""The daemon's coordinator process: sockets, workers, supervision, scheduling.

Threads: the main thread runs the I/O loop (ZeroMQ client and worker sockets, worker pidfds,
outgoing messages from the engine) and supervises workers; the engine thread runs the
Scheduler, which drives the workers through shared-memory channels.  Only the main thread
touches ZeroMQ sockets (the engine hands messages over an inproc PUSH socket of its own).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import zmq

from dsd.daemon import protocol as P
from dsd.daemon import worker_protocol as W
from dsd.daemon.client_side import ClientSide
from dsd.daemon.restarts import RestartPolicy
from dsd.daemon.admission import Admission
from dsd.daemon.config import worker_count
from dsd.daemon.watchdog import StallWatch
from dsd.daemon.shm_channel import Channel, remove_fifos, shm_prefix


class WorkerHandle:
    def __init__(self, index: int, vnode, threads: int, policy=None):
        self.index, self.vnode, self.threads = index, vnode, threads
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.channel: Channel | None = None
        self.state = "starting"
        self.progress = (0, 0)
        self.phase = ""               # while loading: "allocating" (pre-faulting) or "loading"
        self.stats: dict = {}
        self.outstanding = False
        self.policy = policy       # restarts.RestartPolicy
        self.error = ""
        self.old_fds: list[int] = []
        self.ident = None   # instance_dir.Identity of the current process (pid, start time, cmdline)


class Daemon(ClientSide):
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.sock_dir = P.resolve_socket_dir(cfg["socket_dir"], cfg["instance"])
        self.stopping = False
        self.state = "starting"
        self.error = ""
        self.ever_ready = False
        self.ready = threading.Event()
        self.t_start = time.time()
        self.bad_frames = {"ctl": 0, "workers": 0}   # frames refused (protocol.ProtocolError)
        self._bad_logged = 0.0

    def log(self, msg: str) -> None:
        print(f"[dsd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -- setup -------------------------------------------------------------------------------
    def _check_strict_pools(self, vnodes, topo) -> None:
        """With --pages 1g/2m, fail before any worker loads if a node's pool cannot hold its slices."""
        kind = self.cfg["pages"]
        if kind not in ("1g", "2m"):
            return
        from dsd.daemon.slice_weights import SliceWeights
        from dsd.errors import HugePagePoolError
        from dsd.numa.topology import PAGE_BYTES, node_pool_path

        page = PAGE_BYTES[kind]
        need: dict[int, int] = {}
        for v, pieces in zip(vnodes, self.plan.pieces):
            nbytes = SliceWeights(self.gguf, pieces, allocate=False).nbytes
            need[v.node] = need.get(v.node, 0) + -(-max(nbytes, 4096) // page)
        short = []
        for node, n_pages in sorted(need.items()):
            pool = topo.node(node).pool(kind)
            if pool.free < n_pages:
                path = node_pool_path(node, kind, "/", topo.numa_kernel)
                short.append(f"node {node} needs {n_pages} {kind} page(s) but its pool has {pool.free} "
                             f"free of {pool.total}: `echo {pool.total + n_pages - pool.free} > {path}`")
        if short:
            raise HugePagePoolError(f"--pages {kind}: " + "; ".join(short) +
                                    " (or `dsd doctor --model PATH --nodes N --apply`, or --pages auto)")

    def _setup(self) -> None:
        from dsd.errors import DsdError
        from dsd.numa import read_topology, virtual_nodes
        from dsd.shard.chat_template import ChatTemplate
        from dsd.shard.gguf_file import open_gguf
        from dsd.shard.model_path import resolve_model
        from dsd.shard.tokenizer import Tokenizer
        from dsd.daemon.placement import make_plan

        from dsd.daemon.instance_dir import clean_stale, hold_lock

        P.make_socket_dir(self.sock_dir)
        self.lock_fd = hold_lock(self.sock_dir, self.cfg["instance"])   # DsdError if one runs
        left = clean_stale(self.sock_dir, self.cfg["instance"])        # a crashed daemon's files
        if left:
            self.log(f"removed files of a previous daemon that did not stop cleanly: {', '.join(left)}")
        self.http_sock = None
        if self.cfg.get("http"):   # bind now: a taken port or a bad address fails the start
            try:
                from dsd.daemon.http_serve import bind, parse_http_address
                import dsd.daemon.http_api  # noqa: F401  (starlette, uvicorn)
            except ImportError as exc:
                raise DsdError(f"--http: the HTTP API needs starlette and uvicorn ({exc}); "
                               f"pip install 'dsd[http]' or drop --http") from None
            self.http_addr = parse_http_address(self.cfg["http"])
            self.http_sock = bind(*self.http_addr)
        self.model_path = resolve_model(self.cfg["model"] or None)
        self.gguf = open_gguf(self.model_path)
        from dsd.shard.gguf_check import check_memory_fit, check_model

        check_model(self.gguf)  # tensors vs metadata, before any worker loads (shard/gguf_check.py)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.template = ChatTemplate.from_metadata(self.gguf.metadata)
        n = worker_count(self.cfg)
        self.plan = make_plan(self.gguf, n, self.cfg["placement"])
        for line in self.plan.describe():
            self.log(line)
        topo = read_topology()
        for w in check_memory_fit(self.plan.worker_bytes(), topo, pages=self.cfg["pages"]):
            self.log(f"warning: {w}")
        vnodes, note = virtual_nodes(n, topo)
        self.numa_note = note
        if note:
            self.log(note)
        self._check_strict_pools(vnodes, topo)
        g = self.gguf
        self.d_model = int(g.arch_get("embedding_length"))
        self.vocab = int(g.tensors["token_embd.weight"].shape[0])
        from dsd.daemon.kv_budget import make_budget, parse_size

        self.kv_budget = make_budget(g, self.plan, parse_size(self.cfg.get("kv_memory", "auto")),
                                     kv_type=self.cfg.get("kv_type", "f32"))
        for line in self.kv_budget.describe():
            self.log(line)
        trained = int(g.arch_get("context_length", 4096) or 4096)
        asked = int(self.cfg["context"])
        self.context = min(trained, asked) if asked > 0 else trained
        if self.kv_budget.tokens < self.context:
            if self.kv_budget.tokens < 256:
                raise DsdError(f"the KV budget holds only {self.kv_budget.tokens} tokens of context "
                               f"({self.kv_budget.describe()[0]}); free memory or raise --kv-memory")
            self.log(f"context {self.context} -> {self.kv_budget.tokens}: what the KV budget holds")
            self.context = self.kv_budget.tokens
        k = int(g.arch_get("expert_used_count", 0) or 0)
        T = int(self.cfg["prefill_chunk"]) + int(self.cfg["max_batch"])
        rows = int(self.cfg["max_batch"]) + 1
        data = max(T * (8 + 8 * self.d_model + 12 * k), rows * self.vocab * 4) + 16 * 64 + 4096
        from dsd.daemon import calibrate

        self.transport = calibrate.measure()   # this host's wake-up latency and timer overshoot
        if int(self.cfg["spin_us"]) > 0:
            self.transport["spin_us"] = float(self.cfg["spin_us"])
        self.log("transport: wake-up {wake_us} us, timer overshoot {overshoot_us} us -> spin {spin_us} us, "
                 "nap margin {nap_margin_us} us".format(**self.transport))
        spin_us = self.transport["spin_us"]
        self.handles = []
        huge = bool(self.cfg.get("channel_hugepages")) and self._channel_hugepages(topo, data)
        for i, v in enumerate(vnodes):
            h = WorkerHandle(i, v, int(self.cfg["threads_per_node"]) or len(v.cpus), RestartPolicy(
                self.cfg["restart_max"], self.cfg["restart_window_s"], self.cfg["restart_healthy_s"]))
            name = f"{shm_prefix(self.cfg['instance'])}w{i}"
            h.channel = Channel.create(name, data, self.sock_dir, spin_us, hugepages=huge)
            self.handles.append(h)
        # the workers' fixed links (daemon/sharded.py): links[(a, b)] carries a's requests to b
        self.links = {}
        for a in range(n):
            for b in range(n):
                if a != b:
                    self.links[a, b] = Channel.create(f"{shm_prefix(self.cfg['instance'])}l{a}to{b}", data,
                                                      self.sock_dir, spin_us, hugepages=huge)
        kinds = sorted({c.page_kind for c in [h.channel for h in self.handles] + list(self.links.values())})
        self.log("activation channels: " + ("2 MiB hugepages" if kinds == ["2m"] else
                 "/dev/shm" + ("" if not self.cfg.get("channel_hugepages") else
                               " (channel_hugepages: no 2 MiB pages to spare beyond the weights)")))
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME)
        self.ctl.bind(P.ctl_endpoint(self.sock_dir))
        self.wrk = self.ctx.socket(zmq.ROUTER)
        self.wrk.setsockopt(zmq.LINGER, 0)
        self.wrk.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME)
        self.wrk.bind(P.workers_endpoint(self.sock_dir))
        self.out = self.ctx.socket(zmq.PULL)
        self.out.bind("inproc://out")
        self.engine_push = None  # created in the engine thread
        self.engine_lock = threading.Lock()
        self._write_info()

    def _channel_hugepages(self, topo, data_bytes: int) -> bool:
        """Put the activation channels in 2 MiB pages only when the pool can spare them after
        the workers' weights, counted as if all of them went to 2 MiB pages (the worst case of
        --pages auto/2m): the channels are created first and must not starve the weights."""
        from dsd.daemon.shm_channel import DATA, HUGE_2M

        free = sum(n.pool("2m").free for n in topo.nodes)
        pages = self.cfg["pages"]
        need = 0 if pages in ("1g", "thp", "4k") else sum(-(-b // HUGE_2M) + 1 for b in self.plan.worker_bytes())
        n = len(self.plan.pieces)
        need += n * n * -(-(DATA + data_bytes) // HUGE_2M)   # n command channels, n(n-1) links
        return free > 0 and free >= need

    def _write_info(self) -> None:
        from dsd.daemon.config import log_path

        from dsd.daemon.instance_dir import Identity

        info = {"pid": os.getpid(), "instance": self.cfg["instance"], "socket_dir": self.sock_dir,
                "log_file": log_path(self.cfg), "shm": [h.channel.name for h in self.handles] + [c.name for c in getattr(self, "links", {}).values()],
                "workers": [h.pid for h in self.handles if h.pid]}
        # start time + command line of each worker: `dsd stop` kills only these processes
        for h in self.handles:
            if h.pid and getattr(h, "ident", None) is None:
                h.ident = Identity.of(h.pid)
        info["worker_ids"] = {str(h.pid): [h.ident.start, h.ident.cmdline]
                              for h in self.handles if h.pid and h.ident.start is not None}
        tmp = P.info_file(self.sock_dir) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, P.info_file(self.sock_dir))

    # -- workers -----------------------------------------------------------------------------
    def _spawn(self, h: WorkerHandle) -> None:
        cmd = [sys.executable, "-m", "dsd.cli", "worker", "--socket-dir", self.sock_dir,
               "--index", str(h.index)]
        env = dict(os.environ)
        env.pop("DSD_API_KEY", None)   # the HTTP key stays in the coordinator
        # numba's OpenMP pool threads spin ~300k iterations after every parallel region before
        # sleeping.  Workers that share a node's CPUs (more --nodes than nodes) take turns on
        # them, so they spin 3000 (forward medians of --nodes 2 in three interleaved rounds:
        # 16.9 / 17.0 / 14.5 ms with 1000, 14.0 / 15.1 / 13.9 with 3000, 18.0 / 15.8 / 14.3 with
        # 10000).  A worker alone on its CPUs spins 10000, which keeps its pool awake between the
        # kernels of a step (--nodes 1 decode +8% over 1000).  BENCHMARKS.md, session 3.
        env.setdefault("GOMP_SPINCOUNT", "3000" if h.vnode.shared > 1 else "10000")
        # numpy's OpenBLAS sizes its pool when numpy is imported, before the worker pins itself:
        # on a node share of 1 CPU a 2-thread BLAS pool runs both threads on that CPU (an
        # 88-token prompt took 2.5x as long in rows mode).  One BLAS thread per CPU it will use.
        borrow = h.vnode.shared > 1 and not self.own_cpus()
        env["OPENBLAS_NUM_THREADS"] = str(len(h.vnode.node_cpus) if borrow else (h.threads or len(h.vnode.cpus)))
        h.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True, env=env)
        h.pid = h.proc.pid
        h.ident = None
        if h.pidfd is not None:
            h.old_fds.append(h.pidfd)
        h.pidfd = os.pidfd_open(h.pid)
        h.channel.peer_fd = h.pidfd
        h.state, h.progress, h.error, h.phase = "starting", (0, 0), "", ""
        self._write_info()
        self.log(f"worker {h.index}: pid {h.pid}, node {h.vnode.node}, CPUs {list(h.vnode.cpus)}")

    def _engine_main(self) -> None:
        if self._with_driver() is not None:
            # one worker drives every step and idles while we sample, schedule and send tokens:
            # every thread of ours (engine, client I/O, ZeroMQ's) runs on its CPUs, so the other
            # workers keep theirs (a peer pre-empted by us made a step's share wait 0.3-0.4 ms);
            # that worker and we hand the CPUs to each other by blocking, neither spins
            cpus = set(self.handles[self._with_driver()].vnode.cpus)
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), cpus)
                except OSError:
                    pass
        while True:   # an unexpected error in the engine fails its requests, never the daemon
            try:
                self.scheduler.run()
                return
            except Exception as exc:
                import traceback

                traceback.print_exc()
                self.log(f"engine error: {type(exc).__name__}: {exc}; failing the in-flight requests")
                try:
                    self.scheduler.fail_all(f"the daemon failed this request: internal error "
                                            f"{type(exc).__name__}: {exc}")
                except Exception:
                    self.scheduler.active = []
                if self.scheduler.stopping or self.stopping:
                    return

    def _with_driver(self) -> int | None:
        """The worker whose CPUs we share (rows mode on a shared node, one driving worker)."""
        if self.own_cpus() and len(set(self.plan.layer_owner)) == 1 and \
                len({h.vnode.node for h in self.handles}) == 1:
            return self.plan.layer_owner[0]
        return None

    def own_cpus(self) -> bool:
        """rows mode with CPUs of its own for every worker (a node with fewer CPUs than workers
        has them share CPUs: spinning there would stall the sibling)."""
        cpus = [c for h in self.handles for c in h.vnode.cpus]
        return self.plan.mode == "rows" and self.plan.n_workers > 1 and len(cpus) == len(set(cpus))

    def _assign(self, h: WorkerHandle) -> dict:
        return W.build(W.TO_WORKER, "assign", plan=self.plan.to_dict(), node=h.vnode.node, **{
                "cpus": list(h.vnode.cpus), "threads": h.threads, "pages": self.cfg["pages"],
                # rows mode splits every heavy product, so each worker keeps its own CPUs and
                # spins between the commands of a pass: on a shared node, workers that take turns
                # on all of its CPUs pay a process switch per turn (~0.1-0.25 ms on this VM)
                "node_cpus": list(h.vnode.node_cpus) if h.vnode.shared > 1 and not self.own_cpus() else None,
                "spin_between": self.own_cpus() and h.index != self._with_driver(),
                "block_between": h.index == self._with_driver(),
                "channel": h.channel.name, "channel_path": h.channel.path,
                "links": [[j, self.links[h.index, j].name, self.links[h.index, j].path,
                           self.links[j, h.index].name, self.links[j, h.index].path]
                          for j in range(len(self.handles)) if j != h.index],
                "spin_us": self.transport["spin_us"], "context": self.context,
                "kv_type": self.cfg.get("kv_type", "f32"),
                "coordinator_pid": os.getpid()})

    def _worker_of(self, ident: bytes, msg: dict) -> WorkerHandle | None:
        """The worker a message comes from: identity b"w<index>" of a worker we started, the
        same index in the message, and for hello/ready the pid we spawned."""
        s = ident.decode("ascii", "replace")
        if not (s[:1] == "w" and s[1:].isdigit() and int(s[1:]) < len(self.handles)):
            raise P.ProtocolError(f"worker message from unknown identity {ident[:16]!r}")
        h = self.handles[int(s[1:])]
        if msg["index"] != h.index:
            raise P.ProtocolError(f"worker {h.index} sent a message for index {msg['index']}")
        if "pid" in msg and msg["pid"] != h.pid:
            raise P.ProtocolError(f"worker {h.index} message names pid {msg['pid']}, not its pid {h.pid}")
        return h

    def _on_worker_frames(self, frames: list) -> None:
        try:
            if len(frames) != 2:
                raise P.ProtocolError(f"worker message of {len(frames) - 1} frames (one expected)")
            msg = W.decode(frames[1], W.FROM_WORKER)
            h = self._worker_of(frames[0], msg)
        except P.ProtocolError as e:
            self._bad_frame("workers", str(e))
            return
        self._on_worker_msg(frames[0], h, msg)

    def _on_worker_msg(self, ident: bytes, h: WorkerHandle, msg: dict) -> None:
        t = msg["type"]
        if t == "hello":
            if msg["v"] != P.VERSION:
                self._worker_failed(h, f"worker speaks protocol v{msg['v']}, coordinator v{P.VERSION}")
                return
            if h.state != "starting":
                self._bad_frame("workers", f"worker {h.index} said hello again while {h.state}")
                return
            h.state = "loading"
            self.wrk.send_multipart([ident, P.pack(self._assign(h))])
        elif t == "progress":
            h.progress = (msg["done"], msg["total"])
            h.phase = msg.get("phase", "")
        elif t == "ready":
            h.state, h.stats = "ready", msg.get("stats", {})
            h.policy.ready()
            h.progress = (h.stats.get("weight_bytes", 0),) * 2
            self.log(f"worker {h.index} ready (pid {h.pid})")
            if all(x.state == "ready" for x in self.handles):
                self.state = "ready"
                self.ever_ready = True
                self.ready.set()
                self.log(f"ready: {len(self.handles)} worker(s), socket {P.ctl_endpoint(self.sock_dir)}")
        elif t == "stats":
            h.stats = msg.get("stats", h.stats)
        elif t == "fatal":
            self._worker_failed(h, msg.get("message", "unknown error"))

    def _worker_failed(self, h: WorkerHandle, message: str) -> None:
        h.state, h.error = "failed", message
        self.log(f"worker {h.index} failed: {message}")
        if not self.ever_ready or h.policy.recent() >= h.policy.max:
            self.fail(f"worker {h.index} failed: {message}")

    def _on_worker_exit(self, h: WorkerHandle) -> None:
        code = h.proc.wait() if h.proc else None
        self.ready.clear()
        if self.stopping:
            h.state = "stopped"
            return
        was = h.state
        h.state = "dead"
        self.log(f"worker {h.index} (pid {h.pid}) exited with code {code} while {was}")
        if hasattr(self, "scheduler"):
            self.scheduler.worker_died(f"worker {h.index} (pid {h.pid}) died (exit code {code}) while "
                                       f"serving this request; the daemon is restarting it, retry the request")
        if was == "failed" or not self.ever_ready:
            self.fail(h.error or f"worker {h.index} exited with code {code} while {was}; see the log")
            return
        if not self.cfg["restart_workers"]:
            self.fail(f"worker {h.index} died and will not be restarted (restart_workers is off)")
            return
        ok, why = h.policy.allow()
        if not ok:
            self.fail(f"worker {h.index} died and will not be restarted: {why}")
            return
        self.state = "restarting"
        self.log(f"restarting worker {h.index} ({h.policy.recent()} restart(s) in the last "
                 f"{h.policy.window:g} s, at most {h.policy.max})")
        self._spawn(h)

    def fail(self, message: str) -> None:
        if not self.error:
            self.error = message
            self.state = "failed"
            self.log(f"start failed: {message}" if not self.ever_ready else f"failed: {message}")
        self.stopping = True

    # -- main ----------------------------------------------------------------------------------
    def run(self) -> int:
        from dsd.daemon.driver import Driver
        from dsd.daemon.scheduler import Scheduler

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *a: setattr(self, "stopping", True))
        try:
            self._setup()
        except Exception as exc:
            from dsd.errors import is_user_error

            msg = str(exc) if is_user_error(exc) else f"{type(exc).__name__}: {exc}"
            self.fail(msg)
            if not is_user_error(exc):
                import traceback

                traceback.print_exc()
            self._cleanup()
            return 1
        self.admission = Admission(int(self.cfg["max_batch"]), int(self.cfg["max_queue"]),
                                   float(self.cfg["request_timeout"]))
        self.driver = Driver(self.plan, self.handles, self.transport["nap_margin_us"] * 1e-6)
        self.watch = StallWatch(self, float(self.cfg["stall_timeout_s"]), float(self.cfg["stall_kill_s"]))
        if self._with_driver() is not None:
            self.driver.block_on = {self._with_driver()}
        self.scheduler = Scheduler(self.tokenizer, self.driver, self.context,
                                   int(self.cfg["max_batch"]), int(self.cfg["prefill_chunk"]),
                                   self.engine_send, self.ready, self.log,
                                   prefix_cache_tokens=int(self.cfg["prefix_cache_tokens"]),
                                   kv_tokens=self.kv_budget.tokens)
        engine = threading.Thread(target=self._engine_main, name="dsd-engine", daemon=True)
        engine.start()
        for h in self.handles:
            self._spawn(h)
        self.state = "loading"
        if self.cfg.get("http"):
            self._start_http()
        deadline = time.monotonic() + float(self.cfg["ready_timeout"])
        poller = zmq.Poller()
        for s in (self.ctl, self.wrk, self.out):
            poller.register(s, zmq.POLLIN)
        fd_map: dict[int, WorkerHandle] = {}
        try:
            while not self.stopping:
                for h in self.handles:
                    if h.pidfd not in fd_map:
                        for fd in [f for f, x in fd_map.items() if x is h]:
                            poller.unregister(fd)
                            del fd_map[fd]
                        if h.pidfd is not None:
                            poller.register(h.pidfd, zmq.POLLIN)
                            fd_map[h.pidfd] = h
                events = dict(poller.poll(200))
                if self.wrk in events:
                    while self.wrk.poll(0):
                        self._on_worker_frames(self.wrk.recv_multipart())
                if self.ctl in events:
                    while self.ctl.poll(0):
                        self._on_client_frames(self.ctl.recv_multipart())
                if self.out in events:
                    while self.out.poll(0):
                        ident, data = self.out.recv_multipart()
                        self._forward(ident, P.unpack(data))
                if self.admission.reqs:
                    self._expire()
                    self._ping_silent()
                self.watch.check()
                self._check_http()
                for fd, h in list(fd_map.items()):
                    if fd in events and h.pidfd == fd and h.state not in ("dead", "stopped"):
                        self._on_worker_exit(h)
                if not self.ever_ready and time.monotonic() > deadline:
                    self.fail(f"workers not ready after {self.cfg['ready_timeout']:.0f}s "
                              f"(ready_timeout); see the log")
                if self.ready.is_set() and self.state == "restarting":
                    self.state = "ready"
        finally:
            self.log("stopping")
            self.scheduler.inbox.put(("stop", None))
            engine.join(timeout=10)
            # deliver the engine's last messages (e.g. "shutting down" errors)
            while self.out.poll(50):
                ident, data = self.out.recv_multipart()
                self._forward(ident, P.unpack(data))
            self._cleanup()
        return 1 if self.error else 0

    def _start_http(self) -> None:
        """The HTTP API runs in a process of its own (dsd/commands/http_frontend.py) on the socket
        bound at start, so its Python does not share our GIL with the scheduling loop."""
        self.http_restarts: list[float] = []
        self._spawn_http()
        host, port = self.http_addr
        h = f"[{host}]" if ":" in host else host
        self.log(f"HTTP API on http://{h}:{self.http_sock.getsockname()[1]} (process {self.http_proc.pid})")

    def _spawn_http(self) -> None:
        env = dict(os.environ)
        env.pop("DSD_API_KEY", None)
        if self.cfg.get("api_key"):
            env["DSD_API_KEY"] = self.cfg["api_key"]   # never on a command line (ps shows those)
        fd = self.http_sock.fileno()
        self.http_proc = subprocess.Popen(
            [sys.executable, "-m", "dsd.cli", "http-frontend", "--socket-dir", self.sock_dir, "--fd", str(fd)],
            stdin=subprocess.DEVNULL, pass_fds=(fd,), env=env)

    def _check_http(self) -> None:
        """Restart an HTTP process that died (at most 5 times a minute: then the daemon fails)."""
        p = getattr(self, "http_proc", None)
        if p is None or p.poll() is None or self.stopping:
            return
        now = time.monotonic()
        self.http_restarts = [t for t in self.http_restarts if now - t < 60] + [now]
        if len(self.http_restarts) > 5:
            self.fail(f"the HTTP API process died {len(self.http_restarts)} times within a minute "
                      f"(last exit code {p.returncode}); see the log")
            return
        self.log(f"the HTTP API process (pid {p.pid}) exited with code {p.returncode}; restarting it")
        self._spawn_http()

    def _cleanup(self) -> None:
        hp = getattr(self, "http_proc", None)
        if hp is not None and hp.poll() is None:
            hp.terminate()   # uvicorn finishes open responses (timeout_graceful_shutdown 5 s)
            try:
                hp.wait(timeout=7)
            except subprocess.TimeoutExpired:
                hp.kill()
                hp.wait()
        if getattr(self, "http_sock", None) is not None:
            self.http_sock.close()
        for h in getattr(self, "handles", []):
            if h.proc and h.proc.poll() is None:
                try:
                    self.wrk.send_multipart([f"w{h.index}".encode(), P.pack({"type": "stop"})])
                except Exception:
                    pass
                if h.channel is not None:
                    h.channel.stop()
        t_end = time.monotonic() + 5
        for h in getattr(self, "handles", []):
            if h.proc:
                try:
                    h.proc.wait(timeout=max(0.1, t_end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    h.proc.kill()
                    h.proc.wait()
            for fd in [h.pidfd] + h.old_fds:
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            if h.channel is not None:
                name = h.channel.name
                h.channel.close(unlink=True)
                remove_fifos(self.sock_dir, name)
        for ch in getattr(self, "links", {}).values():
            ch.close(unlink=True)
            remove_fifos(self.sock_dir, ch.name)
        for s in ("ctl", "wrk", "out", "engine_push"):
            sock = getattr(self, s, None)
            if sock is not None:
                try:
                    sock.close(0)
                except Exception:
                    pass
        if getattr(self, "lock_fd", None) is None:
            # another daemon holds the instance (or the directory was refused): its files are not ours
            self.log("stopped")
            return
        for f in ("ctl.sock", "workers.sock", "daemon.json", "daemon.pid"):
            try:
                os.unlink(os.path.join(self.sock_dir, f))
            except FileNotFoundError:
                pass
        os.close(self.lock_fd)   # the lock goes last: until now a new start waits for us
        self.lock_fd = None
        try:
            os.rmdir(self.sock_dir)
        except OSError:
            pass
        self.log("stopped")


def run_daemon(cfg: dict) -> int:
    return Daemon(cfg).run()
