"""kernels.stats: the per-token kernel call / parallel-region counts and the time outside numba
kernels that `dsd bench --profile` reports."""
import numpy as np
from gguf import GGMLQuantizationType as G

from dsd.shard import bench, kernels
from dsd.shard.kernels import stats
from tests.tiny_llama import write_tiny_llama


def test_each_kernel_call_is_counted_once_with_its_time():
    raw = np.zeros((4, kernels.row_bytes(int(G.Q8_0), 64)), np.uint8)
    x = np.ones(64, np.float32)
    kernels.matvec(raw, int(G.Q8_0), x)  # load the entry point first
    stats.reset()
    stats.enabled = True
    try:
        for _ in range(3):
            kernels.matvec(raw, int(G.Q8_0), x)
    finally:
        stats.enabled = False
    name = "mv_i8_serial" if kernels.registry._int8_rows(int(G.Q8_0), 2) else "mv_serial"  # VNNI: 8-bit
    assert dict(stats.calls) == {name: 3}   # 4 rows: below the parallel threshold
    assert not stats.regions and stats.seconds[name] > 0
    kernels.matvec(raw, int(G.Q8_0), x)            # not counted while disabled
    assert stats.calls[name] == 3


def test_profile_counts_the_kernels_of_a_decode_step(tmp_path):
    """Tiny llama (2 layers, q/k/v and gate/up in one file): per layer one fused q/k/v call, the
    output projection, one fused gate/up call, the down projection, decode attention, two RMS
    norms and RoPE on q and k = 9 kernel calls; plus the embedding row, the final norm and the
    output head."""
    from dsd.shard.engine import Engine

    path = write_tiny_llama(tmp_path / "tiny.gguf", n_layers=2, qtype=G.Q8_0)
    p = bench.profile_decode(Engine(str(path), threads=1), decode_tokens=4, context=8)
    assert p["kernel_calls_per_token"] == 2 * 9 + 3, p["kernels"]
    assert p["parallel_regions_per_token"] <= p["kernel_calls_per_token"]
    assert 0 <= p["outside_fraction"] < 1
    total = p["ms_in_weight_products"] + p["ms_in_attention"] + p["ms_in_norm_rope"] + p["ms_outside_kernels"]
    assert abs(total - p["ms_per_token"]) < 1e-6 * max(1.0, p["ms_per_token"])
