"""Serving the HTTP API: address parsing, binding (before anything else starts, so a taken port
fails `dsd start`), uvicorn in a thread or blocking, and uvicorn's own error answers (malformed
HTTP) as OpenAI-style JSON."""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time

from dsd.errors import DsdError

log = logging.getLogger("dsd.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def parse_http_address(spec: str | None) -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); HOST defaults to 127.0.0.1 so nothing outside this machine
    can connect unless asked for explicitly. IPv6 hosts go in brackets: '[::1]:8080'."""
    if spec is None or spec == "":
        return DEFAULT_HOST, DEFAULT_PORT
    s = str(spec).strip()
    host, port_s = DEFAULT_HOST, s
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1:].startswith(":"):
            raise DsdError(f"--http {spec!r}: write an IPv6 address as [ADDR]:PORT, e.g. [::1]:8080")
        host, port_s = s[1:end], s[end + 2:]
    elif ":" in s:
        host, port_s = s.rsplit(":", 1)
        host = host or DEFAULT_HOST
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise DsdError(f"--http {spec!r}: the port must be a number 0-65535, e.g. --http 8080 "
                       f"or --http 127.0.0.1:8080")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- serving -------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket for host:port, or DsdError naming the address and the fix."""
    host = host.strip("[]")    # '[::1]' as written in --http [::1]:8080
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections
        # only then, and without it Nagle + delayed ACK add ~40 ms to every response
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise DsdError(f"cannot listen for HTTP on {host}:{port}: {why}; pick another "
                       f"address with --http HOST:PORT or stop the program using it") from e
    sock.set_inheritable(True)
    return sock


_bind = bind


def _warn_exposure(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        log.warning("HTTP API on %s is reachable from other machines and has no API key", host)


class _LazyClient:
    """dsd.client.AsyncClient created on first use, inside the server's event loop (asyncio
    sockets belong to the loop that made them)."""

    def __init__(self, socket_dir):
        self.socket_dir = socket_dir
        self._client = None

    def __getattr__(self, name):
        if self._client is None:
            from dsd.client import AsyncClient
            self._client = AsyncClient(self.socket_dir) if self.socket_dir is not None else AsyncClient()
        return getattr(self._client, name)


HEADER_TIMEOUT_S = 10.0   # a connection must deliver a request's headers within this (slowloris)


def _error_bytes(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


def _protocol_class():
    """uvicorn's h11 protocol with JSON error bodies and a deadline for a request's headers."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._hdr_timer = None
            self._arm()

        def _arm(self) -> None:
            if getattr(self, "_hdr_timer", None) is not None:
                self._hdr_timer.cancel()
            self._hdr_timer = self.loop.call_later(self.header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self._hdr_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if not (self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
                    and self.conn.trailing_data[0]):
                self.transport.close()   # idle keep-alive, or a cycle that cannot continue
                return
            self._send_json(408, f"the request headers did not arrive within {self.header_timeout:g} s",
                            "request_timeout")

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete and self._hdr_timer is not None:
                self._hdr_timer.cancel()
                self._hdr_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if getattr(self, "_hdr_timer", None) is not None:
                self._hdr_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._send_json(400, f"{msg} Send a well-formed HTTP/1.1 request.", "bad_http_request")

        def _send_json(self, status: int, message: str, code: str) -> None:
            body = _error_bytes(status, message, code)
            out = b"".join([
                f"HTTP/1.1 {status} {'Bad Request' if status == 400 else 'Request Timeout'}\r\n".encode(),
                b"content-type: application/json\r\n", f"content-length: {len(body)}\r\n".encode(),
                b"connection: close\r\n\r\n", body])
            self.transport.write(out)
            self.transport.close()

    Protocol.header_timeout = HEADER_TIMEOUT_S
    return Protocol


class _Sparse(logging.Filter):
    """uvicorn logs one warning per malformed request: a flood of them would fill the daemon's
    log, so each message text passes at most once per 10 s, with a count of the ones dropped."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, list] = {}

    def filter(self, record) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = str(record.msg)
        now = time.monotonic()
        last = self.seen.setdefault(key, [0.0, 0])
        if now - last[0] < 10.0:
            last[1] += 1
            return False
        if last[1]:
            record.msg = f"{record.msg} (and {last[1]} more like it in the last 10 s)"
        self.seen[key] = [now, 0]
        return True


_SPARSE = _Sparse()


def uvicorn_config(app, log_level: str, header_timeout: float = HEADER_TIMEOUT_S):
    import uvicorn

    lg = logging.getLogger("uvicorn.error")
    if _SPARSE not in lg.filters:
        lg.addFilter(_SPARSE)

    proto = _protocol_class()
    proto.header_timeout = header_timeout
    return uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
                          http=proto, timeout_keep_alive=5)


class ServerThread:
    """uvicorn serving `app` in a background thread. port=0 picks a free port (see .port);
    sock: an already listening socket (the daemon binds before it starts anything else)."""

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "warning",
                 sock: socket.socket | None = None, header_timeout: float = HEADER_TIMEOUT_S):
        import uvicorn

        self.host = host.strip("[]")
        self.sock = sock if sock is not None else bind(host, int(port))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, log_level, header_timeout))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"dsd-http-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DsdError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, socket_dir=None,
                 api_key: str | None = None, model_name: str | None = None, backend=None,
                 log_level: str = "warning", sock: socket.socket | None = None) -> ServerThread:
    """Serve in a thread of the calling process; returns the started ServerThread (.stop())."""
    from dsd.daemon.http_api import create_app

    _warn_exposure(host.strip("[]"), api_key)
    app = create_app(backend if backend is not None else _LazyClient(socket_dir), api_key, model_name)
    return ServerThread(app, host, port, log_level, sock=sock).start()


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, socket_dir=None,
          api_key: str | None = None, model_name: str | None = None, backend=None,
          log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (in the main thread) or until the process ends."""
    import uvicorn

    from dsd.daemon.http_api import create_app

    _warn_exposure(host.strip("[]"), api_key)
    sock = bind(host, int(port))
    app = create_app(backend if backend is not None else _LazyClient(socket_dir), api_key, model_name)
    server = uvicorn.Server(uvicorn_config(app, log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def serve_socket(fd: int, socket_dir: str, api_key: str | None, log_level: str = "warning") -> None:
    """The daemon's HTTP process (dsd/commands/http_frontend.py): serve on an inherited listening
    socket until SIGTERM, or until the coordinator dies (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    import uvicorn

    from dsd.daemon.http_api import create_app

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)   # die with the coordinator
    except Exception:
        pass
    sock = socket.socket(fileno=fd)
    host = sock.getsockname()[0]
    _warn_exposure(host, api_key)
    server = uvicorn.Server(uvicorn_config(create_app(_LazyClient(socket_dir), api_key, None), log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
