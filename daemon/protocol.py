"""Every message the daemon's processes and clients exchange, in one place (msgpack, never pickle).

Sockets (ZeroMQ, ipc:// in a per-instance directory of mode 0700):
  ctl.sock      ROUTER in the coordinator; clients connect a DEALER (one per request/stream)
  workers.sock  ROUTER in the coordinator; each worker connects a DEALER (identity b"w<index>")

Client -> coordinator (one msgpack map per frame, always with "v": VERSION):
  {"type": "generate", "id": str, "prompt": str} | {"messages": [...]} | {"prompt_ids": [...]},
     "params": {sampling}, "stream": bool}
  {"type": "cancel", "id": str}      {"type": "status"}      {"type": "model_info"}
  {"type": "ping"}                   {"type": "shutdown"}
Coordinator -> client:
  {"type": "chunk", "id", "text", "finish_reason": None|"stop"|"length", "prompt_tokens",
     "completion_tokens"}            (non-streaming requests get one chunk with the whole text)
  {"type": "error", "id", "kind": "invalid"|"failed"|"version", "message"}
  {"type": "status"|"model_info"|"pong"|"ok", ...}

Worker <-> coordinator (control only; activations move through shared memory, see shm_channel):
  worker:  {"type": "hello", "v", "index", "pid"}                         (versioned handshake)
  coord:   {"type": "assign", "v", "plan": {...}, "channel": name, ...}   (what to load)
  worker:  {"type": "progress", "index", "done", "total"}
  worker:  {"type": "ready", "v", "index", "pid", "stats"} | {"type": "fatal", "index", "message"}
  coord:   {"type": "stats"} -> worker: {"type": "stats", "index", "stats"}
  coord:   {"type": "stop"}
A worker that dies is noticed through its pidfd (the "dead sentinel"), not through a message.
"""
from __future__ import annotations

import os

import msgpack

VERSION = 1

# error kinds sent to clients
INVALID = "invalid"   # the request can never succeed as sent (bad params, too long)
FAILED = "failed"     # the daemon failed while serving it (worker died, internal error)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def default_socket_dir(instance: str = "default") -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return os.path.join(base, "dsd", instance)
    return os.path.join(f"/tmp/dsd-{os.getuid()}", instance)


def resolve_socket_dir(socket_dir: str | None = None, instance: str | None = None) -> str:
    """Explicit dir, else $DSD_SOCKET_DIR, else the default for $DSD_INSTANCE (or "default")."""
    if socket_dir:
        return socket_dir
    if os.environ.get("DSD_SOCKET_DIR"):
        return os.environ["DSD_SOCKET_DIR"]
    return default_socket_dir(instance or os.environ.get("DSD_INSTANCE") or "default")


def make_socket_dir(path: str) -> str:
    """Create the directory (and its parent) with mode 0700; refuse one owned by someone else."""
    from dsd.errors import DsdError

    parent = os.path.dirname(path)
    for d in (parent, path):
        os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise DsdError(f"socket directory {path} belongs to uid {st.st_uid}; use another "
                       f"--instance or set DSD_SOCKET_DIR")
    os.chmod(path, 0o700)
    return path


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
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid
