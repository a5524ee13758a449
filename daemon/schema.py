"""The daemon's typed msgpack codec: field types, schemas and registries of message types.

Senders build messages with `build(REGISTRY, type, **fields)` (checked as the receiver will
check them), receivers turn a frame into a checked dict with `decode(data, REGISTRY)`, which
raises ProtocolError (naming the bad field) for anything else: undecodable bytes, a non-map, an
unknown type, a missing or mistyped field, a value out of range.  Fields a schema does not name
pass through unchecked (newer senders may add some).  Never pickle.
"""
from __future__ import annotations

import math

import msgpack

MAX_FRAME = 64 << 20   # ZMQ_MAXMSGSIZE of the daemon's sockets (a 128k-token prompt is ~1 MB)
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
    from dsd.daemon.protocol import VERSION

    msg = {"type": type_, **({"v": VERSION} if "v" in s.fields else {}), **fields}
    return s.check(msg, registry.name)


def version_of(data) -> object:
    """The "v" of a frame that failed decode(), so a client of another version hears why."""
    try:
        m = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
        return m.get("v") if isinstance(m, dict) else None
    except Exception:
        return None


