"""The dense SwiGLU feed-forward, shared by the dense layers of every architecture and by the
shared experts of MoE layers (shard/moe.py); in a module of its own so the MoE code and the model
files do not import each other."""
from __future__ import annotations

import numpy as np

from dsd.shard import ops
from dsd.shard.weights import FusedLinear


class DenseFFN:
    """SwiGLU feed-forward: x [T, D] -> W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, gate, up, down):
        self.gate, self.up, self.down = gate, up, down
        self.gate_up = FusedLinear([gate, up])  # decode: both in one kernel call

    def __call__(self, x: np.ndarray) -> np.ndarray:
        g, u = self.gate_up(x)
        return self.down(ops.silu_mul(g, u))
