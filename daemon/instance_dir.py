"""The instance directory's files and who may act on them: the daemon's lock and identity, and
the cleanup of what a crashed coordinator left.

The coordinator holds an exclusive flock on daemon.pid for its whole life and writes there its
pid, its process start time (/proc/PID/stat field 22, clock ticks since boot) and its command
line.  A daemon "is running" only while that lock is held *and* the pid file's process still
has the recorded start time and command line: after a crash the lock is gone with the
process, so a reused pid (an unrelated process) is never signalled and never blocks a new
start.  Signals go through a pidfd opened before the identity check, so the process checked is
the process signalled.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import time
from dataclasses import dataclass

from dsd.daemon import protocol as P
from dsd.errors import DsdError

FILES = ("ctl.sock", "workers.sock", "daemon.json")


def _proc_start(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _proc_cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return None


@dataclass
class Identity:
    pid: int
    start: int | None
    cmdline: str | None

    @classmethod
    def of(cls, pid: int) -> "Identity":
        return cls(pid, _proc_start(pid), _proc_cmdline(pid))

    def alive(self) -> bool:
        """The same process (pid, start time and command line) is still running."""
        return (self.start is not None and _proc_start(self.pid) == self.start
                and _proc_cmdline(self.pid) == self.cmdline)

    def signal(self, sig: int) -> bool:
        """Send sig if this is still the same process; False if it is gone or another one."""
        try:
            fd = os.pidfd_open(self.pid)
        except (ProcessLookupError, OSError):
            return False
        try:
            if not self.alive():
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)


def hold_lock(sock_dir: str, instance: str) -> int:
    """Take the instance's lock (coordinator, once): returns the fd to keep open for life, or
    raises DsdError naming the daemon that holds it."""
    path = P.pid_file(sock_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        other = running_daemon(sock_dir)
        raise DsdError(f"a dsd daemon{f' (pid {other.pid})' if other else ''} is already running "
                       f"for instance {instance!r}; stop it with `dsd stop`") from None
    me = Identity.of(os.getpid())
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": me.pid, "start": me.start, "cmdline": me.cmdline}).encode(), 0)
    return fd


def _read_identity(sock_dir: str) -> Identity | None:
    try:
        with open(P.pid_file(sock_dir)) as f:
            text = f.read()
        d = json.loads(text)
        return Identity(int(d["pid"]), int(d["start"]), str(d["cmdline"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_held(sock_dir: str) -> bool:
    """Some process holds the instance's lock (a live coordinator)."""
    try:
        fd = os.open(P.pid_file(sock_dir), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)


def running_daemon(sock_dir: str) -> Identity | None:
    """The live coordinator of sock_dir: its lock is held and its pid file's process has the
    recorded start time and command line.  None otherwise (no daemon, or stale files)."""
    if not lock_held(sock_dir):
        return None
    ident = _read_identity(sock_dir)
    return ident if ident is not None and ident.alive() else None


def legacy_daemon(sock_dir: str) -> int | None:
    """The pid of a daemon started by an older dsd (a plain pid file, no lock) if that pid is a
    live `dsd ... start` process: neither signalled nor cleaned up after, only reported."""
    try:
        with open(P.pid_file(sock_dir)) as f:
            text = f.read().strip()
        pid = int(text)
    except (OSError, ValueError):
        return None
    cmd = _proc_cmdline(pid) or ""
    return pid if "dsd" in cmd and " start" in cmd and not lock_held(sock_dir) else None


def stale_pid_file(sock_dir: str) -> bool:
    """A pid file written by a coordinator (with its identity) whose lock nobody holds: that
    daemon is gone, whatever process has its pid now."""
    return _read_identity(sock_dir) is not None and not lock_held(sock_dir)


def worker_identities(sock_dir: str) -> list[Identity]:
    """The workers daemon.json lists, with the start times recorded when they were spawned."""
    try:
        with open(P.info_file(sock_dir)) as f:
            info = json.load(f)
        starts = info.get("worker_ids") or {}
        return [Identity(int(p), int(s[0]), str(s[1])) for p, s in starts.items()]
    except (OSError, ValueError, TypeError, AttributeError, IndexError, KeyError):
        return []


def _channel_re(instance: str) -> re.Pattern:
    from dsd.daemon.shm_channel import shm_prefix

    # w<i>: a worker's command channel; l<a>to<b>: the link from worker a to worker b
    return re.compile(re.escape(shm_prefix(instance)) + r"(w\d+|l\d+to\d+)")


def clean_stale(sock_dir: str, instance: str) -> list[str]:
    """Remove what a dead coordinator of this instance left: sockets, pid and info files, the
    channels' FIFOs and /dev/shm segments (only names this instance's channels use).  Call only
    while no daemon runs (running_daemon() is None or the caller holds the lock)."""
    removed = []
    pat = _channel_re(instance)
    names = []
    if os.path.isdir(sock_dir):
        names = [f for f in FILES if os.path.lexists(os.path.join(sock_dir, f))]
        names += [f for f in os.listdir(sock_dir)
                  if f.endswith((".c2w", ".w2c")) and pat.fullmatch(f[:-4])]
    for f in names:
        try:
            os.unlink(os.path.join(sock_dir, f))
            removed.append(f)
        except FileNotFoundError:
            pass
    try:
        segs = [f for f in os.listdir("/dev/shm") if pat.fullmatch(f)]
    except FileNotFoundError:
        segs = []
    for f in segs:
        try:
            os.unlink(os.path.join("/dev/shm", f))
            removed.append("/dev/shm/" + f)
        except FileNotFoundError:
            pass
    return removed


def remove_pid_file(sock_dir: str) -> None:
    """Remove a pid file nobody holds the lock of."""
    if not lock_held(sock_dir):
        try:
            os.unlink(P.pid_file(sock_dir))
        except FileNotFoundError:
            pass


def wait_gone(ident: Identity, timeout: float) -> bool:
    t_end = time.monotonic() + timeout
    while ident.alive():
        if time.monotonic() >= t_end:
            return False
        time.sleep(0.05)
    return True


# -- who may write the directory ---------------------------------------------------------------
class UnsafeSocketDir(DsdError):
    """The socket directory (or a parent) could be replaced by another user."""


def _unsafe(path: str, why: str) -> UnsafeSocketDir:
    return UnsafeSocketDir(f"refusing socket directory {path}: {why}, so another user could replace "
                     f"dsd's sockets; remove or fix it, or point XDG_RUNTIME_DIR or DSD_SOCKET_DIR "
                     f"at a directory only you can write")


def _check_parent(p: str, st, me: int, target: str) -> None:
    import stat

    if st.st_uid not in (0, me):
        raise _unsafe(target, f"{p} belongs to uid {st.st_uid}, not you (uid {me}) or root")
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _unsafe(target, f"{p} (mode {st.st_mode & 0o7777:04o}) is writable by other users "
                              f"and not sticky")


def _check_own(p: str, st, me: int, target: str) -> None:
    import stat

    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(target, f"{p} is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(target, f"{p} is not a directory")
    if st.st_uid != me:
        raise _unsafe(target, f"{p} belongs to uid {st.st_uid}, not you (uid {me})")
    if st.st_mode & 0o022:
        raise _unsafe(target, f"{p} (mode {st.st_mode & 0o7777:04o}) is writable by other users "
                              f"(`chmod 700 {p}` once you have checked its contents)")


def _own_levels(path: str) -> int:
    """How many trailing components of path the daemon owns: the instance directory, and its
    parent when that is dsd's per-user directory (/tmp/dsd-<uid>, $XDG_RUNTIME_DIR/dsd) or one
    below the tmp directory."""
    parent = os.path.dirname(path)
    name = os.path.basename(parent)
    return 2 if name in (f"dsd-{os.getuid()}", "dsd") else 1


def check_instance_dir(path: str, own_levels: int | None = None) -> None:
    """Raise DsdError (UnsafeSocketDir) unless no other user can replace path: every component
    (as written and resolved) is owned by root or by us and, if writable by others, sticky
    (like /tmp); symbolic links too; the directory itself (and dsd's per-user parent) are ours,
    real directories and not writable by others.  A path that does not exist is fine."""
    me = os.getuid()
    path = os.path.abspath(path)
    own = _own_levels(path) if own_levels is None else own_levels
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        p = "/" + "/".join(parts[:i + 1])
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if i >= len(parts) - own:
            _check_own(p, st, me, path)
        else:
            _check_parent(p, st, me, path)
            if os.path.islink(p):   # a link we trust (root's or ours): check where it leads too
                real = os.path.realpath(p).strip("/").split("/")
                for j in range(len(real)):
                    q = "/" + "/".join(real[:j + 1])
                    _check_parent(q, os.lstat(q), me, path)


def make_instance_dir(path: str) -> str:
    """Create path (missing components with mode 0700), checking before and after with
    check_instance_dir that no other user can replace it."""
    path = os.path.abspath(path)
    check_instance_dir(path)
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        p = "/" + "/".join(parts[:i + 1])
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
    check_instance_dir(path)
    return path
