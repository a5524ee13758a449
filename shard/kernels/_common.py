"""Shared pieces of the numba kernels: fp16 conversion table and raw-byte helpers.

numba has no float16 type, so GGUF fp16 scales are read as two bytes (little endian) and
converted through a 65,536-entry float32 table (256 KiB, stays in L2). The table is passed to
kernels as an argument (not a global) so it is not frozen into every compiled function.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# F16_TABLE[h] == float32(float16 with bit pattern h), exact for every pattern incl. subnormals.
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
F16_TABLE.flags.writeable = False


@njit(cache=True, inline="always")
def f16(flat, i, tab):
    """fp16 stored little-endian at flat[i:i+2] -> float32."""
    return tab[np.int64(flat[i]) | (np.int64(flat[i + 1]) << 8)]


@intrinsic
def u32_as_f32(typingctx, v):
    """Reinterpret a uint32 bit pattern as float32 (numba has no scalar bitcast)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@njit(cache=True, inline="always")
def bf16(flat, i):
    """bf16 stored little-endian at flat[i:i+2] -> float32 (the upper half of a float32)."""
    return u32_as_f32((np.uint32(flat[i]) << np.uint32(16)) | (np.uint32(flat[i + 1]) << np.uint32(24)))


@njit(cache=True, inline="always")
def f32(flat, i):
    """float32 stored little-endian at flat[i:i+4]."""
    return u32_as_f32(np.uint32(flat[i]) | (np.uint32(flat[i + 1]) << np.uint32(8))
                      | (np.uint32(flat[i + 2]) << np.uint32(16)) | (np.uint32(flat[i + 3]) << np.uint32(24)))


@njit(cache=True, inline="always")
def s8(b):
    """uint8 -> signed value as int32 (two's complement)."""
    v = np.int32(b)
    return v - 256 if v >= 128 else v
