"""An in-process backend with the dsd.client.AsyncClient API, running the real single-process
engine (dsd.shard.engine.Engine) in a thread, so the HTTP layer is tested on real model output.

One generation runs at a time (like a daemon with one slot); others wait on a lock and count as
queued. Closing a stream early (what the HTTP layer does when its client disconnects) sets a
flag the engine thread checks between tokens, so the slot is freed within one token.
"""
from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass

from dsd.daemon.http_api import InvalidRequest, RequestFailed
from dsd.errors import DsdError


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class EngineBackend:
    def __init__(self, engine, model_name: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self._slot = threading.Lock()
        self._count_lock = threading.Lock()
        self.queued = 0          # waiting for the slot
        self.active = 0          # generating now
        self.started = 0
        self.finished = 0        # ran to a finish_reason
        self.cancelled = 0       # stopped early because the consumer went away
        self.last_sampling: dict | None = None
        self.fail_after: int | None = None   # tests: raise RequestFailed after this many tokens
        self.gate: threading.Event | None = None   # tests: hold the slot until the gate opens

    # -- AsyncClient API -----------------------------------------------------------------------
    async def chat(self, messages, stream: bool = False, **sampling):
        ids = await asyncio.to_thread(self.engine.encode_chat, messages)
        return await self._run(ids, stream, sampling)

    async def generate(self, prompt, stream: bool = False, **sampling):
        ids = await asyncio.to_thread(self.engine.encode_prompt, prompt)
        return await self._run(ids, stream, sampling)

    async def status(self) -> dict:
        size = os.path.getsize(self.engine.path)
        # the shape of dsd.daemon.requests.status(), trimmed to what the HTTP layer reads
        return {"state": "ready", "pid": os.getpid(),
                "scheduler": {"queued": self.queued, "active": self.active, "decode_tok_s": None},
                "workers": [{"index": 0, "node": 0, "cpus": [0, 1], "state": "ready",
                             "weight_bytes": size, "kv_bytes": 0, "page_kinds": {"4k": size}}]}

    async def model_info(self) -> dict:
        name = self.model_name or os.path.basename(self.engine.path)
        return {"name": name, "path": self.engine.path,
                "context_length": self.engine.model.args.context_length}

    # -- internals -----------------------------------------------------------------------------
    async def _run(self, ids, stream, sampling):
        from dsd.shard.sampling import SamplingParams

        try:
            params = SamplingParams.from_dict(sampling)
        except DsdError as e:
            raise InvalidRequest(str(e)) from e
        ctx = self.engine.model.args.context_length
        if len(ids) >= ctx:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens but the context holds {ctx}; "
                                 "shorten it")
        self.last_sampling = dict(sampling)
        gen = self._stream(ids, params)
        if stream:
            return gen
        parts, last = [], None
        async for c in gen:
            parts.append(c.text)
            last = c
        return Result("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens)

    async def _stream(self, ids, params):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:       # loop closed: nobody is listening any more
                cancel.set()

        def work():
            with self._count_lock:
                self.queued += 1
            with self._slot:
                with self._count_lock:
                    self.queued -= 1
                    self.active += 1
                    self.started += 1
                n = 0
                try:
                    if self.gate is not None:
                        self.gate.wait(timeout=300)
                    if cancel.is_set():       # the client left while this request was queued
                        return
                    for step in self.engine.generate(list(ids), params):
                        if cancel.is_set():
                            return
                        n += 1
                        if self.fail_after is not None and n > self.fail_after:
                            raise RequestFailed("worker 0 died while decoding (test)")
                        put(("chunk", step, n))
                except BaseException as e:
                    put(("error", e, n))
                finally:
                    with self._count_lock:
                        self.active -= 1
                    put(("end", None, n))

        threading.Thread(target=work, name="fake-backend-engine", daemon=True).start()
        done = False
        try:
            while True:
                kind, step, n = await q.get()
                if kind == "error":
                    raise step if isinstance(step, DsdError) else RequestFailed(str(step))
                if kind == "end":       # engine ended without a finish reason (cancelled)
                    return
                if step.finish_reason is not None:
                    done = True
                    with self._count_lock:
                        self.finished += 1
                    yield Chunk(step.text, step.finish_reason, len(ids), n)
                    return
                yield Chunk(step.text)
        finally:
            if not done:
                cancel.set()
                with self._count_lock:
                    self.cancelled += 1
