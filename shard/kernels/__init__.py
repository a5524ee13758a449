"""numba compute kernels on raw GGUF block bytes: dequantize, matvec (decode), matmul (prefill).

    from dsd.shard.kernels import QUANT_TYPES, quant_type, dequantize, matvec, matmul, row_bytes
"""
from .registry import QUANT_TYPES, QuantType, dequantize, matmul, matvec, quant_type, row_bytes  # noqa: F401
