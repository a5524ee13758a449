"""The parallel work split serves 1..64 threads (a real server's node) evenly.

Two facts make a region's balance: numba's static prange schedule (measured here in a process
with 64 numba threads: contiguous item ranges whose lengths differ by at most one), and the
number of equal items each kernel makes for the shapes that matter -- DeepSeek V3's (hidden
7168, experts 2048 wide, 8 routed + 1 shared per token, MLA latent 512 + 64, 128 heads,
vocabulary 129280).  This machine has 2 cores, so the split is checked, not timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsd.shard.kernels import attention, drivers_i8, split

_SCHEDULE_PROBE = r"""
import json, sys, numpy as np, numba
from numba import njit, prange

@njit(parallel=True)
def owner(n, out):
    for i in prange(n):
        out[i] = numba.get_thread_id()

res = {}
for t in range(1, 65):
    numba.set_num_threads(t)
    for n in json.loads(sys.argv[1]):
        out = np.empty(n, np.int64)
        owner(n, out)
        res[f"{t},{n}"] = out.tolist()
print(json.dumps(res))
"""

SIZES = [5, 63, 64, 65, 200, 576, 4099]


@pytest.fixture(scope="module")
def schedule():
    env = dict(os.environ, NUMBA_NUM_THREADS="64")
    out = subprocess.run([sys.executable, "-c", _SCHEDULE_PROBE, json.dumps(SIZES)], env=env,
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return {tuple(map(int, k.split(","))): np.asarray(v) for k, v in json.loads(out).items()}


def test_static_schedule_is_contiguous_and_even(schedule):
    for (t, n), owner in schedule.items():
        counts = np.bincount(owner, minlength=t)
        assert counts.max() - counts.min() <= 1, (t, n, counts)
        assert counts.max() == -(-n // t), (t, n)
        runs = 1 + np.count_nonzero(np.diff(owner))
        assert runs == min(n, t), (t, n, runs)  # one contiguous range per busy thread
        assert split.efficiency(n, t) == pytest.approx((n / t) / counts.max())


D, F_EXPERT, K_ROUTED, N_SHARED, KV, Q_LORA, H, VOCAB = 7168, 2048, 8, 1, 576, 1536, 128, 129280
THREADS = range(1, 65)


def test_decode_items_balance():
    """Decode: matvec rows are items; the fused MoE kernel's items are (pair, row) for gate+up
    over the 8 routed and 1 shared expert, (token, row) for down."""
    items = {"q_a": Q_LORA, "kv_a": KV, "q_b": H * 192, "wo": D, "k_b / v_b (all heads)": H * 512,
             "experts gate+up": (K_ROUTED + N_SHARED) * F_EXPERT, "experts down": D,
             "dense gate": 18432, "output head": VOCAB}
    for name, n in items.items():
        worst = min(split.efficiency(n, t) for t in THREADS)
        assert worst >= 0.9, (name, n, worst)


@pytest.mark.parametrize("T", [17, 32, 64, 256, 512])
def test_prompt_items_balance(T):
    """Prompts (8-bit kernel): items = row blocks x 16-token groups, the block shrunk by
    split.rows_per_item until every thread has several items."""
    groups = -(-T // drivers_i8.MULTI_MAX_T)
    for name, rows in {"q_a": Q_LORA, "kv_a": KV, "q_b": H * 192, "wo": D, "expert gate": F_EXPERT,
                       "expert down": D, "k_b per head": 512, "output head": VOCAB}.items():
        for t in THREADS:
            rb = split.rows_per_item(rows, groups, t)
            n = -(-rows // rb) * groups
            assert 1 <= rb <= split.MAX_ROWS_PER_ITEM
            assert split.efficiency(n, t) >= 0.85, (name, T, t, rb, n)


def test_rows_per_item_keeps_big_blocks_when_work_is_ample():
    assert split.rows_per_item(VOCAB, 32, 64) == split.MAX_ROWS_PER_ITEM
    assert split.rows_per_item(F_EXPERT, 2, 64) < split.MAX_ROWS_PER_ITEM
    assert split.rows_per_item(3, 1, 64) == 1


def test_decode_attention_split_items():
    """Decode attention: (kv head, position range) items, at least 2 per thread once the context
    has SPLIT_MIN_POSITIONS positions per item to give.  MLA caches one latent head, so a short
    context cannot feed 64 threads: what it gets is recorded here."""
    for t in THREADS:
        for L in (4096, 32768):
            ns = attention.n_splits(1, L, t)
            if t > 1:
                assert ns >= min(2 * t, L // attention.SPLIT_MIN_POSITIONS), (t, L, ns)
                assert split.efficiency(ns, t) >= 0.5, (t, L, ns)


def test_prompt_result_does_not_depend_on_the_split(monkeypatch):
    """Any row block gives the same bits (items only regroup the same per-row, per-token work)."""
    from gguf import GGMLQuantizationType as G

    from dsd.shard.kernels import matmul, registry
    from dsd.shard.synth import random_blocks

    if not registry.INT8_ACTIVATIONS:
        pytest.skip("DSD_EXACT_ACTIVATIONS is set: the 8-bit prompt kernel is off")
    rng = np.random.default_rng(3)
    raw = random_blocks(G.Q4_K, (100, 512), rng, std=0.05)
    X = rng.standard_normal((45, 512)).astype(np.float32)
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0)
    want = None
    for rb in (1, 3, 32, 100):
        monkeypatch.setattr(split, "rows_per_item", lambda *a, rb=rb, **k: rb)
        got = matmul(raw, int(G.Q4_K), X)
        if want is None:
            want = got
        assert np.array_equal(got, want), rb
