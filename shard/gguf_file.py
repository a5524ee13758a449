"""Strict, memory-mapped GGUF reader (GGUF v2 and v3, single files and split models).

Why our own reader instead of gguf.GGUFReader: the upstream reader trusts counts and lengths from
the file and builds numpy arrays from them, so a corrupt header can allocate huge arrays or fail
with an IndexError deep inside numpy. Here every length and count is checked against the bytes
that remain in the file *before* anything is allocated, and every problem becomes a
dsd.errors.GGUFError naming the file and the problem.

File layout (all little endian; v2 and v3 are identical for little-endian files, v1 used 32-bit
counts and is not supported):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 ne (innermost first), u32 ggml type,
                 u64 offset relative to the data section)
    padding to general.alignment (default 32) | data section
A string is u64 byte length + UTF-8 bytes; an array is u32 element type + u64 count + elements.

Tensor bytes are never copied: TensorInfo.raw()/array() return read-only views of an mmap of the
file. Split models (NAME-00001-of-0000N.gguf) carry split.no (0-based), split.count and
split.tensors.count; metadata comes from the first part, tensor tables are merged and each
tensor's bytes come from its own part file.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from dsd.errors import GGUFError

# The block table of every ggml type: type id -> (elements per block, bytes per block).
from gguf import GGML_QUANT_SIZES as _QUANT_SIZES
from gguf import GGMLQuantizationType as _QType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
_VALUE_ERRORS = "surrogateescape"  # see _Reader.value
MAX_ARRAY_NESTING = 8  # deeper nesting only appears in corrupt files; bounds recursion

# Metadata value type ids (gguf.GGUFValueType).
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 8, 9, 10, 11, 12

# Fixed-size scalar types: type id -> (struct format, numpy dtype, size in bytes).
_SCALARS: dict[int, tuple[str, str, int]] = {
    T_UINT8: ("<B", "<u1", 1), T_INT8: ("<b", "<i1", 1),
    T_UINT16: ("<H", "<u2", 2), T_INT16: ("<h", "<i2", 2),
    T_UINT32: ("<I", "<u4", 4), T_INT32: ("<i", "<i4", 4),
    T_FLOAT32: ("<f", "<f4", 4), T_BOOL: ("<B", "<u1", 1),
    T_UINT64: ("<Q", "<u8", 8), T_INT64: ("<q", "<i8", 8), T_FLOAT64: ("<d", "<f8", 8),
}
_SCALAR_STRUCTS = {t: struct.Struct(f) for t, (f, _, _) in _SCALARS.items()}
_VALUE_TYPE_NAMES = {
    T_UINT8: "uint8", T_INT8: "int8", T_UINT16: "uint16", T_INT16: "int16", T_UINT32: "uint32",
    T_INT32: "int32", T_FLOAT32: "float32", T_BOOL: "bool", T_STRING: "string", T_ARRAY: "array",
    T_UINT64: "uint64", T_INT64: "int64", T_FLOAT64: "float64",
}
# Smallest encoded size of one element of each type: lets us reject absurd array counts up front.
_MIN_ELEM_SIZE = {**{t: s for t, (_, _, s) in _SCALARS.items()}, T_STRING: 8, T_ARRAY: 12}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_MADV_POPULATE_READ = 22  # linux/mman.h (Python 3.11's mmap module does not name it)
_HEADER = struct.Struct("<4sIQQ")  # magic, version, n_tensors, n_kv (24 bytes)

# numpy dtypes for tensor types that array() can view without dequantizing.
_PLAIN_DTYPES = {
    int(_QType.F32): np.float32, int(_QType.F16): np.float16, int(_QType.F64): np.float64,
    int(_QType.I8): np.int8, int(_QType.I16): np.int16, int(_QType.I32): np.int32,
    int(_QType.I64): np.int64,
}

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def ggml_type_name(ggml_type: int) -> str:
    try:
        return _QType(ggml_type).name
    except ValueError:
        return f"type{ggml_type}"


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor of a GGUF file. shape is numpy order (outermost first): GGUF ne=[cols, rows]
    becomes (rows, cols). offset is the absolute byte offset in `file`."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    n_elements: int
    nbytes: int
    file: str
    offset: int
    _buf: Any = field(default=None, repr=False, compare=False)  # uint8 np view of the whole mmapped file

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def row_bytes(self) -> int:
        """Bytes of one innermost row (shape[-1] elements)."""
        block, block_bytes = _QUANT_SIZES[_QType(self.ggml_type)]
        return self.shape[-1] // block * block_bytes

    def raw(self) -> np.ndarray:
        """Read-only uint8 view (no copy), shape (*shape[:-1], row_bytes)."""
        if self._buf is None:
            raise GGUFError(f"{self.file}: tensor {self.name!r} was read after the model was closed")
        flat = self._buf[self.offset:self.offset + self.nbytes]
        return flat.reshape(*self.shape[:-1], self.row_bytes)

    def array(self) -> np.ndarray:
        """Typed read-only view (no copy) with `shape`, for F32/F16 (and F64/I8..I64) tensors."""
        dtype = _PLAIN_DTYPES.get(self.ggml_type)
        if dtype is None:
            raise GGUFError(
                f"{self.file}: tensor {self.name!r} has quantized type {self.type_name}; "
                "array() only views float/int tensors, use raw() and a dequantizing kernel")
        if self._buf is None:
            raise GGUFError(f"{self.file}: tensor {self.name!r} was read after the model was closed")
        flat = self._buf[self.offset:self.offset + self.nbytes]
        return flat.view(dtype).reshape(self.shape)


class _Reader:
    """Bounds-checked cursor over the mmapped bytes of one file."""

    __slots__ = ("mm", "pos", "size", "path")

    def __init__(self, mm: mmap.mmap, size: int, path: str):
        self.mm, self.pos, self.size, self.path = mm, 0, size, path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"file is truncated: {what} needs {n} bytes at offset {self.pos} but only "
                f"{self.size - self.pos} remain (the file is damaged or incompletely downloaded)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.mm, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.mm, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, errors: str = "strict") -> str:
        n = self.u64(f"length of {what}")
        self.need(n, f"{what} (string of {n} bytes)")
        start = self.pos
        self.pos += n
        try:
            return self.mm[start:start + n].decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at offset {start} is not valid UTF-8 ({e.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            _, _, size = _SCALARS[vtype]
            self.need(size, f"{what} ({_VALUE_TYPE_NAMES[vtype]})")
            (v,) = _SCALAR_STRUCTS[vtype].unpack_from(self.mm, self.pos)
            self.pos += size
            return bool(v) if vtype == T_BOOL else v
        if vtype == T_STRING:
            # Values (unlike keys and tensor names) tolerate invalid UTF-8: some converters wrote
            # raw byte tokens. surrogateescape keeps the bytes: s.encode("utf-8", "surrogateescape").
            return self.string(what, _VALUE_ERRORS)
        if vtype == T_ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown metadata value type {vtype} (known: 0..12)")

    def array(self, what: str, depth: int) -> list:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
        etype = self.u32(f"element type of array {what}")
        count = self.u64(f"element count of array {what}")
        if etype not in _MIN_ELEM_SIZE:
            raise self.fail(f"{what}: array has unknown element type {etype} (known: 0..12)")
        # Reject absurd counts before allocating: every element takes at least this many bytes.
        min_size = _MIN_ELEM_SIZE[etype]
        if count > (self.size - self.pos) // min_size:
            raise self.fail(
                f"{what}: array claims {count} elements of {_VALUE_TYPE_NAMES[etype]} "
                f"(at least {min_size} bytes each) but only {self.size - self.pos} bytes remain "
                "(the file is damaged or truncated)")
        if etype in _SCALARS:
            _, dt, size = _SCALARS[etype]
            start = self.pos
            self.pos += count * size
            arr = np.frombuffer(self.mm, dtype=dt, count=count, offset=start)
            if etype == T_BOOL:
                arr = arr != 0
            out = arr.tolist()
            del arr  # release the exported mmap buffer now so close() can unmap
            return out
        if etype == T_STRING:
            return self._string_list(count, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]

    def _string_list(self, count: int, what: str) -> list[str]:
        # Tight loop: token and merge lists hold ~50k-150k strings in real models.
        mm, pos, size = self.mm, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(mm, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{what}[{i}] (string of {n} bytes)")
            append(mm[pos:pos + n].decode("utf-8", _VALUE_ERRORS))
            pos += n
        self.pos = pos
        return out


class _Part:
    """One parsed GGUF file: header, metadata, tensor infos; keeps its mmap open."""

    def __init__(self, path: str):
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise GGUFError(f"{path}: file not found; check the model path") from None
        except OSError as e:
            raise GGUFError(f"{path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(f"{path}: not a regular file; give the path of a .gguf file")
            self.size = st.st_size
            if self.size < _HEADER.size:
                raise GGUFError(
                    f"{path}: file is truncated: {self.size} bytes is smaller than the "
                    f"{_HEADER.size}-byte GGUF header (damaged or incompletely downloaded)")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.buf: np.ndarray | None = None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        r = _Reader(self.mm, self.size, self.path)
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(self.mm, 0)
        r.pos = _HEADER.size
        if magic != GGUF_MAGIC:
            raise r.fail(f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
        if version not in SUPPORTED_VERSIONS:
            hint = " (GGUF v1 is obsolete; re-convert the model)" if version == 1 else ""
            if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                hint = " (this is a big-endian GGUF file; use a little-endian conversion)"
            raise r.fail(f"unsupported GGUF version {version}; dsd reads versions 2 and 3{hint}")
        self.version = version
        # Each KV takes >= 8 (key length) + 4 (type) + 1 bytes, each tensor info >= 8+4+4+8.
        if n_kv > (self.size - r.pos) // 13:
            raise r.fail(f"header claims {n_kv} metadata entries, more than the "
                         f"{self.size} byte file can hold (damaged file)")
        if n_tensors > (self.size - r.pos) // 24:
            raise r.fail(f"header claims {n_tensors} tensors, more than the "
                         f"{self.size} byte file can hold (damaged file)")

        meta: dict[str, Any] = {}
        types: dict[str, int] = {}
        for i in range(n_kv):
            key = r.string(f"key of metadata entry {i}")
            vtype = r.u32(f"value type of metadata key {key!r}")
            if key in meta:
                raise r.fail(f"duplicate metadata key {key!r}")
            meta[key] = r.value(vtype, f"metadata value {key!r}")
            types[key] = vtype
        self.metadata, self.metadata_types = meta, types

        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in meta:
            alignment = meta["general.alignment"]
            if (types["general.alignment"] not in _SCALARS or types["general.alignment"] in (T_FLOAT32, T_FLOAT64, T_BOOL)
                    or alignment <= 0 or alignment & (alignment - 1)):
                raise r.fail(f"general.alignment must be a positive power of two integer, got {alignment!r}")
        self.alignment = alignment

        raw_infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = r.string(f"name of tensor {i}")
            if name in names:
                raise r.fail(f"duplicate tensor name {name!r}")
            names.add(name)
            n_dims = r.u32(f"n_dims of tensor {name!r}")
            if n_dims == 0 or n_dims > MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1..{MAX_DIMS}")
            r.need(8 * n_dims, f"dimensions of tensor {name!r}")
            ne = struct.unpack_from(f"<{n_dims}q", self.mm, r.pos)
            r.pos += 8 * n_dims
            ggml_type = r.u32(f"type of tensor {name!r}")
            offset = r.u64(f"data offset of tensor {name!r}")
            raw_infos.append((name, ne, ggml_type, offset))
        data_start = -(-r.pos // alignment) * alignment
        self.data_start = data_start

        tensors: list[TensorInfo] = []
        for name, ne, ggml_type, rel in raw_infos:
            tensors.append(self._check_tensor(r, name, ne, ggml_type, rel))
        # Overlap check: sort by offset, each tensor must end at or before the next one starts.
        by_off = sorted(tensors, key=lambda t: t.offset)
        for a, b in zip(by_off, by_off[1:]):
            if a.offset + a.nbytes > b.offset:
                raise r.fail(f"tensors {a.name!r} and {b.name!r} overlap (bytes {a.offset}..{a.offset + a.nbytes} "
                             f"and {b.offset}..{b.offset + b.nbytes})")
        self.tensors = tensors

    def _check_tensor(self, r: _Reader, name: str, ne: tuple[int, ...], ggml_type: int, rel: int) -> TensorInfo:
        for d in ne:
            if d <= 0:
                raise r.fail(f"tensor {name!r} has dimension {d} in ne={list(ne)}; dimensions must be positive")
        try:
            qtype = _QType(ggml_type)
            block, block_bytes = _QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {name!r} has unknown tensor type {ggml_type} "
                         "(not in gguf.GGML_QUANT_SIZES; update the gguf package or re-quantize)") from None
        if ne[0] % block:
            raise r.fail(f"tensor {name!r} of type {qtype.name} has rows of {ne[0]} elements, "
                         f"not a multiple of the block size {block}")
        n_elements = 1
        for d in ne:
            n_elements *= d
        nbytes = n_elements // block * block_bytes  # python ints: no overflow
        if rel % self.alignment:
            raise r.fail(f"tensor {name!r} data offset {rel} is not a multiple of the alignment {self.alignment}")
        offset = self.data_start + rel
        if offset + nbytes > self.size:
            raise r.fail(f"tensor {name!r} ({nbytes} bytes at offset {offset}) extends past the end of "
                         f"the {self.size} byte file (truncated or damaged file)")
        return TensorInfo(name=name, ggml_type=ggml_type, shape=tuple(reversed(ne)), n_elements=n_elements,
                          nbytes=nbytes, file=self.path, offset=offset, _buf=None)

    def attach(self) -> None:
        """Create the uint8 view of the mmap that TensorInfo views slice (after parsing succeeded)."""
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        self.tensors = [TensorInfo(t.name, t.ggml_type, t.shape, t.n_elements, t.nbytes, t.file, t.offset, self.buf)
                        for t in self.tensors]

    def close(self) -> None:
        # Detach the TensorInfos first: they hold the uint8 view, which pins the mapping.
        for t in getattr(self, "tensors", ()):
            object.__setattr__(t, "_buf", None)
        self.buf = None
        mm = getattr(self, "mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Views handed out by raw()/array() still reference the mapping; it is unmapped
                # when the last of them is garbage collected.
                pass
            self.mm = None


class GGUFModel:
    """A parsed GGUF model (one file or all parts of a split model)."""

    def __init__(self, parts: list[_Part]):
        first = parts[0]
        self._parts = parts
        self.path: str = first.path
        self.paths: list[str] = [p.path for p in parts]
        self.version: int = first.version
        self.metadata: dict[str, Any] = first.metadata
        self.metadata_types: dict[str, int] = first.metadata_types  # key -> GGUF value type id
        self.alignment: int = first.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for p in parts:
            p.attach()
            for t in p.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{p.path}: tensor {t.name!r} also appears in {self.tensors[t.name].file} "
                                    "(duplicate tensor across split parts)")
                self.tensors[t.name] = t

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(f"{self.path}: metadata key 'general.architecture' is missing or not a string")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def tensor_nbytes_total(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def metadata_summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[ggml_type_name(t.ggml_type)] = counts.get(ggml_type_name(t.ggml_type), 0) + 1
        types = ", ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        name = self.metadata.get("general.name", os.path.basename(self.path))
        arch = self.metadata.get("general.architecture", "?")
        parts = f", {len(self.paths)} parts" if len(self.paths) > 1 else ""
        return (f"{name} ({arch}, GGUF v{self.version}{parts}): {len(self.tensors)} tensors, "
                f"{self.tensor_nbytes_total() / 2**20:.1f} MiB [{types}], {len(self.metadata)} metadata keys")

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def prefault(self) -> bool:
        """Map every page of the files now (MADV_POPULATE_READ, Linux >= 5.14; else only ask for
        read-ahead) instead of on first touch.  Products read weights straight from this mmap in
        one process: faulting 4 KiB pages inside the first prompt made it 2.4x slower than the
        second (a 4.8 GB DeepSeek-shaped file: 28.7 vs 70 tok/s; populating took 0.4 s when the
        file was in the page cache).  -> whether the pages are mapped now."""
        ok = True
        for p in self._parts:
            try:
                p.mm.madvise(_MADV_POPULATE_READ)
            except OSError:  # older kernel (EINVAL) or a read error: fall back to read-ahead
                ok = False
                try:
                    p.mm.madvise(mmap.MADV_WILLNEED)
                except OSError:
                    pass
        return ok

    def close(self) -> None:
        for p in self._parts:
            p.close()

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFModel({self.path!r}, {len(self.tensors)} tensors)"


def _split_int(part: _Part, key: str) -> int | None:
    v = part.metadata.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise GGUFError(f"{part.path}: metadata {key!r} must be an integer, got {v!r}")
    return v


def open_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Parse a GGUF file (or the first part of a split model) and mmap its tensor data read-only."""
    path = os.fspath(path)
    first = _Part(path)
    parts = [first]
    try:
        count = _split_int(first, "split.count")
        if count is not None and count > 1:
            no = _split_int(first, "split.no")
            if no not in (None, 0):
                raise GGUFError(f"{path}: this is part {no + 1} of a split model; give the first part "
                                "(NAME-00001-of-NNNNN.gguf) instead")
            m = _SPLIT_RE.match(os.path.basename(path))
            if m is None:
                raise GGUFError(f"{path}: metadata says split.count={count} but the file name does not look "
                                "like NAME-00001-of-NNNNN.gguf, so the other parts cannot be found; "
                                "restore the original part file names")
            if int(m["count"]) != count:
                raise GGUFError(f"{path}: file name says {int(m['count'])} parts but metadata split.count={count}")
            folder = os.path.dirname(path)
            for i in range(1, count):
                ppath = os.path.join(folder, f"{m['prefix']}-{i + 1:05d}-of-{count:05d}.gguf")
                if not os.path.exists(ppath):
                    raise GGUFError(f"{path}: split part {i + 1} of {count} is missing: {ppath} not found; "
                                    "download all parts into the same directory")
                part = _Part(ppath)
                parts.append(part)
                pno, pcount = _split_int(part, "split.no"), _split_int(part, "split.count")
                if pno != i or pcount != count:
                    raise GGUFError(f"{ppath}: expected split.no={i} and split.count={count}, found "
                                    f"split.no={pno} split.count={pcount} (parts from different models?)")
            total = _split_int(first, "split.tensors.count")
            have = sum(len(p.tensors) for p in parts)
            if total is not None and total != have:
                raise GGUFError(f"{path}: split.tensors.count={total} but the {count} parts hold {have} tensors")
        return GGUFModel(parts)
    except BaseException:
        for p in parts:
            p.close()
        raise
