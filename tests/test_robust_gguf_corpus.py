"""Issue 17 point 7: GGUF files damaged in the header, metadata or tensor table.

A corpus of 300 deterministic mutations (seeded RNG) of two tiny models (Mixtral-style llama
with experts, DeepSeek2 with MLA and grouped routing): byte flips, integer metadata values,
metadata value types, tensor dims / types / offsets, header counts, truncation.  Each mutated
file, loaded the way `dsd generate` loads it (open_gguf -> build_model -> tokenizer) and run for
one forward pass, must either fail with one of dsd's named errors (DsdError) and a one-line
message, or give logits identical to the original's.  Zero tracebacks, zero silently different
results.

Not mutated: the bytes of weight data, and the *values* of metadata that are themselves model
content (float hyperparameters such as the norm epsilon or RoPE base, expert_used_count,
the gating function, expert_weights_norm/scale, the expert group counts): a different value there is
another valid model, which no check can tell from the original (see shard/gguf_check.py).
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from dsd.errors import DsdError
from tests.tiny_moe import write_tiny_deepseek2, write_tiny_mixtral

N_PER_MODEL = 150
TOKENS = [1, 5, 9, 3]
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FLOAT_TYPES = (6, 12)
# integer/bool keys whose value is model content, not structure (see the module docstring)
_SEMANTIC = ("expert_used_count", "expert_gating_func", "expert_weights_norm", "expert_weights_scale",
             "expert_group_count", "expert_group_used_count")


def _regions(data: bytes):
    """Spans of the file's fields: -> (kvs, tensors, end of tensor table).  kvs: (key, key span,
    type offset, value type, value span); tensors: (name, dims offset, n_dims, type offset,
    offset field offset)."""
    pos = 24
    _, _, n_t, n_kv = struct.unpack_from("<4sIQQ", data, 0)

    def string(p):
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8:p + 8 + n].decode(), p + 8 + n

    def value(p, t):
        if t in _SCALAR_SIZE:
            return p + _SCALAR_SIZE[t]
        if t == 8:
            return string(p)[1]
        et, n = struct.unpack_from("<IQ", data, p)
        p += 12
        for _ in range(n):
            p = value(p, et)
        return p

    kvs = []
    for _ in range(n_kv):
        k0 = pos
        key, pos = string(pos)
        (t,) = struct.unpack_from("<I", data, pos)
        v0 = pos + 4
        pos = value(v0, t)
        kvs.append((key, (k0, v0 - 4), v0 - 4, t, (v0, pos)))
    tensors = []
    for _ in range(n_t):
        name, pos = string(pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        tensors.append((name, pos + 4, nd, pos + 4 + 8 * nd, pos + 8 + 8 * nd))
        pos += 4 + 8 * nd + 4 + 8
    return kvs, tensors, pos


def _is_semantic(key: str, t: int) -> bool:
    return t in _FLOAT_TYPES or any(key.endswith(s) for s in _SEMANTIC) or \
        (t == 9 and key.startswith("tokenizer.ggml.scores"))


def _mutations(data: bytes, seed: int, n: int):
    """n deterministic (description, mutated bytes) pairs."""
    rng = np.random.default_rng(seed)
    kvs, tensors, end = _regions(data)
    protected = [span for key, _, _, t, span in kvs if _is_semantic(key, t)]
    flippable = [i for i in range(end) if not any(a <= i < b for a, b in protected)]
    int_kvs = [kv for kv in kvs if kv[3] in _SCALAR_SIZE and kv[3] not in _FLOAT_TYPES
               and not _is_semantic(kv[0], kv[3])]
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 7: "<B", 10: "<Q", 11: "<q"}
    kinds = ["flip", "flip", "int", "vtype", "dim", "swapdims", "ttype", "offset", "header", "truncate"]
    out = []
    for i in range(n):
        b = bytearray(data)
        kind = kinds[i % len(kinds)]
        if kind == "flip":
            p = int(rng.choice(flippable))
            b[p] ^= int(rng.integers(1, 256))
            desc = f"flip byte {p}"
        elif kind == "int":
            key, _, _, t, (v0, v1) = int_kvs[int(rng.integers(len(int_kvs)))]
            (v,) = struct.unpack_from(fmt[t], b, v0)
            bits = 8 * (v1 - v0)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if t in (1, 3, 5, 11) else (0, (1 << bits) - 1)
            cands = [0, 1, v - 1, v + 1, 2 * v, v // 2, hi, int(rng.integers(0, min(hi, 1 << 20) + 1))]
            nv = min(max(int(rng.choice(cands)), lo), hi)
            struct.pack_into(fmt[t], b, v0, nv)
            desc = f"{key} {v} -> {nv}"
        elif kind == "vtype":
            key, _, tpos, t, _ = kvs[int(rng.integers(len(kvs)))]
            nt = int(rng.choice([x for x in range(14) if x != t]))
            struct.pack_into("<I", b, tpos, nt)
            desc = f"value type of {key} {t} -> {nt}"
        elif kind in ("dim", "swapdims"):
            name, d0, nd, _, _ = tensors[int(rng.integers(len(tensors)))]
            dims = list(struct.unpack_from(f"<{nd}q", b, d0))
            if kind == "swapdims" and nd > 1:
                j = int(rng.integers(nd - 1))
                dims[j], dims[j + 1] = dims[j + 1], dims[j]
            else:
                j = int(rng.integers(nd))
                dims[j] = int(rng.choice([0, 1, dims[j] - 1, dims[j] + 1, 2 * dims[j], dims[j] // 2, -1, 1 << 40]))
            struct.pack_into(f"<{nd}q", b, d0, *dims)
            desc = f"{kind} {name} -> {dims}"
        elif kind == "ttype":
            name, _, _, tp, _ = tensors[int(rng.integers(len(tensors)))]
            nt = int(rng.choice([0, 1, 2, 8, 12, 14, 16, 24, 26, 28, 30, 31, 39, 1000]))
            struct.pack_into("<I", b, tp, nt)
            desc = f"type of {name} -> {nt}"
        elif kind == "offset":
            name, _, _, _, op = tensors[int(rng.integers(len(tensors)))]
            (o,) = struct.unpack_from("<Q", b, op)
            other = tensors[int(rng.integers(len(tensors)))][4]
            no = int(rng.choice([0, o + 32, max(o - 32, 0), o + 1, struct.unpack_from("<Q", b, other)[0], 1 << 50]))
            struct.pack_into("<Q", b, op, no)
            desc = f"offset of {name} {o} -> {no}"
        elif kind == "header":
            field = int(rng.integers(3))
            off, f = [(4, "<I"), (8, "<Q"), (16, "<Q")][field]
            (v,) = struct.unpack_from(f, b, off)
            nv = int(rng.choice([0, 1, v - 1, v + 1, 2 * v, 3, (1 << 32) - 1]))
            struct.pack_into(f, b, off, nv)
            desc = f"header field {off}: {v} -> {nv}"
        else:
            cut = int(rng.integers(0, len(data)))
            b = b[:cut]
            desc = f"truncate to {cut}"
        if bytes(b) != data:
            out.append((desc, bytes(b)))
    return out


def _run(path: str):
    """Load as `dsd generate` does (file mmap weights) and run one forward -> logits."""
    from dsd.shard.batch import Batch
    from dsd.shard.gguf_file import open_gguf
    from dsd.shard.models import build_model
    from dsd.shard.tokenizer import Tokenizer

    with open_gguf(path) as g:
        model = build_model(g)
        Tokenizer.from_metadata(g.metadata)
        cache = model.new_cache()
        logits = model.forward(Batch.single(cache, TOKENS, all_logits=True))
        return np.array(logits)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek2"])
def test_mutated_gguf_corpus(tmp_path, arch):
    if arch == "mixtral":
        src = write_tiny_mixtral(tmp_path / "orig.gguf", n_layers=2, D=32, H=2, Hkv=1, F=16, E=4, k=2, vocab=24)
    else:
        src = write_tiny_deepseek2(tmp_path / "orig.gguf", n_layers=2, D=32, H=2, kv_lora=16, nope=16,
                                   rope=8, vdim=16, F=16, ffn=32, E=8, k=2, vocab=24, groups=2,
                                   groups_used=1, q_lora=8)
    data = open(src, "rb").read()
    want = _run(src)
    path = str(tmp_path / "m.gguf")
    errors, same, bad = 0, 0, []
    for desc, mutated in _mutations(data, seed=17 if arch == "mixtral" else 71, n=N_PER_MODEL):
        with open(path, "wb") as f:
            f.write(mutated)
        try:
            got = _run(path)
        except DsdError as e:
            msg = str(e)
            if "\n" in msg or not msg:
                bad.append(f"{desc}: multi-line or empty message {msg!r}")
            errors += 1
            continue
        except Exception as e:  # noqa: BLE001 - what the corpus hunts for
            bad.append(f"{desc}: {type(e).__name__}: {e}")
            continue
        if got.shape == want.shape and np.array_equal(got, want):
            same += 1
        else:
            bad.append(f"{desc}: loads but gives different logits")
        os.unlink(path)
    assert not bad, f"{len(bad)} of {errors + same + len(bad)} mutations:\n" + "\n".join(bad)
    assert errors + same >= N_PER_MODEL - 10 and errors > N_PER_MODEL // 2
