"""A tiny cached numba function used to check that a host-warmed cache serves the guest.

Warm on the host with the guest's settings (same source path, same cache dir):
    NUMBA_CACHE_DIR=/var/cache/dsd-vm/numba NUMBA_CPU_NAME=generic \
        python -c "import tests.numa_vm.guest_numba as g; g.run()"     # from the repo root
"""
import numba
import numpy as np


@numba.njit(cache=True)
def add_one(x):
    # x: float64[n]; returns sum(x + 1)
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i] + 1.0
    return s


def run() -> float:
    return float(add_one(np.arange(8, dtype=np.float64)))
