"""dsd stop: stop the daemon and everything it started (workers, sockets, shared memory)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

HELP = "stop the running daemon"


def add_arguments(p) -> None:
    p.add_argument("--instance", default=None)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds before killing")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def stop(sock_dir: str, instance: str, timeout: float = 15.0) -> bool:
    """Stop the daemon of sock_dir; returns False if none was running. Kills and cleans up
    after the timeout (workers listed in daemon.json, the instance's /dev/shm segments)."""
    from dsd.daemon import protocol as P
    from dsd.daemon.shm_channel import stale_segments, unlink_segment

    pid = P.read_pid(sock_dir)
    try:
        with open(P.info_file(sock_dir)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    if pid is None:
        for name in stale_segments(instance):
            unlink_segment(name)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    t_end = time.monotonic() + timeout
    while not _gone(pid) and time.monotonic() < t_end:
        time.sleep(0.05)
    if not _gone(pid):
        print(f"dsd stop: daemon pid {pid} did not exit in {timeout:.0f}s; killing it", file=sys.stderr)
        for p in [pid] + [w for w in info.get("workers", []) if w]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        for f in ("ctl.sock", "workers.sock", "daemon.pid", "daemon.json"):
            try:
                os.unlink(os.path.join(sock_dir, f))
            except FileNotFoundError:
                pass
    for w in info.get("workers", []):   # workers die with the coordinator (PDEATHSIG); make sure
        if w and not _gone(w):
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in stale_segments(instance):
        unlink_segment(name)
    return True


def run(args) -> int:
    from dsd.daemon import protocol as P
    from dsd.daemon.config import load_config

    cfg = load_config({"instance": args.instance})
    sock_dir = P.resolve_socket_dir(cfg["socket_dir"], cfg["instance"])
    if stop(sock_dir, cfg["instance"], args.timeout):
        print("dsd: daemon stopped", file=sys.stderr)
    else:
        print("dsd: no daemon was running", file=sys.stderr)
    return 0
