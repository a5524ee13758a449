"""Continuous batching in the coordinator's engine thread.

Each step builds one flat batch: one new token for every decoding sequence (up to max_batch)
plus, if a prompt is waiting, its next chunk of at most prefill_chunk tokens, so a long prompt
never stalls running streams for more than one chunk.  New requests join between steps.  The
KV cache of each layer lives in the worker that owns the layer, and with MLA heads split
(rows mode) also in every worker that holds heads of it (the driver only names sequence ids); finished or failed sequences are freed on every worker with the next command, or at
once when the daemon goes idle.
Sampling, stop strings and incremental detokenisation run here, as in dsd.shard.engine.
"""
from __future__ import annotations

import itertools
import queue
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dsd.daemon import protocol as P
from dsd.daemon.driver import WorkerDied, WorkerError

_seq_ids = itertools.count(1)


@dataclass
class Request:
    rid: str
    client: bytes
    prompt_ids: list[int]
    params: object               # SamplingParams
    stream: bool
    sampler: object = None
    stops: object = None
    decoder: object = None
    seq: int = field(default_factory=lambda: next(_seq_ids))
    history: list[int] = field(default_factory=list)
    pos: int = 0                 # tokens already in the KV cache
    next_token: int | None = None
    generated: int = 0
    max_new: int = 0
    text: list[str] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)   # token ids not yet sent to the client
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_admit: float = 0.0         # monotonic time the scheduler took it (worker deaths fail older ones)
    cached: int = 0              # prompt tokens taken from the prefix cache
    fork: tuple | None = None    # (cached sequence, positions) the workers copy before its prefill
    keep_special: bool = False   # detokenize special tokens as their text (daemon/reasoning.py)


class Scheduler:
    def __init__(self, tokenizer, driver, context: int, max_batch: int, prefill_chunk: int,
                 send, ready_event, log, prefix_cache_tokens: int = 0, kv_tokens: int = 0):
        from dsd.daemon.prefix_cache import PrefixCache

        self.prefix = PrefixCache(prefix_cache_tokens)   # daemon/prefix_cache.py
        # KV positions every admitted request may grow to, plus the prefix cache's, must fit in
        # kv_tokens (daemon/kv_budget.py; 0 = no limit); requests beyond it wait in self.waiting
        self.kv_tokens = int(kv_tokens)
        self.waiting: deque = deque()
        self.tok = tokenizer
        self.driver = driver
        self.context = context
        self.max_batch = max_batch
        self.chunk = prefill_chunk
        self.send = send                 # send(client, msg): thread-safe hand-off to the I/O thread
        self.ready = ready_event         # set while every worker is ready
        self.log = log
        self.inbox: queue.Queue = queue.Queue()
        self.active: list[Request] = []
        self.stopping = False
        self.decode_window: deque = deque(maxlen=64)   # (time, tokens) per decode step
        self.completed = 0
        self.failed = 0
        self.max_decode_batch = 0
        self.steps = 0
        self.step_gaps: deque = deque(maxlen=4096)   # s between consecutive steps (see step)
        self._last_end: float | None = None

    # -- requests ----------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.inbox.put(("add", req))

    def cancel(self, rid: str, client: bytes) -> None:
        self.inbox.put(("cancel", (rid, client)))

    def worker_died(self, message: str) -> None:
        """A worker's KV caches are gone: fail every request admitted before now, even if the
        death fell between two steps (then no step sees WorkerDied, and the restarted worker
        would otherwise continue those sequences from empty caches)."""
        self.inbox.put(("worker_died", (time.monotonic(), message)))

    def _admit(self, req: Request) -> None:
        from dsd.shard.sampling import Sampler, StopStrings

        n = len(req.prompt_ids)
        if n >= self.context:
            self._error(req, P.INVALID, f"prompt has {n} tokens but the context holds "
                                        f"{self.context}; shorten it (or raise --context)")
            return
        req.sampler = Sampler(req.params)
        req.stops = StopStrings(req.params.stop)
        req.decoder = self.tok.decoder(skip_special=not req.keep_special)
        req.history = list(req.prompt_ids)
        req.max_new = min(req.params.max_tokens, self.context - n)
        if self.kv_tokens:
            need = n + req.max_new
            if need > self.kv_tokens:
                self._error(req, P.INVALID, f"the prompt ({n} tokens) and max_tokens ({req.max_new}) need "
                                            f"{need} tokens of KV cache but the daemon's KV budget holds "
                                            f"{self.kv_tokens}; lower max_tokens, shorten the prompt or "
                                            f"raise --kv-memory")
                return
            if not self._fits(need):
                self.waiting.append(req)   # admitted when running requests finish
                return
        self._activate(req)

    def _fits(self, need: int) -> bool:
        """Can a request that may grow to `need` positions start now? Evicts cached prefixes
        (least recently used first) to make room."""
        active = sum(len(r.prompt_ids) + r.max_new for r in self.active)
        if active + self.prefix.tokens + need > self.kv_tokens:
            self.driver.free(self.prefix.evict_to(self.kv_tokens - active - need))
        return active + self.prefix.tokens + need <= self.kv_tokens

    def _admit_waiting(self) -> None:
        while self.waiting and self._fits(len(self.waiting[0].prompt_ids) + self.waiting[0].max_new):
            self._activate(self.waiting.popleft())

    def _activate(self, req: Request) -> None:
        req.t_admit = time.monotonic()
        src, m = self.prefix.match(req.prompt_ids)
        if src is not None:   # start from a copy of the cached prefix: prefill only the rest
            req.fork, req.pos, req.cached = (src, m), m, m
        self.active.append(req)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, val = item
            if kind == "add":
                self._admit(val)
            elif kind == "cancel":
                rid, client = val
                for r in list(self.active):
                    if r.rid == rid and r.client == client:
                        self._finish(r, None)
                for r in list(self.waiting):
                    if r.rid == rid and r.client == client:
                        self.waiting.remove(r)
            elif kind == "worker_died":
                t_death, message = val
                self._forget_cache()
                doomed = [r for r in self.active if r.t_admit <= t_death]
                self.log(f"a worker died: failing {len(doomed)} in-flight request(s)")
                for r in doomed:
                    self.failed += 1
                    self._finish(r, {"type": "error", "id": r.rid, "kind": P.FAILED, "message": message})
            elif kind == "stop":
                self.stopping = True
            elif kind == "hops":   # transport benchmark: empty round trips to every worker
                client, n = val
                self.send(client, {"type": "hops", "ns": self._hops(n)})
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    # -- outputs -----------------------------------------------------------------------------
    def _error(self, req: Request, kind: str, message: str) -> None:
        self.send(req.client, {"type": "error", "id": req.rid, "kind": kind, "message": message})

    def _finish(self, req: Request, msg: dict | None) -> None:
        if req in self.active:
            self.active.remove(req)
        if req.fork is not None:   # admitted, never ran: it has no KV (the fork did not happen)
            self.prefix.unpin(req.fork[0])
            req.fork, req.pos = None, 0
        if req.pos:
            if msg is not None and msg.get("type") == "error":
                self.driver.free([req.seq])
            else:   # its KV holds the tokens fed so far: keep it for a prompt that starts so
                evicted = self.prefix.insert(req.seq, req.history[:req.pos])
                if req.seq not in evicted:   # kept: its buffers shrink to what is kept
                    self.driver.compact(req.seq, req.pos)
                self.driver.free(evicted)
        if msg is not None:
            self.send(req.client, msg)

    def _emit(self, req: Request, tok: int) -> None:
        """Feed one sampled token: text, stop ids, stop strings, length limit (engine.generate)."""
        p = req.params
        req.generated += 1
        req.history.append(tok)
        finish = None
        if tok in self.tok.stop_ids and not p.ignore_eos:
            tail, _ = req.stops.push(req.decoder.flush())
            text, finish = tail + req.stops.flush(), "stop"
        else:
            text, stopped = req.stops.push(req.decoder.push(tok))
            if stopped:
                finish = "stop"
            elif req.generated >= req.max_new:
                tail, stopped = req.stops.push(req.decoder.flush())
                text, finish = text + tail + ("" if stopped else req.stops.flush()), "length"
        req.next_token = tok
        req.unsent.append(tok)
        if req.stream:
            if text or finish:
                self.send(req.client, self._chunk(req, text, finish))
        else:
            req.text.append(text)
        if finish:
            if not req.stream:
                self._finish(req, self._chunk(req, "".join(req.text), finish))
            else:
                self._finish(req, None)
            self.completed += 1

    def _chunk(self, req: Request, text: str, finish) -> dict:
        ids, req.unsent = req.unsent, []
        return {"type": "chunk", "id": req.rid, "text": text, "finish_reason": finish,
                "token_ids": ids, "prompt_tokens": len(req.prompt_ids),
                "completion_tokens": req.generated, "cached_tokens": req.cached}

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> bool:
        """One forward pass over what is ready; False if there was nothing to do."""
        decode = [r for r in self.active if r.next_token is not None][: self.max_batch]
        # prompts share a budget of `chunk` tokens per step (vLLM's token budget): several short
        # prompts that arrive together are prefilled in one step (one weight pass), a long one
        # in chunks; at least one prompt advances even when the decode batch is full
        prefills, budget = [], self.chunk
        for r in self.active:
            if r.next_token is None and budget > 0 and (
                    not prefills or len(decode) + len(prefills) < self.max_batch):
                prefills.append(r)
                budget -= len(r.prompt_ids) - r.pos
        if not decode and not prefills:
            return False
        toks, seqs, ns, pos0, rows, owners = [], [], [], [], [], []
        for r in decode:
            toks.append(r.next_token)
            seqs.append(r.seq)
            ns.append(1)
            pos0.append(r.pos)
            rows.append(len(toks) - 1)
            owners.append(r)
        budget = self.chunk
        ends = []
        for r in prefills:
            a = r.pos
            b = min(len(r.prompt_ids), a + budget)
            budget -= b - a
            toks.extend(r.prompt_ids[a:b])
            seqs.append(r.seq)
            ns.append(b - a)
            pos0.append(a)
            ends.append(b)
            if b == len(r.prompt_ids):
                rows.append(len(toks) - 1)
                owners.append(r)
        t0 = time.perf_counter()
        if self._last_end is not None and self._last_end > t0 - 0.1:
            # coordinator time between two back-to-back steps (sampling, sending, admitting)
            self.step_gaps.append(t0 - self._last_end)
        self.max_decode_batch = max(self.max_decode_batch, len(decode))
        self.steps += 1
        # plain greedy rows come back as token ids (argmax on the head's worker), the others as logits
        greedy = [k for k, r in enumerate(owners) if r.sampler.plain_greedy]
        forks = [[r.fork[0], r.seq, r.fork[1], len(r.prompt_ids) + r.max_new] for r in prefills if r.fork is not None]
        # per segment the positions its sequence may grow to (a new cache is allocated once)
        caps = [len(r.prompt_ids) + r.max_new for r in decode + prefills]
        out = self.driver.forward(np.asarray(toks, dtype=np.int64), seqs, ns, pos0, rows, greedy, forks, caps)
        for r in prefills:
            if r.fork is not None:
                self.prefix.unpin(r.fork[0])
                r.fork = None
        if decode:
            self.decode_window.append((time.perf_counter(), len(decode), time.perf_counter() - t0))
        for r in decode:
            r.pos += 1
        for r, b in zip(prefills, ends):
            r.pos = b
        for row, r in enumerate(owners):
            if r not in self.active:
                continue
            if r.t_first is None:
                r.t_first = time.perf_counter()
            tok = out.token(row, r.sampler, r.history)
            self._emit(r, tok)
        self._last_end = time.perf_counter()
        return True

    def _hops(self, n: int) -> list[list[int]]:
        if not self.ready.wait(30):
            return []
        out = []
        for w in range(len(self.driver.handles)):
            out.append([self.driver.ping(w) for _ in range(int(n))])
        return out

    def _forget_cache(self) -> None:
        """A restarted worker has no caches: no prefix may be reused (the others free theirs)."""
        self.driver.free(self.prefix.clear())

    def fail_all(self, message: str, waiting: bool = False) -> None:
        """Fail the running requests (and, with waiting, those not admitted yet: at shutdown)."""
        while waiting and self.waiting:
            r = self.waiting.popleft()
            self.failed += 1
            self.send(r.client, {"type": "error", "id": r.rid, "kind": P.FAILED, "message": message})
        for r in list(self.active):
            self.failed += 1
            self._finish(r, {"type": "error", "id": r.rid, "kind": P.FAILED, "message": message})

    def run(self) -> None:
        while not self.stopping:
            if self.ready.is_set() and self.driver.needs_prepare():
                try:  # (re)started workers: resync their links and warm up before a request waits
                    self.driver.prepare()
                except (WorkerDied, WorkerError) as e:
                    self.log(f"warming up the workers: {e}")
                    self.driver.drain()
            if not self.active and self.ready.is_set() and self.driver.pending_free:
                try:  # idle: drop finished sequences' KV caches now, not with the next request
                    self.driver.flush_frees()
                except (WorkerDied, WorkerError) as e:
                    self.log(f"freeing KV caches: {e}")
                    self.driver.drain()
            self._drain_inbox(block=not self.active)
            if self.stopping:
                break
            self._admit_waiting()
            if not self.active:
                continue
            if not self.ready.is_set():
                if not self.ready.wait(0.2):
                    continue
            try:
                if not self.step():
                    continue
            except WorkerDied as e:
                self.log(f"{e}; failing {len(self.active)} in-flight request(s)")
                self.driver.drain()
                self._forget_cache()
                self.ready.clear()
                self.fail_all(f"{e} while serving this request; the daemon is restarting it, "
                              f"retry the request")
            except WorkerError as e:
                self.log(str(e))
                self.driver.drain()
                self.fail_all(f"the daemon failed this request: {e}")
        self.fail_all("the daemon is shutting down", waiting=True)

    def stats(self) -> dict:
        w = list(self.decode_window)
        tps = None
        if len(w) >= 2:
            span = w[-1][0] - w[0][0] + w[0][2]
            tps = sum(n for _, n, _ in w) / span if span > 0 else None
        return {"active": len(self.active), "queued": self.inbox.qsize() + len(self.waiting),
                "kv_tokens_reserved": sum(len(r.prompt_ids) + r.max_new for r in self.active) + self.prefix.tokens,
                "kv_tokens_budget": self.kv_tokens or None,
                "completed": self.completed, "failed": self.failed, "decode_tok_s": tps,
                "max_decode_batch": self.max_decode_batch, "steps": self.steps,
                "step_gap_us": _percentiles(self.step_gaps), "prefix_cache": self.prefix.stats()}


def _percentiles(xs) -> dict | None:
    xs = sorted(xs)
    if not xs:
        return None
    return {"p50": round(xs[len(xs) // 2] * 1e6, 1), "p99": round(xs[min(len(xs) - 1, len(xs) * 99 // 100)] * 1e6, 1),
            "n": len(xs)}
