"""Synthetic GGUF models for benchmarks: DeepSeek-shaped files of any depth with random weights.

Quantizing gigabytes of random floats is slow, so quantized tensors are written as random bytes
per block with their fp16 scale fields overwritten by controlled values (`random_blocks`): every
block decodes to finite numbers of a chosen typical magnitude, at disk speed.  The file is
streamed: header + metadata + tensor table first, then each tensor's bytes in order, so a 4 GiB
model never sits in memory.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# type -> (byte offsets of fp16 "d"-like scales, byte offsets of fp16 "min"-like fields,
#          typical |value| of one element per unit of d given random quant bits)
_SCALE_FIELDS = {
    Q.Q4_0: ([0], [], 4.6), Q.Q4_1: ([0], [2], 4.6), Q.Q5_0: ([0], [], 9.2), Q.Q5_1: ([0], [2], 9.2),
    Q.Q8_0: ([0], [], 74.0), Q.Q2_K: ([80], [82], 14.0), Q.Q3_K: ([108], [], 44.0),
    Q.Q4_K: ([0], [2], 255.0), Q.Q5_K: ([0], [2], 500.0), Q.Q6_K: ([208], [], 1300.0),
}
# "min" fields hold a positive offset subtracted from the values; about half the mean
_MIN_RATIO = {Q.Q4_1: -7.5, Q.Q5_1: -15.5, Q.Q2_K: 1.5, Q.Q4_K: 7.5, Q.Q5_K: 15.5}


def supported_types() -> list[str]:
    return ["F32", "F16"] + [t.name for t in _SCALE_FIELDS]


def random_blocks(qtype: int, shape: tuple[int, ...], rng: np.random.Generator, std: float = 0.02) -> np.ndarray:
    """Random raw bytes for a tensor of numpy-order `shape` in `qtype`: uint8 (*shape[:-1], row_bytes).
    Element magnitudes are about `std`; scales vary +-25% per block so blocks differ."""
    qtype = Q(int(qtype))
    cols = int(shape[-1])
    outer = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if qtype in (Q.F32, Q.F16):
        a = (rng.standard_normal((outer, cols), dtype=np.float32) * std).astype(
            np.float32 if qtype == Q.F32 else np.float16)
        return a.view(np.uint8).reshape(*shape[:-1], -1)
    if qtype not in _SCALE_FIELDS:
        raise ValueError(f"synthetic weights support {', '.join(supported_types())}, not {qtype.name}")
    bs, ts = GGML_QUANT_SIZES[qtype]
    if cols % bs:
        raise ValueError(f"rows of {cols} elements cannot be stored as {qtype.name} (block {bs})")
    nb = outer * (cols // bs)
    raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    d_fields, m_fields, unit = _SCALE_FIELDS[qtype]
    d = (std / unit) * rng.uniform(0.75, 1.25, size=nb).astype(np.float32)
    for off in d_fields:
        raw[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    for off in m_fields:
        m = d * abs(_MIN_RATIO[qtype]) if qtype in (Q.Q2_K, Q.Q4_K, Q.Q5_K) else d * _MIN_RATIO[qtype]
        raw[:, off:off + 2] = m.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(*shape[:-1], (cols // bs) * ts)
