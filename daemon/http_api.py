"""OpenAI-compatible HTTP API in front of the dsd daemon (Starlette app served by uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics (Prometheus text).

The app talks to a *backend* with the dsd.client.AsyncClient API:
    await backend.chat(messages, stream=True, **sampling)   -> async iterator of chunks
    await backend.generate(prompt, stream=True, **sampling) -> async iterator of chunks
    await backend.status(), await backend.model_info()
where a chunk has .text, .finish_reason (None until the last) and, on the last, .prompt_tokens
and .completion_tokens.  Chat text is split into content, reasoning_content and tool_calls by
the parser daemon/reasoning.py picks for the model (model_info()["chat_format"]); for a model
with such markup (and for requests with tools) the backend is asked for the raw text with its
special tokens: chat(..., raw=True, keep_special=True, tools=[...]).  Both streaming and
non-streaming HTTP requests use the backend's stream form: one code path, per-token timing for
the decode tok/s metric, and one way to cancel (closing the iterator, which the client turns
into a cancel of the daemon request) when the HTTP client goes away.

`serve()` runs the server blocking (for a process of its own); `start_server()` runs it in a
thread of the caller (for the coordinator) and returns a handle with .stop().
"""
from __future__ import annotations

import hmac
import inspect
import json
import logging
import math
import os
import time

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from dsd.daemon import reasoning
from dsd.daemon.http_metrics import Metrics
from dsd.daemon.http_schema import (ApiError, ParsedRequest, full_response, new_id, parse_chat,
                                    parse_completion, parse_json_body, stream_chunk, usage)
from dsd.errors import DsdError

try:   # the daemon's client library; until it exists, stand-ins with the same names and bases
    from dsd.client import DaemonBusy, DaemonNotRunning, InvalidRequest, RequestFailed, RequestTimeout
except ImportError:  # pragma: no cover - depends on which parts of dsd are installed
    class DaemonNotRunning(DsdError):
        """No daemon answers on the socket directory."""

    class InvalidRequest(DsdError):
        """The daemon refused the request (bad parameters, prompt longer than the context)."""

    class RequestFailed(DsdError):
        """The daemon accepted the request but failed while answering it."""

    class DaemonBusy(RequestFailed):
        """Too many requests in flight."""

    class RequestTimeout(RequestFailed):
        """The request's deadline passed."""

log = logging.getLogger("dsd.http")

MAX_BODY_BYTES = 8 * 1024 * 1024     # a full 128k-token context is ~0.5-1 MB of text
BODY_TIMEOUT_S = 30.0                # a request body must arrive within this (slow clients)
STATUS_TIMEOUT_S = 5.0


# -- backend helpers -----------------------------------------------------------------------------
def _field(obj, *names, default=None):
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return v
    return default


async def _maybe_await(v):
    return await v if inspect.isawaitable(v) else v


def _map_backend_error(exc: BaseException, prompt_param: str | None = None) -> ApiError:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequest):
        code = getattr(exc, "code", None)
        low = msg.lower()
        if code is None and "context" in low and ("token" in low or "long" in low):
            code = "context_length_exceeded"
        param = getattr(exc, "param", None)
        if code == "context_length_exceeded" and param is None:
            param = prompt_param
        return ApiError(400, msg, "invalid_request_error", param, code)
    if isinstance(exc, DaemonNotRunning):
        return ApiError(503, msg, "server_error", None, "daemon_not_running")
    if isinstance(exc, DaemonBusy):
        return ApiError(429, msg, "rate_limit_error", None, "daemon_busy",
                        {"Retry-After": str(max(1, math.ceil(getattr(exc, "retry_after", None) or 1)))})
    if isinstance(exc, RequestTimeout):
        return ApiError(504, msg, "server_error", None, "timeout")
    if isinstance(exc, RequestFailed):
        retry = getattr(exc, "retry_after", None)
        if retry is not None:   # a worker died and is being restarted: try again shortly
            return ApiError(503, msg, "server_error", None, "worker_restarting",
                            {"Retry-After": str(max(1, math.ceil(retry)))})
        return ApiError(500, msg, "server_error", None, "request_failed")
    if isinstance(exc, DsdError):     # user-fixable: the request asked for something dsd refuses
        return ApiError(400, msg, "invalid_request_error", None, None)
    log.exception("unexpected error answering an HTTP request", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {msg}", "server_error", None, None)


def _error_response(e: ApiError, headers: dict | None = None) -> JSONResponse:
    h = {**getattr(e, "headers", {}), **(headers or {})}
    return JSONResponse(e.body(), status_code=e.status, headers=h or None)


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class _Run:
    """One generation: the backend's chunk iterator plus what the HTTP layer measures on it."""

    def __init__(self, it, metrics: Metrics):
        self.it = it
        self.metrics = metrics
        self.t_first = self.t_last = None
        self.chunks = 0
        self.prompt_tokens = None
        self.cached_tokens = None
        self.completion_tokens = None
        self.finish = None
        self.done = False
        self.closed = False
        metrics.in_flight += 1

    async def next(self):
        """The next chunk, or None at the end."""
        if self.done:
            return None
        try:
            c = await self.it.__anext__()
        except StopAsyncIteration:
            self.done = True
            return None
        now = time.monotonic()
        self.t_first = self.t_first or now
        self.t_last = now
        self.chunks += 1
        self.prompt_tokens = _field(c, "prompt_tokens", default=self.prompt_tokens)
        self.cached_tokens = _field(c, "cached_tokens", default=self.cached_tokens)
        self.completion_tokens = _field(c, "completion_tokens", default=self.completion_tokens)
        fr = _field(c, "finish_reason")
        if fr is not None:
            self.finish = fr
            self.done = True
        return c

    def usage(self) -> dict:
        ct = self.completion_tokens if self.completion_tokens is not None else self.chunks
        return usage(int(self.prompt_tokens or 0), int(ct), int(self.cached_tokens or 0))

    async def close(self, cancelled: bool = False) -> None:
        """Close the backend iterator (a cancel for the daemon when it was not finished) and book
        the tokens. Shielded: it runs while the HTTP task is being cancelled by a disconnect."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            closer = getattr(self.it, "aclose", None)
            if closer is not None and not self.done:
                try:
                    await _maybe_await(closer())
                except Exception:   # a failing cancel must not hide the request's own outcome
                    log.exception("closing a backend stream failed")
        self.metrics.in_flight -= 1
        u = self.usage()
        dec = (self.t_last - self.t_first) if self.t_first is not None else None
        self.metrics.tokens(u["prompt_tokens"], u["completion_tokens"], dec)
        if cancelled:
            self.metrics.disconnects += 1


class _Disconnected(Exception):
    pass


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its generator: when the client disconnects while the
    generator is parked at a `yield`, Starlette cancels the send and would otherwise leave the
    generator (and the daemon request behind it) to the garbage collector."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _until_disconnect(request: Request, fn):
    """Run `fn()` while watching the connection; raise _Disconnected (after cancelling fn) if the
    client goes away first. Used while no response has started (prefill, non-streaming)."""
    box: dict = {}
    async with anyio.create_task_group() as tg:
        async def watch():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    box["disconnected"] = True
                    tg.cancel_scope.cancel()
                    return

        async def main():
            try:
                box["value"] = await fn()
            except BaseException as e:    # re-raised below, outside the task group
                if not isinstance(e, anyio.get_cancelled_exc_class()):
                    box["error"] = e
                else:
                    raise
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(main)
    if "error" in box:
        raise box["error"]
    if box.get("disconnected"):
        raise _Disconnected()
    return box["value"]


class _Api:
    def __init__(self, backend, api_key: str | None, model_name: str | None, max_body_bytes: int):
        self.backend = backend
        self.api_key = api_key
        self.model_name = model_name
        self.model_extra: dict = {}
        self.chat_format = None       # daemon/reasoning.py's chat_format() of the model
        self.info_done = False
        self.max_body = max_body_bytes
        self.body_timeout = BODY_TIMEOUT_S
        self.metrics = Metrics()
        self.created = int(time.time())

    # -- plumbing --------------------------------------------------------------------------------
    def route(self, path: str, fn, methods: list[str], endpoint: str, auth: bool = True) -> Route:
        async def handler(request: Request) -> Response:
            request.state.endpoint = endpoint   # one label per route, streamed or not
            try:
                if auth:
                    self.check_auth(request)
                resp = await fn(request)
            except ApiError as e:
                resp = _error_response(e, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
            except _Disconnected:
                resp = Response(status_code=499)   # nginx's "client closed request"; never sent
            except Exception as e:
                resp = _error_response(_map_backend_error(e))
            if not isinstance(resp, StreamingResponse):  # streams book themselves when they end
                self.metrics.request_done(endpoint, resp.status_code)
            return resp
        return Route(path, handler, methods=methods)

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key. Send the daemon's key (DSD_API_KEY or "
                                "`dsd start --api-key-file`) as 'Authorization: Bearer KEY'.",
                           "invalid_request_error", None, "invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        too_big = ApiError(413, f"The request body is larger than {self.max_body} bytes.",
                           "invalid_request_error", None, "request_too_large")
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.max_body:
            raise too_big
        buf = bytearray()
        try:
            with anyio.fail_after(self.body_timeout):
                async for part in request.stream():
                    buf += part
                    if len(buf) > self.max_body:
                        raise too_big
        except ClientDisconnect:
            raise _Disconnected() from None   # gone before its body arrived: nothing to answer
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {self.body_timeout:g} s "
                                f"({len(buf)} bytes received); send it at once.",
                           "invalid_request_error", None, "request_timeout",
                           {"Connection": "close"}) from None
        return parse_json_body(bytes(buf))

    async def info(self) -> None:
        """Ask the backend once for the model's file name and context length."""
        if self.info_done:
            return
        try:
            info = await _maybe_await(self.backend.model_info())
        except Exception:
            if self.model_name is None:
                raise
            return        # the name was given; the context length stays unknown for now
        self.info_done = True
        self.chat_format = _field(info, "chat_format")
        ctx = _field(info, "context_length", "context", "n_ctx", "max_model_len")
        if isinstance(ctx, int) and not isinstance(ctx, bool):
            self.model_extra["context_length"] = ctx
        if self.model_name is None:
            name = os.path.basename(str(_field(info, "path", "model_path", default="")))
            if name.endswith(".gguf"):
                name = name[:-5]
            self.model_name = str(name or _field(info, "name", "model", "id", default="dsd"))

    async def name(self) -> str:
        """The served model's id: model_name if given, else the GGUF file name without .gguf
        (what llama-server shows too), else the model's general.name."""
        await self.info()
        return self.model_name

    # -- endpoints -------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """200 {"status": "ok"} when the daemon answers and is ready; 503 otherwise (starting,
        restarting a worker, failed, not running, busy past the timeout)."""
        status = getattr(self.backend, "status", None)
        if status is None:
            return JSONResponse({"status": "ok"})
        try:
            with anyio.fail_after(STATUS_TIMEOUT_S):
                st = await _maybe_await(status())
        except TimeoutError:
            e = ApiError(503, "the daemon did not answer a status query within "
                              f"{STATUS_TIMEOUT_S:g} s", "server_error", None, "daemon_busy")
            return JSONResponse({"status": "unavailable", **e.body()}, status_code=503)
        except Exception as exc:
            e = _map_backend_error(exc)
            return JSONResponse({"status": "unavailable", **e.body()}, status_code=503)
        state = _field(st, "state", default="ready")
        if state != "ready":
            e = ApiError(503, f"the daemon is {state}" + (f": {_field(st, 'error')}" if _field(st, "error") else ""),
                         "server_error", None, f"daemon_{state}")
            return JSONResponse({"status": str(state), **e.body()}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        st, err = None, None
        status = getattr(self.backend, "status", None)
        if status is not None:
            try:
                with anyio.fail_after(STATUS_TIMEOUT_S):
                    st = await _maybe_await(status())
            except Exception as exc:     # still serve our own counters
                err = f"{type(exc).__name__}: {exc}"
        return PlainTextResponse(self.metrics.render(st, err),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_obj(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "dsd",
                **self.model_extra}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_obj(await self.name())]})

    async def model(self, request: Request) -> Response:
        name = await self.name()
        if request.path_params["model"] != name:
            raise ApiError(404, f"The model '{request.path_params['model']}' does not exist; this "
                                f"server serves '{name}'.", "invalid_request_error", "model",
                           "model_not_found")
        return JSONResponse(self.model_obj(name))

    async def chat(self, request: Request) -> Response:
        req = parse_chat(await self.read_json(request))
        return await self.generate(request, req, request.state.endpoint)

    async def completions(self, request: Request) -> Response:
        req = parse_completion(await self.read_json(request))
        return await self.generate(request, req, request.state.endpoint)

    async def open_run(self, req: ParsedRequest) -> _Run:
        if req.kind == "chat":
            extra = {}
            if req.tools or reasoning.needs_special(self.chat_format):
                extra = {"raw": True, **({"tools": req.tools} if req.tools else {}),
                         **({"keep_special": True} if reasoning.needs_special(self.chat_format) else {})}
            it = await _maybe_await(self.backend.chat(req.messages, stream=True, **extra, **req.sampling))
        else:
            it = await _maybe_await(self.backend.generate(req.prompt, stream=True, **req.sampling))
        if hasattr(it, "__aiter__") and not hasattr(it, "__anext__"):
            it = it.__aiter__()
        return _Run(it, self.metrics)

    async def generate(self, request: Request, req: ParsedRequest, endpoint: str) -> Response:
        model = await self.name()
        rid = new_id(req.kind)
        if "max_tokens" not in req.sampling and "context_length" in self.model_extra:
            # OpenAI semantics: without max_tokens, generate until a stop or the context is full
            # (the daemon caps the count at context - prompt), not the daemon's short default
            req.sampling["max_tokens"] = self.model_extra["context_length"]
        try:
            run = await _until_disconnect(request, lambda: self.open_run(req))
        except InvalidRequest as e:
            raise _map_backend_error(e, "messages" if req.kind == "chat" else "prompt") from e
        try:
            # Wait for the first chunk before answering, so a refusal that the daemon only reports
            # once it tokenizes (prompt longer than the context) is still a clean 4xx.
            first = await _until_disconnect(request, run.next)
            if not req.stream:
                parts = [_field(first, "text", default="")] if first is not None else []

                async def rest():
                    while (c := await run.next()) is not None:
                        parts.append(_field(c, "text", default=""))
                await _until_disconnect(request, rest)
        except _Disconnected:
            await run.close(cancelled=True)
            raise
        except InvalidRequest as e:
            await run.close()
            raise _map_backend_error(e, "messages" if req.kind == "chat" else "prompt") from e
        except BaseException:
            await run.close()
            raise
        if not req.stream:
            await run.close()
            text, reasoning_text, calls = "".join(parts), "", None
            if req.kind == "chat":
                p = reasoning.make_parser(self.chat_format, req.tools)
                ev = p.feed(text) + p.finish()
                text = "".join(v for k, v in ev if k == "content")
                reasoning_text = "".join(v for k, v in ev if k == "reasoning")
                calls = [v for k, v in ev if k == "tool_call"] or None
            finish = run.finish or "stop"
            return JSONResponse(full_response(req, rid, model, text,
                                              "tool_calls" if calls and finish == "stop" else finish,
                                              run.usage(), reasoning_text, calls))
        return _SSEResponse(self.sse(req, rid, model, run, first, endpoint),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def sse(self, req: ParsedRequest, rid: str, model: str, run: _Run, first, endpoint: str):
        created = int(time.time())
        finished = False
        parser = reasoning.make_parser(self.chat_format, req.tools) if req.kind == "chat" else None
        n_calls = 0

        def deltas(events):
            nonlocal n_calls
            for kind, v in events:
                if kind == "tool_call":
                    n_calls += 1
                    yield _sse(stream_chunk(req, rid, created, model, tool_call=v, tool_index=n_calls - 1))
                else:
                    yield _sse(stream_chunk(req, rid, created, model, **{
                        "text" if kind == "content" else "reasoning": v}))
        try:
            if req.kind == "chat":
                yield _sse(stream_chunk(req, rid, created, model, role=True))
            elif req.echo:
                yield _sse(stream_chunk(req, rid, created, model, text=req.prompt))
            c = first
            try:
                while c is not None:
                    text = _field(c, "text", default="")
                    if parser is not None:
                        for d in deltas(parser.feed(text) if text else []):
                            yield d
                    elif text:
                        yield _sse(stream_chunk(req, rid, created, model, text=text))
                    c = await run.next()
                if parser is not None:
                    for d in deltas(parser.finish()):
                        yield d
            except (Exception, anyio.get_cancelled_exc_class()) as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                # headers are sent: report the failure in-band the way OpenAI does, then end
                yield _sse(_map_backend_error(exc).body())
                yield "data: [DONE]\n\n"
                finished = True
                return
            finish = run.finish or "stop"
            yield _sse(stream_chunk(req, rid, created, model,
                                    finish="tool_calls" if n_calls and finish == "stop" else finish))
            await run.close()
            if req.include_usage:
                yield _sse(stream_chunk(req, rid, created, model, u=run.usage(), usage_only=True))
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            await run.close(cancelled=not finished)
            self.metrics.request_done(endpoint, 200 if finished else 499)


def create_app(backend, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app. `backend` has the dsd.client.AsyncClient API; `model_name` is the id shown
    in /v1/models and responses (default: asked from backend.model_info())."""
    api = _Api(backend, api_key or None, model_name, max_body_bytes)
    routes = [
        api.route("/v1/chat/completions", api.chat, ["POST"], "chat_completions"),
        api.route("/v1/completions", api.completions, ["POST"], "completions"),
        api.route("/v1/models", api.models, ["GET"], "models"),
        api.route("/v1/models/{model:path}", api.model, ["GET"], "models"),
        api.route("/health", api.health, ["GET"], "health", auth=False),
        api.route("/metrics", api.metrics_text, ["GET"], "metrics"),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        e = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     "invalid_request_error", None, kind)
        api.metrics.request_done("other", exc.status_code)
        return _error_response(e, getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error_response(_map_backend_error(exc))

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, 500: server_error})
    app.state.api = api          # tests and the daemon reach the counters through this
    return app


# -- serving (daemon/http_serve.py; re-exported for the callers of this module) ------------------
from dsd.daemon.http_serve import (DEFAULT_HOST, DEFAULT_PORT, ServerThread, is_loopback,  # noqa: E402,F401
                                   parse_http_address, serve, start_server)
