"""Per-kernel call counts and time, for `dsd bench --profile` (off unless `enabled`).

Every numba kernel the engine calls goes through one of three funnels that record here when
enabled: registry._entry (weight products, dequantization), attention.decode (decode
attention) and ops (RMS norm, RoPE).  The time is wall time around the compiled call, so
"outside kernels" = step time - sum(seconds) is measured, not estimated: Python glue, numpy
temporaries, routing, sampling.  A call whose driver is a numba parallel region (name contains
"parallel" or "split") counts as one parallel region.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

enabled = False
calls: Counter = Counter()
regions: Counter = Counter()
seconds: defaultdict = defaultdict(float)


def reset() -> None:
    calls.clear()
    regions.clear()
    seconds.clear()


def timed(name: str, fn, *args):
    """fn(*args), its wall time recorded under `name`."""
    t0 = time.perf_counter()
    r = fn(*args)
    seconds[name] += time.perf_counter() - t0
    calls[name] += 1
    if "parallel" in name or "split" in name:
        regions[name] += 1
    return r


def snapshot(per: int = 1) -> dict:
    """{kernel name: (calls, parallel regions, seconds)} divided by `per` (e.g. decoded tokens)."""
    return {k: (calls[k] / per, regions[k] / per, seconds[k] / per) for k in calls}
