"""Helpers that write small GGUF files for tests and synthetic models.

Two levels:
- write_gguf / write_split_gguf: valid files through gguf.GGUFWriter (the upstream writer, so a
  file we read correctly is one llama.cpp's own tooling produced).
- pack_* / RawGGUF: byte builders for files GGUFWriter refuses to write (empty arrays, v2 headers
  with odd counts, corrupt fields), used by the malformed-file tests.

Shapes are numpy order (outermost first), like dsd.shard.gguf_file.TensorInfo.shape; the GGUF
ne list is the reverse.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

V = GGUFValueType  # short alias for tests: V.UINT8 ... V.FLOAT64


class Typed(NamedTuple):
    """A metadata value with an explicit GGUF type, e.g. Typed(7, V.UINT64) or
    Typed([1, 2], V.ARRAY, V.INT16). Plain python values get a default type (see infer_type)."""

    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


def infer_type(value: Any) -> GGUFValueType:
    """bool->BOOL, int->INT32 (INT64 if it does not fit), float->FLOAT32, str->STRING, list->ARRAY."""
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, int):
        return V.INT32 if -2**31 <= value < 2**31 else V.INT64
    if isinstance(value, float):
        return V.FLOAT32
    if isinstance(value, (str, bytes)):
        return V.STRING
    if isinstance(value, (list, tuple)):
        return V.ARRAY
    raise TypeError(f"cannot infer a GGUF type for {value!r}")


# A tensor spec: a numpy array (F32/F16/F64/I8..I64), or (raw bytes, ggml type, numpy-order shape).
TensorSpec = Any


def _tensor_args(spec: TensorSpec) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    if isinstance(spec, np.ndarray):
        return spec, None
    raw, ggml_type, shape = spec
    qtype = GGMLQuantizationType(int(ggml_type))
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    row_bytes = shape[-1] // block * block_bytes
    arr = np.frombuffer(bytes(raw), dtype=np.uint8)
    # GGUFWriter derives the element shape from a uint8 byte shape (*outer, row_bytes).
    return arr.reshape(*shape[:-1], row_bytes), qtype


def _fill_writer(w: GGUFWriter, metadata: dict[str, Any], tensors: dict[str, TensorSpec],
                 alignment: int | None) -> None:
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, val in metadata.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it from its arch argument
        t = val if isinstance(val, Typed) else Typed(val, infer_type(val))
        sub = t.sub_type
        if t.vtype == V.ARRAY and sub is None:
            sub = infer_type(t.value[0]) if len(t.value) else V.INT32
        if t.vtype == V.ARRAY and len(t.value) == 0:
            raise ValueError("GGUFWriter cannot write empty arrays; use pack_kv + RawGGUF")
        w.add_key_value(key, list(t.value) if t.vtype == V.ARRAY else t.value, t.vtype, sub)
    for name, spec in tensors.items():
        arr, qtype = _tensor_args(spec)
        w.add_tensor(name, arr, raw_dtype=qtype)


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _set_version(path: os.PathLike[str] | str, version: int) -> None:
    # v2 and v3 little-endian files have identical layouts; only the version field differs.
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", version))


def write_gguf(path: os.PathLike[str] | str, metadata: dict[str, Any], tensors: dict[str, TensorSpec],
               version: int = 3, alignment: int | None = None) -> str:
    """Write one GGUF file. metadata values: python values or Typed(...); 'general.architecture'
    defaults to 'llama'. tensors: name -> ndarray or (raw_bytes, ggml_type, shape)."""
    arch = metadata.get("general.architecture", "llama")
    arch = arch.value if isinstance(arch, Typed) else arch
    w = GGUFWriter(path, arch)
    _fill_writer(w, metadata, tensors, alignment)
    _finish(w)
    if version != 3:
        _set_version(path, version)
    return os.fspath(path)


def write_split_gguf(path: os.PathLike[str] | str, metadata: dict[str, Any], tensors: dict[str, TensorSpec],
                     max_tensors_per_part: int, version: int = 3, alignment: int | None = None,
                     small_first_shard: bool = False) -> list[str]:
    """Write a split model; `path` is the base name (e.g. dir/model.gguf -> dir/model-00001-of-0000N.gguf).
    Returns the part paths, first part first. small_first_shard: part 1 holds metadata only."""
    arch = metadata.get("general.architecture", "llama")
    arch = arch.value if isinstance(arch, Typed) else arch
    w = GGUFWriter(path, arch, split_max_tensors=max_tensors_per_part, small_first_shard=small_first_shard)
    _fill_writer(w, metadata, tensors, alignment)
    paths = [os.fspath(p) for p in w.format_shard_names(Path(path))]
    _finish(w)
    if version != 3:
        for p in paths:
            _set_version(p, version)
    return paths


# ---------------------------------------------------------------------------------------------
# Low-level byte builders (for malformed files). Every function returns bytes.

def pack_string(s: str | bytes, length: int | None = None) -> bytes:
    """u64 length + bytes; `length` overrides the written length (to forge absurd lengths)."""
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


def pack_value(vtype: int, value: Any, sub_type: int | None = None) -> bytes:
    """Encode a value without its type tag. Arrays: sub_type is the element type; for nested
    arrays pass value as a list of Typed(list, V.ARRAY, inner_type) or plain lists of ints (INT32)."""
    vtype = int(vtype)
    if vtype in _FMT:
        return struct.pack(_FMT[V(vtype)], int(value) if vtype == V.BOOL else value)
    if vtype == V.STRING:
        return pack_string(value)
    if vtype == V.ARRAY:
        if sub_type is None:
            sub_type = infer_type(value[0]) if len(value) else V.INT32
        out = struct.pack("<IQ", int(sub_type), len(value))
        for item in value:
            if int(sub_type) == V.ARRAY:
                it = item if isinstance(item, Typed) else Typed(item, V.ARRAY, None)
                out += pack_value(V.ARRAY, it.value, it.sub_type)
            else:
                out += pack_value(sub_type, item)
        return out
    raise ValueError(f"pack_value: unknown type {vtype}")


def pack_kv(key: str | bytes, vtype: int, value: Any = None, sub_type: int | None = None,
            raw_value: bytes | None = None) -> bytes:
    """key string + u32 type + value (or raw_value bytes verbatim, for corrupt values)."""
    body = raw_value if raw_value is not None else pack_value(vtype, value, sub_type)
    return pack_string(key) + struct.pack("<I", int(vtype)) + body


def pack_tensor_info(name: str | bytes, shape: Sequence[int], ggml_type: int, offset: int,
                     n_dims: int | None = None) -> bytes:
    """Tensor info with numpy-order `shape` (written reversed as ne); dims are written as int64 so
    negative values can be forged; n_dims overrides the written dimension count."""
    ne = list(reversed([int(s) for s in shape]))
    return (pack_string(name) + struct.pack("<I", len(ne) if n_dims is None else n_dims)
            + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", int(ggml_type), offset))


def tensor_nbytes(ggml_type: int, shape: Sequence[int]) -> int:
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(ggml_type))]
    n = 1
    for s in shape:
        n *= int(s)
    return n // block * block_bytes


class RawGGUF(NamedTuple):
    """The sections of a hand-built GGUF file; .data() joins them. Offsets let tests cut a file
    inside a chosen section."""

    header: bytes
    kv: bytes
    tensor_info: bytes
    padding: bytes
    tensor_data: bytes

    def data(self) -> bytes:
        return self.header + self.kv + self.tensor_info + self.padding + self.tensor_data

    @property
    def kv_start(self) -> int:
        return len(self.header)

    @property
    def ti_start(self) -> int:
        return len(self.header) + len(self.kv)

    @property
    def data_start(self) -> int:
        return self.ti_start + len(self.tensor_info) + len(self.padding)

    def write(self, path: os.PathLike[str] | str) -> str:
        Path(path).write_bytes(self.data())
        return os.fspath(path)


def raw_gguf(kvs: Sequence[bytes] = (), tensor_infos: Sequence[bytes] = (), tensor_data: bytes = b"",
             *, version: int = 3, magic: bytes = b"GGUF", n_tensors: int | None = None,
             n_kv: int | None = None, alignment: int = 32) -> RawGGUF:
    """Assemble a GGUF file from packed pieces; counts default to len(kvs)/len(tensor_infos) and
    can be forged. Padding aligns the data section to `alignment`."""
    header = magic + struct.pack("<IQQ", version, len(tensor_infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    kv = b"".join(kvs)
    ti = b"".join(tensor_infos)
    end = len(header) + len(kv) + len(ti)
    pad = b"\0" * ((-end) % alignment)
    return RawGGUF(header, kv, ti, pad, tensor_data)


def simple_raw_gguf(tensors: dict[str, tuple[int, Sequence[int]]] | None = None, *, extra_kvs: Sequence[bytes] = (),
                    version: int = 3, alignment: int = 32) -> RawGGUF:
    """A valid hand-built file: general.architecture='llama' + extra KVs and tensors given as
    name -> (ggml_type, shape), laid out back to back (aligned), data bytes 0,1,2,..."""
    tensors = tensors if tensors is not None else {"w": (int(GGMLQuantizationType.F32), (2, 8))}
    kvs = [pack_kv("general.architecture", V.STRING, "llama"), *extra_kvs]
    if alignment != 32:
        kvs.append(pack_kv("general.alignment", V.UINT32, alignment))
    infos, data = [], b""
    for name, (t, shape) in tensors.items():
        infos.append(pack_tensor_info(name, shape, t, len(data)))
        nb = tensor_nbytes(t, shape)
        data += (np.arange(nb) % 251).astype(np.uint8).tobytes()
        data += b"\0" * ((-len(data)) % alignment)
    return raw_gguf(kvs, infos, data, version=version, alignment=alignment)
