"""Python client of the dsd daemon (sync `Client` and asyncio `AsyncClient`, same API).

    from dsd.client import Client
    c = Client()                                    # the default instance's daemon
    r = c.chat([{"role": "user", "content": "Hi"}], temperature=0)
    print(r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens)
    for chunk in c.generate("Once upon a time", stream=True, max_tokens=50):
        print(chunk.text, end="")

Sampling keywords are dsd.shard.sampling.SamplingParams fields (temperature, top_k, top_p,
min_p, repetition_penalty, repeat_last_n, seed, max_tokens, stop, ignore_eos); `timeout=SECONDS`
is the request's deadline (the daemon cancels it then: RequestTimeout).  A daemon with
max_batch + max_queue requests in flight refuses more at once: DaemonBusy (.retry_after).
Errors: DaemonNotRunning, InvalidRequest, RequestFailed (all dsd.errors.DsdError).
This module imports only zmq and msgpack (no numpy/numba), so it is cheap to import.
"""
from __future__ import annotations

import contextlib

import os
import time
import uuid
from dataclasses import dataclass

import zmq

from dsd.daemon import protocol as P
from dsd.errors import DsdError

__all__ = ["Client", "AsyncClient", "Result", "Chunk", "DaemonNotRunning", "InvalidRequest",
           "DaemonBusy", "RequestTimeout",
           "RequestFailed"]


class DaemonNotRunning(DsdError):
    """No daemon answers on the instance's socket (start one with `dsd start`)."""


class InvalidRequest(DsdError):
    """The daemon rejected the request as sent (bad parameters, prompt too long...)."""


class RequestFailed(DsdError):
    """The daemon accepted the request but failed while serving it (e.g. a worker died);
    retry_after: seconds after which a retry should work (None: not known to help)."""

    retry_after: float | None = None


class DaemonBusy(RequestFailed):
    """The daemon has as many requests in flight as it queues (max_batch + max_queue); retry
    after retry_after seconds."""


class RequestTimeout(RequestFailed):
    """The request's `timeout` passed before it finished; the daemon cancelled it."""


@dataclass
class Result:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] | None = None    # the generated token ids
    cached_tokens: int = 0                # prompt tokens the daemon's prefix cache supplied
    reasoning: str = ""                   # chat: the model's thinking (text is the answer)
    tool_calls: list[dict] | None = None  # chat with tools: [{"id", "name", "arguments": JSON}]


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None      # set on the last chunk
    completion_tokens: int | None = None  # set on the last chunk
    token_ids: list[int] | None = None     # token ids this chunk's text came from
    cached_tokens: int | None = None       # set on the last chunk: prompt tokens from the prefix cache
    reasoning: str = ""                    # chat: thinking text in this chunk
    tool_calls: list[dict] | None = None   # chat with tools: calls completed in this chunk


_POLL_MS = 500


def _reply(data: bytes) -> dict:
    """A daemon reply checked against protocol.TO_CLIENT (a malformed one fails the call)."""
    try:
        return P.decode(data, P.TO_CLIENT)
    except P.ProtocolError as e:
        raise RequestFailed(f"the daemon sent a malformed reply ({e}); is the client the same dsd "
                            f"version as the daemon?") from None


def _request(type_: str, **fields) -> dict:
    try:
        msg = P.build(P.TO_DAEMON, type_, **fields)
        P.pack(msg)   # an integer past 64 bits, a lone surrogate, an object msgpack cannot hold
    except P.ProtocolError as e:
        raise InvalidRequest(str(e)) from None
    except (OverflowError, TypeError, ValueError) as e:
        raise InvalidRequest(f"the request cannot be sent: {type(e).__name__}: {e} (integers must "
                             f"fit in 64 bits, text must be valid Unicode)") from None
    return msg


def _raise(msg: dict):
    kind, text = msg.get("kind"), msg.get("message", "request failed")
    if kind in (P.INVALID, "version"):
        raise InvalidRequest(text)
    exc = {P.BUSY: DaemonBusy, P.TIMEOUT: RequestTimeout}.get(kind, RequestFailed)(text)
    exc.retry_after = msg.get("retry_after")   # seconds, when a retry should succeed (worker restart)
    raise exc


def _parsed(c, parser, state: dict, last: bool):
    """Chunk or Result `c` with its raw text split by a daemon/reasoning.py parser into answer
    text, reasoning and tool calls (finish_reason "tool_calls" once a call was made)."""
    ev = parser.feed(c.text) + (parser.finish() if last else [])
    c.text = "".join(v for k, v in ev if k == "content")
    c.reasoning = "".join(v for k, v in ev if k == "reasoning")
    c.tool_calls = [v for k, v in ev if k == "tool_call"] or None
    state["calls"] = state.get("calls", 0) + len(c.tool_calls or ())
    if last and state["calls"] and c.finish_reason == "stop":
        c.finish_reason = "tool_calls"
    return c


class _Base:
    def __init__(self, socket_dir: str | None = None, instance: str | None = None,
                 timeout: float = 10.0):
        self.socket_dir = P.resolve_socket_dir(socket_dir, instance)
        self.timeout = timeout  # for status/model_info/ping replies
        self.endpoint = P.ctl_endpoint(self.socket_dir)

    def _check_running(self) -> int:
        from dsd.daemon.instance_dir import check_instance_dir, stale_pid_file

        check_instance_dir(self.socket_dir)   # UnsafeSocketDir if another user could swap it
        if stale_pid_file(self.socket_dir):   # its pid may name another process by now
            raise DaemonNotRunning(f"no dsd daemon is running (socket directory {self.socket_dir} holds "
                                   f"files of a daemon that did not stop cleanly; `dsd start` or "
                                   f"`dsd stop` removes them)")
        pid = P.read_pid(self.socket_dir)
        if pid is None or not os.path.exists(os.path.join(self.socket_dir, "ctl.sock")):
            raise DaemonNotRunning(f"no dsd daemon is running (socket directory {self.socket_dir}); "
                                   f"start one with `dsd start`")
        return pid

    def _alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _gen_msg(self, stream: bool, sampling: dict, **src) -> dict:
        """timeout (seconds, in sampling): the daemon cancels the request when it passes;
        tools (chat) and keep_special are request fields too, not sampling ones."""
        timeout = sampling.pop("timeout", None)
        extra = {"timeout": float(timeout)} if timeout is not None else {}
        for k in ("tools", "keep_special"):
            if sampling.get(k) is not None:
                extra[k] = sampling.pop(k)
            sampling.pop(k, None)
        return _request("generate", id=uuid.uuid4().hex, stream=bool(stream), params=sampling,
                        **extra, **src)

    @staticmethod
    def _give_up_at(msg: dict) -> float | None:
        """Past the request's timeout (plus a grace for the daemon's own answer) the client
        stops waiting even if the daemon says nothing."""
        t = msg.get("timeout")
        return time.monotonic() + t + 10.0 if t else None

    @staticmethod
    def _check_deadline(msg: dict, give_up: float | None) -> None:
        if give_up is not None and time.monotonic() > give_up:
            raise RequestTimeout(f"no answer within the request's timeout of {msg['timeout']:g} s")

    @staticmethod
    def _src_prompt(prompt) -> dict:
        if isinstance(prompt, str):
            return {"prompt": prompt}
        if isinstance(prompt, (list, tuple)):
            return {"prompt_ids": [int(t) for t in prompt]}
        raise InvalidRequest("prompt must be a string or a list of token ids")

    @staticmethod
    def _to_chunk(m: dict) -> Chunk:
        last = m.get("finish_reason") is not None
        return Chunk(m.get("text", ""), m.get("finish_reason"),
                     m.get("prompt_tokens") if last else None,
                     m.get("completion_tokens") if last else None, m.get("token_ids"),
                     m.get("cached_tokens", 0) if last else None)


class Client(_Base):
    """Synchronous client; one ZeroMQ socket per call, so it is safe to share between threads."""

    def _socket(self):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    def _call(self, msg: dict) -> dict:
        pid = self._check_running()
        s = self._socket()
        try:
            s.send(P.pack(_request(**{"type_" if k == "type" else k: v for k, v in msg.items()})))
            waited = 0.0
            while not s.poll(_POLL_MS):
                waited += _POLL_MS / 1000
                if not self._alive(pid) or waited >= self.timeout:
                    raise DaemonNotRunning(f"the dsd daemon (pid {pid}) does not answer on "
                                           f"{self.endpoint}; check `dsd status` and its log")
            m = _reply(s.recv())
        finally:
            s.close(0)
        if m.get("type") == "error":
            _raise(m)
        return m

    def _stream(self, msg: dict):
        pid = self._check_running()
        s = self._socket()
        done = False
        try:
            s.send(P.pack(msg))
            give_up = self._give_up_at(msg)
            while True:
                while not s.poll(_POLL_MS):
                    self._check_deadline(msg, give_up)
                    if not self._alive(pid):
                        raise RequestFailed(f"the dsd daemon (pid {pid}) exited while serving "
                                            f"the request; see its log")
                m = _reply(s.recv())
                if m.get("type") == "error":
                    done = True
                    _raise(m)
                if m.get("type") != "chunk" or m.get("id") != msg["id"]:
                    continue
                if m.get("finish_reason") is not None:
                    done = True
                yield m
                if done:
                    return
        finally:
            if not done:  # the caller stopped early: tell the daemon to stop generating
                s.setsockopt(zmq.LINGER, 200)
                try:
                    s.send(P.pack(_request("cancel", id=msg["id"])))
                except zmq.ZMQError:
                    pass
            s.close(0 if done else 200)  # linger 0 would drop the queued cancel

    def _run(self, msg: dict, stream: bool):
        if stream:
            return (self._to_chunk(m) for m in self._stream(msg))
        m = None
        for m in self._stream(msg):
            pass
        return Result(m["text"], m["finish_reason"], m["prompt_tokens"], m["completion_tokens"],
                      m.get("token_ids"), m.get("cached_tokens", 0))

    def generate(self, prompt, stream: bool = False, **sampling):
        """Raw text (or token ids) continuation: Result, or an iterator of Chunk if stream."""
        return self._run(self._gen_msg(stream, sampling, **self._src_prompt(prompt)), stream)

    def chat(self, messages: list[dict], stream: bool = False, tools: list | None = None,
             raw: bool = False, **sampling):
        """Chat with the model's template: Result, or an iterator of Chunk if stream.  The
        model's reasoning and tool calls (given `tools`, OpenAI's list) come apart from the
        answer in .reasoning / .tool_calls; raw=True gives the generated text unparsed."""
        if raw:
            return self._run(self._gen_msg(stream, dict(sampling, tools=tools),
                                           messages=list(messages)), stream)
        from dsd.daemon.reasoning import make_parser, needs_special

        fmt = self._chat_format()
        msg = self._gen_msg(stream, dict(sampling, tools=tools, keep_special=needs_special(fmt) or None),
                            messages=list(messages))
        parser, state = make_parser(fmt, tools), {}
        if not stream:
            return _parsed(self._run(msg, False), parser, state, True)
        return (_parsed(c, parser, state, c.finish_reason is not None) for c in self._run(msg, True))

    def _chat_format(self):
        if getattr(self, "_fmt", None) is None:
            try:
                self._fmt = self.model_info().get("chat_format") or "plain"
            except InvalidRequest:   # a daemon from before chat_format
                self._fmt = "plain"
        return self._fmt

    def status(self) -> dict:
        return self._call({"type": "status"})

    def model_info(self) -> dict:
        return self._call({"type": "model_info"})

    def ping(self) -> bool:
        try:
            return self._call({"type": "ping"}).get("type") == "pong"
        except DaemonNotRunning:
            return False

    def shutdown(self) -> None:
        self._call({"type": "shutdown"})


class AsyncClient(_Base):
    """asyncio client with Client's API; stream=True gives an async iterator of Chunk."""

    def _socket(self):
        import zmq.asyncio

        s = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    async def _call(self, msg: dict) -> dict:
        pid = self._check_running()
        s = self._socket()
        try:
            await s.send(P.pack(_request(**{"type_" if k == "type" else k: v for k, v in msg.items()})))
            waited = 0.0
            while not await s.poll(_POLL_MS):
                waited += _POLL_MS / 1000
                if not self._alive(pid) or waited >= self.timeout:
                    raise DaemonNotRunning(f"the dsd daemon (pid {pid}) does not answer on "
                                           f"{self.endpoint}; check `dsd status` and its log")
            m = _reply(await s.recv())
        finally:
            s.close(0)
        if m.get("type") == "error":
            _raise(m)
        return m

    async def _stream(self, msg: dict):
        pid = self._check_running()
        s = self._socket()
        done = False
        try:
            await s.send(P.pack(msg))
            give_up = self._give_up_at(msg)
            while True:
                while not await s.poll(_POLL_MS):
                    self._check_deadline(msg, give_up)
                    if not self._alive(pid):
                        raise RequestFailed(f"the dsd daemon (pid {pid}) exited while serving "
                                            f"the request; see its log")
                m = _reply(await s.recv())
                if m.get("type") == "error":
                    done = True
                    _raise(m)
                if m.get("type") != "chunk" or m.get("id") != msg["id"]:
                    continue
                if m.get("finish_reason") is not None:
                    done = True
                yield m
                if done:
                    return
        finally:
            if not done:
                s.setsockopt(zmq.LINGER, 200)
                try:
                    s.send(P.pack(_request("cancel", id=msg["id"])))
                except zmq.ZMQError:
                    pass
            s.close(0 if done else 200)  # linger 0 would drop the queued cancel

    async def _chunks(self, msg: dict):
        # aclosing: closing this iterator (client gone) closes _stream now, which sends the cancel
        async with contextlib.aclosing(self._stream(msg)) as stream:
            async for m in stream:
                yield self._to_chunk(m)

    async def _result(self, msg: dict) -> Result:
        m = None
        async for m in self._stream(msg):
            pass
        return Result(m["text"], m["finish_reason"], m["prompt_tokens"], m["completion_tokens"],
                      m.get("token_ids"), m.get("cached_tokens", 0))

    def _run(self, msg: dict, stream: bool):
        # stream=True returns the async iterator directly (no await), like `async for c in
        # client.chat(..., stream=True)`; stream=False returns a coroutine to await.
        return self._chunks(msg) if stream else self._result(msg)

    def generate(self, prompt, stream: bool = False, **sampling):
        return self._run(self._gen_msg(stream, sampling, **self._src_prompt(prompt)), stream)

    def chat(self, messages: list[dict], stream: bool = False, tools: list | None = None,
             raw: bool = False, **sampling):
        """Client.chat: .reasoning / .tool_calls apart from the answer unless raw."""
        if raw:
            return self._run(self._gen_msg(stream, dict(sampling, tools=tools),
                                           messages=list(messages)), stream)
        msg = self._gen_msg(stream, dict(sampling, tools=tools), messages=list(messages))
        return self._parsed_chunks(msg, tools) if stream else self._parsed_result(msg, tools)

    async def _chat_format(self):
        if getattr(self, "_fmt", None) is None:
            try:
                self._fmt = (await self.model_info()).get("chat_format") or "plain"
            except InvalidRequest:
                self._fmt = "plain"
        return self._fmt

    async def _parsed_setup(self, msg, tools):
        from dsd.daemon.reasoning import make_parser, needs_special

        fmt = await self._chat_format()
        if needs_special(fmt):
            msg["keep_special"] = True
        return make_parser(fmt, tools), {}

    async def _parsed_result(self, msg, tools) -> Result:
        parser, state = await self._parsed_setup(msg, tools)
        return _parsed(await self._result(msg), parser, state, True)

    async def _parsed_chunks(self, msg, tools):
        parser, state = await self._parsed_setup(msg, tools)
        async with contextlib.aclosing(self._chunks(msg)) as chunks:
            async for c in chunks:
                yield _parsed(c, parser, state, c.finish_reason is not None)

    async def status(self) -> dict:
        return await self._call({"type": "status"})

    async def model_info(self) -> dict:
        return await self._call({"type": "model_info"})

    async def ping(self) -> bool:
        try:
            return (await self._call({"type": "ping"})).get("type") == "pong"
        except DaemonNotRunning:
            return False
