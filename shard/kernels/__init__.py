"""numba compute kernels on raw GGUF block bytes: dequantize, matvec (decode), matmul (prefill).

    from dsd.shard.kernels import QUANT_TYPES, quant_type, dequantize, matvec, matmul, row_bytes
"""
from . import registry  # noqa: F401
from .registry import (FUSED_MAX_T, QUANT_TYPES, batch_invariant, exact_activations, QuantType, dequantize, matmul, matvec, matvec_gather,  # noqa: F401
                       quant_type, row_bytes, split_unit, prepare_matvec, stack_view, warm_up, matvec_offsets, has_simd_rows,
                       experts_gate_up, experts_down_sum)


def batch_invariant_mode() -> bool:
    """True while products are batch-invariant (DSD_DETERMINISTIC=1 or batch_invariant()):
    model code then also runs attention and routed experts the way one decode step does."""
    return registry.BATCH_INVARIANT
