"""The two host figures the wait rule needs, measured at start-up (DESIGN.md, "How a process
waits for its peer"):

  w  wake-up latency: a process blocked in select() on a FIFO, woken by another process writing
     one byte, runs again w after the write (the scheduler's cross-CPU wake-up);
  o  timer overshoot: a timed select() of 200 us returns o late.

Each is the median of a few hundred trials between this process and a forked child (~30 ms in
all).  spin_us = w is the classic spin-then-block bound (a spin of w is never worse than twice
the better choice); the nap margin covers o with a factor of two.
"""
from __future__ import annotations

import os
import select
import statistics
import struct
import time

TRIALS = 200
NAP_S = 200e-6


def _wakeups(n: int) -> list[float]:
    """n wake-up latencies (s): the child blocks on FIFO a, we write a timestamp, it answers
    with its own wake time on FIFO b."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: wait, report when we woke
        try:
            os.close(a_w)
            os.close(b_r)
            for _ in range(n):
                select.select([a_r], [], [])
                os.read(a_r, 8)
                os.write(b_w, struct.pack("d", time.perf_counter()))
        finally:
            os._exit(0)
    os.close(a_r)
    os.close(b_w)
    out = []
    try:
        for _ in range(n):
            time.sleep(200e-6)   # let the child block (a spinning reader would measure nothing)
            t = time.perf_counter()
            os.write(a_w, b"x")
            woke = struct.unpack("d", os.read(b_r, 8))[0]
            out.append(woke - t)
    finally:
        os.close(a_w)
        os.close(b_r)
        os.waitpid(pid, 0)
    return out


def _overshoots(n: int) -> list[float]:
    r, w = os.pipe()
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            select.select([r], [], [], NAP_S)
            out.append(time.perf_counter() - t - NAP_S)
    finally:
        os.close(r)
        os.close(w)
    return out


def measure(trials: int = TRIALS) -> dict:
    """{"wake_us": w, "overshoot_us": o, "spin_us": the spin budget, "nap_margin_us": ...}."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)   # 1 us timer slack, as the channels' waiters
    except Exception:
        pass
    w = statistics.median(_wakeups(trials)) * 1e6
    o = max(0.0, statistics.median(_overshoots(trials // 2)) * 1e6)
    return {"wake_us": round(w, 1), "overshoot_us": round(o, 1),
            # clamped to [10, 200] us: a wild figure (a host under load while we measure) must
            # not make every waiter spin for milliseconds or never
            "spin_us": round(min(200.0, max(10.0, w)), 1),
            "nap_margin_us": round(min(200.0, max(20.0, 2 * o)), 1)}
