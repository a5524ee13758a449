"""Shared-memory command channel between the coordinator and one worker.

Per-layer hops cannot afford a ZeroMQ round trip (~250 us here, FACTS.md); a sequence counter in
shared memory that the other side spins on costs ~1 us.  Spinning forever would steal a core
from the computing process (this machine has two), so a waiter spins for `spin_us`, then raises
its "sleeping" flag and blocks in select() on a FIFO; a writer that sees the flag writes one
byte to wake it.  select() also watches a pidfd of the peer process, so a waiter notices the
peer's death at once (the dead sentinel), and times out every 20 ms to re-check the counter
(a backstop for the flag/counter race, which x86's store buffer makes possible in theory).

Segment layout (one segment per worker, created by the coordinator: a memfd in 2 MiB hugepages
when the pool has pages to spare, see HugeSegment, else a /dev/shm file):
  [0, 4096)          control: int64 slots on separate cache lines (see _CMD.._RLEN)
  [4096, 4096+HDR)   msgpack header of the current message (request or reply)
  [DATA, DATA+n)     arrays, each 64-byte aligned, described in the header {name: [dtype, shape, off]}
The request and the reply use the same regions in turn: the reply overwrites the request.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import select
import threading
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from dsd.daemon.protocol import pack, unpack

_CMD, _DONE, _WSLEEP, _CSLEEP, _HLEN, _STOP = 0, 8, 16, 24, 32, 40  # int64 indices (x8 bytes)
# A coordinator channel's step-abort counter: the coordinator raises it after a failed step, and a
# worker waiting on a peer link (daemon/sharded.py) gives up the step when it moves.
_ABORT = 48
HDR = 1 << 16
DATA = 4096 + HDR


_thread = threading.local()
_DTYPES: dict[str, np.dtype] = {}


def _tight_timer_slack() -> None:
    """Timed sleeps of this thread wake within ~1 us instead of Linux's default 50 us slack
    (PR_SET_TIMERSLACK is per thread); the driver's naps are a few hundred us."""
    if getattr(_thread, "slack_set", False):
        return
    _thread.slack_set = True
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)
    except Exception:
        pass


class PeerDied(Exception):
    """The process on the other side of a channel exited."""


class BadMessage(ValueError):
    """A channel message that cannot be read (a bug or corruption on the sending side)."""


class StepAborted(Exception):
    """The coordinator aborted the step this wait belonged to (another worker failed)."""


def shm_prefix(instance: str) -> str:
    return f"dsd-{os.getuid()}-{instance}-"


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # Python 3.11 registers every attach with the resource tracker, which unlinks the segment
    # when *this* process exits (FACTS.md); the coordinator owns the lifetime instead.
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    except Exception:
        pass


def _open_fifo(path: str) -> int:
    # O_RDWR: opening never blocks waiting for the other end, and the FIFO never sees EOF
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


HUGE_2M = 2 << 20


class HugeSegment:
    """A channel segment in 2 MiB hugepages: a memfd (MFD_HUGETLB) of the coordinator, which the
    workers open through /proc/<coordinator pid>/fd/<fd>.  The pages are reserved at mmap (a
    short pool fails there with ENOMEM, not later with SIGBUS) and go back to the pool when the
    last process holding the memfd exits, so a crash cannot leak them (nor a /dev/shm file)."""

    def __init__(self, name: str, fd: int, size: int, path: str, owner: bool):
        self.name, self.size, self.path, self._owner = name, size, path, owner
        self._fd = fd
        self._mm = mmap.mmap(fd, size)  # MAP_SHARED
        if not owner:
            os.close(fd)
            self._fd = -1
        self.buf = memoryview(self._mm)

    @classmethod
    def create(cls, name: str, size: int) -> "HugeSegment":
        size = -(-size // HUGE_2M) * HUGE_2M
        fd = os.memfd_create(name, os.MFD_HUGETLB | os.MFD_HUGE_2MB | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(name, fd, size, f"/proc/{os.getpid()}/fd/{fd}", True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, name: str, path: str) -> "HugeSegment":
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return cls(name, fd, os.fstat(fd).st_size, path, False)

    def close(self) -> None:
        self.buf.release()
        self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_segment(name: str, path: str | None):
    if path:
        return HugeSegment.open(name, path)
    shm = shared_memory.SharedMemory(name=name)
    _untrack(shm)
    return shm


class Channel:
    def __init__(self, shm, fifo_dir: str, side: str, spin_us: float = 300.0):
        self.shm = shm  # shared_memory.SharedMemory (/dev/shm) or HugeSegment
        self.name = shm.name
        self.path: str | None = getattr(shm, "path", None)  # how others open a HugeSegment
        self.side = side  # "coord" or "worker"
        self.ctl = np.ndarray((512,), dtype=np.int64, buffer=shm.buf, offset=0)
        self.buf = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
        self.hbuf = self.buf[4096: 4096 + HDR].data  # the header region as a memoryview
        self.capacity = shm.size - DATA
        self.to_worker = _open_fifo(os.path.join(fifo_dir, self.name + ".c2w"))
        self.to_coord = _open_fifo(os.path.join(fifo_dir, self.name + ".w2c"))
        self.spin = spin_us * 1e-6
        self.peer_fd: int | None = None   # pidfd of the peer process
        self.peer_at_send: int | None = None  # peer_fd when the pending command was sent
        self.seq = int(self.ctl[_CMD])
        self.wait_stats = [0, 0]  # [spins that succeeded, blocking waits]
        # peer links only: (ctl array of this worker's coordinator channel, value of its _ABORT
        # slot when the step began, that channel's FIFO): a wait raises StepAborted once it moves
        self.abort: tuple | None = None

    # -- lifetime ------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, data_bytes: int, fifo_dir: str, spin_us: float = 300.0,
               hugepages: bool = False) -> "Channel":
        """hugepages: put the segment in 2 MiB pages if the pool has them (else /dev/shm)."""
        try:  # a segment left by a killed daemon of the same instance
            old = shared_memory.SharedMemory(name=name)
            _untrack(old)
            old.close()
            old.unlink()
        except FileNotFoundError:
            pass
        shm = None
        if hugepages:
            try:
                shm = HugeSegment.create(name, DATA + int(data_bytes))
            except OSError:
                shm = None  # pool empty or too small: fall back to /dev/shm
        if shm is None:
            shm = shared_memory.SharedMemory(name=name, create=True, size=DATA + int(data_bytes))
            _untrack(shm)
        for suffix in (".c2w", ".w2c"):
            p = os.path.join(fifo_dir, name + suffix)
            if os.path.exists(p):
                os.unlink(p)
            os.mkfifo(p, 0o600)
        np.ndarray((512,), dtype=np.int64, buffer=shm.buf)[:] = 0
        return cls(shm, fifo_dir, "coord", spin_us)

    @classmethod
    def attach_driver(cls, name: str, fifo_dir: str, spin_us: float = 300.0,
                      path: str | None = None) -> "Channel":
        """Attach to another worker's channel on the coordinator's side (a layer owner sending
        that worker its expert share during a stage the coordinator lent it for)."""
        return cls(_open_segment(name, path), fifo_dir, "coord", spin_us)

    def resync(self) -> None:
        """Take up the sequence counter after someone else drove this channel."""
        self.seq = int(self.ctl[_CMD])

    def idle(self) -> bool:
        """Every command sent on this channel has been answered."""
        return int(self.ctl[_DONE]) >= int(self.ctl[_CMD])

    @classmethod
    def attach(cls, name: str, fifo_dir: str, spin_us: float = 300.0, path: str | None = None) -> "Channel":
        return cls(_open_segment(name, path), fifo_dir, "worker", spin_us)

    @property
    def page_kind(self) -> str:
        return "2m" if isinstance(self.shm, HugeSegment) else "shm"

    def close(self, unlink: bool = False) -> None:
        for fd in (self.to_worker, self.to_coord):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.hbuf is not None:
            self.hbuf.release()
        self.ctl = self.buf = self.hbuf = None
        try:
            self.shm.close()
        except BufferError:
            pass  # a numpy view is still alive; the mapping goes with the process
        if unlink and not isinstance(self.shm, HugeSegment):
            # not shm.unlink(): it would unregister again and upset the resource tracker
            unlink_segment(self.name)

    # -- messages ------------------------------------------------------------------------------
    def _write(self, header: dict, arrays: dict) -> None:
        # (per message ~35 us of Python went into these two methods, nine messages per token in
        # rows mode: kept to plain slicing, no per-array numpy helpers)
        desc = {}
        off = 0
        buf = self.buf
        for k, a in arrays.items():
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            n = a.nbytes
            if off + n > self.capacity:
                raise ValueError(f"shared-memory channel {self.name} holds {self.capacity} bytes; "
                                 f"message needs more (raise prefill_chunk/max_batch limits)")
            buf[DATA + off: DATA + off + n] = a.reshape(-1).view(np.uint8)
            desc[k] = [a.dtype.str, a.shape, off]
            off = (off + n + 63) & ~63
        header["_arrays"] = desc
        data = pack(header)
        del header["_arrays"]
        if len(data) > HDR:
            raise ValueError(f"channel header of {len(data)} bytes exceeds {HDR}")
        self.hbuf[:len(data)] = data
        self.ctl[_HLEN] = len(data)

    def _read(self, copy: bool) -> tuple[dict, dict]:
        try:
            return self._parse(copy)
        except BadMessage:
            raise
        except Exception as e:   # whatever bytes are there: a clear error, never a crash
            raise BadMessage(f"channel {self.name}: unreadable message ({type(e).__name__}: {str(e)[:80]})") from None

    def _parse(self, copy: bool) -> tuple[dict, dict]:
        n = int(self.ctl[_HLEN])
        if not 0 < n <= HDR:
            raise BadMessage(f"channel {self.name}: header length {n} is outside (0, {HDR}]")
        header = unpack(self.hbuf[:n])
        desc = header.pop("_arrays", None) if isinstance(header, dict) else None
        if not isinstance(header, dict) or not isinstance(desc, dict):
            raise BadMessage(f"channel {self.name}: the header is not a map with an array table")
        arrays = {}
        buf = self.buf
        for k, (dt, shape, off) in desc.items():
            dt = _DTYPES.get(dt) or _DTYPES.setdefault(dt, np.dtype(dt))
            if dt.hasobject or not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(off, int):
                raise BadMessage(f"channel {self.name}: array {k!r} has a bad dtype, shape or offset")
            end = off + math.prod(shape) * dt.itemsize
            if off < 0 or end > self.capacity:
                raise BadMessage(f"channel {self.name}: array {k!r} [{off}, {end}) lies outside the "
                                 f"{self.capacity}-byte data region")
            a = buf[DATA + off: DATA + end].view(dt).reshape(shape)
            arrays[k] = a.copy() if copy else a
        return header, arrays

    def _wait(self, slot: int, want: int, sleep_slot: int, fifo: int, deadline: float | None,
              spin: float | None = None, nap: float = 0.0) -> None:
        ctl = self.ctl
        if ctl[slot] >= want:
            self.wait_stats[0] += 1
            return
        if nap > 0:
            # expected to take a while: block (the peer kicks the FIFO when it finishes early)
            # until shortly before the expected end, then spin over it; the spin then overlaps
            # little of the peer's compute, and an on-time reply needs no cross-CPU wake-up
            _tight_timer_slack()
            fds = [fifo] + ([self.peer_fd] if self.peer_fd is not None else [])
            ctl[sleep_slot] = 1
            try:
                if ctl[slot] < want:
                    r, _, _ = select.select(fds, [], [], nap)
                    if fifo in r:
                        try:
                            os.read(fifo, 4096)
                        except BlockingIOError:
                            pass
            finally:
                ctl[sleep_slot] = 0
            if ctl[slot] >= want:
                self.wait_stats[0] += 1
                return
        t_end = time.perf_counter() + (self.spin if spin is None else spin)
        ab = self.abort
        while time.perf_counter() < t_end:
            for _ in range(64):
                if ctl[slot] >= want:
                    self.wait_stats[0] += 1
                    return
            if ab is not None and ab[0][_ABORT] != ab[1]:
                raise StepAborted(self.name)
        self.wait_stats[1] += 1
        fds = [fifo] + ([self.peer_fd] if self.peer_fd is not None else []) + ([ab[2]] if ab else [])
        ctl[sleep_slot] = 1
        try:
            while ctl[slot] < want:
                if self.side == "coord" and self.peer_fd != self.peer_at_send:
                    # the worker was replaced (died and respawned) after our command went out:
                    # nobody will answer it
                    raise PeerDied(self.name)
                r, _, _ = select.select(fds, [], [], 0.02)
                if fifo in r:
                    try:
                        os.read(fifo, 4096)
                    except BlockingIOError:
                        pass
                if self.peer_fd is not None and self.peer_fd in r and ctl[slot] < want:
                    raise PeerDied(self.name)
                if ctl[_STOP] and self.side == "worker":
                    raise PeerDied(self.name)
                if ab is not None and ab[0][_ABORT] != ab[1] and ctl[slot] < want:
                    if ab[2] in r:
                        try:
                            os.read(ab[2], 4096)
                        except BlockingIOError:
                            pass
                    raise StepAborted(self.name)
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError(f"no answer on {self.name}")
        finally:
            ctl[sleep_slot] = 0

    @staticmethod
    def _kick(fd: int) -> None:
        try:
            os.write(fd, b"x")
        except BlockingIOError:
            pass  # FIFO full: the sleeper has plenty of wake-ups queued

    # coordinator side
    def send(self, header: dict, arrays: dict) -> None:
        self.peer_at_send = self.peer_fd
        self._write(header, arrays)
        self.seq += 1
        self.ctl[_CMD] = self.seq
        if self.ctl[_WSLEEP]:
            self._kick(self.to_worker)

    def reply_wait(self, deadline: float | None = None, spin: float | None = None,
                   nap: float = 0.0) -> tuple[dict, dict]:
        """Wait for the worker's reply.  nap: seconds to sleep first without asking for a wake-up
        (the driver's estimate of the stage's duration minus a margin); spin: overrides the
        channel's spin budget after that."""
        self._wait(_DONE, self.seq, _CSLEEP, self.to_coord, deadline, spin, nap)
        return self._read(copy=True)

    def abort_step(self) -> None:
        """Tell a worker waiting on one of its peer links to give up the current step."""
        self.ctl[_ABORT] += 1
        self._kick(self.to_worker)

    def abort_count(self) -> int:
        return int(self.ctl[_ABORT])

    def stop(self) -> None:
        """Tell a worker blocked on this channel to leave its loop."""
        self.ctl[_STOP] = 1
        self._kick(self.to_worker)

    # worker side
    def wait_command(self, nap: float = 0.0, spin: float | None = None) -> tuple[dict, dict]:
        """Wait for the next command; nap/spin as in reply_wait (the coordinator's hint of how
        long this worker will be idle)."""
        self._wait(_CMD, self.seq + 1, _WSLEEP, self.to_worker, None, spin, nap)
        self.seq = int(self.ctl[_CMD])
        return self._read(copy=True)

    def reply(self, header: dict, arrays: dict) -> None:
        self._write(header, arrays)
        self.ctl[_DONE] = self.seq
        if self.ctl[_CSLEEP]:
            self._kick(self.to_coord)


def remove_fifos(fifo_dir: str, name: str) -> None:
    for suffix in (".c2w", ".w2c"):
        try:
            os.unlink(os.path.join(fifo_dir, name + suffix))
        except FileNotFoundError:
            pass


def stale_segments(instance: str) -> list[str]:
    """Names of this user's /dev/shm segments for `instance` (to clean after a crash)."""
    pre = shm_prefix(instance)
    try:
        return sorted(f for f in os.listdir("/dev/shm") if f.startswith(pre))
    except FileNotFoundError:
        return []


def unlink_segment(name: str) -> None:
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass
