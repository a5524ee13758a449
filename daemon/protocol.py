"""Every message the daemon's processes and clients exchange, in one place (msgpack, never pickle).

Sockets (ZeroMQ, ipc:// in a per-instance directory that only its user can write, see
instance_dir.py):
  ctl.sock      ROUTER in the coordinator; clients connect a DEALER (one per request/stream)
  workers.sock  ROUTER in the coordinator; each worker connects a DEALER (identity b"w<index>")

This module is the client <-> coordinator boundary; daemon/worker_protocol.py is the
coordinator <-> worker one (ZeroMQ control, shared-memory step commands, link headers), and
daemon/schema.py the typed msgpack codec both use.  Each direction has a registry of typed
schemas (TO_DAEMON, TO_CLIENT here): senders build messages with `build(REGISTRY, type, **fields)`, receivers turn a frame
into a checked dict with `decode(data, REGISTRY)`, which raises ProtocolError (naming the bad
field) for anything else: undecodable bytes, a non-map, an unknown type, a missing or mistyped
field, a value out of range.  A receiver logs a ProtocolError and answers it with an error
(clients) or drops the frame (workers.sock); no frame may stop a process.  Fields a schema
does not name are passed through unchecked (newer senders may add some).

Client -> coordinator (TO_DAEMON; every request carries "v": VERSION, checked first):
  generate   id, one of prompt (text) | messages (chat) | prompt_ids, params {sampling}, stream,
             timeout (seconds; the daemon cancels the request then, see admission.py)
  cancel id | status | model_info | ping | shutdown | hops n (transport benchmark)
Coordinator -> client (TO_CLIENT):
  chunk      id, text, finish_reason None|"stop"|"length", token_ids, prompt_tokens,
             completion_tokens   (non-streaming requests get one chunk with the whole text)
  error      id, kind "invalid"|"failed"|"version"|"busy"|"timeout", message, retry_after
  status | model_info | pong | ok | hops
  alive      id   (every 2 s to the client of a non-streaming request: ignored by clients; a
                   send that fails means the client went away and its request is cancelled)
Worker <-> coordinator: see daemon/worker_protocol.py.
"""
from __future__ import annotations

import json
import os

from dsd.daemon.schema import (INT64, MAX_DEPTH, MAX_FRAME, Any_, Bool, Field, IntList, Int, Map,  # noqa: F401
                               Messages, Num, OneOf, ProtocolError, Registry, Schema, Str, build,
                               decode, pack, unpack, version_of)

VERSION = 1

# error kinds sent to clients
INVALID = "invalid"   # the request can never succeed as sent (bad params, too long)
FAILED = "failed"     # the daemon failed while serving it (worker died, internal error)
BUSY = "busy"         # the daemon is overloaded right now: retry later (retry_after seconds)
TIMEOUT = "timeout"   # the request's deadline passed; it was cancelled

MAX_ID = 256           # request id length

_ID = Str(MAX_ID, nonempty=True)
TO_DAEMON = Registry(
    "client request",
    Schema("generate", {"id": _ID, "prompt": Str().optional(), "messages": Messages().optional(),
                        "prompt_ids": IntList(0, 2**31 - 1).optional(), "params": Map(4).optional().or_none(),
                        "stream": Bool().optional(), "timeout": Num().optional().or_none()}, True),
    Schema("cancel", {"id": _ID}, True),
    Schema("status", {}, True), Schema("model_info", {}, True), Schema("ping", {}, True),
    Schema("shutdown", {}, True), Schema("hops", {"n": Int(1, 100000).optional()}, True),
)
TO_CLIENT = Registry(
    "daemon reply",
    Schema("chunk", {"id": _ID, "text": Str(), "finish_reason": OneOf("stop", "length").or_none(),
                     "token_ids": IntList().optional(), "prompt_tokens": Int(0).optional(),
                     "completion_tokens": Int(0).optional(), "cached_tokens": Int(0).optional()}),
    Schema("error", {"id": Str(MAX_ID).optional().or_none(), "kind": Str(64), "message": Str(),
                     "retry_after": Num().optional()}),
    Schema("status", {"state": Str(64)}), Schema("model_info", {}), Schema("pong", {}),
    Schema("ok", {}), Schema("hops", {"ns": Any_()}), Schema("alive", {"id": _ID}),
)
# -- files of an instance ----------------------------------------------------------------------------
def default_socket_dir(instance: str = "default") -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return os.path.join(base, "dsd", instance)
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, f"dsd-{os.getuid()}", instance)


def resolve_socket_dir(socket_dir: str | None = None, instance: str | None = None) -> str:
    """Explicit dir, else $DSD_SOCKET_DIR, else the default for $DSD_INSTANCE (or "default")."""
    if socket_dir:
        return socket_dir
    if os.environ.get("DSD_SOCKET_DIR"):
        return os.environ["DSD_SOCKET_DIR"]
    return default_socket_dir(instance or os.environ.get("DSD_INSTANCE") or "default")


def ctl_endpoint(sock_dir: str) -> str:
    return "ipc://" + os.path.join(sock_dir, "ctl.sock")


def workers_endpoint(sock_dir: str) -> str:
    return "ipc://" + os.path.join(sock_dir, "workers.sock")


def pid_file(sock_dir: str) -> str:
    return os.path.join(sock_dir, "daemon.pid")


def info_file(sock_dir: str) -> str:
    """JSON written by the coordinator: pid, log file, shm names, started time."""
    return os.path.join(sock_dir, "daemon.json")


def read_pid(sock_dir: str) -> int | None:
    """The coordinator's pid if its pid file names a live process, else None."""
    try:
        with open(pid_file(sock_dir)) as f:
            text = f.read().strip()
        pid = int(json.loads(text)["pid"]) if text.startswith("{") else int(text)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return None
    except PermissionError:
        return pid
    return pid


def make_socket_dir(path: str) -> str:
    """Create (or check) the instance directory; see instance_dir.make_instance_dir."""
    from dsd.daemon.instance_dir import make_instance_dir

    return make_instance_dir(path)
