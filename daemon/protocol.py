"""Every message the daemon's processes and clients exchange, in one place (msgpack, never pickle).

Sockets (ZeroMQ, ipc:// in a per-instance directory that only its user can write, see
instance_dir.py):
  ctl.sock      ROUTER in the coordinator; clients connect a DEALER (one per request/stream)
  workers.sock  ROUTER in the coordinator; each worker connects a DEALER (identity b"w<index>")

Each direction has a registry of typed schemas below (TO_DAEMON, TO_CLIENT, FROM_WORKER,
TO_WORKER): senders build messages with `build(REGISTRY, type, **fields)`, receivers turn a frame
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
Worker <-> coordinator (control only; activations move through shared memory, see shm_channel):
  worker:  hello v, index, pid                       (versioned handshake)
  coord:   assign v, plan, channel, node, cpus, ...  (what to load)
  worker:  progress index, done, total[, phase] | ready v, index, pid, stats | fatal index, message
  coord:   stats -> worker: stats index, stats
  coord:   stop
A worker that dies is noticed through its pidfd (the "dead sentinel"), not through a message.
"""
from __future__ import annotations

import json
import math
import os

import msgpack

VERSION = 1

# error kinds sent to clients
INVALID = "invalid"   # the request can never succeed as sent (bad params, too long)
FAILED = "failed"     # the daemon failed while serving it (worker died, internal error)
BUSY = "busy"         # the daemon is overloaded right now: retry later (retry_after seconds)
TIMEOUT = "timeout"   # the request's deadline passed; it was cancelled

MAX_FRAME = 64 << 20   # ZMQ_MAXMSGSIZE of the daemon's sockets (a 128k-token prompt is ~1 MB)
MAX_ID = 256           # request id length
MAX_DEPTH = 32         # nesting of maps/lists inside a message
INT64 = 2**63


class ProtocolError(ValueError):
    """A frame that is not a valid message of its socket (the text names what is wrong)."""


# -- packing ------------------------------------------------------------------------------------
def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# -- field types ----------------------------------------------------------------------------------
class Field:
    """One field: a check(value) -> error text or None, whether it must be present, and a
    description for error messages."""

    def __init__(self, check, what: str, required: bool = True, nullable: bool = False):
        self.check, self.what, self.required, self.nullable = check, what, required, nullable

    def optional(self) -> "Field":
        return Field(self.check, self.what, False, self.nullable)

    def or_none(self) -> "Field":
        return Field(self.check, self.what + " or null", self.required, True)


def _depth(x, limit: int) -> bool:
    """True if x nests no deeper than limit maps/lists."""
    stack = [(x, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, tuple, dict)):
            if d >= limit:
                return False
            items = v.values() if isinstance(v, dict) else v
            stack.extend((i, d + 1) for i in items if isinstance(i, (list, tuple, dict)))
    return True


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def Int(lo: int = -INT64, hi: int = INT64 - 1) -> Field:
    return Field(lambda v: None if _is_int(v) and lo <= v <= hi else f"must be an integer in [{lo}, {hi}]",
                 "integer")


def Str(max_len: int = MAX_FRAME, nonempty: bool = False) -> Field:
    def check(v):
        if not isinstance(v, str):
            return "must be a string"
        if nonempty and not v:
            return "must not be empty"
        if len(v) > max_len:
            return f"must be at most {max_len} characters"
        return None
    return Field(check, "string")


def OneOf(*values) -> Field:
    return Field(lambda v: None if isinstance(v, str) and v in values else
                 f"must be one of {', '.join(map(repr, values))}", "one of " + "/".join(values))


def Bool() -> Field:
    return Field(lambda v: None if isinstance(v, bool) else "must be true or false", "boolean")


def Num() -> Field:
    return Field(lambda v: None if (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
                 else "must be a finite number", "number")


def Map(depth: int = MAX_DEPTH) -> Field:
    def check(v):
        if not isinstance(v, dict) or not all(isinstance(k, (str, int)) for k in v):
            return "must be a map with string keys"
        return None if _depth(v, depth) else f"nests deeper than {depth} levels"
    return Field(check, "map")


def IntList(lo: int = -INT64, hi: int = INT64 - 1, max_len: int = 1 << 24) -> Field:
    def check(v):
        if not isinstance(v, list) or len(v) > max_len:
            return f"must be a list of at most {max_len} integers"
        if not all(_is_int(t) and lo <= t <= hi for t in v):
            return f"must hold integers in [{lo}, {hi}] only"
        return None
    return Field(check, "list of integers")


def Messages() -> Field:
    def check(v):
        if not isinstance(v, list) or not v:
            return "must be a non-empty list of {'role': ..., 'content': ...} maps"
        if len(v) > 100000:
            return "must hold at most 100000 messages"
        for i, m in enumerate(v):
            if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
                return f"item {i} must be a map with string keys"
            if not isinstance(m.get("role"), str):
                return f"item {i} needs a string 'role'"
            c = m.get("content")
            if c is not None and not isinstance(c, (str, list)):
                return f"item {i} has content of type {type(c).__name__}; use a string"
        return None if _depth(v, 8) else "nests deeper than 8 levels"
    return Field(check, "list of chat messages")


def Any_() -> Field:
    return Field(lambda v: None if _depth(v, MAX_DEPTH) else f"nests deeper than {MAX_DEPTH} levels", "value")


# -- schemas --------------------------------------------------------------------------------------
class Schema:
    def __init__(self, type_: str, fields: dict[str, Field], versioned: bool = False):
        self.type = type_
        self.fields = dict(fields)
        if versioned:
            self.fields["v"] = Int()

    def check(self, msg: dict, where: str) -> dict:
        for name, f in self.fields.items():
            if name not in msg:
                if f.required:
                    raise ProtocolError(f"{where}: {self.type!r} message lacks field {name!r} ({f.what})")
                continue
            v = msg[name]
            if v is None and f.nullable:
                continue
            err = "must not be null" if v is None else f.check(v)
            if err:
                raise ProtocolError(f"{where}: {self.type!r} field {name!r} {err} (got {_show(v)})")
        return msg


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class Registry:
    def __init__(self, name: str, *schemas: Schema):
        self.name = name
        self.schemas = {s.type: s for s in schemas}

    def check(self, msg) -> dict:
        if not isinstance(msg, dict):
            raise ProtocolError(f"{self.name}: a message must be a map, got {type(msg).__name__}")
        if not all(isinstance(k, str) for k in msg):
            raise ProtocolError(f"{self.name}: message keys must be strings")
        t = msg.get("type")
        s = self.schemas.get(t) if isinstance(t, str) else None
        if s is None:
            raise ProtocolError(f"{self.name}: unknown message type {_show(t)}; known: "
                                f"{', '.join(sorted(self.schemas))}")
        return s.check(msg, self.name)


def decode(data, registry: Registry) -> dict:
    """The checked message in one frame; ProtocolError for anything else (never another error)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{registry.name}: a frame must be bytes")
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"{registry.name}: frame of {len(data)} bytes is over {MAX_FRAME}")
    try:
        msg = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
    except Exception as e:   # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError ...
        raise ProtocolError(f"{registry.name}: undecodable frame ({type(e).__name__}: {str(e)[:80]})") from None
    return registry.check(msg)


def build(registry: Registry, type_: str, **fields) -> dict:
    """A message of registry's type_, checked as its receiver will check it (a bug in a sender
    shows up where it is made)."""
    s = registry.schemas[type_]
    msg = {"type": type_, **({"v": VERSION} if "v" in s.fields else {}), **fields}
    return s.check(msg, registry.name)


def version_of(data) -> object:
    """The "v" of a frame that failed decode(), so a client of another version hears why."""
    try:
        m = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
        return m.get("v") if isinstance(m, dict) else None
    except Exception:
        return None


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
                     "completion_tokens": Int(0).optional()}),
    Schema("error", {"id": Str(MAX_ID).optional().or_none(), "kind": Str(64), "message": Str(),
                     "retry_after": Num().optional()}),
    Schema("status", {"state": Str(64)}), Schema("model_info", {}), Schema("pong", {}),
    Schema("ok", {}), Schema("hops", {"ns": Any_()}), Schema("alive", {"id": _ID}),
)
_INDEX = Int(0, 4095)
FROM_WORKER = Registry(
    "worker message",
    Schema("hello", {"index": _INDEX, "pid": Int(1)}, True),
    Schema("progress", {"index": _INDEX, "done": Int(0), "total": Int(0),
                        "phase": OneOf("allocating", "loading").optional()}),
    Schema("ready", {"index": _INDEX, "pid": Int(1), "stats": Map()}, True),
    Schema("fatal", {"index": _INDEX, "message": Str(1 << 16)}),
    Schema("stats", {"index": _INDEX, "stats": Map()}),
)
TO_WORKER = Registry(
    "coordinator message",
    Schema("assign", {"plan": Map(), "node": Int(0), "cpus": IntList(0), "threads": Int(0),
                      "pages": Str(16), "channel": Str(255, nonempty=True),
                      "channel_path": Str(4096).or_none(), "context": Int(1),
                      "coordinator_pid": Int(1), "spin_us": Num(),
                      "node_cpus": IntList(0).or_none()}, True),
    Schema("stats", {}), Schema("stop", {}),
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
