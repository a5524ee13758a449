"""The coordinator's side of ctl.sock: client requests checked against protocol.TO_DAEMON and
answered, replies that never block the I/O loop, refused frames counted and logged sparingly.
A mixin of coordinator.Daemon (only the main thread touches these sockets)."""
from __future__ import annotations

import os
import time

import zmq

from dsd.daemon import protocol as P


class ClientSide:
    def _bad_frame(self, sock: str, why: str) -> None:
        """Count a refused frame; log at most one line a second (a flood must not fill the log)."""
        self.bad_frames[sock] += 1
        now = time.monotonic()
        if now - self._bad_logged >= 1.0:
            self._bad_logged = now
            self.log(f"refused a frame on {sock}.sock ({self.bad_frames[sock]} so far): {why}")

    def _send_client(self, ident: bytes, msg: dict) -> None:
        try:
            self.ctl.send_multipart([ident, P.pack(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            # EHOSTUNREACH: the client went away; EAGAIN: it reads nothing and its queue is full.
            # Either way stop generating for it (never block the loop on one client)
            if msg.get("id") and msg.get("type") == "chunk":
                self.admission.forget(ident, msg["id"])
                self.scheduler.cancel(msg["id"], ident)
            if e.errno != zmq.EHOSTUNREACH:
                self._bad_frame("ctl", f"dropped a reply to a client that does not read ({e})")

    def _with_retry(self, msg: dict) -> dict:
        """An engine error caused by a worker death says when to retry: about one worker load."""
        if msg.get("type") == "error" and msg.get("kind") == P.FAILED and (
                "retry the request" in str(msg.get("message")) or self.state == "restarting"):
            loads = [float(h.stats.get("load_s") or 0) for h in self.handles]
            msg["retry_after"] = round(max(loads + [5.0]) + 2, 1)
        return msg

    def _error_reply(self, ident: bytes, rid, kind: str, message: str, **extra) -> None:
        rid = rid if isinstance(rid, str) and len(rid) <= P.MAX_ID else None
        self._send_client(ident, P.build(P.TO_CLIENT, "error", id=rid, kind=kind, message=message, **extra))

    def _forward(self, ident: bytes, msg: dict) -> None:
        """A message of the engine to a client: bookkeeping, then sent."""
        if msg.get("type") == "error" and isinstance(msg.get("message"), str):
            msg["message"] = self.watch.explain(msg["message"])
        msg = self._with_retry(msg)
        self.admission.on_reply(ident, msg)
        self._send_client(ident, msg)

    def _ping_silent(self) -> None:
        """Every 2 s, an "alive" to the clients of non-streaming requests: a client that went
        away fails the send (ROUTER_MANDATORY) and its request is cancelled, so it does not
        hold a batch slot until max_tokens."""
        now = time.monotonic()
        if now - getattr(self, "_pinged", 0.0) < 2.0:
            return
        self._pinged = now
        for ident, rid in self.admission.silent():
            try:
                self.ctl.send_multipart([ident, P.pack({"type": "alive", "id": rid})], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    self.admission.forget(ident, rid)
                    self.scheduler.cancel(rid, ident)
                    self.log(f"request {rid[:16]}: its client went away; cancelled")

    def _expire(self) -> None:
        """Cancel and answer the requests whose deadline passed."""
        for ident, rid, timeout in self.admission.expired():
            self.scheduler.cancel(rid, ident)
            self._error_reply(ident, rid, P.TIMEOUT, f"the request did not finish within its timeout of "
                                                     f"{timeout:g} s and was cancelled; raise `timeout` or "
                                                     f"ask for fewer tokens")

    def _on_client_frames(self, frames: list) -> None:
        ident = frames[0]
        try:
            if len(frames) != 2:
                raise P.ProtocolError(f"client request of {len(frames) - 1} frames (one expected)")
            msg = P.decode(frames[1], P.TO_DAEMON)
        except P.ProtocolError as e:
            self._bad_frame("ctl", str(e))
            v = P.version_of(frames[-1])
            if v is not None and v != P.VERSION:
                self._error_reply(ident, None, "version", self._version_text(v))
            else:
                self._error_reply(ident, None, P.INVALID, f"{e}; see dsd/daemon/protocol.py")
            return
        try:
            self._on_client(ident, msg)
        except Exception as exc:   # a bug answering one request must not stop the daemon
            import traceback

            traceback.print_exc()
            self.log(f"error answering a {msg['type']!r} request: {type(exc).__name__}: {exc}")
            self._error_reply(ident, msg.get("id"), P.FAILED,
                              f"internal error answering this request ({type(exc).__name__}: {exc}); "
                              f"the daemon keeps running, see its log")

    @staticmethod
    def _version_text(v) -> str:
        return (f"client protocol v{v} but daemon v{P.VERSION}; use the dsd of the running daemon")

    def engine_send(self, ident: bytes, msg: dict) -> None:
        """Called from the engine thread."""
        if self.engine_push is None:
            self.engine_push = self.ctx.socket(zmq.PUSH)
            self.engine_push.connect("inproc://out")
        self.engine_push.send_multipart([ident, P.pack(msg)])

    def _on_client(self, ident: bytes, msg: dict) -> None:
        from dsd.daemon.requests import build_request, model_info, status

        t = msg["type"]
        if msg["v"] != P.VERSION:
            self._error_reply(ident, msg.get("id"), "version", self._version_text(msg["v"]))
        elif t == "generate":
            if self.state == "failed":
                self._error_reply(ident, msg["id"], P.FAILED, f"the daemon failed: {self.error}")
                return
            timeout = msg.get("timeout")
            if timeout is not None and timeout <= 0:
                self._error_reply(ident, msg["id"], P.INVALID, f"timeout must be > 0 seconds, got {timeout}")
                return
            req, err = build_request(self, ident, msg)
            if err:
                self._error_reply(ident, msg["id"], P.INVALID, err)
            elif not self.admission.admit(ident, msg["id"], timeout, bool(msg.get("stream"))):
                a = self.admission
                self._error_reply(ident, msg["id"], P.BUSY,
                                  f"the daemon is busy: {a.limit} requests in flight (max_batch "
                                  f"{a.max_batch} + max_queue {a.max_queue}); retry later",
                                  retry_after=a.retry_after())
            else:
                self.scheduler.submit(req)
        elif t == "cancel":
            self.admission.forget(ident, msg["id"])
            self.scheduler.cancel(msg["id"], ident)
        elif t == "status":
            self._send_client(ident, status(self))
        elif t == "model_info":
            self._send_client(ident, model_info(self))
        elif t == "hops":
            self.scheduler.inbox.put(("hops", (ident, msg.get("n", 1000))))
        elif t == "ping":
            self._send_client(ident, P.build(P.TO_CLIENT, "pong", pid=os.getpid(), state=self.state))
        elif t == "shutdown":
            self._send_client(ident, P.build(P.TO_CLIENT, "ok"))
            self.stopping = True

